// CPU kernels of nmsparse's sparse runtime: 1xN block and n:m products, float32.
//
// One source for every CPU. The products are written once over a vector type of the GNU vector
// extensions (`vf`, VW floats wide, supported by GCC and Clang alike), so the same micro-kernels
// compile to AVX-512 (VW 16), AVX2 + FMA (VW 8), NEON (VW 4) or SSE2 (VW 4) code depending on
// the -march the library is built with (nmsparse/runtime/_native.py builds it for the machine it
// runs on). Only three operations are ISA-specific, each behind one small inline function with a
// portable fallback: masked loads/stores of a vector's first lanes (`vload_n`, `vstore_n`), the
// two-vector variable permute of the batch-1 n:m kernel (`select2`) and the gather of its generic
// path (`gather`); plus a register transpose (AVX-512 / AVX2) of linear inputs.
//
// Called through ctypes with raw buffers; no PyTorch headers, so the build takes seconds.
//
// Conventions (see nmsparse/runtime/formats.py):
//   xt[c * ldx + b]   input, column c of the weight's GEMM matrix, batch item b (b contiguous)
//   out[o * ldo + b]  output row o, batch item b
// 1xN blocks: block row r keeps `kept` columns cols[r*kept + k] (ascending, then padding);
//   vals[(r*kept + k)*block + t] is the weight of output r*block + t at that column (padded entries
//   carry zero values). kstart[r*(chunks+1) + c] is the first k of block row r whose column lies in
//   chunk c (columns c*cc .. c*cc+cc-1); kstart[r*(chunks+1) + chunks] = kept.
// n:m, chunk-major: the columns are cut into chunks of cc = jc/n*m columns; row o keeps jc values
//   per chunk (J in all; the last chunk keeps count = J - c*jc <= jc): value j of row o in chunk c
//   is vals[c*rows*jc + o*count + j], in column c*cc + (j/n)*m + code, the code a `bits`-wide field
//   at bit j*bits of the row's ceil(count*bits/8) code bytes (see nm_val_off / nm_code_off).
//   Chunk-major order makes the batched kernel's weight reads one sequential stream while the
//   chunk's input rows stay in L1 for all rows.

#include <algorithm>
#include <cmath>
#include <cstdint>
#include <cstdlib>
#include <cstring>
#include <omp.h>
#if defined(__AVX512F__) || defined(__AVX2__) || defined(__SSE2__)
#include <immintrin.h>
#elif defined(__aarch64__) || defined(__ARM_NEON)
#include <arm_neon.h>
#endif

typedef int64_t i64;

