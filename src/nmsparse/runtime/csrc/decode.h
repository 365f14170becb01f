// One decode step of a Llama-architecture decoder, batch 1, in one call (nmsparse/runtime/decode.py
// binds the plan): embedding row, per layer RMSNorm -> q/k/v products -> rotary embedding -> the
// token's keys and values written into the KV cache -> attention over the cache -> output product ->
// residual -> RMSNorm -> gate/up products -> SiLU(gate) * up -> down product -> residual; final RMSNorm
// and the LM head. Every product is a bound batch-1 plan of nms_gemv (float32 or quantized, sparse
// or dense), so the step costs the weights' bytes plus microseconds, where the Hugging Face module
// tree costs ~20 ms of Python per token on a 135M model. Included by kernels.cpp after nms_gemv's
// kernels; the math follows transformers' LlamaForCausalLM (RMSNorm in float32, rotate-half rotary
// embedding from the model's own cos/sin tables, softmax(q k^T * scale) v with grouped KV heads).

// The decode plan (int64 slots; pointers as integers; see decode.py DecodePlan):
//   [0] layers L  [1] hidden d  [2] heads H  [3] kv heads KH  [4] head dim hd  [5] vocab
//   [6] intermediate I  [7] cache capacity  [8] embedding [vocab, d]  [9] final norm weight
//   [10] LM head gemv plan  [11] LM head threads  [12] cos table [capacity, hd]  [13] sin table
//   [14] scratch floats (3d + 2*KH*hd + 2*H*hd + 2I + capacity*H)
//   then per layer, 20 slots from 16 + 20*l:
//     input norm w, post norm w, (plan, threads) for q, k, v, o, gate, up, down, K cache ([KH, hd, capacity]:
//     keys transposed), V cache ([KH, capacity, hd]); capacity a multiple of 16
// eps and the attention scale come as float arguments.

