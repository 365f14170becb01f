// Mask kernels of nmsparse._topk_cpu: top-k of every group of 4 (2:4, 1:4, 3:4) written as float32
// 1.0 / 0.0 straight into a parametrization's 0/1 buffer, and SR-STE's decay added in place to a
// gradient. Plain C++ over GCC/Clang vector extensions, compiled with -march=native (AVX-512: 16
// floats a vector, AVX2: 8, NEON/SSE: 4), built once per machine and loaded with ctypes in
// milliseconds: a fresh process needs no JIT and no numba start-up (~1 s) before its first masks.
//
// Tie rule (nmsparse.mask): rank_i = #{j: s_j > s_i} + #{j < i: s_j == s_i}; kept when rank_i < k.
// NaN scores rank lowest (treated as -inf).
#include <cmath>
#include <cstdint>
#include <cstring>
#include <limits>

#if defined(__AVX512F__)
#define LANES 16
#elif defined(__AVX__)
#define LANES 8
#else
#define LANES 4
#endif

typedef float f32v __attribute__((vector_size(LANES * 4)));
typedef int32_t i32v __attribute__((vector_size(LANES * 4)));

static const uint32_t ONE_BITS = 0x3F800000u;  // 1.0f

static inline f32v load(const float* p) { f32v v; std::memcpy(&v, p, sizeof v); return v; }
static inline void store(uint32_t* p, i32v v) { std::memcpy(p, &v, sizeof v); }
static inline i32v splat(int32_t s) { i32v v; for (int i = 0; i < LANES; ++i) v[i] = s; return v; }

// |v| where asked, NaN -> -inf
static inline f32v clean(f32v v, bool absolute) {
  i32v bits = (i32v)v;
  if (absolute) bits &= splat(0x7FFFFFFF);
  i32v is_num = (i32v)((f32v)bits == (f32v)bits);
  return (f32v)((bits & is_num) | (splat((int32_t)0xFF800000) & ~is_num));
}

static inline float clean1(float v, bool absolute) {
  v = absolute ? std::fabs(v) : v;
  return v == v ? v : -std::numeric_limits<float>::infinity();
}

// kept (as 1.0f bits) or 0 for a count of "beats" c: vector comparisons give -1 per true lane
static inline i32v keep_bits(i32v beats_negative, int k) {
  return (i32v)((-beats_negative) < splat(k)) & splat((int32_t)ONE_BITS);
}

static inline void rank4_1(float a0, float a1, float a2, float a3, int k, uint32_t* o, int64_t stride) {
  int c01 = a1 > a0, c02 = a2 > a0, c03 = a3 > a0, c12 = a2 > a1, c13 = a3 > a1, c23 = a3 > a2;
  o[0] = (c01 + c02 + c03 < k) ? ONE_BITS : 0u;
  o[stride] = (1 - c01 + c12 + c13 < k) ? ONE_BITS : 0u;
  o[2 * stride] = (2 - c02 - c12 + c23 < k) ? ONE_BITS : 0u;
  o[3 * stride] = (3 - c03 - c13 - c23 < k) ? ONE_BITS : 0u;
}

// Groups of 4 consecutive floats. Each vector holds LANES / 4 whole groups; lane i is compared with
// the same group's other lanes through three in-group rotations (r = 1, 2, 3): lane i meets lane
// 4 * (i / 4) + (i + r) % 4, which comes earlier in the group exactly when i % 4 >= 4 - r.
#if LANES == 16
#define ROT(v, r) __builtin_shufflevector(v, v, (0+r)%4, (1+r)%4, (2+r)%4, (3+r)%4, 4+(0+r)%4, 4+(1+r)%4, \
  4+(2+r)%4, 4+(3+r)%4, 8+(0+r)%4, 8+(1+r)%4, 8+(2+r)%4, 8+(3+r)%4, 12+(0+r)%4, 12+(1+r)%4, 12+(2+r)%4, 12+(3+r)%4)
#elif LANES == 8
#define ROT(v, r) __builtin_shufflevector(v, v, (0+r)%4, (1+r)%4, (2+r)%4, (3+r)%4, 4+(0+r)%4, 4+(1+r)%4, \
  4+(2+r)%4, 4+(3+r)%4)