namespace {

// ---------------------------------------------------------------- the vector type
#if defined(__AVX512F__)
constexpr int VW = 16, REGS = 32;
#define NMS_ISA "avx512"
#elif defined(__AVX2__) && defined(__FMA__)
constexpr int VW = 8, REGS = 16;
#define NMS_ISA "avx2"
#elif defined(__aarch64__) || defined(__ARM_NEON)
constexpr int VW = 4, REGS = 32;
#define NMS_ISA "neon"
#else
constexpr int VW = 4, REGS = 16;
#define NMS_ISA "generic"
#endif

typedef float vf __attribute__((vector_size(VW * 4)));
typedef uint32_t vu __attribute__((vector_size(VW * 4)));
typedef int32_t vi __attribute__((vector_size(VW * 4)));

inline vf vload(const float* p) {
  vf v;
  std::memcpy(&v, p, sizeof v);
  return v;
}
inline void vstore(float* p, vf v) { std::memcpy(p, &v, sizeof v); }

// ---------------------------------------------------------------- weight scales: float16
// The quantized layouts store each weight scale as IEEE binary16 bits (the grids' scales are float16
// values, nmsparse/quantgrid.py): half the bytes of float32, read as float where used.
inline float half_to_float(uint16_t h) {
#if defined(__F16C__)
  return _cvtsh_ss(h);
#elif defined(__aarch64__)
  __fp16 v;
  std::memcpy(&v, &h, 2);
  return (float)v;
#else
  const uint32_t sign = (uint32_t)(h & 0x8000) << 16, exp = (h >> 10) & 0x1F, man = h & 0x3FF;
  uint32_t bits;
  if (exp == 0x1F) {
    bits = sign | 0x7F800000u | (man << 13);  // inf / nan
  } else if (exp != 0) {
    bits = sign | ((exp + 112) << 23) | (man << 13);  // normal: rebias 15 -> 127
  } else {  // zero or subnormal: man * 2^-24, exact in float32
    float f = (float)man * 5.9604644775390625e-8f;
    std::memcpy(&bits, &f, 4);
    bits |= sign;
  }
  float out;
  std::memcpy(&out, &bits, 4);
  return out;
#endif
}
// A weight scale; converts to float wherever a float is wanted (sc[i] * x).
struct h16 {
  uint16_t bits;
  operator float() const { return half_to_float(bits); }
};
static_assert(sizeof(h16) == 2, "h16 is the two bytes of a float16");
// VW consecutive weight scales as floats.
inline vf vload_scales(const h16* p) {
#if defined(__AVX512F__)
  return _mm512_cvtph_ps(_mm256_loadu_si256((const __m256i*)p));
#elif defined(__AVX2__) && defined(__F16C__)
  return _mm256_cvtph_ps(_mm_loadu_si128((const __m128i*)p));
#elif defined(__aarch64__)
  float16x4_t h;
  std::memcpy(&h, p, 8);
  return vcvt_f32_f16(h);
#else
  vf v;
  for (int i = 0; i < VW; ++i) v[i] = p[i];
  return v;
#endif
}
// The ISA's broadcast: GCC compiles `vf{} + s` with a scalar add of +0.0 before the broadcast (it may
// not fold 0 + s, signed zeros) and a lane-fill loop into insert chains, in the innermost loops.
inline vf vsplat(float s) {
#if defined(__AVX512F__)
  return _mm512_set1_ps(s);
#elif defined(__AVX2__)
  return _mm256_set1_ps(s);
#elif defined(__aarch64__) || defined(__ARM_NEON)
  return vdupq_n_f32(s);
#elif defined(__SSE2__)
  return _mm_set1_ps(s);
#else
  vf v;
  for (int i = 0; i < VW; ++i) v[i] = s;
  return v;
#endif
}
inline vu lane_ids() {
  vu v;
  for (int i = 0; i < VW; ++i) v[i] = (uint32_t)i;
  return v;
}
inline vf vrelu(vf v) { return (vf)((vi)v & (v > vf{})); }
inline float vsum(vf v) {
  float s = 0.f;
  for (int i = 0; i < VW; ++i) s += v[i];
  return s;
}

// The first n lanes (0 <= n <= VW) of p; the other lanes zero. Only tails of a batch use these.
inline vf vload_n(const float* p, i64 n) {
  if (n >= VW) return vload(p);
#if defined(__AVX512F__)
  return _mm512_maskz_loadu_ps((__mmask16)((1u << n) - 1), p);
#elif defined(__AVX2__)
  return _mm256_maskload_ps(p, (__m256i)(lane_ids() < (uint32_t)n));
#else
  vf v = {};
  std::memcpy(&v, p, n * sizeof(float));
  return v;
#endif
}
inline void vstore_n(float* p, vf v, i64 n) {
  if (n >= VW) return vstore(p, v);
#if defined(__AVX512F__)
  _mm512_mask_storeu_ps(p, (__mmask16)((1u << n) - 1), v);
#else
  std::memcpy(p, &v, n * sizeof(float));
#endif
}

// r[i] = (idx[i] < VW ? lo : hi)[idx[i] % VW] for idx[i] < 2*VW: the inputs of VW kept values drawn
// from a window of 2*VW consecutive columns (2:4, 4:8, 1:2, 8:16).
inline vf select2(vf lo, vf hi, vu idx) {
#if defined(__AVX512F__)
  return _mm512_permutex2var_ps(lo, (__m512i)idx, hi);
#elif defined(__AVX2__)
  const __m256 a = _mm256_permutevar8x32_ps(lo, (__m256i)idx), b = _mm256_permutevar8x32_ps(hi, (__m256i)idx);
  return _mm256_blendv_ps(a, b, (__m256)(idx << 28));  // lane bit 3 -> sign bit selects hi
#elif defined(__GNUC__) && !defined(__clang__)
  return __builtin_shuffle(lo, hi, (vi)idx);
#else
  vf r;
  for (int i = 0; i < VW; ++i) r[i] = idx[i] < (uint32_t)VW ? lo[idx[i]] : hi[idx[i] - VW];
  return r;
#endif
}

// r[i] = p[idx[i]]
inline vf gather(const float* p, vu idx) {
#if defined(__AVX512F__)
  return _mm512_i32gather_ps((__m512i)idx, p, 4);
#else
  vf r;
  for (int i = 0; i < VW; ++i) r[i] = p[idx[i]];
  return r;
#endif
}

inline void prefetch(const float* p) { __builtin_prefetch(p, 0, 3); }

// Threads of the parallel regions of the current call, set by each entry point from its `threads`
// argument and passed to every region as num_threads(...). Never omp_set_num_threads: that sets the
// calling thread's default for every later region of the process, and PyTorch and MKL share the
// OpenMP runtime, so one single-threaded sparse product left every dense operator of the model on
// one thread (docs/benchmarks.md has the decode step it slowed).
thread_local int call_threads = 1;

// ---------------------------------------------------------------- n:m layout helpers
// Start of row o's values / code bytes in chunk c of an n:m layout (the last chunk may be narrower).
inline i64 nm_val_off(i64 c, i64 o, i64 rows, i64 jc, i64 count) { return c * rows * jc + o * count; }
inline i64 nm_code_off(i64 c, i64 o, i64 rows, i64 jc, i64 count, int bits) {
  return c * rows * ((jc * bits + 7) / 8) + o * ((count * bits + 7) / 8);
}

inline int decode_one(const uint8_t* row, i64 j, int bits) {
  const i64 bit = j * bits;
  return (row[bit >> 3] >> (bit & 7)) & ((1 << bits) - 1);
}

// The VW codes starting at byte p (VW*BITS a multiple of 8): a broadcast of the 32-bit word(s)
// holding them, one variable shift and a mask.
template <int BITS>
inline vu decode(const uint8_t* p) {
  constexpr int PER = 32 / BITS;  // codes per 32-bit word
  vu word, shift;
  if constexpr (VW <= PER) {
    uint32_t w = 0;
    std::memcpy(&w, p, VW * BITS / 8);
    word = vu{} + w;
  } else {
    uint32_t ws[VW / PER];
    std::memcpy(ws, p, sizeof ws);
    for (int i = 0; i < VW; ++i) word[i] = ws[i / PER];
  }
  for (int i = 0; i < VW; ++i) shift[i] = (uint32_t)((i % PER) * BITS);
  return (word >> shift) & (uint32_t)((1u << BITS) - 1);
}

inline vu decode_bits(const uint8_t* p, int bits) {
  switch (bits) {
    case 1: return decode<1>(p);
    case 2: return decode<2>(p);
    case 4: return decode<4>(p);
    default: return decode<8>(p);
  }
}

// In-window column base of kept value i of a vector: (i / n) * m (n divides VW).
inline vu group_base(int n, int m) {
  vu b;
  for (int i = 0; i < VW; ++i) b[i] = (uint32_t)((i / n) * m);
  return b;
}

// The epilogue of a finished output row: + bias (when given), then max(., 0) when relu.
inline void epilogue_row(float* y, i64 batch, const float* bias, i64 o, bool relu) {
  if (bias) for (i64 b = 0; b < batch; ++b) y[b] += bias[o];
  if (relu) for (i64 b = 0; b < batch; ++b) y[b] = y[b] > 0.f ? y[b] : 0.f;
}

// ---------------------------------------------------------------- 1xN blocks, batch 1
// y[r*B + t] = sum_k x[cols[r,k]] * vals[r,k,t], S block rows at a time. The S rows come from S
// equal parts of the thread's range, so the thread reads S separate weight streams: the hardware
// prefetcher runs ahead per stream, so several streams read faster than one (docs/runtime.md); a
// software prefetch 4 KB ahead adds a little more.
constexpr int GEMV_STREAMS = 4;
constexpr int GEMV_PREFETCH = 1024;  // floats ahead in each stream

constexpr int gemv_streams(int vectors) { return std::max(1, std::min(GEMV_STREAMS, REGS / 2 / vectors)); }

// The S finished block rows of a batch-1 1xN product (V vectors each): + bias, ReLU, stored.
template <int S, int V>
__attribute__((always_inline)) inline void store_block_rows(const vf (&acc)[S][V], float* const* y,
                                                            const float* const* bias, bool relu) {
#pragma GCC unroll 16
  for (int s = 0; s < S; ++s)
#pragma GCC unroll 16
    for (int v = 0; v < V; ++v) {
      const vf r = bias[s] ? acc[s][v] + vload(bias[s] + VW * v) : acc[s][v];
      vstore(y[s] + VW * v, relu ? vrelu(r) : r);
    }
}

template <int B, int S>
__attribute__((always_inline)) inline void block_gemv_rows(const float* x, const int32_t* const* c,
                                                           const float* const* w, i64 kept, float* const* y,
                                                           const float* const* bias, bool relu) {
  constexpr int V = B / VW;  // vectors per block vector
  vf acc[S][V];
#pragma GCC unroll 16
  for (int s = 0; s < S; ++s)
#pragma GCC unroll 16
    for (int v = 0; v < V; ++v) acc[s][v] = vf{};
  for (i64 k = 0; k < kept; ++k) {
#pragma GCC unroll 16
    for (int s = 0; s < S; ++s) {
      const float* wk = w[s] + k * B;
#pragma GCC unroll 16
      for (int l = 0; l < B; l += 16) prefetch(wk + GEMV_PREFETCH + l);  // one per cache line
      const vf xv = vsplat(x[c[s][k]]);
#pragma GCC unroll 16
      for (int v = 0; v < V; ++v) acc[s][v] = vload(wk + VW * v) * xv + acc[s][v];
    }
  }
  store_block_rows<S, V>(acc, y, bias, relu);
}

template <int B>
void block_gemv(const float* x, const int32_t* cols, const float* vals, i64 rows, i64 kept, float* out,
                const float* bias, bool relu) {
  constexpr int S = gemv_streams(B / VW);
#pragma omp parallel num_threads(call_threads)
  {
    const int nth = omp_get_num_threads(), tid = omp_get_thread_num();
    const i64 r0 = rows * tid / nth, r1 = rows * (tid + 1) / nth, part = (r1 - r0) / S;
    const int32_t* c[S];
    const float* w[S];
    float* y[S];
    const float* bs[S];
    for (i64 i = 0; i < part; ++i) {  // row i of each of the S parts
      for (int s = 0; s < S; ++s) {
        const i64 r = r0 + s * part + i;
        c[s] = cols + r * kept, w[s] = vals + r * kept * B, y[s] = out + r * B, bs[s] = bias ? bias + r * B : nullptr;
      }
      block_gemv_rows<B, S>(x, c, w, kept, y, bs, relu);
    }
    for (i64 r = r0 + S * part; r < r1; ++r) {  // the rows left over
      c[0] = cols + r * kept, w[0] = vals + r * kept * B, y[0] = out + r * B, bs[0] = bias ? bias + r * B : nullptr;
      block_gemv_rows<B, 1>(x, c, w, kept, y, bs, relu);
    }
  }
}

// ---------------------------------------------------------------- 1xN blocks, batched
// A T x (VW*NB) register tile of outputs (T outputs of a block row, VW*NB batch items). Per kept
// column: NB input vectors, T broadcast weights, T*NB FMAs, over kept columns k0..k1 (one column
// chunk; `first` starts from zero, otherwise from the partial sums in y). MASK: the tile holds the
// batch's last items and its last vector may be partial.
template <int T, int NB, bool MASK>
__attribute__((always_inline)) inline void block_tile(const float* xt, i64 ldx, const int32_t* c, const float* w,
                                                      i64 block, i64 k0, i64 k1, i64 b0, i64 batch, float* y, i64 ldo,
                                                      bool first, bool last, const float* bias, bool relu) {
  vf acc[T][NB];
  i64 left[NB];
#pragma GCC unroll 16
  for (int v = 0; v < NB; ++v) left[v] = std::max<i64>(0, std::min<i64>(VW, batch - b0 - VW * v));
#pragma GCC unroll 16
  for (int t = 0; t < T; ++t)
#pragma GCC unroll 16
    for (int v = 0; v < NB; ++v) {
      const float* p = y + t * ldo + b0 + VW * v;
      acc[t][v] = first ? vf{} : (MASK ? vload_n(p, left[v]) : vload(p));
    }
  for (i64 k = k0; k < k1; ++k) {
    const float* x = xt + (i64)c[k] * ldx + b0;
    vf xv[NB];
#pragma GCC unroll 16
    for (int v = 0; v < NB; ++v) xv[v] = MASK ? vload_n(x + VW * v, left[v]) : vload(x + VW * v);
    const float* wk = w + k * block;
#pragma GCC unroll 16
    for (int t = 0; t < T; ++t) {
      const vf wt = vsplat(wk[t]);
#pragma GCC unroll 16
      for (int v = 0; v < NB; ++v) acc[t][v] = wt * xv[v] + acc[t][v];
    }
  }
#pragma GCC unroll 16
  for (int t = 0; t < T; ++t)
#pragma GCC unroll 16
    for (int v = 0; v < NB; ++v) {
      vf r = acc[t][v];
      if (last && bias) r = r + bias[t];
      if (last && relu) r = vrelu(r);
      float* p = y + t * ldo + b0 + VW * v;
      if (MASK) vstore_n(p, r, left[v]);
      else vstore(p, r);
    }
}

// 1xN tile: 4 outputs x NB vectors of batch items (16 accumulators with 32 registers; with 16
// registers 12: 4 x 3 keeps 12 FMA chains in flight, enough to cover the FMA latency on two ports,
// where 4 x 2 left a third of the FMA throughput unused)
#ifndef NMS_BNB
#define NMS_BNB 3
#endif
constexpr int BT = 4, BNB = REGS == 32 ? 4 : NMS_BNB;
// batch items whose chunk of inputs (128 columns) is walked by all rows before the next (about
// 32 KB): a whole number of tiles
constexpr i64 SUPER = (64 / (VW * BNB)) * VW * BNB;

// One block row's outputs over kept columns k0..k1, for the batch items b0 .. b0 + VW*NB - 1.
template <int NB, bool MASK>
inline void block_row(const float* xt, i64 ldx, const int32_t* cr, const float* w, i64 block, i64 k0, i64 k1,
                      i64 b0, i64 batch, float* y, i64 ldo, bool first, bool last, const float* bias, bool relu) {
  if (block % BT == 0)
    for (i64 t0 = 0; t0 < block; t0 += BT)
      block_tile<BT, NB, MASK>(xt, ldx, cr, w + t0, block, k0, k1, b0, batch, y + t0 * ldo, ldo, first, last,
                               bias ? bias + t0 : nullptr, relu);
  else
    for (i64 t0 = 0; t0 < block; ++t0)
      block_tile<1, NB, MASK>(xt, ldx, cr, w + t0, block, k0, k1, b0, batch, y + t0 * ldo, ldo, first, last,
                              bias ? bias + t0 : nullptr, relu);
}

// Loop order per thread (a contiguous range of block rows): batch super-tile (SUPER items), column
// chunk, block row, batch tile. A chunk's input rows (cc x SUPER floats) stay in L1 while all block
// rows of the thread use them, and a block row's weights of the chunk stay in L1 across the batch
// tiles; kstart says which kept columns of a block row fall into the chunk. With a single chunk (at
// most 128 columns) the order is block row, then batch tile: each output row is then written front
// to back (measured 1.7x faster on a 64 -> 256 1x1 convolution of 3136 pixels, whose output traffic
// dominates). The last tile is only as wide as the batch items left (in vectors). Input rows are
// addressed as xt + cols[k] * ldx: with ldx = 1, cols may hold element offsets (the implicit-GEMM
// convolution of _native.implicit_conv).
void block_mm(const float* xt, i64 ldx, const int32_t* cols, const int32_t* kstart, i64 chunks, const float* vals,
              i64 rows, i64 kept, i64 block, i64 batch, float* out, i64 ldo, const float* bias, bool relu) {
  constexpr i64 TILE = VW * BNB;
  auto step = [&](i64 b0, i64 c, i64 r) {
    const i64 k0 = kstart[r * (chunks + 1) + c], k1 = kstart[r * (chunks + 1) + c + 1];
    const int32_t* cr = cols + r * kept;
    const float* w = vals + r * kept * block;
    float* y = out + r * block * ldo;
    const float* br = bias ? bias + r * block : nullptr;
    const bool first = c == 0, last = c == chunks - 1;
    const i64 items = std::min(TILE, batch - b0);
    if (items == TILE) return block_row<BNB, false>(xt, ldx, cr, w, block, k0, k1, b0, batch, y, ldo, first, last, br, relu);
    switch ((items + VW - 1) / VW) {
      case 1: return block_row<1, true>(xt, ldx, cr, w, block, k0, k1, b0, batch, y, ldo, first, last, br, relu);
      case 2: return block_row<2, true>(xt, ldx, cr, w, block, k0, k1, b0, batch, y, ldo, first, last, br, relu);
      default: return block_row<BNB, true>(xt, ldx, cr, w, block, k0, k1, b0, batch, y, ldo, first, last, br, relu);
    }
  };
#pragma omp parallel num_threads(call_threads)
  {
    const int nth = omp_get_num_threads(), tid = omp_get_thread_num();
    const i64 r0 = rows * tid / nth, r1 = rows * (tid + 1) / nth;
    if (chunks == 1) {
      for (i64 r = r0; r < r1; ++r)
        for (i64 b0 = 0; b0 < batch; b0 += TILE) step(b0, 0, r);
    } else {
      for (i64 sb = 0; sb < batch; sb += SUPER)
        for (i64 c = 0; c < chunks; ++c)
          for (i64 r = r0; r < r1; ++r)
            for (i64 b0 = sb; b0 < std::min(batch, sb + SUPER); b0 += TILE) step(b0, c, r);
    }
  }
}

// ---------------------------------------------------------------- n:m, batch 1
// The threads of a batch-1 n:m product: each takes rows o0..o1-1 and keeps a `lanes`-float partial
// sum per row in `part` (row i of the thread at part + i * lanes); body(o0, o1, part) adds to them chunk
// by chunk (and may add scalar tails to out[o]); the partial sums are reduced into out at the end,
// with the bias and the ReLU.
template <class Body>
void nm_gemv_threads(i64 rows, float* out, const float* bias, bool relu, Body body, int lanes = VW) {
#pragma omp parallel num_threads(call_threads)
  {
    const int nth = omp_get_num_threads(), tid = omp_get_thread_num();
    const i64 o0 = rows * tid / nth, o1 = rows * (tid + 1) / nth;
    float* part = (float*)aligned_alloc(64, ((std::max<i64>(1, o1 - o0) * lanes * sizeof(float) + 63) / 64) * 64);
    std::memset(part, 0, (o1 - o0) * lanes * sizeof(float));
    for (i64 o = o0; o < o1; ++o) out[o] = 0.f;
    body(o0, o1, part);
    for (i64 o = o0; o < o1; ++o) {
      const float* p = part + (o - o0) * lanes;
      float sum = 0.f;
      if (lanes == VW) {
        sum = vsum(vload(p));
      } else {
        for (int l = 0; l < lanes; ++l) sum += p[l];
      }
      const float y = out[o] + sum + (bias ? bias[o] : 0.f);
      out[o] = relu && y < 0.f ? 0.f : y;
    }
    free(part);
  }
}

// Any n:m: VW kept values at a time (codes decoded as vectors where n divides VW), their inputs
// gathered; scalar values past the last whole vector. Two FMA chains per row.
void nm_gemv_any(const float* x, const uint8_t* codes, const float* vals, i64 rows, i64 J, i64 jc, int n, int m,
                 int bits, float* out, const float* bias, bool relu) {
  const bool vec = VW % n == 0 && (VW * bits) % 8 == 0;
  const vu base = group_base(vec ? n : 1, m);
  const i64 chunks = (J + jc - 1) / jc, cc = jc / n * m;
  nm_gemv_threads(rows, out, bias, relu, [&](i64 o0, i64 o1, float* part) {
    for (i64 c = 0; c < chunks; ++c) {
      const i64 count = std::min(jc, J - c * jc), steps = vec ? count / VW : 0;
      const float* xc = x + c * cc;
      for (i64 o = o0; o < o1; ++o) {
        const uint8_t* row = codes + nm_code_off(c, o, rows, jc, count, bits);
        const float* w = vals + nm_val_off(c, o, rows, jc, count);
        vf acc0 = vload(part + (o - o0) * VW), acc1 = vf{};
        for (i64 s = 0; s < steps; ++s) {
          const vu idx = decode_bits(row + s * VW * bits / 8, bits) + base;
          const vf xv = gather(xc + s * VW / n * m, idx);
          if (s & 1) acc1 = vload(w + s * VW) * xv + acc1;
          else acc0 = vload(w + s * VW) * xv + acc0;
        }
        vstore(part + (o - o0) * VW, acc0 + acc1);
        for (i64 j = steps * VW; j < count; ++j) out[o] += w[j] * xc[(j / n) * m + decode_one(row, j, bits)];
      }
    }
  });
}

// Windows of 2*VW columns (m = 2n: 1:2, 2:4, 4:8, 8:16), specialised on the code width: the decode
// is a broadcast, a variable shift and a mask; the inputs one two-vector permute (select2). R rows
// at a time share each loaded input window; the R rows come from R equal parts of the thread's
// rows, so within a chunk the thread reads R separate weight streams (see GEMV_STREAMS), each
// prefetched 4 KB ahead.
template <int BITS, int R>
__attribute__((always_inline)) inline void nm_pair_rows(const float* xc, const uint8_t* row, i64 cstride,
                                                        const float* w, i64 wstride, i64 steps, vu base, float* part,
                                                        i64 pstride) {
  vf acc[R];
#pragma GCC unroll 8
  for (int q = 0; q < R; ++q) acc[q] = vload(part + q * pstride);
  for (i64 s = 0; s < steps; ++s) {
    const vf lo = vload(xc + s * 2 * VW), hi = vload(xc + s * 2 * VW + VW);
#pragma GCC unroll 8
    for (int q = 0; q < R; ++q) {
      const vu idx = decode<BITS>(row + q * cstride + s * VW * BITS / 8) + base;
      prefetch(w + q * wstride + s * VW + GEMV_PREFETCH);
      acc[q] = vload(w + q * wstride + s * VW) * select2(lo, hi, idx) + acc[q];
    }
  }
#pragma GCC unroll 8
  for (int q = 0; q < R; ++q) vstore(part + q * pstride, acc[q]);
}

template <int BITS>
void nm_gemv_pair(const float* x, const uint8_t* codes, const float* vals, i64 rows, i64 J, i64 jc, int n, int m,
                  float* out, const float* bias, bool relu) {
  constexpr int R = GEMV_STREAMS;
  const vu base = group_base(n, m);
  const i64 chunks = (J + jc - 1) / jc, cc = jc / n * m;
  nm_gemv_threads(rows, out, bias, relu, [&](i64 o0, i64 o1, float* part) {
    for (i64 c = 0; c < chunks; ++c) {
      const i64 count = std::min(jc, J - c * jc), steps = count / VW, cstride = (count * BITS + 7) / 8;
      const float* xc = x + c * cc;
      const uint8_t* row = codes + nm_code_off(c, o0, rows, jc, count, BITS);
      const float* w = vals + nm_val_off(c, o0, rows, jc, count);
      const i64 len = (o1 - o0) / R;  // row i of each of the R parts, then the rows left over
      for (i64 i = 0; i < len; ++i)
        nm_pair_rows<BITS, R>(xc, row + i * cstride, len * cstride, w + i * count, len * count, steps, base,
                              part + i * VW, len * VW);
      for (i64 i = R * len; i < o1 - o0; ++i)
        nm_pair_rows<BITS, 1>(xc, row + i * cstride, 0, w + i * count, 0, steps, base, part + i * VW, 0);
      if (steps * VW < count)  // a narrower last chunk: the values past the last whole vector
        for (i64 q = 0; q < o1 - o0; ++q)
          for (i64 j = steps * VW; j < count; ++j)
            out[o0 + q] += w[q * count + j] * xc[(j / n) * m + decode_one(row + q * cstride, j, BITS)];
    }
  });
}

// ---------------------------------------------------------------- n:m, batched
// R rows x (VW*NB) batch items of accumulators; every kept value scales one input row slice.
// `col`/`w` point at the chunk's first kept value of the tile's first row (row stride cs / ws).
template <int R, int NB, bool MASK>
__attribute__((always_inline)) inline void nm_tile(const float* xt, i64 ldx, const int32_t* col, i64 cs,
                                                   const float* w, i64 ws, i64 count, i64 b0, i64 batch, float* y,
                                                   i64 ldo, bool first) {
  vf acc[R][NB];
  i64 left[NB];
#pragma GCC unroll 16
  for (int v = 0; v < NB; ++v) left[v] = std::max<i64>(0, std::min<i64>(VW, batch - b0 - VW * v));
#pragma GCC unroll 16
  for (int q = 0; q < R; ++q)
#pragma GCC unroll 16
    for (int v = 0; v < NB; ++v) {
      const float* p = y + q * ldo + b0 + VW * v;
      acc[q][v] = first ? vf{} : (MASK ? vload_n(p, left[v]) : vload(p));
    }
  for (i64 j = 0; j < count; ++j) {
#pragma GCC unroll 16
    for (int q = 0; q < R; ++q) {
      const float* x = xt + (i64)col[q * cs + j] * ldx + b0;
      const vf wq = vsplat(w[q * ws + j]);
#pragma GCC unroll 16
      for (int v = 0; v < NB; ++v)
        acc[q][v] = wq * (MASK ? vload_n(x + VW * v, left[v]) : vload(x + VW * v)) + acc[q][v];
    }
  }
#pragma GCC unroll 16
  for (int q = 0; q < R; ++q)
#pragma GCC unroll 16
    for (int v = 0; v < NB; ++v) {
      float* p = y + q * ldo + b0 + VW * v;
      if (MASK) vstore_n(p, acc[q][v], left[v]);
      else vstore(p, acc[q][v]);
    }
}

// n:m tile: NR rows x NNB vectors. Rows of an n:m weight share no input columns, so a row of the
// tile costs an index load and a weight broadcast per kept value whatever the tile's height, and
// only the width amortises them: one row x NM_SUPER items (the inputs read as FMA memory operands;
// AVX2: 1 x 8 vectors, 1.25 loads per FMA against 2 for 4 x 2). AVX-512 keeps the 3 x 4 tile it
// was measured with.
constexpr int NR = VW == 16 ? 3 : 1;
constexpr i64 NM_SUPER = 64;  // batch items per super-tile of the n:m product
constexpr int NNB = VW == 16 ? 4 : std::min<int>(NM_SUPER / VW, REGS - 4);

template <bool MASK, int NB, int R = NR>
inline void nm_tile_rows(const float* xt, i64 ldx, const int32_t* col, i64 cs, const float* w, i64 count, i64 nr,
                         i64 b0, i64 batch, float* y, i64 ldo, bool first) {
  if (nr == R) return nm_tile<R, NB, MASK>(xt, ldx, col, cs, w, count, count, b0, batch, y, ldo, first);
  for (i64 q = 0; q < nr; ++q)
    nm_tile<1, NB, MASK>(xt, ldx, col + q * cs, cs, w + q * count, count, count, b0, batch, y + q * ldo, ldo, first);
}

// Loop order per thread (a contiguous range of rows): batch super-tile (NM_SUPER items), a chunk of
// input columns, a block of rows, then the batch tiles. The chunk's input rows (cc x NM_SUPER floats,
// 32 KB for 128 columns) stay in L1 while every row of the thread uses them; the weights arrive as
// one sequential stream (chunk-major), each row block's decoded columns serve all batch tiles;
// accumulators go back to the output between chunks. A tile is only as many vectors wide as the
// batch items it holds; up to VW items (one vector) a tile takes 8 rows, so that 8 independent
// accumulator chains hide the FMA latency.
void nm_mm(const float* xt, i64 ldx, const uint8_t* codes, const float* vals, i64 rows, i64 J, i64 jc, int n, int m,
           int bits, i64 batch, float* out, i64 ldo, const int32_t* colmap) {
  constexpr i64 TILE = VW * NNB;
  const i64 chunks = (J + jc - 1) / jc, cc = jc / n * m;
  const bool vec = VW % n == 0 && jc % VW == 0 && (VW * bits) % 8 == 0;
  const i64 RB = batch <= VW ? 8 : NR;  // rows per tile
  // col holds element offsets (row * ldx) where they fit in int32: no multiply per loaded input row.
  // colmap (may be null) maps a weight column to its input row: the implicit-GEMM convolution's offsets.
  const bool offsets = !colmap && (J / n * m + m) * ldx < (i64(1) << 31);
  const uint32_t scale = offsets ? (uint32_t)ldx : 1u;
  const i64 lx = offsets ? 1 : ldx;
  const i64 row_blocks = (rows + RB - 1) / RB;
  const vu base = group_base(vec ? n : 1, m);
  if (J == 0) {
    for (i64 o = 0; o < rows; ++o) std::fill(out + o * ldo, out + o * ldo + batch, 0.f);
    return;
  }
#pragma omp parallel num_threads(call_threads)
  {
    const int nth = omp_get_num_threads(), tid = omp_get_thread_num();
    const i64 rb0 = row_blocks * tid / nth, rb1 = row_blocks * (tid + 1) / nth;
    int32_t* col = new int32_t[RB * jc];
    for (i64 sb = 0; sb < batch; sb += NM_SUPER) {
      const i64 se = std::min(batch, sb + NM_SUPER);
      for (i64 c = 0; c < chunks; ++c) {
        const i64 count = std::min(jc, J - c * jc);
        for (i64 rb = rb0; rb < rb1; ++rb) {
          const i64 o0 = rb * RB;
          const i64 nr = std::min<i64>(RB, rows - o0);
          for (i64 q = 0; q < nr; ++q) {  // input rows (or their element offsets) of this chunk's kept values
            const uint8_t* row = codes + nm_code_off(c, o0 + q, rows, jc, count, bits);
            int32_t* cq = col + q * jc;
            i64 j = 0;
            if (vec)
              for (; j + VW <= count; j += VW) {
                vu v = decode_bits(row + j * bits / 8, bits) + base + (uint32_t)(c * cc + (j / n) * m);
                if (colmap)
                  for (int i = 0; i < VW; ++i) v[i] = (uint32_t)colmap[v[i]];
                v = v * scale;
                std::memcpy(cq + j, &v, sizeof v);
              }
            for (; j < count; ++j) {
              const i64 cj = c * cc + (j / n) * m + decode_one(row, j, bits);
              cq[j] = (int32_t)((colmap ? (i64)colmap[cj] : cj) * (offsets ? ldx : 1));
            }
          }
          const float* w = vals + nm_val_off(c, o0, rows, jc, count);
          float* y = out + o0 * ldo;
          const bool first = c == 0;
          for (i64 b0 = sb; b0 < se; b0 += TILE) {
            const i64 items = std::min(TILE, batch - b0);
            if (RB == 8) {  // batch <= VW: one vector, 8 rows
              nm_tile_rows<true, 1, 8>(xt, lx, col, jc, w, count, nr, b0, batch, y, ldo, first);
            } else if (items == TILE) {
              nm_tile_rows<false, NNB>(xt, lx, col, jc, w, count, nr, b0, batch, y, ldo, first);
            } else {
              switch ((items + VW - 1) / VW) {  // a tail tile: as many vectors as it holds, up to 4
                case 1: nm_tile_rows<true, 1>(xt, lx, col, jc, w, count, nr, b0, batch, y, ldo, first); break;
                case 2: nm_tile_rows<true, 2>(xt, lx, col, jc, w, count, nr, b0, batch, y, ldo, first); break;
                case 3: nm_tile_rows<true, 3>(xt, lx, col, jc, w, count, nr, b0, batch, y, ldo, first); break;
                case 4: nm_tile_rows<true, 4>(xt, lx, col, jc, w, count, nr, b0, batch, y, ldo, first); break;
                default: nm_tile_rows<true, NNB>(xt, lx, col, jc, w, count, nr, b0, batch, y, ldo, first);
              }
            }
          }
        }
      }
    }
    delete[] col;
  }
}

#include "qkernels.h"

// ---------------------------------------------------------------- im2col
// d[j] = src[j*step + off] where that column lies inside [0, W), else 0, for j < count: one output
// row of im2col or of a phase plane (a straight copy where the step is 1). src null: a padding row.
inline void padded_row(const float* src, i64 W, i64 off, int step, i64 count, float* d) {
  if (!src) {
    std::fill(d, d + count, 0.f);
    return;
  }
  i64 lo = off >= 0 ? 0 : (-off + step - 1) / step;
  i64 hi = W - 1 - off < 0 ? 0 : std::min<i64>(count, (W - 1 - off) / step + 1);
  if (lo > hi) lo = hi;
  std::fill(d, d + lo, 0.f);
  if (step == 1) std::memcpy(d + lo, src + lo + off, (hi - lo) * sizeof(float));
  else
    for (i64 j = lo; j < hi; ++j) d[j] = src[j * step + off];
  std::fill(d + hi, d + count, 0.f);
}

// out[row * ldo + oy*ow + ox] for one image x[C, H, W] (contiguous planes); row = c*kh*kw + dy*kw + dx
// ("chw", PyTorch's weight order) or (dy*kw + dx)*C + c ("hwc"). Zero padding. Memory-bound: rows
// are written once, with straight copies where the stride is 1.
void im2col_image(const float* x, i64 C, i64 H, i64 W, int kh, int kw, int sh, int sw, int ph, int pw, int dh, int dw,
                  bool hwc, float* out, i64 ldo) {
  const i64 oh = (H + 2 * ph - dh * (kh - 1) - 1) / sh + 1, ow = (W + 2 * pw - dw * (kw - 1) - 1) / sw + 1;
#pragma omp parallel for num_threads(call_threads) collapse(2) schedule(static)
  for (i64 c = 0; c < C; ++c) {
    for (int k = 0; k < kh * kw; ++k) {
      const int dy = k / kw, dx = k % kw;
      const i64 row = hwc ? (i64)k * C + c : c * kh * kw + k;
      float* dst = out + row * ldo;
      const float* plane = x + c * H * W;
      for (i64 oy = 0; oy < oh; ++oy) {  // input column of output ox: ox*sw + dx*dw - pw
        const i64 iy = oy * sh - ph + (i64)dy * dh;
        padded_row(iy < 0 || iy >= H ? nullptr : plane + iy * W, W, (i64)dx * dw - pw, sw, ow, dst + oy * ow);
      }
    }
  }
}

// ---------------------------------------------------------------- transpose
// dst[c * ldd + r] = src[r * lds + c] for r < rows, c < cols: a linear layer's [tokens, in] input as
// the [in, tokens] matrix the products read. Square tiles through registers (AVX-512 16x16, AVX2
// 8x8) or a tiled loop; PyTorch's strided copy measured ~4 GB/s for this.
#if defined(__AVX512F__)
constexpr int TT = 16;
inline void transpose_tile(const float* src, i64 lds, float* dst, i64 ldd) {
  __m512 r[16], t[16];
  for (int i = 0; i < 16; ++i) r[i] = _mm512_loadu_ps(src + i * lds);
  for (int i = 0; i < 16; i += 2) {  // 2x2 blocks of scalars
    t[i] = _mm512_unpacklo_ps(r[i], r[i + 1]);
    t[i + 1] = _mm512_unpackhi_ps(r[i], r[i + 1]);
  }
  for (int i = 0; i < 16; i += 4) {  // 4x4 blocks
    r[i] = _mm512_castpd_ps(_mm512_unpacklo_pd(_mm512_castps_pd(t[i]), _mm512_castps_pd(t[i + 2])));
    r[i + 1] = _mm512_castpd_ps(_mm512_unpackhi_pd(_mm512_castps_pd(t[i]), _mm512_castps_pd(t[i + 2])));
    r[i + 2] = _mm512_castpd_ps(_mm512_unpacklo_pd(_mm512_castps_pd(t[i + 1]), _mm512_castps_pd(t[i + 3])));
    r[i + 3] = _mm512_castpd_ps(_mm512_unpackhi_pd(_mm512_castps_pd(t[i + 1]), _mm512_castps_pd(t[i + 3])));
  }
  // r[4g + k] now holds, for rows 4g..4g+3, columns k, k+4, k+8, k+12 in its four 128-bit lanes;
  // output row 4L + k gathers lane L of r[k], r[4 + k], r[8 + k], r[12 + k]
  for (int q = 0; q < 4; ++q) {
    const __m512 a = _mm512_shuffle_f32x4(r[q], r[q + 4], 0x88), b = _mm512_shuffle_f32x4(r[q], r[q + 4], 0xDD);
    const __m512 c = _mm512_shuffle_f32x4(r[q + 8], r[q + 12], 0x88), d = _mm512_shuffle_f32x4(r[q + 8], r[q + 12], 0xDD);
    t[q] = _mm512_shuffle_f32x4(a, c, 0x88);
    t[q + 8] = _mm512_shuffle_f32x4(a, c, 0xDD);
    t[q + 4] = _mm512_shuffle_f32x4(b, d, 0x88);
    t[q + 12] = _mm512_shuffle_f32x4(b, d, 0xDD);
  }
  for (int i = 0; i < 16; ++i) _mm512_storeu_ps(dst + i * ldd, t[i]);
}
#elif defined(__AVX2__)
constexpr int TT = 8;
inline void transpose_tile(const float* src, i64 lds, float* dst, i64 ldd) {
  __m256 r[8], t[8];
  for (int i = 0; i < 8; ++i) r[i] = _mm256_loadu_ps(src + i * lds);
  for (int i = 0; i < 8; i += 2) {
    t[i] = _mm256_unpacklo_ps(r[i], r[i + 1]);
    t[i + 1] = _mm256_unpackhi_ps(r[i], r[i + 1]);
  }
  for (int i = 0; i < 8; i += 4) {  // 4x4 blocks within each 128-bit half
    r[i] = _mm256_shuffle_ps(t[i], t[i + 2], 0x44);
    r[i + 1] = _mm256_shuffle_ps(t[i], t[i + 2], 0xEE);
    r[i + 2] = _mm256_shuffle_ps(t[i + 1], t[i + 3], 0x44);
    r[i + 3] = _mm256_shuffle_ps(t[i + 1], t[i + 3], 0xEE);
  }
  for (int k = 0; k < 4; ++k) {  // r[k] rows 0-3, r[4+k] rows 4-7: halves hold columns k and k+4
    _mm256_storeu_ps(dst + k * ldd, _mm256_permute2f128_ps(r[k], r[4 + k], 0x20));
    _mm256_storeu_ps(dst + (k + 4) * ldd, _mm256_permute2f128_ps(r[k], r[4 + k], 0x31));
  }
}
#else
constexpr int TT = 16;
#endif

void transpose(const float* src, i64 rows, i64 cols, i64 lds, float* dst, i64 ldd) {
#pragma omp parallel for num_threads(call_threads) schedule(static)
  for (i64 c0 = 0; c0 < cols; c0 += TT) {
    for (i64 r0 = 0; r0 < rows; r0 += TT) {
#if defined(__AVX512F__) || defined(__AVX2__)
      if (r0 + TT <= rows && c0 + TT <= cols) {
        transpose_tile(src + r0 * lds + c0, lds, dst + c0 * ldd + r0, ldd);
        continue;
      }
#endif
      for (i64 c = c0; c < std::min<i64>(cols, c0 + TT); ++c)
        for (i64 r = r0; r < std::min<i64>(rows, r0 + TT); ++r) dst[c * ldd + r] = src[r * lds + c];
    }
  }
}

// ---------------------------------------------------------------- phase planes
// The zero-padded input of the implicit-GEMM convolution, cut into sh*sw phase planes:
// out[(py*sw + px)*C + c) * cstride + (n*hq + i)*wq + j] = x[n][c][i*sh + py - ph][j*sw + px - pw]
// (zero outside), i < hq, j < wq. For stride 1 this is the padded input in [C, N, Hp, Wp] order.
// cstride >= N*hq*wq is the distance between channels (padded so that channels do not share cache
// sets, see _native.implicit_conv). One pass.
void phase_planes(const float* x, i64 N, i64 C, i64 H, i64 W, int sh, int sw, int ph, int pw, i64 hq, i64 wq,
                  i64 cstride, float* out) {
#pragma omp parallel for num_threads(call_threads) collapse(2) schedule(static)
  for (i64 phase = 0; phase < (i64)sh * sw; ++phase) {
    for (i64 c = 0; c < C; ++c) {
      const int py = (int)(phase / sw), px = (int)(phase % sw);
      for (i64 n = 0; n < N; ++n) {
        const float* src = x + (n * C + c) * H * W;
        float* dst = out + (phase * C + c) * cstride + n * hq * wq;
        for (i64 i = 0; i < hq; ++i) {  // input column of plane column j: j*sw + px - pw
          const i64 iy = i * sh + py - ph;
          padded_row(iy < 0 || iy >= H ? nullptr : src + iy * W, W, px - pw, sw, wq, dst + i * wq);
        }
      }
    }
  }
}

}  // namespace