namespace {

inline float dot(const float* q, const float* k, i64 hd);

inline void rmsnorm(const float* x, const float* w, i64 d, float eps, float* y) {
  const float ss = dot(x, x, d);
  const float r = 1.f / std::sqrt(ss / (float)d + eps);
  for (i64 i = 0; i < d; ++i) y[i] = w[i] * (x[i] * r);
}

// rotate-half rotary embedding of `heads` vectors of hd at one position (cos/sin rows of hd)
inline void rope(float* v, i64 heads, i64 hd, const float* cs, const float* sn) {
  const i64 half = hd / 2;
  for (i64 h = 0; h < heads; ++h) {
    float* x = v + h * hd;
    for (i64 i = 0; i < half; ++i) {
      const float a = x[i], b = x[i + half];
      x[i] = a * cs[i] - b * sn[i];
      x[i + half] = b * cs[i + half] + a * sn[i + half];
    }
  }
}

inline void gemv_plan(i64 plan, i64 threads, const float* x, float* out) {
  nms_gemv((const i64*)plan, x, out, (int)threads);
}

// e^x of VW floats (Cephes' expf: range reduction by ln 2, a degree-5 polynomial, the exponent put
// back in the float's bits; within 2 ulp of expf over [-87, 88], clamped outside): the SiLU of a wide
// MLP calls it for every intermediate channel of every layer, where a scalar expf per channel showed in
// the step's time (docs/benchmarks.md).
inline vf vexp(vf x) {
  x = x < vsplat(88.f) ? x : vsplat(88.f);  // n <= 127: 2^n stays finite
  x = x > vsplat(-87.3365447504f) ? x : vsplat(-87.3365447504f);
  const vf magic = vsplat(12582912.f);  // 1.5 * 2^23: adding it rounds to an integer
  const vf n = (x * vsplat(1.44269504088896341f) + magic) - magic;
  vf r = x - n * vsplat(0.693359375f);
  r = r - n * vsplat(-2.12194440e-4f);
  vf p = vsplat(1.9875691500e-4f);
  p = p * r + vsplat(1.3981999507e-3f);
  p = p * r + vsplat(8.3334519073e-3f);
  p = p * r + vsplat(4.1665795894e-2f);
  p = p * r + vsplat(1.6666665459e-1f);
  p = p * r + vsplat(5.0000001201e-1f);
  const vf y = p * r * r + r + vsplat(1.f);
  const vi e = (__builtin_convertvector(n, vi) + 127) << 23;
  return y * (vf)e;
}

// g[i] = silu(g[i]) * u[i]
inline void silu_mul(float* g, const float* u, i64 count) {
  i64 i = 0;
  for (; i + VW <= count; i += VW) {
    const vf gv = vload(g + i);
    vstore(g + i, gv / (vsplat(1.f) + vexp(vf{} - gv)) * vload(u + i));
  }
  for (; i < count; ++i) g[i] = g[i] / (1.f + std::exp(-g[i])) * u[i];
}

// q . k over hd floats
inline float dot(const float* q, const float* k, i64 hd) {
  i64 i = 0;
  float s = 0.f;
  if (hd >= VW) {
    vf a = vf{}, b = vf{};
    for (; i + 2 * VW <= hd; i += 2 * VW) a = vload(q + i) * vload(k + i) + a, b = vload(q + i + VW) * vload(k + i + VW) + b;
    for (; i + VW <= hd; i += VW) a = vload(q + i) * vload(k + i) + a;
    s = vsum(a + b);
  }
  for (; i < hd; ++i) s += q[i] * k[i];
  return s;
}

// o += w * v over hd floats
inline void axpy(float w, const float* v, float* o, i64 hd) {
  i64 i = 0;
  const vf wv = vsplat(w);
  for (; i + VW <= hd; i += VW) vstore(o + i, wv * vload(v + i) + vload(o + i));
  for (; i < hd; ++i) o[i] += w * v[i];
}

// Scores s[t] = (q . K[:, t]) * scale of one head for t < len rounded up to whole vectors (the lanes past
// len read keys not yet written, and are ignored); K transposed ([hd, cap], cap a multiple of VW, so a
// whole vector never leaves the row). Four vectors of positions at a time: every key element read once
// per head with a vector load, no horizontal sums.
inline void head_scores(const float* q, const float* Kt, i64 hd, i64 cap, i64 len, float scale, float* s) {
  i64 t = 0;
  for (; t + 4 * VW <= len; t += 4 * VW) {
    vf a0 = vf{}, a1 = vf{}, a2 = vf{}, a3 = vf{};
    for (i64 i = 0; i < hd; ++i) {
      const vf qi = vsplat(q[i]);
      const float* k = Kt + i * cap + t;
      a0 = qi * vload(k) + a0, a1 = qi * vload(k + VW) + a1, a2 = qi * vload(k + 2 * VW) + a2;
      a3 = qi * vload(k + 3 * VW) + a3;
    }
    const vf sc = vsplat(scale);
    vstore(s + t, a0 * sc), vstore(s + t + VW, a1 * sc), vstore(s + t + 2 * VW, a2 * sc), vstore(s + t + 3 * VW, a3 * sc);
  }
  for (; t < len; t += VW) {
    vf a = vf{};
    for (i64 i = 0; i < hd; ++i) a = vsplat(q[i]) * vload(Kt + i * cap + t) + a;
    vstore(s + t, a * vsplat(scale));
  }
}

// s[0 .. len) = exp(s - max s) / sum (softmax in place)
inline void softmax(float* s, i64 len) {
  float mx = -INFINITY;
  for (i64 t = 0; t < len; ++t) mx = std::max(mx, s[t]);
  i64 t = 0;
  vf acc = vf{};
  for (; t + VW <= len; t += VW) {
    const vf e = vexp(vload(s + t) - vsplat(mx));
    vstore(s + t, e), acc = acc + e;
  }
  float sum = vsum(acc);
  for (; t < len; ++t) sum += (s[t] = std::exp(s[t] - mx));
  const float inv = 1.f / sum;
  for (t = 0; t < len; ++t) s[t] *= inv;
}

// o[0 .. NV*VW) = sum over t < len of p[t] * V[t] (V rows of hd = NV*VW floats), the output in registers
template <int NV>
inline void weighted_rows(const float* p, const float* V, i64 len, float* o) {
  vf a[NV], b[NV];
  for (int v = 0; v < NV; ++v) a[v] = vf{}, b[v] = vf{};
  i64 t = 0;
  for (; t + 2 <= len; t += 2) {
    const vf p0 = vsplat(p[t]), p1 = vsplat(p[t + 1]);
    const float* r = V + t * NV * VW;
#pragma GCC unroll 16
    for (int v = 0; v < NV; ++v) a[v] = p0 * vload(r + v * VW) + a[v], b[v] = p1 * vload(r + (NV + v) * VW) + b[v];
  }
  if (t < len) {
    const vf p0 = vsplat(p[t]);
#pragma GCC unroll 16
    for (int v = 0; v < NV; ++v) a[v] = p0 * vload(V + t * NV * VW + v * VW) + a[v];
  }
  for (int v = 0; v < NV; ++v) vstore(o + v * VW, a[v] + b[v]);
}

// softmax(q . K[:, t] * scale over t <= pos) . V for every head; K: [KH, hd, cap] (transposed), V: [KH, cap, hd]
void attend(const float* q, const float* K, const float* V, i64 H, i64 KH, i64 hd, i64 cap, i64 pos, float scale,
            float* scores, float* out, int threads) {
  const i64 per = H / KH, len = pos + 1;
#pragma omp parallel for num_threads(threads) schedule(static) if (len * H * hd > 32768)
  for (i64 h = 0; h < H; ++h) {
    const float* Vh = V + (h / per) * cap * hd;
    float* s = scores + h * cap;
    head_scores(q + h * hd, K + (h / per) * hd * cap, hd, cap, len, scale, s);
    softmax(s, len);
    float* o = out + h * hd;
    switch (hd % VW ? 0 : hd / VW) {
      case 1: weighted_rows<1>(s, Vh, len, o); break;
      case 2: weighted_rows<2>(s, Vh, len, o); break;
      case 4: weighted_rows<4>(s, Vh, len, o); break;
      case 8: weighted_rows<8>(s, Vh, len, o); break;
      case 16: weighted_rows<16>(s, Vh, len, o); break;
      default:
        for (i64 i = 0; i < hd; ++i) o[i] = 0.f;
        for (i64 t = 0; t < len; ++t) axpy(s[t], Vh + t * hd, o, hd);
    }
  }
}

}  // namespace

