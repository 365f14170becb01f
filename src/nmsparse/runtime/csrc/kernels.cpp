// CPU kernels of nmsparse's sparse runtime: 1xN block and n:m products, float32.
//
// Built at first use by nmsparse/runtime/_native.py (g++ -O3 -march=native -fopenmp) and called
// through ctypes with raw buffers; no PyTorch headers, so the build takes seconds. With AVX-512 the
// products run register-blocked micro-kernels; without it a portable loop nest (same results).
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
//   at bit j*bits of the row's ceil(count*bits/8) code bytes (see nm_val_off / nm_code_off). Chunk-major order makes the batched kernel's weight reads one
//   sequential stream while the chunk's input rows stay in L1 for all rows.

#include <cstdint>
#include <cstring>
#include <algorithm>
#include <cstdlib>
#include <omp.h>
#if defined(__AVX512F__)
#include <immintrin.h>
#endif

typedef int64_t i64;

namespace {

// Start of row o's values / code bytes in chunk c of an n:m layout (the last chunk may be narrower).
inline i64 nm_val_off(i64 c, i64 o, i64 rows, i64 jc, i64 count) { return c * rows * jc + o * count; }
inline i64 nm_code_off(i64 c, i64 o, i64 rows, i64 jc, i64 count, int bits) {
  return c * rows * ((jc * bits + 7) / 8) + o * ((count * bits + 7) / 8);
}

inline int decode_one(const uint8_t* row, i64 j, int bits) {
  const i64 bit = j * bits;
  return (row[bit >> 3] >> (bit & 7)) & ((1 << bits) - 1);
}

// ---------------------------------------------------------------- portable loop nests
// The epilogue of a finished output row: + bias (when given), then max(., 0) when relu.
inline void epilogue_row(float* y, i64 batch, const float* bias, i64 o, bool relu) {
  if (bias) for (i64 b = 0; b < batch; ++b) y[b] += bias[o];
  if (relu) for (i64 b = 0; b < batch; ++b) y[b] = y[b] > 0.f ? y[b] : 0.f;
}

void block_mm_portable(const float* xt, i64 ldx, const int32_t* cols, const float* vals, i64 rows, i64 kept,
                       i64 block, i64 batch, float* out, i64 ldo, const float* bias, bool relu) {
#pragma omp parallel for schedule(static)
  for (i64 r = 0; r < rows; ++r) {
    for (i64 t = 0; t < block; ++t) std::fill(out + (r * block + t) * ldo, out + (r * block + t) * ldo + batch, 0.f);
    for (i64 k = 0; k < kept; ++k) {
      const float* x = xt + (i64)cols[r * kept + k] * ldx;
      const float* w = vals + (r * kept + k) * block;
      for (i64 t = 0; t < block; ++t) {
        float* y = out + (r * block + t) * ldo;
        const float wt = w[t];
#pragma omp simd
        for (i64 b = 0; b < batch; ++b) y[b] += wt * x[b];
      }
    }
    for (i64 t = 0; t < block; ++t) epilogue_row(out + (r * block + t) * ldo, batch, bias, r * block + t, relu);
  }
}

void nm_mm_portable(const float* xt, i64 ldx, const uint8_t* codes, const float* vals, i64 rows, i64 J,
                    i64 jc, int n, int m, int bits, i64 batch, float* out, i64 ldo, const int32_t* colmap) {
  const i64 chunks = (J + jc - 1) / jc, cc = jc / n * m;
#pragma omp parallel for schedule(static)
  for (i64 o = 0; o < rows; ++o) {
    float* y = out + o * ldo;
    std::fill(y, y + batch, 0.f);
    for (i64 c = 0; c < chunks; ++c) {
      const i64 count = std::min(jc, J - c * jc);
      const uint8_t* row = codes + nm_code_off(c, o, rows, jc, count, bits);
      const float* w = vals + nm_val_off(c, o, rows, jc, count);
      for (i64 j = 0; j < count; ++j) {
        const i64 col = c * cc + (j / n) * m + decode_one(row, j, bits);
        const float* x = xt + (colmap ? (i64)colmap[col] : col) * ldx;
        const float wj = w[j];
#pragma omp simd
        for (i64 b = 0; b < batch; ++b) y[b] += wj * x[b];
      }
    }
  }
}

#if defined(__AVX512F__)
// ---------------------------------------------------------------- AVX-512: 1xN blocks
inline __mmask16 tail_mask(i64 left) { return left >= 16 ? (__mmask16)0xFFFF : (__mmask16)((1u << left) - 1); }

// Batch 1: y[r*B + t] = sum_k x[cols[r,k]] * vals[r,k,t], S block rows at a time. The S rows come
// from S equal parts of the thread's range, so the thread reads S separate weight streams: one
// stream per core measured 11-17 GB/s on 2 threads against 15-24 GB/s for four (the hardware
// prefetcher runs ahead per stream); a software prefetch 4 KB ahead adds a little more.
constexpr int GEMV_STREAMS = 4;
constexpr int GEMV_PREFETCH = 1024;  // floats ahead in each stream

template <int B, int S>
__attribute__((always_inline)) inline void block_gemv_rows(const float* x, const int32_t* const* c,
                                                           const float* const* w, i64 kept, float* const* y,
                                                           const float* const* bias, bool relu) {
  constexpr int V = B / 16;  // vectors per block vector
  __m512 acc[S][V];
#pragma GCC unroll 16
  for (int s = 0; s < S; ++s)
#pragma GCC unroll 16
    for (int v = 0; v < V; ++v) acc[s][v] = _mm512_setzero_ps();
  for (i64 k = 0; k < kept; ++k) {
#pragma GCC unroll 16
    for (int s = 0; s < S; ++s) {
      const float* wk = w[s] + k * B;
#pragma GCC unroll 16
      for (int v = 0; v < V; ++v) _mm_prefetch((const char*)(wk + GEMV_PREFETCH + 16 * v), _MM_HINT_T0);
      const __m512 xv = _mm512_set1_ps(x[c[s][k]]);
#pragma GCC unroll 16
      for (int v = 0; v < V; ++v) acc[s][v] = _mm512_fmadd_ps(_mm512_loadu_ps(wk + 16 * v), xv, acc[s][v]);
    }
  }
#pragma GCC unroll 16
  for (int s = 0; s < S; ++s)
#pragma GCC unroll 16
    for (int v = 0; v < V; ++v) {
      __m512 r = bias[s] ? _mm512_add_ps(acc[s][v], _mm512_loadu_ps(bias[s] + 16 * v)) : acc[s][v];
      _mm512_storeu_ps(y[s] + 16 * v, relu ? _mm512_max_ps(r, _mm512_setzero_ps()) : r);
    }
}

template <int B>
void block_gemv_avx512(const float* x, const int32_t* cols, const float* vals, i64 rows, i64 kept, float* out,
                       const float* bias, bool relu) {
  constexpr int S = GEMV_STREAMS;
#pragma omp parallel
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

// Batched: a T x (16*NB) register tile of outputs (T outputs of a block row, 16*NB batch items).
// Per kept column: NB input vectors, T broadcast weights, T*NB FMAs, over kept columns k0..k1
// (one column chunk; `first` starts from zero, otherwise from the partial sums in y).
template <int T, int NB>
__attribute__((always_inline)) inline void block_tile(const float* xt, i64 ldx, const int32_t* c, const float* w, i64 block, i64 k0, i64 k1,
                       i64 b0, i64 batch, float* y, i64 ldo, bool first, bool last, const float* bias, bool relu) {
  __m512 acc[T][NB];
  __mmask16 mk[NB];
  #pragma GCC unroll 16
  for (int v = 0; v < NB; ++v) mk[v] = tail_mask(batch - b0 - 16 * v > 0 ? batch - b0 - 16 * v : 0);
  #pragma GCC unroll 16
  for (int t = 0; t < T; ++t)
    #pragma GCC unroll 16
    for (int v = 0; v < NB; ++v)
      acc[t][v] = first ? _mm512_setzero_ps() : _mm512_maskz_loadu_ps(mk[v], y + t * ldo + b0 + 16 * v);
  for (i64 k = k0; k < k1; ++k) {
    const float* x = xt + (i64)c[k] * ldx + b0;
    __m512 xv[NB];
    #pragma GCC unroll 16
    for (int v = 0; v < NB; ++v) xv[v] = _mm512_maskz_loadu_ps(mk[v], x + 16 * v);
    const float* wk = w + k * block;
    #pragma GCC unroll 16
    for (int t = 0; t < T; ++t) {
      const __m512 wt = _mm512_set1_ps(wk[t]);
      #pragma GCC unroll 16
      for (int v = 0; v < NB; ++v) acc[t][v] = _mm512_fmadd_ps(wt, xv[v], acc[t][v]);
    }
  }
  #pragma GCC unroll 16
  for (int t = 0; t < T; ++t)
    #pragma GCC unroll 16
    for (int v = 0; v < NB; ++v) {
      __m512 r = acc[t][v];
      if (last && bias) r = _mm512_add_ps(r, _mm512_set1_ps(bias[t]));
      if (last && relu) r = _mm512_max_ps(r, _mm512_setzero_ps());
      _mm512_mask_storeu_ps(y + t * ldo + b0 + 16 * v, mk[v], r);
    }
}

constexpr int BT = 4, BNB = 4;  // 1xN tile: 4 outputs x 64 batch items (16 accumulators)

// One block row's outputs over kept columns k0..k1, for the batch items b0 .. b0 + 16*NB - 1.
template <int NB>
inline void block_row(const float* xt, i64 ldx, const int32_t* cr, const float* w, i64 block, i64 k0, i64 k1,
                      i64 b0, i64 batch, float* y, i64 ldo, bool first, bool last, const float* bias, bool relu) {
  if (block % BT == 0)
    for (i64 t0 = 0; t0 < block; t0 += BT)
      block_tile<BT, NB>(xt, ldx, cr, w + t0, block, k0, k1, b0, batch, y + t0 * ldo, ldo, first, last,
                         bias ? bias + t0 : nullptr, relu);
  else
    for (i64 t0 = 0; t0 < block; ++t0)
      block_tile<1, NB>(xt, ldx, cr, w + t0, block, k0, k1, b0, batch, y + t0 * ldo, ldo, first, last,
                        bias ? bias + t0 : nullptr, relu);
}

// Loop order per thread (a contiguous range of block rows): batch tile, column chunk, block row.
// A chunk's input rows (cc x 16*BNB floats) stay in L1 while all block rows of the thread use them;
// kstart says which kept columns of a block row fall into the chunk. With a single chunk (at most
// 128 columns) the order is block row, then batch tile: each output row is then written front to
// back (measured 1.7x faster on a 64 -> 256 1x1 convolution of 3136 pixels, whose output traffic
// dominates). The last tile is only as wide as the batch items left (in vectors of 16): 196 items
// cost 13 vectors, not 16. Input rows are addressed as xt + cols[k] * ldx: with ldx = 1, cols may
// hold element offsets (the implicit-GEMM convolution of _native.block_conv).
void block_mm_avx512(const float* xt, i64 ldx, const int32_t* cols, const int32_t* kstart, i64 chunks,
                     const float* vals, i64 rows, i64 kept, i64 block, i64 batch, float* out, i64 ldo,
                     const float* bias, bool relu) {
  const i64 tiles = (batch + 16 * BNB - 1) / (16 * BNB);
  auto step = [&](i64 bt, i64 c, i64 r) {
    const i64 b0 = bt * 16 * BNB;
    const i64 k0 = kstart[r * (chunks + 1) + c], k1 = kstart[r * (chunks + 1) + c + 1];
    const int32_t* cr = cols + r * kept;
    const float* w = vals + r * kept * block;
    float* y = out + r * block * ldo;
    const float* br = bias ? bias + r * block : nullptr;
    const bool first = c == 0, last = c == chunks - 1;
    switch (std::min<i64>(BNB, (batch - b0 + 15) / 16)) {
      case 1: return block_row<1>(xt, ldx, cr, w, block, k0, k1, b0, batch, y, ldo, first, last, br, relu);
      case 2: return block_row<2>(xt, ldx, cr, w, block, k0, k1, b0, batch, y, ldo, first, last, br, relu);
      case 3: return block_row<3>(xt, ldx, cr, w, block, k0, k1, b0, batch, y, ldo, first, last, br, relu);
      default: return block_row<BNB>(xt, ldx, cr, w, block, k0, k1, b0, batch, y, ldo, first, last, br, relu);
    }
  };
#pragma omp parallel
  {
    const int nth = omp_get_num_threads(), tid = omp_get_thread_num();
    const i64 r0 = rows * tid / nth, r1 = rows * (tid + 1) / nth;
    if (chunks == 1) {
      for (i64 r = r0; r < r1; ++r)
        for (i64 bt = 0; bt < tiles; ++bt) step(bt, 0, r);
    } else {
      for (i64 bt = 0; bt < tiles; ++bt)
        for (i64 c = 0; c < chunks; ++c)
          for (i64 r = r0; r < r1; ++r) step(bt, c, r);
    }
  }
}

// ---------------------------------------------------------------- AVX-512: n:m
// Offsets of the 16 values j0..j0+15 (j0 a multiple of 16) as 16 int32 lanes.
inline __m512i decode16(const uint8_t* row, i64 j0, int bits) {
  const uint8_t* p = row + ((j0 * bits) >> 3);
  if (bits == 8) return _mm512_cvtepu8_epi32(_mm_loadu_si128((const __m128i*)p));
  if (bits == 4) {
    uint64_t q;
    std::memcpy(&q, p, 8);
    const __m512i lanes = _mm512_inserti64x4(_mm512_castsi256_si512(_mm256_set1_epi32((int)(uint32_t)q)),
                                             _mm256_set1_epi32((int)(uint32_t)(q >> 32)), 1);
    const __m512i sh = _mm512_setr_epi32(0, 4, 8, 12, 16, 20, 24, 28, 0, 4, 8, 12, 16, 20, 24, 28);
    return _mm512_and_si512(_mm512_srlv_epi32(lanes, sh), _mm512_set1_epi32(15));
  }
  uint32_t word;
  if (bits == 2) {
    std::memcpy(&word, p, 4);
  } else {
    uint16_t half;
    std::memcpy(&half, p, 2);
    word = half;
  }
  const __m512i sh = _mm512_mullo_epi32(_mm512_setr_epi32(0, 1, 2, 3, 4, 5, 6, 7, 8, 9, 10, 11, 12, 13, 14, 15),
                                        _mm512_set1_epi32(bits));
  return _mm512_and_si512(_mm512_srlv_epi32(_mm512_set1_epi32((int)word), sh), _mm512_set1_epi32((1 << bits) - 1));
}

// In-chunk column base of value i of a 16-value chunk: (i / n) * m (n divides 16).
inline __m512i chunk_base(int n, int m) {
  alignas(64) int32_t b[16];
  for (int i = 0; i < 16; ++i) b[i] = (i / n) * m;
  return _mm512_load_si512(b);
}

// The threads of a batch-1 n:m product: each takes rows o0..o1-1 and keeps a 16-lane partial sum
// per row in `part`; body(o0, o1, part) adds to them chunk by chunk (and may add scalar tails to
// out[o]); the partial sums are reduced into out at the end.
template <class Body>
void nm_gemv_threads(i64 rows, float* out, const float* bias, bool relu, Body body) {
#pragma omp parallel
  {
    const int nth = omp_get_num_threads(), tid = omp_get_thread_num();
    const i64 o0 = rows * tid / nth, o1 = rows * (tid + 1) / nth;
    float* part = (float*)aligned_alloc(64, std::max<i64>(1, o1 - o0) * 16 * sizeof(float));
    for (i64 o = o0; o < o1; ++o) {
      _mm512_store_ps(part + (o - o0) * 16, _mm512_setzero_ps());
      out[o] = 0.f;
    }
    body(o0, o1, part);
    for (i64 o = o0; o < o1; ++o) {
      const float y = out[o] + _mm512_reduce_add_ps(_mm512_load_ps(part + (o - o0) * 16)) + (bias ? bias[o] : 0.f);
      out[o] = relu && y < 0.f ? 0.f : y;
    }
    free(part);
  }
}

// Batch 1, generic: 16 kept values at a time; their inputs come from a window of 16*m/n columns:
// one permute for windows of 16, a gather otherwise (windows of 32 go to nm_gemv32_avx512).
// Chunk-major like the batched kernel, so each thread streams one contiguous run of weights per chunk.
void nm_gemv_avx512(const float* x, const uint8_t* codes, const float* vals, i64 rows, i64 J, i64 jc, int n,
                    int m, int bits, float* out, const float* bias, bool relu) {
  const __m512i base = chunk_base(n, m);
  const i64 window = 16 * m / n, chunks = (J + jc - 1) / jc, cc = jc / n * m;
  nm_gemv_threads(rows, out, bias, relu, [&](i64 o0, i64 o1, float* part) {
    for (i64 c = 0; c < chunks; ++c) {
      const i64 count = std::min(jc, J - c * jc), steps = count / 16;
      const float* xc = x + c * cc;
      for (i64 o = o0; o < o1; ++o) {
        const uint8_t* row = codes + nm_code_off(c, o, rows, jc, count, bits);
        const float* w = vals + nm_val_off(c, o, rows, jc, count);
        __m512 acc0 = _mm512_load_ps(part + (o - o0) * 16), acc1 = _mm512_setzero_ps();  // two FMA chains
        for (i64 s = 0; s < steps; ++s) {
          const __m512i idx = _mm512_add_epi32(decode16(row, s * 16, bits), base);
          const float* xs = xc + s * window;
          __m512 xv;
          if (window == 16) xv = _mm512_permutexvar_ps(idx, _mm512_loadu_ps(xs));
          else xv = _mm512_i32gather_ps(idx, xs, 4);
          if (s & 1) acc1 = _mm512_fmadd_ps(_mm512_loadu_ps(w + s * 16), xv, acc1);
          else acc0 = _mm512_fmadd_ps(_mm512_loadu_ps(w + s * 16), xv, acc0);
        }
        _mm512_store_ps(part + (o - o0) * 16, _mm512_add_ps(acc0, acc1));
        for (i64 j = steps * 16; j < count; ++j) out[o] += w[j] * xc[(j / n) * m + decode_one(row, j, bits)];
      }
    }
  });
}

// Batch 1 for windows of 32 columns (1:2, 2:4, 4:8, 8:16), specialised on the code width so the
// decode is a broadcast, a variable shift and one ternary-logic op ((codes & mask) | base), and
// R rows at a time share each loaded input window. The R rows come from R equal parts of the
// thread's rows, so within a chunk the thread reads R separate weight streams (see GEMV_STREAMS),
// each prefetched 4 KB ahead.

template <int BITS>
__attribute__((always_inline)) inline __m512i codes16(const uint8_t* p) {
  if constexpr (BITS == 4) {
    uint64_t q;
    std::memcpy(&q, p, 8);
    return _mm512_inserti64x4(_mm512_castsi256_si512(_mm256_set1_epi32((int)(uint32_t)q)),
                              _mm256_set1_epi32((int)(uint32_t)(q >> 32)), 1);
  } else if constexpr (BITS == 2) {
    uint32_t word;
    std::memcpy(&word, p, 4);
    return _mm512_set1_epi32((int)word);
  } else {
    uint16_t half;
    std::memcpy(&half, p, 2);
    return _mm512_set1_epi32((int)half);
  }
}

template <int BITS>
inline __m512i code_shifts() {
  if constexpr (BITS == 4) return _mm512_setr_epi32(0, 4, 8, 12, 16, 20, 24, 28, 0, 4, 8, 12, 16, 20, 24, 28);
  else return _mm512_mullo_epi32(_mm512_setr_epi32(0, 1, 2, 3, 4, 5, 6, 7, 8, 9, 10, 11, 12, 13, 14, 15),
                                 _mm512_set1_epi32(BITS));
}

template <int BITS, int R>
__attribute__((always_inline)) inline void nm_gemv32_rows(const float* xc, const uint8_t* row, i64 cstride,
                                                          const float* w, i64 wstride, i64 steps, __m512i base,
                                                          __m512i shifts, float* part, i64 pstride) {
  const __m512i low = _mm512_set1_epi32((1 << BITS) - 1);
  __m512 acc[R];
#pragma GCC unroll 8
  for (int q = 0; q < R; ++q) acc[q] = _mm512_load_ps(part + q * pstride);
  for (i64 s = 0; s < steps; ++s) {
    const __m512 lo = _mm512_loadu_ps(xc + s * 32), hi = _mm512_loadu_ps(xc + s * 32 + 16);
#pragma GCC unroll 8
    for (int q = 0; q < R; ++q) {
      const __m512i idx = _mm512_ternarylogic_epi32(
          _mm512_srlv_epi32(codes16<BITS>(row + q * cstride + s * 2 * BITS), shifts), low, base, 0xEA);
      _mm_prefetch((const char*)(w + q * wstride + s * 16 + GEMV_PREFETCH), _MM_HINT_T0);
      acc[q] = _mm512_fmadd_ps(_mm512_loadu_ps(w + q * wstride + s * 16), _mm512_permutex2var_ps(lo, idx, hi), acc[q]);
    }
  }
#pragma GCC unroll 8
  for (int q = 0; q < R; ++q) _mm512_store_ps(part + q * pstride, acc[q]);
}

template <int BITS>
void nm_gemv32_avx512(const float* x, const uint8_t* codes, const float* vals, i64 rows, i64 J, i64 jc, int n,
                      int m, float* out, const float* bias, bool relu) {
  constexpr int R = GEMV_STREAMS;
  const __m512i base = chunk_base(n, m), shifts = code_shifts<BITS>();
  const i64 chunks = (J + jc - 1) / jc, cc = jc / n * m;
  nm_gemv_threads(rows, out, bias, relu, [&](i64 o0, i64 o1, float* part) {
    for (i64 c = 0; c < chunks; ++c) {
      const i64 count = std::min(jc, J - c * jc), steps = count / 16, cstride = (count * BITS + 7) / 8;
      const float* xc = x + c * cc;
      const uint8_t* row = codes + nm_code_off(c, o0, rows, jc, count, BITS);
      const float* w = vals + nm_val_off(c, o0, rows, jc, count);
      const i64 len = (o1 - o0) / R;  // row i of each of the R parts, then the rows left over
      for (i64 i = 0; i < len; ++i)
        nm_gemv32_rows<BITS, R>(xc, row + i * cstride, len * cstride, w + i * count, len * count, steps, base, shifts,
                                part + i * 16, len * 16);
      for (i64 i = R * len; i < o1 - o0; ++i)
        nm_gemv32_rows<BITS, 1>(xc, row + i * cstride, 0, w + i * count, 0, steps, base, shifts, part + i * 16, 0);
      if (steps * 16 < count) {  // a narrower last chunk: the values past the last whole vector
        const uint8_t* r0 = codes + nm_code_off(c, o0, rows, jc, count, BITS);
        const float* w0 = vals + nm_val_off(c, o0, rows, jc, count);
        for (i64 q = o0; q < o1; ++q)
          for (i64 j = steps * 16; j < count; ++j)
            out[q] += w0[(q - o0) * count + j] * xc[(j / n) * m + decode_one(r0 + (q - o0) * cstride, j, BITS)];
      }
    }
  });
}

// Batched: R rows x (16*NB) batch items of accumulators; every kept value scales one input row
// slice. `col`/`w` point at the chunk's first kept value of the tile's first row (row stride cs/ws).
template <int R, int NB, bool MASK>
__attribute__((always_inline)) inline void nm_tile(const float* xt, i64 ldx, const int32_t* col, i64 cs,
                                                   const float* w, i64 ws, i64 count, i64 b0, i64 batch, float* y,
                                                   i64 ldo, bool first) {
  __m512 acc[R][NB];
  __mmask16 mk[NB];
#pragma GCC unroll 16
  for (int v = 0; v < NB; ++v) mk[v] = MASK ? tail_mask(batch - b0 - 16 * v > 0 ? batch - b0 - 16 * v : 0) : 0xFFFF;
#pragma GCC unroll 16
  for (int q = 0; q < R; ++q)
#pragma GCC unroll 16
    for (int v = 0; v < NB; ++v)
      acc[q][v] = first ? _mm512_setzero_ps()
                        : (MASK ? _mm512_maskz_loadu_ps(mk[v], y + q * ldo + b0 + 16 * v)
                                : _mm512_loadu_ps(y + q * ldo + b0 + 16 * v));
  for (i64 j = 0; j < count; ++j) {
#pragma GCC unroll 16
    for (int q = 0; q < R; ++q) {
      const float* x = xt + (i64)col[q * cs + j] * ldx + b0;
      const __m512 wq = _mm512_set1_ps(w[q * ws + j]);
#pragma GCC unroll 16
      for (int v = 0; v < NB; ++v)
        acc[q][v] = _mm512_fmadd_ps(wq, MASK ? _mm512_maskz_loadu_ps(mk[v], x + 16 * v) : _mm512_loadu_ps(x + 16 * v),
                                    acc[q][v]);
    }
  }
#pragma GCC unroll 16
  for (int q = 0; q < R; ++q)
#pragma GCC unroll 16
    for (int v = 0; v < NB; ++v) {
      if (MASK) _mm512_mask_storeu_ps(y + q * ldo + b0 + 16 * v, mk[v], acc[q][v]);
      else _mm512_storeu_ps(y + q * ldo + b0 + 16 * v, acc[q][v]);
    }
}

constexpr int NR = 3, NNB = 4;  // n:m tile: 3 rows x 64 batch items (12 accumulators)

template <bool MASK, int NB, int R = NR>
inline void nm_tile_rows(const float* xt, i64 ldx, const int32_t* col, i64 cs, const float* w, i64 J, i64 count,
                         i64 nr, i64 b0, i64 batch, float* y, i64 ldo, bool first) {
  if (nr == R) return nm_tile<R, NB, MASK>(xt, ldx, col, cs, w, J, count, b0, batch, y, ldo, first);
  for (i64 q = 0; q < nr; ++q)
    nm_tile<1, NB, MASK>(xt, ldx, col + q * cs, cs, w + q * J, J, count, b0, batch, y + q * ldo, ldo, first);
}

// Loop order per thread (a contiguous range of rows): batch tile, then a chunk of input columns,
// then the rows. The chunk's input rows (cc x 16*NNB floats, 32 KB for 128 columns) stay in L1 while
// every row of the thread uses them; the weights arrive as one sequential stream (chunk-major);
// accumulators go back to the output between chunks. A tile is only as many vectors wide as the
// batch items it holds; up to 16 items (one vector) a tile takes 8 rows, so that 8 independent
// accumulator chains hide the FMA latency (4096x4096 2:4 at batch 8: 15.6 ms with four mostly
// masked vectors and 3 rows, 9.2 with one vector and 3 rows, see docs/benchmarks.md for 8 rows).
void nm_mm_avx512(const float* xt, i64 ldx, const uint8_t* codes, const float* vals, i64 rows, i64 J, i64 jc,
                  int n, int m, int bits, i64 batch, float* out, i64 ldo, const int32_t* colmap) {
  const i64 tiles = (batch + 16 * NNB - 1) / (16 * NNB);
  const i64 chunks = (J + jc - 1) / jc, cc = jc / n * m;
  const bool vec = (16 % n) == 0 && jc % 16 == 0;
  const i64 RB = batch <= 16 ? 8 : NR;  // rows per tile
  // col holds element offsets (row * ldx) where they fit in int32: no multiply per loaded input row.
  // colmap (may be null) maps a weight column to its input row: the implicit-GEMM convolution's offsets.
  const bool offsets = !colmap && (J / n * m + m) * ldx < (i64(1) << 31);
  const __m512i scale = _mm512_set1_epi32(offsets ? (int)ldx : 1);
  const i64 lx = offsets ? 1 : ldx;
  const i64 row_blocks = (rows + RB - 1) / RB;
  const __m512i base = chunk_base(vec ? n : 1, m);
  if (J == 0) {
    for (i64 o = 0; o < rows; ++o) std::fill(out + o * ldo, out + o * ldo + batch, 0.f);
    return;
  }
#pragma omp parallel
  {
    const int nth = omp_get_num_threads(), tid = omp_get_thread_num();
    const i64 rb0 = row_blocks * tid / nth, rb1 = row_blocks * (tid + 1) / nth;
    int32_t* col = new int32_t[RB * jc];
    for (i64 bt = 0; bt < tiles; ++bt) {
      const i64 b0 = bt * 16 * NNB;
      const bool full = b0 + 16 * NNB <= batch;
      const i64 vectors = std::min<i64>(NNB, (batch - b0 + 15) / 16);
      for (i64 c = 0; c < chunks; ++c) {
        const i64 count = std::min(jc, J - c * jc);
        for (i64 rb = rb0; rb < rb1; ++rb) {
          const i64 o0 = rb * RB;
          const i64 nr = std::min<i64>(RB, rows - o0);
          for (i64 q = 0; q < nr; ++q) {  // input rows (or their element offsets) of this chunk's kept values
            const uint8_t* row = codes + nm_code_off(c, o0 + q, rows, jc, count, bits);
            i64 j = 0;
            if (vec)
              for (; j + 16 <= count; j += 16) {
                __m512i v = _mm512_add_epi32(_mm512_add_epi32(decode16(row, j, bits), base),
                                             _mm512_set1_epi32((int)(c * cc + (j / n) * m)));
                if (colmap) v = _mm512_i32gather_epi32(v, colmap, 4);
                _mm512_storeu_si512(col + q * jc + j, _mm512_mullo_epi32(v, scale));
              }
            for (; j < count; ++j) {
              const i64 cj = c * cc + (j / n) * m + decode_one(row, j, bits);
              col[q * jc + j] = (int32_t)((colmap ? (i64)colmap[cj] : cj) * (offsets ? ldx : 1));
            }
          }
          const float* w = vals + nm_val_off(c, o0, rows, jc, count);
          float* y = out + o0 * ldo;
          const int kind = RB == 8 ? 0 : full ? NNB + 1 : (int)vectors;  // which tile shape runs
          switch (kind) {
            case 0: nm_tile_rows<true, 1, 8>(xt, lx, col, jc, w, count, count, nr, b0, batch, y, ldo, c == 0); break;
            case 1: nm_tile_rows<true, 1>(xt, lx, col, jc, w, count, count, nr, b0, batch, y, ldo, c == 0); break;
            case 2: nm_tile_rows<true, 2>(xt, lx, col, jc, w, count, count, nr, b0, batch, y, ldo, c == 0); break;
            case 3: nm_tile_rows<true, 3>(xt, lx, col, jc, w, count, count, nr, b0, batch, y, ldo, c == 0); break;
            case NNB: nm_tile_rows<true, NNB>(xt, lx, col, jc, w, count, count, nr, b0, batch, y, ldo, c == 0); break;
            default: nm_tile_rows<false, NNB>(xt, lx, col, jc, w, count, count, nr, b0, batch, y, ldo, c == 0);
          }
        }
      }
    }
    delete[] col;
  }
}
#endif

// ---------------------------------------------------------------- im2col
// out[row * ldo + oy*ow + ox] for one image x[C, H, W] (contiguous planes); row = c*kh*kw + dy*kw + dx
// ("chw", PyTorch's weight order) or (dy*kw + dx)*C + c ("hwc"). Zero padding. Memory-bound: rows
// are written once, with straight copies where the stride is 1.
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

void im2col_image(const float* x, i64 C, i64 H, i64 W, int kh, int kw, int sh, int sw, int ph, int pw, int dh, int dw,
                  bool hwc, float* out, i64 ldo) {
  const i64 oh = (H + 2 * ph - dh * (kh - 1) - 1) / sh + 1, ow = (W + 2 * pw - dw * (kw - 1) - 1) / sw + 1;
#pragma omp parallel for collapse(2) schedule(static)
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
// the [in, tokens] matrix the products read. 16x16 tiles through registers (AVX-512) or a tiled loop;
// PyTorch's strided copy measured ~4 GB/s for this.
#if defined(__AVX512F__)
inline void transpose16(const float* src, i64 lds, float* dst, i64 ldd) {
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
#endif

void transpose(const float* src, i64 rows, i64 cols, i64 lds, float* dst, i64 ldd) {
#pragma omp parallel for schedule(static)
  for (i64 c0 = 0; c0 < cols; c0 += 16) {
    for (i64 r0 = 0; r0 < rows; r0 += 16) {
#if defined(__AVX512F__)
      if (r0 + 16 <= rows && c0 + 16 <= cols) {
        transpose16(src + r0 * lds + c0, lds, dst + c0 * ldd + r0, ldd);
        continue;
      }
#endif
      for (i64 c = c0; c < std::min(cols, c0 + 16); ++c)
        for (i64 r = r0; r < std::min(rows, r0 + 16); ++r) dst[c * ldd + r] = src[r * lds + c];
    }
  }
}

// ---------------------------------------------------------------- phase planes
// The zero-padded input of the implicit-GEMM convolution, cut into sh*sw phase planes:
// out[((py*sw + px)*C + c)*N + n][i][j] = x[n][c][i*sh + py - ph][j*sw + px - pw] (zero outside),
// i < hq, j < wq. For stride 1 this is the padded input in [C, N, Hp, Wp] order. One pass.
void phase_planes(const float* x, i64 N, i64 C, i64 H, i64 W, int sh, int sw, int ph, int pw, i64 hq, i64 wq,
                  float* out) {
#pragma omp parallel for collapse(2) schedule(static)
  for (i64 phase = 0; phase < (i64)sh * sw; ++phase) {
    for (i64 c = 0; c < C; ++c) {
      const int py = (int)(phase / sw), px = (int)(phase % sw);
      for (i64 n = 0; n < N; ++n) {
        const float* src = x + (n * C + c) * H * W;
        float* dst = out + ((phase * C + c) * N + n) * hq * wq;
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

// 512 when the AVX-512 micro-kernels are compiled in, 0 for the portable loop nests.
int nms_isa() {
#if defined(__AVX512F__)
  return 512;
#else
  return 0;
#endif
}

// out[rows*block, batch] = W @ xt (+ bias[o], then max(., 0) with relu) for a 1xN-packed W; `portable`
// forces the portable loop nest. kstart[rows, chunks + 1]: see the top of the file (read by the AVX-512
// batched kernel only). bias may be null.
void nms_block_mm(const float* xt, i64 ldx, const int32_t* cols, const int32_t* kstart, i64 chunks, const float* vals,
                  i64 rows, i64 kept, i64 block, i64 batch, float* out, i64 ldo, const float* bias, int relu,
                  int threads, int portable) {
  omp_set_num_threads(threads);
#if defined(__AVX512F__)
  if (!portable) {
    if (batch == 1 && ldx == 1 && ldo == 1) {
      if (block == 16) return block_gemv_avx512<16>(xt, cols, vals, rows, kept, out, bias, relu != 0);
      if (block == 32) return block_gemv_avx512<32>(xt, cols, vals, rows, kept, out, bias, relu != 0);
      if (block == 64) return block_gemv_avx512<64>(xt, cols, vals, rows, kept, out, bias, relu != 0);
    }
    return block_mm_avx512(xt, ldx, cols, kstart, chunks, vals, rows, kept, block, batch, out, ldo, bias, relu != 0);
  }
#endif
  (void)portable;
  block_mm_portable(xt, ldx, cols, vals, rows, kept, block, batch, out, ldo, bias, relu != 0);
}

// out[rows, batch] = W @ xt (+ bias[o], then max(., 0) with relu; bias may be null) for an n:m-packed W
// (chunk-major layout, see the top of the file). The batch-1 kernels apply the epilogue as they
// reduce each row; the batched ones in a pass over the just-written (cache-resident) output.
// colmap (may be null): input row of each weight column, in place of the column itself (the
// implicit-GEMM convolution passes element offsets into its phase planes, with ldx = 1).
void nms_nm_mm(const float* xt, i64 ldx, const uint8_t* codes, const float* vals, i64 rows, i64 J, i64 jc,
               int n, int m, int bits, i64 batch, float* out, i64 ldo, const float* bias, int relu,
               const int32_t* colmap, int threads, int portable) {
  omp_set_num_threads(threads);
#if defined(__AVX512F__)
  if (!portable) {
    if (batch == 1 && ldx == 1 && ldo == 1 && (16 % n) == 0 && !colmap) {
      if (16 * m / n == 32 && bits == 1) return nm_gemv32_avx512<1>(xt, codes, vals, rows, J, jc, n, m, out, bias, relu);
      if (16 * m / n == 32 && bits == 2) return nm_gemv32_avx512<2>(xt, codes, vals, rows, J, jc, n, m, out, bias, relu);
      if (16 * m / n == 32 && bits == 4) return nm_gemv32_avx512<4>(xt, codes, vals, rows, J, jc, n, m, out, bias, relu);
      return nm_gemv_avx512(xt, codes, vals, rows, J, jc, n, m, bits, out, bias, relu);
    }
    nm_mm_avx512(xt, ldx, codes, vals, rows, J, jc, n, m, bits, batch, out, ldo, colmap);
  } else {
    nm_mm_portable(xt, ldx, codes, vals, rows, J, jc, n, m, bits, batch, out, ldo, colmap);
  }
#else
  (void)portable;
  nm_mm_portable(xt, ldx, codes, vals, rows, J, jc, n, m, bits, batch, out, ldo, colmap);
#endif
  if (bias || relu) {
#pragma omp parallel for schedule(static)
    for (i64 o = 0; o < rows; ++o) epilogue_row(out + o * ldo, batch, bias, o, relu != 0);
  }
}

// im2col of a batch x[N, C, H, W] (contiguous) into out[C*kh*kw, N*oh*ow]: image n fills columns
// n*oh*ow .. (n+1)*oh*ow - 1, the transposed layout the products read.
void nms_im2col(const float* x, i64 N, i64 C, i64 H, i64 W, int kh, int kw, int sh, int sw, int ph, int pw, int dh,
                int dw, int hwc, float* out, int threads) {
  omp_set_num_threads(threads);
  const i64 oh = (H + 2 * ph - dh * (kh - 1) - 1) / sh + 1, ow = (W + 2 * pw - dw * (kw - 1) - 1) / sw + 1;
  for (i64 n = 0; n < N; ++n)
    im2col_image(x + n * C * H * W, C, H, W, kh, kw, sh, sw, ph, pw, dh, dw, hwc != 0, out + n * oh * ow, N * oh * ow);
}

// Phase planes of x[N, C, H, W] (contiguous) for the implicit-GEMM convolution: see phase_planes.
void nms_phase_planes(const float* x, i64 N, i64 C, i64 H, i64 W, int sh, int sw, int ph, int pw, i64 hq, i64 wq,
                      float* out, int threads) {
  omp_set_num_threads(threads);
  phase_planes(x, N, C, H, W, sh, sw, ph, pw, hq, wq, out);
}

// dst[c * ldd + r] = src[r * lds + c]: see transpose.
void nms_transpose(const float* src, i64 rows, i64 cols, i64 lds, float* dst, i64 ldd, int threads) {
  omp_set_num_threads(threads);
  transpose(src, rows, cols, lds, dst, ldd);
}

}  // extern "C"