extern "C" {

// The instruction set the products were compiled for: "avx512", "avx2", "neon" or "generic".
const char* nms_isa() { return NMS_ISA; }

// Floats per vector of the compiled products.
int nms_vector_width() { return VW; }

// out[rows*block, batch] = W @ xt (+ bias[o], then max(., 0) with relu) for a 1xN-packed W.
// kstart[rows, chunks + 1]: see the top of the file. bias may be null.
void nms_block_mm(const float* xt, i64 ldx, const int32_t* cols, const int32_t* kstart, i64 chunks, const float* vals,
                  i64 rows, i64 kept, i64 block, i64 batch, float* out, i64 ldo, const float* bias, int relu,
                  int threads) {
  call_threads = threads;
  if (batch == 1 && ldx == 1 && ldo == 1) {
    switch (block) {
      case 4: if constexpr (4 % VW == 0) return block_gemv<4>(xt, cols, vals, rows, kept, out, bias, relu != 0); break;
      case 8: if constexpr (8 % VW == 0) return block_gemv<8>(xt, cols, vals, rows, kept, out, bias, relu != 0); break;
      case 16: return block_gemv<16>(xt, cols, vals, rows, kept, out, bias, relu != 0);
      case 32: return block_gemv<32>(xt, cols, vals, rows, kept, out, bias, relu != 0);
      case 64: return block_gemv<64>(xt, cols, vals, rows, kept, out, bias, relu != 0);
      default: break;
    }
  }
  block_mm(xt, ldx, cols, kstart, chunks, vals, rows, kept, block, batch, out, ldo, bias, relu != 0);
}

// out[rows, batch] = W @ xt (+ bias[o], then max(., 0) with relu; bias may be null) for an n:m-packed W
// (chunk-major layout, see the top of the file). The batch-1 kernels apply the epilogue as they
// reduce each row; the batched ones in a pass over the just-written (cache-resident) output.
// colmap (may be null): input row of each weight column, in place of the column itself (the
// implicit-GEMM convolution passes element offsets into its phase planes, with ldx = 1).
void nms_nm_mm(const float* xt, i64 ldx, const uint8_t* codes, const float* vals, i64 rows, i64 J, i64 jc, int n,
               int m, int bits, i64 batch, float* out, i64 ldo, const float* bias, int relu, const int32_t* colmap,
               int threads) {
  call_threads = threads;
  if (batch == 1 && ldx == 1 && ldo == 1 && !colmap) {
    if (m == 2 * n && VW % n == 0 && (VW * bits) % 8 == 0) {
      switch (bits) {
        case 1: return nm_gemv_pair<1>(xt, codes, vals, rows, J, jc, n, m, out, bias, relu != 0);
        case 2: return nm_gemv_pair<2>(xt, codes, vals, rows, J, jc, n, m, out, bias, relu != 0);
        case 4: return nm_gemv_pair<4>(xt, codes, vals, rows, J, jc, n, m, out, bias, relu != 0);
        default: return nm_gemv_pair<8>(xt, codes, vals, rows, J, jc, n, m, out, bias, relu != 0);
      }
    }
    return nm_gemv_any(xt, codes, vals, rows, J, jc, n, m, bits, out, bias, relu != 0);
  }
  nm_mm(xt, ldx, codes, vals, rows, J, jc, n, m, bits, batch, out, ldo, colmap);
  if (bias || relu) {
#pragma omp parallel for num_threads(call_threads) schedule(static)
    for (i64 o = 0; o < rows; ++o) epilogue_row(out + o * ldo, batch, bias, o, relu != 0);
  }
}

// out[rows] = W @ x for an n:m layout whose kept values are qbits-bit integers with one scale per
// `group` values (qkernels.h); bias may be null. Batch 1 only (batched products dequantize first).
// a8: the activations are quantized first (qkernels.h quant_x, blocks of min(group, jc) * m / n columns).
void nms_nmq_gemv(const float* x, const uint8_t* codes, const uint8_t* q, const h16* scales, i64 rows, i64 J,
                  i64 jc, int n, int m, int bits, int qbits, i64 group, int a8, float* out, const float* bias, int relu,
                  int threads) {
  call_threads = threads;
  const bool r = relu != 0;
  if (a8) {
    quant_x(x, J / n * m, std::min(jc, group) * m / n);
#if defined(NMS_VNNI)
    if (m == 2 * n && jc == 64 && bits <= 4) {
      if (qbits == 8) switch (bits) {
        case 1: return nmq_gemv_vnni<1, 8>(codes, q, scales, rows, J, n, m, group, out, bias, r);
        case 2: return nmq_gemv_vnni<2, 8>(codes, q, scales, rows, J, n, m, group, out, bias, r);
        default: return nmq_gemv_vnni<4, 8>(codes, q, scales, rows, J, n, m, group, out, bias, r);
      }
      switch (bits) {
        case 1: return nmq_gemv_vnni<1, 4>(codes, q, scales, rows, J, n, m, group, out, bias, r);
        case 2: return nmq_gemv_vnni<2, 4>(codes, q, scales, rows, J, n, m, group, out, bias, r);
        default: return nmq_gemv_vnni<4, 4>(codes, q, scales, rows, J, n, m, group, out, bias, r);
      }
    }
#elif defined(NMS_I8DOT)
    if (n == 2 && m == 4 && jc == 64 && bits == 2 && group % 16 == 0) {
      if (qbits == 8) return nmq_gemv_avx2<8>(codes, q, scales, rows, J, group, out, bias, r);
      return nmq_gemv_avx2<4>(codes, q, scales, rows, J, group, out, bias, r);
    }
#endif
    x = xbuf.d;
  }
  const bool vec = VW % n == 0 && (VW * bits) % 8 == 0 && group % VW == 0;
#define NMQ(BITS, QB)                                                                                  \
  return m == 2 * n ? nmq_gemv<BITS, QB, true>(x, codes, q, scales, rows, J, jc, n, m, group, out, bias, r) \
                    : nmq_gemv<BITS, QB, false>(x, codes, q, scales, rows, J, jc, n, m, group, out, bias, r)
  if (vec && qbits == 8) switch (bits) { case 1: NMQ(1, 8); case 2: NMQ(2, 8); case 4: NMQ(4, 8); default: NMQ(8, 8); }
  if (vec && qbits == 4) switch (bits) { case 1: NMQ(1, 4); case 2: NMQ(2, 4); case 4: NMQ(4, 4); default: NMQ(8, 4); }
#undef NMQ
  if (qbits == 8) return nmq_gemv_scalar<8>(x, codes, q, scales, rows, J, jc, n, m, bits, group, out, bias, r);
  return nmq_gemv_scalar<4>(x, codes, q, scales, rows, J, jc, n, m, bits, group, out, bias, r);
}

// out[rows * block] = W @ x for a 1xN layout with quantized kept values (qkernels.h); batch 1.
void nms_blockq_gemv(const float* x, const int32_t* cols, const uint8_t* q, const h16* scales, i64 rows, i64 kept,
                     i64 block, int qbits, i64 group, float* out, const float* bias, int relu, int threads) {
  call_threads = threads;
  const bool r = relu != 0;
  if (block % VW == 0 && group > 0) {
#define BQ(B)                                                                                    \
  return qbits == 8 ? blockq_gemv<B, 8>(x, cols, q, scales, rows, kept, group, out, bias, r) \
                    : blockq_gemv<B, 4>(x, cols, q, scales, rows, kept, group, out, bias, r)
    switch (block) {
      case 16: if constexpr (16 % VW == 0) BQ(16); break;
      case 32: BQ(32);
      case 64: BQ(64);
      default: break;
    }
#undef BQ
  }
  const i64 gk = cdiv(kept, group);  // any other block size: scalar
#pragma omp parallel for num_threads(call_threads) schedule(static)
  for (i64 rr = 0; rr < rows; ++rr)
    for (i64 t = 0; t < block; ++t) {
      float s = bias ? bias[rr * block + t] : 0.f;
      for (i64 k = 0; k < kept; ++k) {
        const i64 i = (rr * kept + k) * block + t;
        const float v = qbits == 8 ? deq_one<8>(q, i) : deq_one<4>(q, i);
        s += v * scales[(rr * gk + k / group) * block + t] * x[cols[rr * kept + k]];
      }
      out[rr * block + t] = r && s < 0.f ? 0.f : s;
    }
}

// out[rows] = W @ x for a dense [rows, cols] weight of qbits-bit integers, one scale per `group`
// values of a row (qkernels.h); batch 1.
void nms_denseq_gemv(const float* x, const uint8_t* q, const h16* scales, i64 rows, i64 cols, int qbits, i64 group,
                     int a8, float* out, const float* bias, int relu, int threads) {
  call_threads = threads;
  if (a8) {
    quant_x(x, cols, group);
#if defined(NMS_VNNI)
    if (group % 16 == 0) {
      if (qbits == 8) return denseq_gemv_vnni<8>(q, scales, rows, cols, group, out, bias, relu != 0);
      return denseq_gemv_vnni<4>(q, scales, rows, cols, group, out, bias, relu != 0);
    }
#elif defined(NMS_I8DOT)
    if (group % 32 == 0 && cols % 32 == 0) {
      if (qbits == 8) return denseq_gemv_avx2<8>(q, scales, rows, cols, group, out, bias, relu != 0);
      return denseq_gemv_avx2<4>(q, scales, rows, cols, group, out, bias, relu != 0);
    }
#endif
    x = xbuf.d;
  }
  if (group % VW == 0) {
    if (qbits == 8) return denseq_gemv<8>(x, q, scales, rows, cols, group, out, bias, relu != 0);
    return denseq_gemv<4>(x, q, scales, rows, cols, group, out, bias, relu != 0);
  }
#pragma omp parallel for num_threads(call_threads) schedule(static)
  for (i64 o = 0; o < rows; ++o) {
    float s = bias ? bias[o] : 0.f;
    const i64 gr = cdiv(cols, group);
    for (i64 j = 0; j < cols; ++j)
      s += (qbits == 8 ? deq_one<8>(q + o * cols, j) : deq_one<4>(q + o * cols / 2, j)) * scales[o * gr + j / group] * x[j];
    out[o] = relu && s < 0.f ? 0.f : s;
  }
}

// out[T, rows] = Q(x) @ W^T for T rows of x (int8 activations, qkernels.h quant_block) against a
// quantized n:m (kind 0) or dense (kind 2) weight: integer products. AVX-512 VNNI + VBMI builds run
// q_gemm_vnni for n:m with m = 2n, jc = 64, codes of at most 4 bits and dense layouts, groups of a
// multiple of 16 values; every build runs q_gemm16 (16-bit multiply-adds) for the other layouts it
// takes (q_gemm16_takes). Returns 0, computing nothing, where neither takes the layout (the caller
// dequantizes the weight instead); nms_q_gemm_takes says so before the caller allocates anything.
static bool vnni_takes(int kind, int n, int m, i64 jc, int bits, i64 group) {
#if defined(NMS_VNNI)
  return group % 16 == 0 && ((kind == 0 && m == 2 * n && jc == 64 && bits <= 4) || kind == 2);
#else
  (void)kind, (void)n, (void)m, (void)jc, (void)bits, (void)group;
  return false;
#endif
}

int nms_q_gemm_takes(int kind, int n, int m, i64 jc, int bits, i64 group) {
  return vnni_takes(kind, n, m, jc, bits, group) || q_gemm16_takes(kind, n, m, jc, group);
}

int nms_q_gemm(int kind, const uint8_t* codes, const uint8_t* q, const h16* scales, i64 rows, i64 cols, int n, int m,
               i64 jc, int bits, int qbits, i64 group, const float* x, i64 T, float* out, const float* bias, int relu,
               int threads) {
  if (!nms_q_gemm_takes(kind, n, m, jc, bits, group)) return 0;
  call_threads = threads;
  const bool r = relu != 0;
#if defined(NMS_VNNI)
  if (vnni_takes(kind, n, m, jc, bits, group)) {
    if (kind == 2) bits = 1;
#define QG(BITS)                                                                                                 \
  qbits == 8 ? q_gemm_vnni<BITS, 8>(kind, codes, q, scales, rows, cols, n, m, group, x, T, out, bias, r) \
             : q_gemm_vnni<BITS, 4>(kind, codes, q, scales, rows, cols, n, m, group, x, T, out, bias, r)
    switch (bits) {
      case 1: QG(1); break;
      case 2: QG(2); break;
      default: QG(4); break;
    }
#undef QG
    return 1;
  }
#endif
  if (qbits == 8) q_gemm16<8>(kind, codes, q, scales, rows, cols, n, m, jc, bits, group, x, T, out, bias, r);
  else q_gemm16<4>(kind, codes, q, scales, rows, cols, n, m, jc, bits, group, x, T, out, bias, r);
  return 1;
}

// The float32 values of a quantized n:m layout (chunk-major, as the float32 kernels read them) or of
// a dense weight (jc = J = cols, rows segments): out[i] = q[i] * its group's scale.
void nms_nmq_dequant(const uint8_t* q, const h16* scales, i64 rows, i64 J, i64 jc, int qbits, i64 group, float* out,
                     int threads) {
  call_threads = threads;
  const i64 chunks = cdiv(J, jc), gpc = cdiv(jc, group);
  auto seg = [&](i64 s, i64& start, i64& len, i64& sstart) {
    const i64 c = s / rows, o = s % rows, count = std::min(jc, J - c * jc);
    start = c * rows * jc + o * count, len = count, sstart = c * rows * gpc + o * cdiv(count, group);
  };
  if (qbits == 8) dequant_segments<8>(q, scales, chunks * rows, group, out, seg);
  else dequant_segments<4>(q, scales, chunks * rows, group, out, seg);
}

// The float32 values [rows, kept, block] of a quantized 1xN layout.
void nms_blockq_dequant(const uint8_t* q, const h16* scales, i64 rows, i64 kept, i64 block, int qbits, i64 group,
                        float* out, int threads) {
  call_threads = threads;
  const i64 gk = cdiv(kept, group);
#pragma omp parallel for num_threads(call_threads) schedule(static)
  for (i64 r = 0; r < rows; ++r)
    for (i64 k = 0; k < kept; ++k) {
      const h16* sc = scales + (r * gk + k / group) * block;
      const i64 i0 = (r * kept + k) * block;
      for (i64 t = 0; t < block; ++t)
        out[i0 + t] = (qbits == 8 ? deq_one<8>(q, i0 + t) : deq_one<4>(q, i0 + t)) * sc[t];
    }
}

// A one-token product with every argument but the input, the output and the thread count bound
// once in `plan` (nmsparse/runtime/_native.py gemv_call): four arguments to convert per call from
// Python instead of seventeen. plan[0] is the kind, then the arguments of the product, pointers
// as integers:
//   0 (n:m): codes, vals, rows, J, jc, n, m, bits, bias, relu
//   1 (1xN): cols, kstart, chunks, vals, rows, kept, block, bias, relu
//   2 (n:m, quantized): codes, q, scales, rows, J, jc, n, m, bits, qbits, group, a8, bias, relu
//   3 (1xN, quantized): cols, q, scales, rows, kept, block, qbits, group, bias, relu
//   4 (dense, quantized): q, scales, rows, cols, qbits, group, a8, bias, relu
//   5 (dense, float32): w, rows, cols, bias, relu
void nms_gemv(const i64* plan, const float* x, float* out, int threads) {
  const i64* p = plan + 1;
  if (plan[0] == 2)
    nms_nmq_gemv(x, (const uint8_t*)p[0], (const uint8_t*)p[1], (const h16*)p[2], p[3], p[4], p[5], (int)p[6],
                 (int)p[7], (int)p[8], (int)p[9], p[10], (int)p[11], out, (const float*)p[12], (int)p[13], threads);
  else if (plan[0] == 3)
    nms_blockq_gemv(x, (const int32_t*)p[0], (const uint8_t*)p[1], (const h16*)p[2], p[3], p[4], p[5], (int)p[6],
                    p[7], out, (const float*)p[8], (int)p[9], threads);
  else if (plan[0] == 4)
    nms_denseq_gemv(x, (const uint8_t*)p[0], (const h16*)p[1], p[2], p[3], (int)p[4], p[5], (int)p[6], out,
                    (const float*)p[7], (int)p[8], threads);
  else if (plan[0] == 5)
    call_threads = threads, densef_gemv((const float*)p[0], p[1], p[2], x, out, (const float*)p[3], (int)p[4] != 0);
  else if (plan[0] == 0)
    nms_nm_mm(x, 1, (const uint8_t*)p[0], (const float*)p[1], p[2], p[3], p[4], (int)p[5], (int)p[6], (int)p[7], 1,
              out, 1, (const float*)p[8], (int)p[9], nullptr, threads);
  else
    nms_block_mm(x, 1, (const int32_t*)p[0], (const int32_t*)p[1], p[2], (const float*)p[3], p[4], p[5], p[6], 1, out,
                 1, (const float*)p[7], (int)p[8], threads);
}

// Element offsets, in the phase planes of the implicit-GEMM convolution (_native.implicit_conv), of
// the weight columns cols[0..count) (cols null: columns 0..count-1). Column order "chw"
// (c*kh*kw + dy*kw + dx) or, with hwc, (dy*kw + dx)*C + c. Returns 0 where an offset overflows int32.
int nms_conv_offsets(const int32_t* cols, i64 count, i64 C, int kh, int kw, int sh, int sw, int dh, int dw, i64 plane,
                     i64 width, int hwc, int32_t* out) {
  for (i64 i = 0; i < count; ++i) {
    const i64 col = cols ? cols[i] : i;
    const i64 c = hwc ? col % C : col / (kh * kw), tap = hwc ? col / C : col % (kh * kw);
    const i64 ry = (tap / kw) * dh, rx = (tap % kw) * dw;  // row / column offsets from the window's corner
    const i64 phase = (ry % sh) * sw + rx % sw;
    const i64 off = (phase * C + c) * plane + (ry / sh) * width + rx / sw;
    if (off >= (i64(1) << 31)) return 0;
    out[i] = (int32_t)off;
  }
  return 1;
}

// im2col of a batch x[N, C, H, W] (contiguous) into out[C*kh*kw, N*oh*ow]: image n fills columns
// n*oh*ow .. (n+1)*oh*ow - 1, the transposed layout the products read.
void nms_im2col(const float* x, i64 N, i64 C, i64 H, i64 W, int kh, int kw, int sh, int sw, int ph, int pw, int dh,
                int dw, int hwc, float* out, int threads) {
  call_threads = threads;
  const i64 oh = (H + 2 * ph - dh * (kh - 1) - 1) / sh + 1, ow = (W + 2 * pw - dw * (kw - 1) - 1) / sw + 1;
  for (i64 n = 0; n < N; ++n)
    im2col_image(x + n * C * H * W, C, H, W, kh, kw, sh, sw, ph, pw, dh, dw, hwc != 0, out + n * oh * ow, N * oh * ow);
}

// Phase planes of x[N, C, H, W] (contiguous) for the implicit-GEMM convolution: see phase_planes.
void nms_phase_planes(const float* x, i64 N, i64 C, i64 H, i64 W, int sh, int sw, int ph, int pw, i64 hq, i64 wq,
                      i64 cstride, float* out, int threads) {
  call_threads = threads;
  phase_planes(x, N, C, H, W, sh, sw, ph, pw, hq, wq, cstride, out);
}

// dst[c * ldd + r] = src[r * lds + c]: see transpose.
void nms_transpose(const float* src, i64 rows, i64 cols, i64 lds, float* dst, i64 ldd, int threads) {
  call_threads = threads;
  transpose(src, rows, cols, lds, dst, ldd);
}

}  // extern "C"

#include "decode.h"