// Seconds of a step by part, added to prof[0 .. 4) when prof is not null: the decoder layers' products,
// the LM head, attention (with the rotary embedding and the cache writes), and the rest (norms, SiLU,
// residual adds, the embedding row).
struct StepClock {
  double* prof;
  double last = 0.;
  explicit StepClock(double* p) : prof(p) {
    if (prof) last = omp_get_wtime();
  }
  void lap(int part) {
    if (!prof) return;
    const double now = omp_get_wtime();
    prof[part] += now - last;
    last = now;
  }
};
enum { PRODUCTS = 0, HEAD = 1, ATTENTION = 2, REST = 3 };

// logits[vocab] of token `token` at position `pos` (< capacity); the step's keys and values are
// written into the caches at `pos`. prof: null, or 4 doubles the step adds its time by part to.
extern "C" void nms_llama_step(const i64* p, i64 token, i64 pos, float eps, float scale, float* logits, int threads,
                               double* prof) {
  StepClock clock(prof);
  const i64 L = p[0], d = p[1], H = p[2], KH = p[3], hd = p[4], I = p[6], cap = p[7];
  const float* emb = (const float*)p[8];
  const float* cosr = (const float*)p[12] + pos * hd;
  const float* sinr = (const float*)p[13] + pos * hd;
  float* h = (float*)p[14];
  float* xn = h + d;
  float* tmp = xn + d;
  float* kv = tmp + d;  // the token's k then v, KH*hd each
  float* q = kv + 2 * KH * hd;
  float* att = q + H * hd;
  float* g = att + H * hd;
  float* u = g + I;
  float* scores = u + I;
  std::memcpy(h, emb + token * d, d * sizeof(float));
  for (i64 l = 0; l < L; ++l) {
    const i64* s = p + 16 + 20 * l;
    float* K = (float*)s[16];
    float* V = (float*)s[17];
    rmsnorm(h, (const float*)s[0], d, eps, xn);
    clock.lap(REST);
    gemv_plan(s[2], s[3], xn, q);
    gemv_plan(s[4], s[5], xn, kv);
    gemv_plan(s[6], s[7], xn, kv + KH * hd);
    clock.lap(PRODUCTS);
    rope(q, H, hd, cosr, sinr);
    rope(kv, KH, hd, cosr, sinr);
    for (i64 j = 0; j < KH; ++j) {
      for (i64 i = 0; i < hd; ++i) K[(j * hd + i) * cap + pos] = kv[j * hd + i];
      std::memcpy(V + j * cap * hd + pos * hd, kv + (KH + j) * hd, hd * sizeof(float));
    }
    attend(q, K, V, H, KH, hd, cap, pos, scale, scores, att, threads);
    clock.lap(ATTENTION);
    gemv_plan(s[8], s[9], att, tmp);
    clock.lap(PRODUCTS);
    for (i64 i = 0; i < d; ++i) h[i] += tmp[i];
    rmsnorm(h, (const float*)s[1], d, eps, xn);
    clock.lap(REST);
    gemv_plan(s[10], s[11], xn, g);
    gemv_plan(s[12], s[13], xn, u);
    clock.lap(PRODUCTS);
    silu_mul(g, u, I);
    clock.lap(REST);
    gemv_plan(s[14], s[15], g, tmp);
    clock.lap(PRODUCTS);
    for (i64 i = 0; i < d; ++i) h[i] += tmp[i];
  }
  rmsnorm(h, (const float*)p[9], d, eps, xn);
  clock.lap(REST);
  gemv_plan(p[10], p[11], xn, logits);
  clock.lap(HEAD);
}