#else
#define ROT(v, r) __builtin_shufflevector(v, v, (0+r)%4, (1+r)%4, (2+r)%4, (3+r)%4)
#endif

static void flat4(const float* src, uint32_t* dst, int64_t groups, int k, bool absolute, int threads) {
  i32v lane;
  for (int i = 0; i < LANES; ++i) lane[i] = i % 4;
  const i32v earlier1 = lane >= splat(3), earlier2 = lane >= splat(2), earlier3 = lane >= splat(1);
  const int64_t n = 4 * groups, full = n / LANES * LANES;
#pragma omp parallel for num_threads(threads) schedule(static)
  for (int64_t b = 0; b < full; b += LANES) {
    f32v v = clean(load(src + b), absolute);
    f32v r1 = ROT(v, 1), r2 = ROT(v, 2), r3 = ROT(v, 3);
    i32v beats = (r1 > v) | ((r1 == v) & earlier1);
    i32v total = beats + ((r2 > v) | ((r2 == v) & earlier2)) + ((r3 > v) | ((r3 == v) & earlier3));
    store(dst + b, keep_bits(total, k));
  }
  for (int64_t b = full; b < n; b += 4)
    rank4_1(clean1(src[b], absolute), clean1(src[b + 1], absolute), clean1(src[b + 2], absolute),
            clean1(src[b + 3], absolute), k, dst + b, 1);
}

// Groups strided `inner` apart: the weight as [outer, width, inner], groups of 4 along width (conv
// input channels: inner = kh * kw). A block of 4 channels is four contiguous rows of `inner`; the
// comparisons run down the rows, LANES positions at a time.
static void strided4(const float* src, uint32_t* dst, int64_t outer, int64_t width, int64_t inner, int k,
                     bool absolute, int threads) {
  const int64_t blocks = width / 4;
#pragma omp parallel for num_threads(threads) schedule(static)
  for (int64_t ob = 0; ob < outer * blocks; ++ob) {
    const int64_t base = (ob / blocks) * width * inner + (ob % blocks) * 4 * inner;
    const float* s = src + base;
    uint32_t* d = dst + base;
    int64_t p = 0;
    for (; p + LANES <= inner; p += LANES) {
      f32v a0 = clean(load(s + p), absolute), a1 = clean(load(s + p + inner), absolute);
      f32v a2 = clean(load(s + p + 2 * inner), absolute), a3 = clean(load(s + p + 3 * inner), absolute);
      i32v c01 = a1 > a0, c02 = a2 > a0, c03 = a3 > a0, c12 = a2 > a1, c13 = a3 > a1, c23 = a3 > a2;
      // comparisons are -1 where true: "beats" counts are their negations (j < i ties: not (a_i > a_j))
      store(d + p, keep_bits(c01 + c02 + c03, k));
      store(d + p + inner, keep_bits(splat(-1) - c01 + c12 + c13, k));
      store(d + p + 2 * inner, keep_bits(splat(-2) - c02 - c12 + c23, k));
      store(d + p + 3 * inner, keep_bits(splat(-3) - c03 - c13 - c23, k));
    }
    for (; p < inner; ++p)
      rank4_1(clean1(s[p], absolute), clean1(s[p + inner], absolute), clean1(s[p + 2 * inner], absolute),
              clean1(s[p + 3 * inner], absolute), k, d + p, inner);
  }
}

extern "C" {

// float32 0/1 mask (written as bits through uint32) of the top k of every group of 4
void nms_mask_topk4(const float* src, uint32_t* dst, int64_t outer, int64_t width, int64_t inner, int k,
                    int absolute, int threads) {
  if (inner == 1)
    flat4(src, dst, outer * width / 4, k, absolute != 0, threads);
  else
    strided4(src, dst, outer, width, inner, k, absolute != 0, threads);
}

// g += decay * (w - w * keep), in place (keep: the 0/1 mask)
void nms_mask_decay_into(float* g, const float* w, const float* keep, float decay, int64_t n, int threads) {
#pragma omp parallel for num_threads(threads) schedule(static)
  for (int64_t i = 0; i < n; ++i) g[i] += decay * (w[i] - w[i] * keep[i]);
}

int nms_mask_lanes() { return LANES; }
}
