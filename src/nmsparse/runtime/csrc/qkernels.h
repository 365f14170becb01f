// Quantized products of nmsparse's runtime: the kept values of an n:m or 1xN layout, or a dense
// weight, stored as 8- or 4-bit integers with one float16 scale per group of G values along the
// input axis (symmetric: value = q * scale). Included by kernels.cpp inside its anonymous
// namespace, after the vector type and the n:m helpers it reuses; the same source builds for every
// instruction set.
//
// Integer storage (nmsparse/runtime/quant.py writes it):
//   QB = 8: one signed byte per value, in the order of the float32 layout's values.
//   QB = 4: value i of a segment in the low nibble of byte i/2 when i is even, the high nibble when
//           odd, stored as q + 8 (0..15); every segment has an even length, so segments start on
//           whole bytes (offsets below are in values; bytes = values * QB / 8).
// Scales: float16 (h16, read as float), one per group of G consecutive values of a segment (the
// last group of a segment may be shorter). A segment is
//   n:m    the `count` kept values of row o in chunk c (see the top of kernels.cpp); its scales start
//          at c * rows * ceil(jc / G) + o * ceil(count / G)
//   dense  one row (`cols` values); scales start at o * ceil(cols / G)
//   1xN    kept values k of block row r for each of the B outputs t: scales[(r * ceil(K / G) + k / G) * B + t]
//
// Batch 1 (a decode step) runs the weight-only products below: integers are widened and converted to
// float in registers, summed per group in float32 and scaled once per group, so the weights are read
// at 1 (int8) or 1/2 (int4) byte per value. Batched products dequantize the weight once per call
// into the float32 layout (nms_q_dequant) and run the float32 kernels.

// ---------------------------------------------------------------- dequantize in registers
// VW values starting at value index 0 of p (QB = 4: p on a whole byte), as floats (not scaled).
// The widening is spelled per instruction set: GCC 12 lowers __builtin_convertvector of a byte
// vector to one scalar conversion per lane (measured: 5 GB/s instead of memory speed).
#if defined(__AVX512F__) || defined(__AVX2__) || defined(__SSE2__)
// 2*h bytes of nibble pairs (h <= 8) as 4*h bytes, one value each in order (low nibble first), + 8
inline __m128i nibbles(const uint8_t* p, int h) {
  uint64_t w = 0;
  std::memcpy(&w, p, h);
  const __m128i b = _mm_unpacklo_epi8(_mm_cvtsi64_si128((long long)w), _mm_setzero_si128());  // 16-bit lanes
  return _mm_or_si128(_mm_and_si128(b, _mm_set1_epi16(0x000F)), _mm_and_si128(_mm_slli_epi16(b, 4),
                                                                                _mm_set1_epi16(0x0F00)));
}
#endif
template <int QB>
inline vf deq(const uint8_t* p) {
#if defined(__AVX512F__)
  const __m128i b = QB == 8 ? _mm_loadu_si128((const __m128i*)p) : nibbles(p, 8);
  const __m512i i = QB == 8 ? _mm512_cvtepi8_epi32(b) : _mm512_sub_epi32(_mm512_cvtepu8_epi32(b), _mm512_set1_epi32(8));
  return _mm512_cvtepi32_ps(i);
#elif defined(__AVX2__)
  const __m128i b = QB == 8 ? _mm_loadl_epi64((const __m128i*)p) : nibbles(p, 4);
  const __m256i i = QB == 8 ? _mm256_cvtepi8_epi32(b) : _mm256_sub_epi32(_mm256_cvtepu8_epi32(b), _mm256_set1_epi32(8));
  return _mm256_cvtepi32_ps(i);
#elif defined(__aarch64__) || defined(__ARM_NEON)
  if constexpr (QB == 8) {
    uint32_t w;
    std::memcpy(&w, p, 4);
    const int16x8_t h = vmovl_s8(vreinterpret_s8_u32(vdup_n_u32(w)));
    return vcvtq_f32_s32(vmovl_s16(vget_low_s16(h)));
  } else {
    return vcvtq_f32_s32(vsubq_s32(vreinterpretq_s32_u32(decode<4>(p)), vdupq_n_s32(8)));
  }
#elif defined(__SSE2__)
  if constexpr (QB == 8) {
    int32_t w;
    std::memcpy(&w, p, 4);
    __m128i b = _mm_cvtsi32_si128(w);
    b = _mm_unpacklo_epi8(b, b);
    b = _mm_srai_epi32(_mm_unpacklo_epi16(b, b), 24);  // sign-extended bytes
    return _mm_cvtepi32_ps(b);
  } else {
    const __m128i i = _mm_sub_epi32(_mm_unpacklo_epi16(_mm_unpacklo_epi8(nibbles(p, 2), _mm_setzero_si128()),
                                                       _mm_setzero_si128()), _mm_set1_epi32(8));
    return _mm_cvtepi32_ps(i);
  }
#else
  vf r;
  for (int i = 0; i < VW; ++i)
    r[i] = QB == 8 ? (float)(int8_t)p[i] : (float)((p[i >> 1] >> ((i & 1) * 4)) & 15) - 8.f;
  return r;
#endif
}

template <int QB>
inline float deq_one(const uint8_t* seg, i64 i) {
  if constexpr (QB == 8) return (float)(int8_t)seg[i];
  else return (float)((seg[i >> 1] >> ((i & 1) * 4)) & 15) - 8.f;
}

inline void prefetch_bytes(const uint8_t* p) { __builtin_prefetch(p, 0, 3); }
#if defined(__AVX512F__) || defined(__AVX2__) || defined(__SSE2__)
// The hint of the VNNI kernels' far prefetches (a whole chunk ahead in the int4 n:m loop, two blocks of
// rows ahead in the dense one): into L2 (T1), not L1, where they evicted the partial sums, the inputs and
// each other before their turn. AVX-512 VNNI EPYC, 2 threads, the 1.1 B Llama shapes: the dense int8 LM
// head (49152x2048) 24.6 -> 29.6 GB/s, the 2:4 int4 products 8-15% faster (docs/benchmarks.md, session 8).
// The 2:4 int8 loop measured the same then because its prefetches were not in the binary (nm8_quads): with
// them, in L2, 11-52% faster (session 12). The AVX2 2:4 loop's next-chunk prefetches: int8 2-14% faster in
// L2, int4 the same (session 12); the AVX2 dense rows keep T0 (session 8: the same or slower with T1).
// -DFAR_HINT=_MM_HINT_T0 builds the former behaviour, for comparison; -DNM8_QUADS=0 the int8 loop before
// session 12.
#ifndef NM8_QUADS
#define NM8_QUADS 1
#endif
#ifndef FAR_HINT
#define FAR_HINT _MM_HINT_T1
#endif
#endif
constexpr i64 QPREFETCH = 2048;  // bytes ahead in each weight stream

inline i64 cdiv(i64 a, i64 b) { return (a + b - 1) / b; }

// ---------------------------------------------------------------- n:m, batch 1
// R rows (one per stream, see nm_pair_rows) over one chunk: per group of G values, VW kept values at
// a time, their inputs from the chunk's window (PAIR: m = 2n, a two-vector permute) or gathered.
template <int BITS, int QB, int R, bool PAIR>
__attribute__((always_inline)) inline void nmq_rows(const float* xc, const uint8_t* row, i64 cstride,
                                                    const uint8_t* q, i64 qstride, const h16* sc, i64 sstride,
                                                    i64 steps, i64 gsteps, vu base, int n, int m, float* part,
                                                    i64 pstride) {
  vf acc[R];
#pragma GCC unroll 8
  for (int r = 0; r < R; ++r) acc[r] = vload(part + r * pstride);
  for (i64 s0 = 0, g = 0; s0 < steps; s0 += gsteps, ++g) {
    vf ga[R];
#pragma GCC unroll 8
    for (int r = 0; r < R; ++r) ga[r] = vf{};
    const i64 s1 = std::min(steps, s0 + gsteps);
    for (i64 s = s0; s < s1; ++s) {
      vf lo, hi;
      if constexpr (PAIR) lo = vload(xc + s * 2 * VW), hi = vload(xc + s * 2 * VW + VW);
#pragma GCC unroll 8
      for (int r = 0; r < R; ++r) {
        const vu idx = decode<BITS>(row + r * cstride + s * VW * BITS / 8) + base;
        const uint8_t* w = q + r * qstride + s * VW * QB / 8;
        prefetch_bytes(w + QPREFETCH);
        vf xv;
        if constexpr (PAIR) xv = select2(lo, hi, idx);
        else xv = gather(xc + s * VW / n * m, idx);
        ga[r] = deq<QB>(w) * xv + ga[r];
      }
    }
#pragma GCC unroll 8
    for (int r = 0; r < R; ++r) acc[r] = ga[r] * vsplat(sc[r * sstride + g]) + acc[r];
  }
#pragma GCC unroll 8
  for (int r = 0; r < R; ++r) vstore(part + r * pstride, acc[r]);
}

template <int BITS, int QB, bool PAIR>
void nmq_gemv(const float* x, const uint8_t* codes, const uint8_t* q, const h16* scales, i64 rows, i64 J, i64 jc,
              int n, int m, i64 G, float* out, const float* bias, bool relu) {
#ifndef NMS_QSTREAMS
#define NMS_QSTREAMS GEMV_STREAMS
#endif
  constexpr int R = NMS_QSTREAMS;
  const vu base = group_base(n, m);
  const i64 chunks = cdiv(J, jc), cc = jc / n * m, gpc = cdiv(jc, G), gsteps = G / VW;
  nm_gemv_threads(rows, out, bias, relu, [&](i64 o0, i64 o1, float* part) {
    for (i64 c = 0; c < chunks; ++c) {
      const i64 count = std::min(jc, J - c * jc), steps = count / VW, cstride = (count * BITS + 7) / 8;
      const i64 gr = cdiv(count, G), qrow = count * QB / 8;
      const float* xc = x + c * cc;
      const uint8_t* row = codes + nm_code_off(c, o0, rows, jc, count, BITS);
      const uint8_t* qc = q + (c * rows * jc + o0 * count) * QB / 8;
      const h16* sc = scales + c * rows * gpc + o0 * gr;
      const i64 len = (o1 - o0) / R;
      for (i64 i = 0; i < len; ++i)
        nmq_rows<BITS, QB, R, PAIR>(xc, row + i * cstride, len * cstride, qc + i * qrow, len * qrow, sc + i * gr,
                                    len * gr, steps, gsteps, base, n, m, part + i * VW, len * VW);
      for (i64 i = R * len; i < o1 - o0; ++i)
        nmq_rows<BITS, QB, 1, PAIR>(xc, row + i * cstride, 0, qc + i * qrow, 0, sc + i * gr, 0, steps, gsteps, base, n,
                                    m, part + i * VW, 0);
      if (steps * VW < count)  // the values past the last whole vector
        for (i64 i = 0; i < o1 - o0; ++i)
          for (i64 j = steps * VW; j < count; ++j)
            out[o0 + i] += deq_one<QB>(qc + i * qrow, j) * sc[i * gr + j / G] *
                           xc[(j / n) * m + decode_one(row + i * cstride, j, BITS)];
    }
  });
}

// The scalar n:m product of any layout the vector kernels do not take (n not dividing VW).
template <int QB>
void nmq_gemv_scalar(const float* x, const uint8_t* codes, const uint8_t* q, const h16* scales, i64 rows, i64 J,
                     i64 jc, int n, int m, int bits, i64 G, float* out, const float* bias, bool relu) {
  const i64 chunks = cdiv(J, jc), cc = jc / n * m, gpc = cdiv(jc, G);
  nm_gemv_threads(rows, out, bias, relu, [&](i64 o0, i64 o1, float*) {
    for (i64 c = 0; c < chunks; ++c) {
      const i64 count = std::min(jc, J - c * jc), gr = cdiv(count, G);
      for (i64 o = o0; o < o1; ++o) {
        const uint8_t* row = codes + nm_code_off(c, o, rows, jc, count, bits);
        const uint8_t* qs = q + (c * rows * jc + o * count) * QB / 8;
        const h16* sc = scales + c * rows * gpc + o * gr;
        float s = 0.f;
        for (i64 j = 0; j < count; ++j)
          s += deq_one<QB>(qs, j) * sc[j / G] * x[c * cc + (j / n) * m + decode_one(row, j, bits)];
        out[o] += s;
      }
    }
  });
}

// ---------------------------------------------------------------- dense, batch 1
// R consecutive rows (one stream: rows follow each other in memory), one input vector shared by the R.
template <int QB, int R>
__attribute__((always_inline)) inline void denseq_rows(const float* x, const uint8_t* q, i64 qrow, const h16* sc,
                                                       i64 gr, i64 cols, i64 G, float* y) {
  vf acc[R];
#pragma GCC unroll 8
  for (int r = 0; r < R; ++r) acc[r] = vf{};
  const i64 full = cols / VW * VW;
  for (i64 g0 = 0, g = 0; g0 < full; g0 += G, ++g) {
    const i64 g1 = std::min(full, g0 + G);
    vf ga[R];
#pragma GCC unroll 8
    for (int r = 0; r < R; ++r) ga[r] = vf{};
    for (i64 j = g0; j < g1; j += VW) {
      const vf xv = vload(x + j);
#pragma GCC unroll 8
      for (int r = 0; r < R; ++r) {
        const uint8_t* w = q + r * qrow + j * QB / 8;
        prefetch_bytes(w + QPREFETCH);
        ga[r] = deq<QB>(w) * xv + ga[r];
      }
    }
#pragma GCC unroll 8
    for (int r = 0; r < R; ++r) acc[r] = ga[r] * vsplat(sc[r * gr + g]) + acc[r];
  }
#pragma GCC unroll 8
  for (int r = 0; r < R; ++r) {
    float s = vsum(acc[r]);
    for (i64 j = full; j < cols; ++j) s += deq_one<QB>(q + r * qrow, j) * sc[r * gr + j / G] * x[j];
    y[r] = s;
  }
}

template <int QB>
void denseq_gemv(const float* x, const uint8_t* q, const h16* scales, i64 rows, i64 cols, i64 G, float* out,
                 const float* bias, bool relu) {
  constexpr int R = 4;
  const i64 qrow = cols * QB / 8, gr = cdiv(cols, G);
#pragma omp parallel num_threads(call_threads)
  {
    const int nth = omp_get_num_threads(), tid = omp_get_thread_num();
    const i64 o0 = rows * tid / nth, o1 = rows * (tid + 1) / nth;
    i64 o = o0;
    for (; o + R <= o1; o += R) denseq_rows<QB, R>(x, q + o * qrow, qrow, scales + o * gr, gr, cols, G, out + o);
    for (; o < o1; ++o) denseq_rows<QB, 1>(x, q + o * qrow, qrow, scales + o * gr, gr, cols, G, out + o);
    for (o = o0; o < o1; ++o) {
      const float y = out[o] + (bias ? bias[o] : 0.f);
      out[o] = relu && y < 0.f ? 0.f : y;
    }
  }
}

// ---------------------------------------------------------------- 1xN blocks, batch 1
#if defined(__AVX512F__) || defined(__AVX2__)
#define NMS_NIB 1  // the int4 1xN loop below reads 16-row pieces whole (AVX-512: a broadcast and per-lane shifts)
// The lane order of the int4 1xN loop (blockq_rows). AVX-512: a 16-row piece's qword broadcast to every
// qword lane, each 32-bit lane shifted by its own count: lane 2i holds row i (the low dword >> 4i), lane
// 2i+1 row 8 + i (the high dword >> 4i). AVX2: below. to_lanes puts a block's row-ordered vectors (its
// scales) in that order, to_rows puts the sums back in row order; each runs once per group or block, not
// per column.
struct NibOrder {
#if defined(__AVX512F__)
  __m512i shift, mask, lanes, rows, magic;
  __m512 magic8;
  NibOrder() {
    alignas(64) int32_t sh[16], ln[16], rw[16];
    for (int j = 0; j < 16; ++j) sh[j] = 4 * (j / 2), ln[j] = j % 2 ? 8 + j / 2 : j / 2;
    for (int r = 0; r < 16; ++r) rw[r] = r < 8 ? 2 * r : 2 * (r - 8) + 1;
    shift = _mm512_load_si512(sh), lanes = _mm512_load_si512(ln), rows = _mm512_load_si512(rw);
    mask = _mm512_set1_epi32(15), magic = _mm512_set1_epi32(0x4B000000);  // the float 2^23
    magic8 = _mm512_set1_ps(8388608.f + 8.f);
  }
  template <int V>
  void to_lanes(vf (&v)[V]) const {
    for (int i = 0; i < V; ++i) v[i] = vf(_mm512_permutexvar_ps(lanes, __m512(v[i])));
  }
  template <int V>
  void to_rows(vf (&v)[V]) const {
    for (int i = 0; i < V; ++i) v[i] = vf(_mm512_permutexvar_ps(rows, __m512(v[i])));
  }
#else
  // AVX2 (two vectors a piece): the piece's 8 bytes zero-extended to 8 lanes, byte j holding rows 2j (low
  // nibble) and 2j + 1 (high): vector a holds the even rows 0 2 .. 14 (a mask), b the odd ones (a shift)
  __m256i mask;
  NibOrder() { mask = _mm256_set1_epi32(15); }
  template <int V>  // V even: pairs (rows 0-7, rows 8-15) -> (even rows, odd rows)
  void to_lanes(vf (&v)[V]) const {
    for (int i = 0; i < V; i += 2) {
      const __m256 e = _mm256_shuffle_ps(__m256(v[i]), __m256(v[i + 1]), 0x88);  // r0 r2 r8 r10 | r4 r6 r12 r14
      const __m256 o = _mm256_shuffle_ps(__m256(v[i]), __m256(v[i + 1]), 0xDD);  // r1 r3 r9 r11 | r5 r7 r13 r15
      v[i] = vf(_mm256_castpd_ps(_mm256_permute4x64_pd(_mm256_castps_pd(e), 0xD8)));
      v[i + 1] = vf(_mm256_castpd_ps(_mm256_permute4x64_pd(_mm256_castps_pd(o), 0xD8)));
    }
  }
  template <int V>
  void to_rows(vf (&v)[V]) const {
    for (int i = 0; i < V; i += 2) {
      const __m256 lo = _mm256_unpacklo_ps(__m256(v[i]), __m256(v[i + 1]));  // r0 r1 r2 r3 | r8 r9 r10 r11
      const __m256 hi = _mm256_unpackhi_ps(__m256(v[i]), __m256(v[i + 1]));  // r4 r5 r6 r7 | r12 .. r15
      v[i] = vf(_mm256_permute2f128_ps(lo, hi, 0x20)), v[i + 1] = vf(_mm256_permute2f128_ps(lo, hi, 0x31));
    }
  }
#endif
};
#endif

// S block rows (S streams, as block_gemv): per group of G kept columns, B-vectors of integers times
// the column's input, summed in float32, then scaled by the group's B scales.
template <int B, int S, int QB>
__attribute__((always_inline)) inline void blockq_rows(const float* x, const int32_t* const* c,
                                                       const uint8_t* const* w, const h16* const* sc, i64 kept,
                                                       i64 G, float* const* y, const float* const* bias, bool relu) {
  constexpr int V = B / VW;
  constexpr i64 KB = B * QB / 8;  // bytes per kept column
#ifdef NMS_NIB
  constexpr bool NIB = QB == 4 && B % 16 == 0;
  constexpr i64 PER_LINE = KB >= 64 ? 1 : 64 / KB;
  const NibOrder nib;
#else
  constexpr bool NIB = false;
#endif
  vf acc[S][V];
#pragma GCC unroll 16
  for (int s = 0; s < S; ++s)
#pragma GCC unroll 16
    for (int v = 0; v < V; ++v) acc[s][v] = vf{};
  for (i64 k0 = 0, g = 0; k0 < kept; k0 += G, ++g) {
    const i64 k1 = std::min(kept, k0 + G);
    vf ga[S][V];
#pragma GCC unroll 16
    for (int s = 0; s < S; ++s)
#pragma GCC unroll 16
      for (int v = 0; v < V; ++v) ga[s][v] = vf{};
    i64 k = k0;
#ifdef NMS_NIB
    if constexpr (NIB) {
      // int4: each 16-row piece of a kept column is one qword (row r's nibble at bits 4r, stored q + 8),
      // read whole (AVX-512: broadcast, then one variable shift and one mask give every lane its row's
      // integer; AVX2: its bytes zero-extended to lanes, then a mask or a shift):
      // the accumulators hold the rows in NibOrder's order until the block's end. One prefetch a cache
      // line of each stream (PER_LINE columns), not one a column: the loop is bound by its instructions.
#if defined(__AVX512F__)
      // each lane's integer ORed into the mantissa of 2^23 (one ternary-logic op with the mask) and
      // 2^23 + 8 taken off in float (exact): q as a float without a conversion, and no input sum
      for (; k < k1; ++k) {
#pragma GCC unroll 16
        for (int s = 0; s < S; ++s) {
          const uint8_t* wk = w[s] + k * KB;
          if (k % PER_LINE == 0) prefetch_bytes(wk + QPREFETCH);
          const vf xv = vf(_mm512_set1_ps(x[c[s][k]]));
#pragma GCC unroll 16
          for (int h = 0; h < B / 16; ++h) {
            long long piece;
            std::memcpy(&piece, wk + 8 * h, 8);
            const __m512i v = _mm512_ternarylogic_epi32(_mm512_srlv_epi32(_mm512_set1_epi64(piece), nib.shift), nib.mask,
                                                        nib.magic, 0xEA);  // (a & b) | c
            ga[s][h] = vf(_mm512_sub_ps(_mm512_castsi512_ps(v), nib.magic8)) * xv + ga[s][h];
          }
        }
      }
#else
      // the stored q + 8 multiply as they are and 8 x the group's input sum comes off at its end (the
      // inputs are the same for the block's B rows), so no per-column subtract
      float xs[S] = {};
      for (; k < k1; ++k) {
#pragma GCC unroll 16
        for (int s = 0; s < S; ++s) {
          const uint8_t* wk = w[s] + k * KB;
          if (k % PER_LINE == 0) prefetch_bytes(wk + QPREFETCH);
          const float* xp = x + c[s][k];
          xs[s] += *xp;
          const vf xv = vf(_mm256_broadcast_ss(xp));  // from memory: a load, no shuffle
#pragma GCC unroll 16
          for (int h = 0; h < B / 16; ++h) {
            const __m256i b = _mm256_cvtepu8_epi32(_mm_loadl_epi64((const __m128i*)(wk + 8 * h)));
            ga[s][2 * h] = vf(_mm256_cvtepi32_ps(_mm256_and_si256(b, nib.mask))) * xv + ga[s][2 * h];
            ga[s][2 * h + 1] = vf(_mm256_cvtepi32_ps(_mm256_srli_epi32(b, 4))) * xv + ga[s][2 * h + 1];
          }
        }
      }
#pragma GCC unroll 16
      for (int s = 0; s < S; ++s)
#pragma GCC unroll 16
        for (int v = 0; v < V; ++v) ga[s][v] = ga[s][v] - vsplat(8.f * xs[s]);
#endif
    }
#endif
    for (; k < k1; ++k) {
#pragma GCC unroll 16
      for (int s = 0; s < S; ++s) {
        const uint8_t* wk = w[s] + k * KB;
        prefetch_bytes(wk + QPREFETCH);
        const vf xv = vsplat(x[c[s][k]]);
#pragma GCC unroll 16
        for (int v = 0; v < V; ++v) ga[s][v] = deq<QB>(wk + VW * v * QB / 8) * xv + ga[s][v];
      }
    }
#pragma GCC unroll 16
    for (int s = 0; s < S; ++s) {
      vf scale[V];
#pragma GCC unroll 16
      for (int v = 0; v < V; ++v) scale[v] = vload_scales(sc[s] + g * B + VW * v);
#ifdef NMS_NIB
      if constexpr (NIB) nib.to_lanes(scale);
#endif
#pragma GCC unroll 16
      for (int v = 0; v < V; ++v) acc[s][v] = ga[s][v] * scale[v] + acc[s][v];
    }
  }
#ifdef NMS_NIB
  if constexpr (NIB)
#pragma GCC unroll 16
    for (int s = 0; s < S; ++s) nib.to_rows(acc[s]);
#endif
  store_block_rows<S, V>(acc, y, bias, relu);
}

template <int B, int QB>
void blockq_gemv(const float* x, const int32_t* cols, const uint8_t* q, const h16* scales, i64 rows, i64 kept,
                 i64 G, float* out, const float* bias, bool relu) {
  constexpr int S = gemv_streams(B / VW);
  const i64 gk = cdiv(kept, G), qb = kept * B * QB / 8;
#pragma omp parallel num_threads(call_threads)
  {
    const int nth = omp_get_num_threads(), tid = omp_get_thread_num();
    const i64 r0 = rows * tid / nth, r1 = rows * (tid + 1) / nth, part = (r1 - r0) / S;
    const int32_t* c[S];
    const uint8_t* w[S];
    const h16* sc[S];
    float* y[S];
    const float* bs[S];
    auto bind = [&](int s, i64 r) {
      c[s] = cols + r * kept, w[s] = q + r * qb, sc[s] = scales + r * gk * B, y[s] = out + r * B;
      bs[s] = bias ? bias + r * B : nullptr;
    };
    for (i64 i = 0; i < part; ++i) {
      for (int s = 0; s < S; ++s) bind(s, r0 + s * part + i);
      blockq_rows<B, S, QB>(x, c, w, sc, kept, G, y, bs, relu);
    }
    for (i64 r = r0 + S * part; r < r1; ++r) {
      bind(0, r);
      blockq_rows<B, 1, QB>(x, c, w, sc, kept, G, y, bs, relu);
    }
  }
}

// ---------------------------------------------------------------- dequantize a whole layout
// out[i] = q[i] * scale of value i, over `segs` segments; segment s holds len(s) values starting at
// value start(s) and scales starting at sstart(s) (see the top of this file).
template <int QB, class Seg>
void dequant_segments(const uint8_t* q, const h16* scales, i64 segs, i64 G, float* out, Seg seg) {
#pragma omp parallel for num_threads(call_threads) schedule(static)
  for (i64 s = 0; s < segs; ++s) {
    i64 start, len, sstart;
    seg(s, start, len, sstart);
    const uint8_t* qs = q + start * QB / 8;
    for (i64 j = 0; j < len; ++j) out[start + j] = deq_one<QB>(qs, j) * scales[sstart + j / G];
  }
}

// ---------------------------------------------------------------- dense float32, batch 1
// A plain Linear inside the fused decode step (decode.h): R consecutive rows share each input vector.
template <int R>
__attribute__((always_inline)) inline void densef_rows(const float* x, const float* w, i64 cols, float* y) {
  vf acc[R];
#pragma GCC unroll 8
  for (int r = 0; r < R; ++r) acc[r] = vf{};
  const i64 full = cols / VW * VW;
  for (i64 j = 0; j < full; j += VW) {
    const vf xv = vload(x + j);
#pragma GCC unroll 8
    for (int r = 0; r < R; ++r) acc[r] = vload(w + r * cols + j) * xv + acc[r];
  }
#pragma GCC unroll 8
  for (int r = 0; r < R; ++r) {
    float s = vsum(acc[r]);
    for (i64 j = full; j < cols; ++j) s += w[r * cols + j] * x[j];
    y[r] = s;
  }
}

void densef_gemv(const float* w, i64 rows, i64 cols, const float* x, float* out, const float* bias, bool relu) {
#pragma omp parallel num_threads(call_threads)
  {
    const int nth = omp_get_num_threads(), tid = omp_get_thread_num();
    const i64 o0 = rows * tid / nth, o1 = rows * (tid + 1) / nth;
    i64 o = o0;
    for (; o + 4 <= o1; o += 4) densef_rows<4>(x, w + o * cols, cols, out + o);
    for (; o < o1; ++o) densef_rows<1>(x, w + o * cols, cols, out + o);
    for (o = o0; o < o1; ++o) {
      const float y = out[o] + (bias ? bias[o] : 0.f);
      out[o] = relu && y < 0.f ? 0.f : y;
    }
  }
}

// ---------------------------------------------------------------- int8 activations (A8)
// With activations quantized, a quantized product computes W_q . Q(x): x cut into blocks of `xb`
// columns (the columns of one weight scale group), sx = max|x| / 127 over each block, xq =
// round-to-nearest-even(x * (127 / max|x|)) (0 where the block is all zero), and Q(x) = sx * xq. Every
// instruction set computes that same function: with AVX-512 VNNI + VBMI from the integers
// (vpdpbusd, 64 products an instruction), elsewhere by the weight-only kernels above on the floats
// sx * xq. nmsparse/runtime/quant.py quantize_activations is the reference.
struct XBuf {
  int8_t* q = nullptr;  // xq, zero-padded by 128 bytes
  float* s = nullptr;   // sx per block
  float* d = nullptr;   // sx * xq
  i64 cap = 0, scap = 0;
  ~XBuf() { free(q), free(s), free(d); }
};
thread_local XBuf xbuf;

// round-half-even(v * inv) as int32 lanes (the product rounded to float first, as the reference does)
inline vi round_mul(vf v, vf inv) {
  const vf t = v * inv;
#if defined(__AVX512F__)
  return (vi)_mm512_cvtps_epi32(t);
#elif defined(__AVX2__)
  return (vi)_mm256_cvtps_epi32(t);
#elif defined(__SSE2__)
  return (vi)_mm_cvtps_epi32(t);
#elif defined(__aarch64__)
  return vcvtnq_s32_f32(t);
#else
  vi r;
  for (int i = 0; i < VW; ++i) r[i] = (int32_t)std::nearbyint(t[i]);
  return r;
#endif
}

// Columns [c0, c1) of x as one block: q[c0..c1) = xq, d[c0..c1) = sx * xq (d may be null); returns sx.
inline float quant_block(const float* x, i64 c0, i64 c1, int8_t* q, float* d) {
  i64 i = c0;
  vf vmax = vf{};
  for (; i + VW <= c1; i += VW) {
    const vf a = (vf)((vi)vload(x + i) & 0x7fffffff);  // |x|
    vmax = vmax > a ? vmax : a;
  }
  float amax = 0.f;
  for (int l = 0; l < VW; ++l) amax = std::max(amax, vmax[l]);
  for (; i < c1; ++i) amax = std::max(amax, std::fabs(x[i]));
  const float s = amax / 127.f, inv = amax > 0.f ? 127.f / amax : 0.f;
  const vf vinv = vsplat(inv), vs = vsplat(s);
  for (i = c0; i + VW <= c1; i += VW) {
    const vi v = round_mul(vload(x + i), vinv);
    for (int l = 0; l < VW; ++l) q[i + l] = (int8_t)v[l];
    if (d) vstore(d + i, __builtin_convertvector(v, vf) * vs);
  }
  for (; i < c1; ++i) {
    const float v = std::nearbyint(x[i] * inv);
    q[i] = (int8_t)v;
    if (d) d[i] = s * v;
  }
  return s;
}

inline void quant_x(const float* x, i64 cols, i64 xb) {
  XBuf& b = xbuf;
  const i64 blocks = cdiv(cols, xb);
  if (cols + 128 > b.cap) {
    free(b.q), free(b.d);
    b.cap = cols + 128;
    b.q = (int8_t*)aligned_alloc(64, cdiv(b.cap, 64) * 64);
    b.d = (float*)aligned_alloc(64, cdiv(b.cap * 4, 64) * 64);
  }
  if (blocks > b.scap) {
    free(b.s);
    b.scap = blocks;
    b.s = (float*)aligned_alloc(64, cdiv(blocks * 4, 64) * 64);
  }
  for (i64 k = 0; k < blocks; ++k) b.s[k] = quant_block(x, k * xb, std::min(cols, k * xb + xb), b.q, b.d);
  std::memset(b.q + cols, 0, 128);
}

// One token tile of a batched product into out[T, rows]: rows o .. o+R-1 (those below `rows`), tokens
// t0 .. t0+count-1, acc[r][t] + bias, ReLU applied.
template <int R, int C>
inline void store_tile(const float (&acc)[R][C], i64 o, i64 rows, i64 t0, i64 count, float* out, const float* bias,
                       bool relu) {
  for (int r = 0; r < R && o + r < rows; ++r) {
    const float b = bias ? bias[o + r] : 0.f;
    for (i64 t = 0; t < count; ++t) {
      const float y = acc[r][t] + b;
      out[(t0 + t) * rows + o + r] = relu && y < 0.f ? 0.f : y;
    }
  }
}

#if defined(__AVX512VNNI__) && defined(__AVX512VBMI__) && defined(__AVX512BW__)
#define NMS_VNNI 1
#ifndef NMS_VSTREAMS
#define NMS_VSTREAMS 2
#endif

// The 64 weights of one step as unsigned bytes (int8: q + 128 by flipping the sign bit; int4: the
// stored nibbles q + 8, pairs interleaved back into value order), `live` values.
template <int QB>
inline __m512i weights_u8(const uint8_t* q, __mmask64 live, i64 count) {
  if constexpr (QB == 8) {
    return _mm512_xor_si512(_mm512_maskz_loadu_epi8(live, q), _mm512_set1_epi8((char)0x80));
  } else {
    const __m256i w = _mm256_maskz_loadu_epi8((__mmask32)((count + 1) / 2 >= 32 ? ~0u : (1u << ((count + 1) / 2)) - 1), q);
    const __m256i m = _mm256_set1_epi8(0x0F);
    const __m512i lo = _mm512_castsi256_si512(_mm256_and_si256(w, m));
    const __m512i hi = _mm512_castsi256_si512(_mm256_and_si256(_mm256_srli_epi16(w, 4), m));
    alignas(64) static const uint8_t order[64] = {
        0, 64, 1, 65, 2, 66, 3, 67, 4, 68, 5, 69, 6, 70, 7, 71, 8, 72, 9, 73, 10, 74, 11, 75, 12, 76, 13, 77, 14, 78,
        15, 79, 16, 80, 17, 81, 18, 82, 19, 83, 20, 84, 21, 85, 22, 86, 23, 87, 24, 88, 25, 89, 26, 90, 27, 91, 28, 92,
        29, 93, 30, 94, 31, 95};
    return _mm512_permutex2var_epi8(lo, _mm512_load_si512(order), hi);
  }
}

inline __mmask64 live_mask(i64 count) { return count >= 64 ? ~0ull : (1ull << count) - 1; }

// Which group of a 64-value step each int32 lane (values 4j..4j+3) falls into, for groups of G
// values starting at the step (G a multiple of 16: the same for every step).
inline __m512i lane_group_ids(i64 G) {
  alignas(64) int32_t idx[16];
  for (int j = 0; j < 16; ++j) idx[j] = (int32_t)((4 * j) / G);
  return _mm512_load_si512(idx);
}

// Per-lane values of the step's groups: p[0 .. groups) spread by lane_group_ids.
inline __m512 lane_groups(const float* p, __m512i ids, i64 groups) {
  return _mm512_permutexvar_ps(ids, _mm512_maskz_loadu_ps((__mmask16)((1u << std::min<i64>(groups, 16)) - 1), p));
}
inline __m512 lane_groups(const h16* p, __m512i ids, i64 groups) {  // weight scales (float16)
  const __m256i h = _mm256_maskz_loadu_epi16((__mmask16)((1u << std::min<i64>(groups, 16)) - 1), p);
  return _mm512_permutexvar_ps(ids, _mm512_cvtph_ps(h));
}

// The columns (0..127, within the chunk) of a row-chunk's 64 kept values of an n:m layout with m = 2n:
// the BITS-wide codes spread to bytes (vpmultishiftqb) plus each value's group start (j / n) * m. Lane i
// holds value i, or with `split` value split_order(i): the order int4 bytes unpack in without a
// permute (weights_u8_split).
inline int split_order(int i) { return i < 32 ? 2 * i : 2 * (i - 32) + 1; }

template <int BITS>
struct NMColumns {
  __m512i perm, ctrl, base, cmask;
  NMColumns(int n, int m, bool split = false) {
    alignas(64) uint64_t p[8];
    alignas(64) uint8_t c[64], b[64];
    auto value = [&](int i) { return split ? split_order(i) : i; };
    // qword k of the spread codes: the code qword holding lanes 8k..8k+7 (16 * BITS <= 64 bits apart)
    for (int k = 0; k < 8; ++k) p[k] = (uint64_t)(value(8 * k) * BITS / 64);
    for (int i = 0; i < 64; ++i) {
      c[i] = (uint8_t)(value(i) * BITS - 64 * (int)p[i / 8]);
      b[i] = (uint8_t)((value(i) / n) * m);
    }
    perm = _mm512_load_si512(p), ctrl = _mm512_load_si512(c), base = _mm512_load_si512(b);
    cmask = _mm512_set1_epi8((char)((1 << BITS) - 1));
  }
  __m512i operator()(const uint8_t* codes, i64 cbytes) const {
    const __m512i src = _mm512_permutexvar_epi64(perm, _mm512_maskz_loadu_epi8(
        cbytes >= 64 ? ~0ull : (1ull << cbytes) - 1, codes));
    return _mm512_add_epi8(_mm512_and_si512(_mm512_multishift_epi64_epi8(ctrl, src), cmask), base);
  }
  // The same for a whole chunk (64 * BITS / 8 code bytes) of a layout whose m is a power of two: the
  // group starts are multiples of m and the codes below m, so the add is an OR (one ternary-logic op).
  __m512i whole_pow2(const uint8_t* codes) const {
    const __m512i src = _mm512_permutexvar_epi64(perm, _mm512_maskz_loadu_epi8(
        BITS == 8 ? ~0ull : (1ull << (8 * BITS)) - 1, codes));
    return _mm512_ternarylogic_epi64(_mm512_multishift_epi64_epi8(ctrl, src), cmask, base, 0xEA);  // (a & b) | c
  }
};

// Two consecutive rows' chunks of int4 values (m = 2n, 64 kept values a chunk, m a power of two) as
// they lie in memory: one 64-byte load holds both rows (32 bytes each), and the low nibbles (the even
// values) and the high nibbles (the odd values) multiply as they are, masked in place, without
// unpacking: the high nibble as 16 * (q + 8) and the low one shifted up to the same 16 * (q + 8). Lane b
// of the `even` / `odd` input vectors is the input of row b / 32's value 2 (b % 32) / 2 (b % 32) + 1:
// the two rows' codes (2 * 8 * BITS bytes, consecutive) spread by one qword permute, then two bit-field
// selects (vpmultishiftqb) and the group starts ORed in.
template <int BITS>
struct NMPairColumns {
  __m512i perm, ctrl_even, ctrl_odd, base_even, base_odd, cmask;
  NMPairColumns(int n, int m) {
    alignas(64) uint64_t p[8];
    alignas(64) uint8_t ce[64], co[64], be[64], bo[64];
    for (int k = 0; k < 8; ++k) p[k] = (uint64_t)(2 * BITS * 8 * k / 64);
    for (int b = 0; b < 64; ++b) {
      const int v = 2 * (b % 32), bit = 2 * BITS * b - 64 * (int)p[b / 8];
      ce[b] = (uint8_t)bit, co[b] = (uint8_t)(bit + BITS);
      be[b] = (uint8_t)((v / n) * m), bo[b] = (uint8_t)(((v + 1) / n) * m);
    }
    perm = _mm512_load_si512(p), ctrl_even = _mm512_load_si512(ce), ctrl_odd = _mm512_load_si512(co);
    base_even = _mm512_load_si512(be), base_odd = _mm512_load_si512(bo);
    cmask = _mm512_set1_epi8((char)((1 << BITS) - 1));
  }
  // the even and odd lanes' input columns (0..127) of two rows whose codes start at `codes`
  void operator()(const uint8_t* codes, __m512i& even, __m512i& odd) const {
    const __m512i src = _mm512_permutexvar_epi64(perm, _mm512_maskz_loadu_epi8(
        BITS == 4 ? ~0ull : (1ull << (16 * BITS)) - 1, codes));
    even = _mm512_ternarylogic_epi64(_mm512_multishift_epi64_epi8(ctrl_even, src), cmask, base_even, 0xEA);
    odd = _mm512_ternarylogic_epi64(_mm512_multishift_epi64_epi8(ctrl_odd, src), cmask, base_odd, 0xEA);
  }
};

// The integer sums of four rows (16 lanes each) as one vector: lanes 4r .. 4r+3 hold row r's sum in 4
// parts (three 128-bit shuffle-and-add steps for the four rows instead of two per row).
inline __m512i fold4(__m512i a, __m512i b, __m512i c, __m512i d) {
  const __m512i ab = _mm512_add_epi32(_mm512_shuffle_i32x4(a, b, 0x44), _mm512_shuffle_i32x4(a, b, 0xEE));
  const __m512i cd = _mm512_add_epi32(_mm512_shuffle_i32x4(c, d, 0x44), _mm512_shuffle_i32x4(c, d, 0xEE));
  return _mm512_add_epi32(_mm512_shuffle_i32x4(ab, cd, 0x88), _mm512_shuffle_i32x4(ab, cd, 0xDD));
}

// The `count` (even) int4 values of one step as unsigned bytes q + 8 in split_order: the low nibbles
// (even values) then the high nibbles (odd values), one insert instead of weights_u8<4>'s permute.
inline __m512i weights_u8_split(const uint8_t* q, i64 count) {
  const i64 bytes = count / 2;
  const __m256i w = _mm256_maskz_loadu_epi8(bytes >= 32 ? ~0u : (1u << bytes) - 1, q);
  const __m256i m = _mm256_set1_epi8(0x0F);
  return _mm512_inserti64x4(_mm512_castsi256_si512(_mm256_and_si256(w, m)),
                            _mm256_and_si256(_mm256_srli_epi16(w, 4), m), 1);
}

// 64 int4 values (32 bytes) as weights_u8_split, from a broadcast load: the upper half shifted by a
// nibble, then both masked (no 256-bit insert).
inline __m512i weights_u8_split64(const uint8_t* q) {
  const __m512i w = _mm512_broadcast_i64x4(_mm256_loadu_si256((const __m256i*)q));
  return _mm512_and_si512(_mm512_mask_srli_epi16(w, 0xFFFF0000u, w, 4), _mm512_set1_epi8(0x0F));
}

// The lanes of split_order holding values below `count` (even).
inline __mmask64 split_live(i64 count) {
  const uint64_t half = count >= 64 ? 0xFFFFFFFFull : (1ull << (count / 2)) - 1;
  return half | (half << 32);
}

// The int8 whole-chunk loop of nmq_gemv_vnni (m = 2n a power of two, groups of whole chunks): rows
// [0, len4) of each of the NMS_VSTREAMS streams of a thread's rows (stream r starts at row r * len), four
// rows a step, their sums folded into one vector and scaled at once. Its own function, with the column
// decode's constants in registers: inside the kernel's lambdas GCC 12 reloaded them from memory for every
// row, branched on `pow2` for every row and dropped the prefetches of this loop altogether.
template <int BITS>
__attribute__((noinline)) void nm8_quads(const NMColumns<BITS>& columns, const uint8_t* qrow, const uint8_t* crow,
                                         const h16* srow, __m512i xlo, __m512i xhi, float sxc, float* part, i64 len,
                                         i64 len4, i64 qnext, i64 cnext) {
  constexpr i64 cbytes = 8 * BITS;  // a row-chunk's code bytes (64 values)
  const __m512i perm = columns.perm, ctrl = columns.ctrl, base = columns.base, cmask = columns.cmask;
  const __m512i offx = _mm512_set1_epi8((char)0x80);
  // the inputs as unsigned bytes xq + 128 against the signed weights as stored, less 128 * the weights' sum
  const __m512i ulo = _mm512_xor_si512(xlo, offx), uhi = _mm512_xor_si512(xhi, offx);
  const __m512i spread = _mm512_set_epi32(3, 3, 3, 3, 2, 2, 2, 2, 1, 1, 1, 1, 0, 0, 0, 0);
  const __m512 vsx = _mm512_set1_ps(sxc);
  const __mmask64 cm = cbytes >= 64 ? ~0ull : (1ull << cbytes) - 1;
  for (i64 i = 0; i < len4; i += 4) {
#pragma GCC unroll 8
    for (int r = 0; r < NMS_VSTREAMS; ++r) {
      const i64 i0 = r * len + i;
      const uint8_t* q4 = qrow + i0 * 64;
      const uint8_t* c4 = crow + i0 * cbytes;
      // the same rows in the next chunk (qnext, cnext: 0 in the last), a thread's rows of one chunk being short
      // streams whose following bytes belong to other rows: four lines of values, the codes' lines
      for (int k = 0; k < 4; ++k) _mm_prefetch((const char*)(q4 + qnext + 64 * k), FAR_HINT);
      for (int k = 0; k < 4 * cbytes; k += 64) _mm_prefetch((const char*)(c4 + cnext + k), FAR_HINT);
      __m512i d[4];
      for (int k = 0; k < 4; ++k) {
        const __m512i src = _mm512_permutexvar_epi64(perm, _mm512_maskz_loadu_epi8(cm, c4 + k * cbytes));
        const __m512i idx = _mm512_ternarylogic_epi64(_mm512_multishift_epi64_epi8(ctrl, src), cmask, base, 0xEA);
        const __m512i w = _mm512_loadu_si512(q4 + 64 * k);
        d[k] = _mm512_sub_epi32(_mm512_dpbusd_epi32(_mm512_setzero_si512(), _mm512_permutex2var_epi8(ulo, idx, uhi), w),
                                _mm512_dpbusd_epi32(_mm512_setzero_si512(), offx, w));
      }
      const __m512 sc = _mm512_mul_ps(_mm512_permutexvar_ps(spread, _mm512_castps128_ps512(
          _mm_cvtph_ps(_mm_loadl_epi64((const __m128i*)(srow + i0))))), vsx);
      float* p = part + i0 * 4;
      _mm512_storeu_ps(p, _mm512_fmadd_ps(_mm512_cvtepi32_ps(fold4(d[0], d[1], d[2], d[3])), sc, _mm512_loadu_ps(p)));
    }
  }
}

// n:m with m = 2n and 64 kept values per chunk (1:2, 2:4, 4:8, 8:16): per row and chunk, the 64
// offsets become byte indices (vpmultishiftqb), the chunk's 128 quantized inputs are picked by
// them (vpermt2b), and vpdpbusd sums the products 4 at a time.
template <int BITS, int QB>
void nmq_gemv_vnni(const uint8_t* codes, const uint8_t* q, const h16* scales, i64 rows, i64 J, int n, int m, i64 G,
                   float* out, const float* bias, bool relu) {
  constexpr i64 jc = 64;
  const i64 chunks = cdiv(J, jc), gpc = cdiv(jc, G);
  const int8_t* xq = xbuf.q;
  const float* sx = xbuf.s;
  const i64 gm = std::min(jc, G);
  const bool whole = G % jc == 0;
  // int4 whole chunks of a power-of-two m: two rows a load, values in memory order (NMPairColumns);
  // other int4 whole chunks: lanes in split_order (no lane-group scales to follow it)
  const bool pow2 = (m & (m - 1)) == 0, pairs = QB == 4 && whole && pow2;
  constexpr bool can_split = QB == 4;
  const bool split = can_split && whole && !pairs;
  // groups of 32 (two scales a row-chunk): whole chunks in the tight loop too, scaled before the fold
  const bool half = G == 32 && (QB == 8 || pow2);
  const NMColumns<BITS> columns(n, m, split);
  const NMPairColumns<BITS> pair_columns(n, m);
  const __m512i off = _mm512_set1_epi8(QB == 8 ? (char)0x80 : 8);
  const __m512i wids = lane_group_ids(G), xids = lane_group_ids(gm);
  nm_gemv_threads(rows, out, bias, relu, [&](i64 o0, i64 o1, float* part) {
    for (i64 c = 0; c < chunks; ++c) {
      const i64 count = std::min(jc, J - c * jc), gr = cdiv(count, G), cbytes = (count * BITS + 7) / 8;
      const __mmask64 live = split ? split_live(count) : live_mask(count);
      const __m512i xlo = _mm512_loadu_si512(xq + c * 128), xhi = _mm512_loadu_si512(xq + c * 128 + 64);
      // x scale of each lane: the weight group's columns are one x block (see quant_x's caller)
      const __m512 sxl = lane_groups(sx + c * (jc / gm), xids, cdiv(count, gm));
      const float sxc = sx[c * (jc / gm)];
      const uint8_t* crow = codes + nm_code_off(c, o0, rows, jc, count, BITS);
      const uint8_t* qrow = q + (c * rows * jc + o0 * count) * QB / 8;
      const h16* srow = scales + c * rows * gpc + o0 * gr;
      const i64 qb = count * QB / 8;
      auto one = [&](i64 i) {  // row o0 + i of the thread's range
        const uint8_t* cr = crow + i * cbytes;
        const uint8_t* qr = qrow + i * qb;
        _mm_prefetch((const char*)(qr + QPREFETCH), _MM_HINT_T0);
        const __m512i idx = columns(cr, cbytes);
        const __m512i xs = _mm512_maskz_permutex2var_epi8(live, xlo, idx, xhi);
        const __m512i w = split ? weights_u8_split(qr, count) : weights_u8<QB>(qr, live, count);
        const __m512i dot = _mm512_sub_epi32(_mm512_dpbusd_epi32(_mm512_setzero_si512(), w, xs),
                                             _mm512_dpbusd_epi32(_mm512_setzero_si512(), off, xs));
        if (whole) {
          // groups of whole chunks (G a multiple of 64, the default): one weight and one input scale per
          // row and chunk, so the 16 integer lanes fold to 4 before the scaling, and each row's partial
          // sum is 16 bytes (less partial-sum traffic beside the weight streams than 64)
          const __m256i d8 = _mm256_add_epi32(_mm512_castsi512_si256(dot), _mm512_extracti64x4_epi64(dot, 1));
          const __m128i d4 = _mm_add_epi32(_mm256_castsi256_si128(d8), _mm256_extracti128_si256(d8, 1));
          float* p4 = part + i * 4;
          _mm_storeu_ps(p4, _mm_fmadd_ps(_mm_cvtepi32_ps(d4), _mm_set1_ps(srow[i * gr] * sxc), _mm_loadu_ps(p4)));
          return;
        }
        float* p = part + i * VW;
        const __m512 scale = _mm512_mul_ps(lane_groups(srow + i * gr, wids, gr), sxl);
        vstore(p, _mm512_fmadd_ps(_mm512_cvtepi32_ps(dot), scale, vload(p)));
      };
      const i64 nrow = o1 - o0, len = nrow / NMS_VSTREAMS;
      if (count == jc && (whole || half)) {  // the common case in one tight loop: whole chunks, 1 or 2 scales
        const __m512i offx = _mm512_set1_epi8(QB == 8 ? (char)0x80 : 8);
        // int8: the inputs as unsigned bytes xq + 128 against the signed weights as stored (no per-row flip),
        // less 128 * the weights' sum
        const __m512i ulo = _mm512_xor_si512(xlo, offx), uhi = _mm512_xor_si512(xhi, offx);
        // prefetch the same rows in the next chunk: a thread's rows of one chunk are short streams (two per
        // thread), and the bytes past their end belong to other rows. (GCC 12 emits these in the int4 loops
        // but not in the int8 one; forcing them there with inline asm measured the same, +-5%, session 11.)
        const i64 cstride = c + 1 < chunks ? rows * qb : 0, ccstride = c + 1 < chunks ? rows * cbytes : 0;
        auto prefetch_next = [&](i64 i) {  // row i's values (int8: two lines; int4 pairs: one a row) and codes
          const uint8_t* qr = qrow + i * qb;
          _mm_prefetch((const char*)(qr + cstride), FAR_HINT);
          if (QB == 8) _mm_prefetch((const char*)(qr + cstride + 64), FAR_HINT);
          _mm_prefetch((const char*)(crow + i * cbytes + ccstride), FAR_HINT);
        };
        auto dot = [&](i64 i) {
          const uint8_t* qr = qrow + i * qb;
          prefetch_next(i);
          const __m512i idx = pow2 ? columns.whole_pow2(crow + i * cbytes) : columns(crow + i * cbytes, cbytes);
          if constexpr (QB == 8) {
            const __m512i xu = _mm512_permutex2var_epi8(ulo, idx, uhi), w = _mm512_loadu_si512(qr);
            return _mm512_sub_epi32(_mm512_dpbusd_epi32(_mm512_setzero_si512(), xu, w),
                                    _mm512_dpbusd_epi32(_mm512_setzero_si512(), offx, w));
          }
          const __m512i xs = _mm512_permutex2var_epi8(xlo, idx, xhi);
          const __m512i w = split ? weights_u8_split64(qr) : weights_u8<4>(qr, ~0ull, 64);
          return _mm512_sub_epi32(_mm512_dpbusd_epi32(_mm512_setzero_si512(), w, xs),
                                  _mm512_dpbusd_epi32(_mm512_setzero_si512(), offx, xs));
        };
        auto row = [&](i64 i) {
          const __m512i d = dot(i);
          const __m256i d8 = _mm256_add_epi32(_mm512_castsi512_si256(d), _mm512_extracti64x4_epi64(d, 1));
          const __m128i d4 = _mm_add_epi32(_mm256_castsi256_si128(d8), _mm256_extracti128_si256(d8, 1));
          float* p4 = part + i * 4;
          _mm_storeu_ps(p4, _mm_fmadd_ps(_mm_cvtepi32_ps(d4), _mm_set1_ps(srow[i] * sxc), _mm_loadu_ps(p4)));
        };
        // four consecutive rows at a time: their sums folded into one vector, scaled by their four scales
        const __m512i spread = _mm512_set_epi32(3, 3, 3, 3, 2, 2, 2, 2, 1, 1, 1, 1, 0, 0, 0, 0);
        const __m512 vsx = _mm512_set1_ps(sxc);
        auto add4 = [&](i64 i, __m512i d, __m512 vs) {  // rows i..i+3's folded sums, scaled, into their partials
          const __m512 s = _mm512_mul_ps(_mm512_permutexvar_ps(spread, _mm512_castps128_ps512(_mm_cvtph_ps(_mm_loadl_epi64((const __m128i*)(srow + i))))), vs);
          float* p = part + i * 4;
          _mm512_storeu_ps(p, _mm512_fmadd_ps(_mm512_cvtepi32_ps(d), s, _mm512_loadu_ps(p)));
        };
        auto quad = [&](i64 i) { add4(i, fold4(dot(i), dot(i + 1), dot(i + 2), dot(i + 3)), vsx); };
        // int4: two rows a load (NMPairColumns); lanes 0-7 of a pair's sum are its first row, 8-15 the second,
        // 16 times the product with the stored q + 8, less 16 * 8 * (the inputs' sum)
        const __m512i hi4 = _mm512_set1_epi8((char)0xF0), c128 = _mm512_set1_epi8((char)0x80);
        auto pair = [&](i64 i) {
          const uint8_t* qr = qrow + i * qb;
          prefetch_next(i);
          __m512i ie, io;
          pair_columns(crow + i * cbytes, ie, io);
          const __m512i xe = _mm512_permutex2var_epi8(xlo, ie, xhi), xo = _mm512_permutex2var_epi8(xlo, io, xhi);
          const __m512i w = _mm512_loadu_si512(qr);
          const __m512i wlo = _mm512_and_si512(_mm512_slli_epi16(w, 4), hi4), whi = _mm512_and_si512(w, hi4);
          const __m512i acc = _mm512_dpbusd_epi32(_mm512_dpbusd_epi32(_mm512_setzero_si512(), wlo, xe), whi, xo);
          const __m512i corr = _mm512_dpbusd_epi32(_mm512_dpbusd_epi32(_mm512_setzero_si512(), c128, xe), c128, xo);
          return _mm512_sub_epi32(acc, corr);
        };
        const __m512 vsx16 = _mm512_set1_ps(sxc / 16);
        auto quad4 = [&](i64 i) {
          const __m512i a = pair(i), b = pair(i + 2);
          add4(i, _mm512_add_epi32(_mm512_shuffle_i32x4(a, b, 0x88), _mm512_shuffle_i32x4(a, b, 0xDD)), vsx16);
        };
        const i64 len4 = len & ~(i64)3;
        auto quads = [&](auto step) {
          for (i64 i = 0; i < len4; i += 4)
#pragma GCC unroll 8
            for (int r = 0; r < NMS_VSTREAMS; ++r) step(r * len + i);
        };
        if (half) {
          // groups of 32 kept values: a row's lanes 0-7 are its first group, 8-15 its second; a pair's (int4)
          // lanes 0-3 / 4-7 the first row's groups, 8-11 / 12-15 the second row's. Each lane is scaled by its
          // weight and input scales, then a row's lanes fold into its 4-lane partial.
          const float sxa = sx[c * (jc / gm)], sxb = sx[c * (jc / gm) + 1];
          const __m512 xs8 = _mm512_mask_blend_ps(0xFF00, _mm512_set1_ps(sxa), _mm512_set1_ps(sxb));
          const __m512 xs4 = _mm512_mul_ps(_mm512_set_ps(sxb, sxb, sxb, sxb, sxa, sxa, sxa, sxa, sxb, sxb, sxb, sxb, sxa,
                                                         sxa, sxa, sxa), _mm512_set1_ps(1.f / 16));
          auto add_row = [&](i64 i, __m256 v) {  // into the first 4 of the row's VW partial lanes (see one())
            float* p4 = part + i * VW;
            const __m128 f = _mm_add_ps(_mm256_castps256_ps128(v), _mm256_extractf128_ps(v, 1));
            _mm_storeu_ps(p4, _mm_add_ps(f, _mm_loadu_ps(p4)));
          };
          auto row32 = [&](i64 i) {
            const __m512 s = _mm512_mask_blend_ps(0xFF00, _mm512_set1_ps(srow[2 * i]), _mm512_set1_ps(srow[2 * i + 1]));
            const __m512 v = _mm512_mul_ps(_mm512_cvtepi32_ps(dot(i)), _mm512_mul_ps(s, xs8));
            add_row(i, _mm256_add_ps(_mm512_castps512_ps256(v), _mm512_extractf32x8_ps(v, 1)));
          };
          auto pair32 = [&](i64 i) {
            const __m128 s4 = _mm_cvtph_ps(_mm_loadl_epi64((const __m128i*)(srow + 2 * i)));
            const __m512 s = _mm512_mul_ps(_mm512_permutexvar_ps(spread, _mm512_castps128_ps512(s4)), xs4);
            const __m512 v = _mm512_mul_ps(_mm512_cvtepi32_ps(pair(i)), s);
            add_row(i, _mm512_castps512_ps256(v));
            add_row(i + 1, _mm512_extractf32x8_ps(v, 1));
          };
          if (QB == 4) quads([&](i64 i) { pair32(i), pair32(i + 2); });
          else quads([&](i64 i) { row32(i), row32(i + 1), row32(i + 2), row32(i + 3); });
          for (int r = 0; r < NMS_VSTREAMS; ++r)
            for (i64 i = len4; i < len; ++i) row32(r * len + i);
          for (i64 i = NMS_VSTREAMS * len; i < nrow; ++i) row32(i);
          continue;
        }
        if (pairs) quads(quad4);
        else if (QB == 8 && pow2 && NM8_QUADS) nm8_quads<BITS>(columns, qrow, crow, srow, xlo, xhi, sxc, part, len, len4,
                                                              cstride, ccstride);
        else quads(quad);
        for (int r = 0; r < NMS_VSTREAMS; ++r)
          for (i64 i = len4; i < len; ++i) row(r * len + i);
        for (i64 i = NMS_VSTREAMS * len; i < nrow; ++i) row(i);
        continue;
      }
      // R separate streams per thread (R equal parts of its rows), as the float32 kernels read theirs
      for (i64 i = 0; i < len; ++i)
#pragma GCC unroll 8
        for (int r = 0; r < NMS_VSTREAMS; ++r) one(r * len + i);
      for (i64 i = NMS_VSTREAMS * len; i < nrow; ++i) one(i);
    }
  }, whole ? 4 : VW);
}

// Dense quantized rows against the int8 activations: 64 columns a step, R rows sharing each input load.
// Groups of a multiple of 64 columns (the default 64) give one weight scale and one input scale per
// row and step: broadcast products of two floats instead of per-lane scale vectors (fewer
// instructions per weight byte: the head of a language model is the largest dense product).
template <int QB, int R, bool WHOLE>
__attribute__((always_inline)) inline void denseq_rows_vnni(const int8_t* xq, const float* sx, const uint8_t* q, i64 qrow,
                                                            const h16* sc, i64 gr, i64 cols, i64 G, float* y) {
  const __m512i off = _mm512_set1_epi8(QB == 8 ? (char)0x80 : 8);
  const __m512i ids = lane_group_ids(G);
  __m512 acc[R];
#pragma GCC unroll 8
  for (int r = 0; r < R; ++r) acc[r] = _mm512_setzero_ps();
  i64 j = 0;
  if constexpr (WHOLE) {
    alignas(64) static const uint8_t order[64] = {  // split_order: int4 inputs in the order weights unpack
        0,  2,  4,  6,  8,  10, 12, 14, 16, 18, 20, 22, 24, 26, 28, 30, 32, 34, 36, 38, 40, 42,
        44, 46, 48, 50, 52, 54, 56, 58, 60, 62, 1,  3,  5,  7,  9,  11, 13, 15, 17, 19, 21, 23,
        25, 27, 29, 31, 33, 35, 37, 39, 41, 43, 45, 47, 49, 51, 53, 55, 57, 59, 61, 63};
    const __m512i vorder = _mm512_load_si512(order);
    for (; j + 64 <= cols; j += 64) {
      __m512i xs = _mm512_loadu_si512(xq + j);
      if constexpr (QB == 4) xs = _mm512_permutexvar_epi8(vorder, xs);  // once per step, for R rows
      const __m512i corr = _mm512_dpbusd_epi32(_mm512_setzero_si512(), off, xs);
      const i64 g = j / G;
      const float s = sx[g];
#pragma GCC unroll 8
      for (int r = 0; r < R; ++r) {
        const uint8_t* w = q + r * qrow + j * QB / 8;
        // the same place two blocks of R rows ahead: rows of 2 KB are streams too short for the hardware prefetcher
        _mm_prefetch((const char*)(w + 2 * R * qrow), FAR_HINT);
        const __m512i wu = QB == 4 ? weights_u8_split64(w) : weights_u8<QB>(w, ~0ull, 64);
        const __m512i dot = _mm512_sub_epi32(_mm512_dpbusd_epi32(_mm512_setzero_si512(), wu, xs), corr);
        acc[r] = _mm512_fmadd_ps(_mm512_cvtepi32_ps(dot), _mm512_set1_ps(sc[r * gr + g] * s), acc[r]);
      }
    }
  }
  for (; j < cols; j += 64) {
    const i64 count = std::min<i64>(64, cols - j);
    const __mmask64 live = live_mask(count);
    const __m512i xs = _mm512_maskz_loadu_epi8(live, xq + j);
    const __m512i corr = _mm512_dpbusd_epi32(_mm512_setzero_si512(), off, xs);
    const i64 groups = cdiv(j + count, G) - j / G;
    const __m512 sxl = lane_groups(sx + j / G, ids, groups);
#pragma GCC unroll 8
    for (int r = 0; r < R; ++r) {
      const uint8_t* w = q + r * qrow + j * QB / 8;
      if constexpr (!WHOLE) _mm_prefetch((const char*)(w + 2048), _MM_HINT_T0);
      const __m512i dot = _mm512_sub_epi32(_mm512_dpbusd_epi32(_mm512_setzero_si512(), weights_u8<QB>(w, live, count),
                                                               xs), corr);
      acc[r] = _mm512_fmadd_ps(_mm512_cvtepi32_ps(dot), _mm512_mul_ps(lane_groups(sc + r * gr + j / G, ids, groups), sxl),
                               acc[r]);
    }
  }
#pragma GCC unroll 8
  for (int r = 0; r < R; ++r) y[r] = _mm512_reduce_add_ps(acc[r]);
}

template <int QB, bool WHOLE>
inline void denseq_range_vnni(const int8_t* xq, const float* sx, const uint8_t* q, const h16* scales, i64 o0, i64 o1,
                              i64 cols, i64 G, float* out) {
  const i64 qrow = cols * QB / 8, gr = cdiv(cols, G);
  i64 o = o0;
  for (; o + 8 <= o1; o += 8)
    denseq_rows_vnni<QB, 8, WHOLE>(xq, sx, q + o * qrow, qrow, scales + o * gr, gr, cols, G, out + o);
  for (; o < o1; ++o) denseq_rows_vnni<QB, 1, WHOLE>(xq, sx, q + o * qrow, qrow, scales + o * gr, gr, cols, G, out + o);
}

template <int QB>
void denseq_gemv_vnni(const uint8_t* q, const h16* scales, i64 rows, i64 cols, i64 G, float* out, const float* bias,
                      bool relu) {
  const int8_t* xq = xbuf.q;  // the calling thread's buffers (thread_local): read through these in the region
  const float* sx = xbuf.s;
#pragma omp parallel num_threads(call_threads)
  {
    const int nth = omp_get_num_threads(), tid = omp_get_thread_num();
    const i64 o0 = rows * tid / nth, o1 = rows * (tid + 1) / nth;
    if (G % 64 == 0) denseq_range_vnni<QB, true>(xq, sx, q, scales, o0, o1, cols, G, out);
    else denseq_range_vnni<QB, false>(xq, sx, q, scales, o0, o1, cols, G, out);
    for (i64 o = o0; o < o1; ++o) {
      const float y = out[o] + (bias ? bias[o] : 0.f);
      out[o] = relu && y < 0.f ? 0.f : y;
    }
  }
}
// ---------------------------------------------------------------- int8 activations, T rows (prefill)
// out[T, rows] = Q(x) @ W^T for T >= 2 rows of x, integer products as the batch-1 kernels above, for the
// dense and the n:m (m = 2n, 64 kept values a chunk) layouts. Each thread takes GR of its output rows
// at a time and widens them into dense signed bytes (zero where n:m dropped a value, int4 unpacked),
// with each group's weight sum; then every token tile multiplies them: lanes are GT / 2 tokens (two
// vectors), and one vpdpbusd adds 4 columns of one row, broadcast, against the 4 activation bytes of
// each token. The activations are stored as unsigned bytes xq + 128 (vpdpbusd multiplies unsigned by
// signed), so the integer sum carries 128 * (the group's weight sum), taken off before the float32
// scaling by the row's weight scale times each token's activation scale.
constexpr int GR = 4, GT = 32;

struct GemmBuf {     // the calling thread's activations, laid out for the tiles (reused across calls)
  uint8_t* u = nullptr;  // [T / GT][K / 4][GT][4] xq + 128 (padding 128: a zero)
  float* s = nullptr;    // [T / GT][groups][GT] activation scales (padding 0)
  i64 ucap = 0, scap = 0;
  ~GemmBuf() { free(u), free(s); }
  void reserve(i64 ubytes, i64 sfloats) {
    if (ubytes > ucap) free(u), ucap = ubytes, u = (uint8_t*)aligned_alloc(64, cdiv(ubytes, 64) * 64);
    if (sfloats > scap) free(s), scap = sfloats, s = (float*)aligned_alloc(64, cdiv(sfloats * 4, 64) * 64);
  }
};
thread_local GemmBuf gemm_buf;

// The T rows of x quantized in blocks of Gd columns (quant_block: the batch-1 rounding), into gemm_buf.
inline void gemm_x(const float* x, i64 T, i64 K, i64 Gd, i64 K4, i64 groups) {
  const i64 tiles = cdiv(T, GT);
  GemmBuf& b = gemm_buf;
  b.reserve(tiles * K4 * GT * 4, tiles * groups * GT);
  uint8_t* u = b.u;
  float* sx = b.s;
  std::memset(u, 0x80, tiles * K4 * GT * 4);
  std::memset(sx, 0, tiles * groups * GT * 4);
#pragma omp parallel num_threads(call_threads)
  {
    int8_t* row = (int8_t*)aligned_alloc(64, cdiv(K4 * 4, 64) * 64);
#pragma omp for schedule(static)
    for (i64 t = 0; t < T; ++t) {
      std::memset(row, 0, K4 * 4);
      const i64 tile = t / GT, lane = t % GT;
      for (i64 g = 0; g < groups; ++g)
        sx[(tile * groups + g) * GT + lane] = quant_block(x + t * K, g * Gd, std::min(K, g * Gd + Gd), row, nullptr);
      uint8_t* dst = u + tile * K4 * GT * 4 + lane * 4;
      for (i64 k = 0; k < K4; ++k) {
        uint32_t v;
        std::memcpy(&v, row + 4 * k, 4);
        v ^= 0x80808080u;
        std::memcpy(dst + k * GT * 4, &v, 4);
      }
    }
    free(row);
  }
}

// GR expanded rows (w, `stride` bytes apart; sw / wc: per row and group, the weight scale and 128 * the
// weight sum) against one tile of GT tokens; acc[r][t] = the products, bias and ReLU not applied.
inline void gemm_tile(const int8_t* w, i64 stride, const float* sw, const int32_t* wc, const uint8_t* xu,
                      const float* sx, i64 groups, i64 steps, float acc[GR][GT]) {
  __m512 f[GR][2];
#pragma GCC unroll 8
  for (int r = 0; r < GR; ++r) f[r][0] = f[r][1] = _mm512_setzero_ps();
  for (i64 g = 0; g < groups; ++g) {
    __m512i a[GR][2];
#pragma GCC unroll 8
    for (int r = 0; r < GR; ++r) a[r][0] = a[r][1] = _mm512_setzero_si512();
    const uint8_t* xp = xu + g * steps * GT * 4;
    const int8_t* wg = w + g * steps * 4;
    for (i64 k = 0; k < steps; ++k) {
      const __m512i x0 = _mm512_load_si512(xp + k * GT * 4), x1 = _mm512_load_si512(xp + k * GT * 4 + 64);
#pragma GCC unroll 8
      for (int r = 0; r < GR; ++r) {
        int32_t v;
        std::memcpy(&v, wg + r * stride + 4 * k, 4);
        const __m512i b = _mm512_set1_epi32(v);
        a[r][0] = _mm512_dpbusd_epi32(a[r][0], x0, b);
        a[r][1] = _mm512_dpbusd_epi32(a[r][1], x1, b);
      }
    }
    const __m512 s0 = _mm512_load_ps(sx + g * GT), s1 = _mm512_load_ps(sx + g * GT + 16);
#pragma GCC unroll 8
    for (int r = 0; r < GR; ++r) {
      const __m512i c = _mm512_set1_epi32(wc[r * groups + g]);
      const __m512 sc = _mm512_set1_ps(sw[r * groups + g]);
      f[r][0] = _mm512_fmadd_ps(_mm512_cvtepi32_ps(_mm512_sub_epi32(a[r][0], c)), _mm512_mul_ps(s0, sc), f[r][0]);
      f[r][1] = _mm512_fmadd_ps(_mm512_cvtepi32_ps(_mm512_sub_epi32(a[r][1], c)), _mm512_mul_ps(s1, sc), f[r][1]);
    }
  }
#pragma GCC unroll 8
  for (int r = 0; r < GR; ++r) _mm512_storeu_ps(acc[r], f[r][0]), _mm512_storeu_ps(acc[r] + 16, f[r][1]);
}

// 128 * the sum of each group of Gd (a multiple of 16) bytes of one expanded row of `len` bytes.
inline void group_sums(const int8_t* w, i64 groups, i64 Gd, int32_t* wc) {
  const __m512i ones = _mm512_set1_epi8(1);
  for (i64 g = 0; g < groups; ++g) {
    __m512i acc = _mm512_setzero_si512();
    for (i64 j = 0; j < Gd; j += 64) {
      const __mmask64 live = live_mask(Gd - j);
      acc = _mm512_dpbusd_epi32(acc, ones, _mm512_maskz_loadu_epi8(live, w + g * Gd + j));
    }
    wc[g] = 128 * _mm512_reduce_add_epi32(acc);
  }
}

// The 64 kept values of one n:m row-chunk (columns idx, 0..127) as 128 dense signed bytes at dst.
template <int QB>
inline void expand_nm_chunk(const uint8_t* qr, __m512i idx, __mmask64 live, i64 count, int n, int m,
                            const __m512i* pick, int8_t* dst) {
  __m512i w = weights_u8<QB>(qr, live, count);  // int8: q + 128; int4: q + 8
  w = _mm512_maskz_sub_epi8(live, w, _mm512_set1_epi8(QB == 8 ? (char)0x80 : 8));
  for (int h = 0; h < 2; ++h) {
    // dense column p of this half takes kept value j = (p / m) * n + r where column(j) == p
    const __m512i pos = _mm512_add_epi8(pick[16], _mm512_set1_epi8((char)(64 * h)));
    __m512i sel = _mm512_setzero_si512();
    __mmask64 hit = 0;
    for (int r = 0; r < n; ++r) {
      const __m512i j = pick[h * 8 + r];
      const __mmask64 eq = _mm512_cmpeq_epi8_mask(_mm512_permutexvar_epi8(j, idx), pos);
      sel = _mm512_mask_mov_epi8(sel, eq, j);
      hit |= eq;
    }
    _mm512_storeu_si512(dst + 64 * h, _mm512_maskz_permutexvar_epi8(hit, sel, w));
  }
}

// Rows [o, o + GR) of the weight as dense signed bytes (stride bytes a row), their scales and sums
// per group of Gd columns. kind 0: n:m (codes, jc = 64, m = 2n); kind 2: dense.
template <int BITS, int QB>
inline void gemm_expand(int kind, const uint8_t* codes, const uint8_t* q, const h16* scales, i64 rows, i64 cols,
                        int n, int m, i64 G, i64 o, i64 Gd, i64 groups, i64 stride, const NMColumns<BITS>* columns,
                        const __m512i* pick, int8_t* w, float* sw, int32_t* wc) {
  std::memset(w, 0, GR * stride);
  for (int r = 0; r < GR; ++r) {
    const i64 row = o + r;
    int8_t* wr = w + r * stride;
    if (row >= rows) {
      for (i64 g = 0; g < groups; ++g) sw[r * groups + g] = 0.f, wc[r * groups + g] = 0;
      continue;
    }
    if (kind == 2) {
      const uint8_t* qr = q + row * cols * QB / 8;
      for (i64 j = 0; j < cols; j += 64) {
        const i64 count = std::min<i64>(64, cols - j);
        const __mmask64 live = live_mask(count);
        const __m512i v = _mm512_maskz_sub_epi8(live, weights_u8<QB>(qr + j * QB / 8, live, count),
                                                _mm512_set1_epi8(QB == 8 ? (char)0x80 : 8));
        _mm512_mask_storeu_epi8(wr + j, live, v);
      }
      for (i64 g = 0; g < groups; ++g) sw[r * groups + g] = scales[row * groups + g];
    } else {
      constexpr i64 jc = 64;
      const i64 J = cols / m * n, chunks = cdiv(J, jc), gpc = cdiv(jc, G);
      for (i64 c = 0; c < chunks; ++c) {
        const i64 count = std::min(jc, J - c * jc), cbytes = (count * BITS + 7) / 8, gr = cdiv(count, G);
        const __m512i idx = (*columns)(codes + nm_code_off(c, row, rows, jc, count, BITS), cbytes);
        expand_nm_chunk<QB>(q + (c * rows * jc + row * count) * QB / 8, idx, live_mask(count), count, n, m, pick,
                            wr + c * 128);
        for (i64 gi = 0; gi < gr; ++gi) sw[r * groups + c * gpc + gi] = scales[c * rows * gpc + row * gr + gi];
      }
    }
    group_sums(wr, groups, Gd, wc + r * groups);
  }
}

template <int BITS, int QB>
void q_gemm_vnni(int kind, const uint8_t* codes, const uint8_t* q, const h16* scales, i64 rows, i64 cols, int n,
                 int m, i64 G, const float* x, i64 T, float* out, const float* bias, bool relu) {
  const i64 Gd = kind == 2 ? G : std::min<i64>(G, 64) * m / n, groups = cdiv(cols, Gd), steps = Gd / 4;
  const i64 K4 = groups * steps, tiles = cdiv(T, GT);
  const i64 stride = cdiv(std::max(groups * Gd, kind == 2 ? cols : cdiv(cols / m * n, 64) * 128), 64) * 64;
  gemm_x(x, T, cols, Gd, K4, groups);
  const uint8_t* xu = gemm_buf.u;
  const float* sx = gemm_buf.s;
  if (kind != 0) n = 1, m = 2;  // unused by dense rows
  const NMColumns<BITS> columns(n, m);
  // pick[h * 8 + r]: for dense column p = 64 h + lane, the kept value (p / m) * n + r; pick[16]: lane ids
  alignas(64) uint8_t pk[17][64];
  for (int h = 0; h < 2; ++h)
    for (int r = 0; r < 8; ++r)
      for (int l = 0; l < 64; ++l) pk[h * 8 + r][l] = (uint8_t)(((64 * h + l) / m) * n + std::min(r, n - 1));
  for (int l = 0; l < 64; ++l) pk[16][l] = (uint8_t)l;
  __m512i pick[17];
  for (int i = 0; i < 17; ++i) pick[i] = _mm512_load_si512(pk[i]);
  const i64 blocks = cdiv(rows, GR);
#pragma omp parallel num_threads(call_threads)
  {
    int8_t* w = (int8_t*)aligned_alloc(64, GR * stride);
    float* sw = (float*)aligned_alloc(64, cdiv(GR * groups * 4, 64) * 64);
    int32_t* wc = (int32_t*)aligned_alloc(64, cdiv(GR * groups * 4, 64) * 64);
    alignas(64) float acc[GR][GT];
#pragma omp for schedule(static)
    for (i64 bl = 0; bl < blocks; ++bl) {
      const i64 o = bl * GR;
      gemm_expand<BITS, QB>(kind, codes, q, scales, rows, cols, n, m, G, o, Gd, groups, stride, &columns, pick,
                            w, sw, wc);
      for (i64 tile = 0; tile < tiles; ++tile) {
        gemm_tile(w, stride, sw, wc, xu + tile * K4 * GT * 4, sx + tile * groups * GT, groups, steps, acc);
        store_tile(acc, o, rows, tile * GT, std::min<i64>(GT, T - tile * GT), out, bias, relu);
      }
    }
    free(w), free(sw), free(wc);
  }
}
#endif

// ---------------------------------------------------------------- int8 activations, batch 1, AVX2
// The batch-1 products of builds with AVX2 but not AVX-512 VNNI + VBMI (AVX2 + FMA machines, AVX-512
// without VNNI), for dense layouts and for 2:4 with 64 kept values a chunk: the same function as the
// VNNI kernels (integers summed per group, then the weight scale times the input scale), on 256-bit
// integer dot products. vpmaddubsw multiplies unsigned by signed bytes, so a signed weight byte w
// enters as |w| against sign(w) * x (vpabsb, vpsignb); 2 * 128 * 127 fits its 16-bit sums, so it is
// exact. int4 dense rows skip that step: their stored nibbles (q + 8, unsigned) multiply x directly
// and 8 * (the group's input sum) comes off. 2:4 rows gather their inputs by byte shuffles (below).
#if defined(__AVX2__) && !defined(NMS_VNNI)
#define NMS_I8DOT 1

// Products of signed bytes summed 4 at a time into 8 int32 lanes (|w| <= 128, |x| <= 127).
inline __m256i dot_s8(__m256i w, __m256i x) {
  return _mm256_madd_epi16(_mm256_maddubs_epi16(_mm256_abs_epi8(w), _mm256_sign_epi8(x, w)), _mm256_set1_epi16(1));
}

inline float hsum8(__m256 v) {
  const __m128 s = _mm_add_ps(_mm256_castps256_ps128(v), _mm256_extractf128_ps(v, 1));
  const __m128 t = _mm_add_ps(s, _mm_movehl_ps(s, s));
  return _mm_cvtss_f32(_mm_add_ss(t, _mm_movehdup_ps(t)));
}

// 32 int4 values from 16 bytes, as signed bytes in split order: the 16 low nibbles (even values), then
// the 16 high nibbles (odd values); `off` 8 gives q, 0 the stored q + 8.
inline __m256i nibbles_split(const uint8_t* p, int off) {
  const __m128i b = _mm_loadu_si128((const __m128i*)p), m = _mm_set1_epi8(0x0F);
  const __m256i v = _mm256_inserti128_si256(_mm256_castsi128_si256(_mm_and_si128(b, m)),
                                            _mm_and_si128(_mm_srli_epi16(b, 4), m), 1);
  return _mm256_sub_epi8(v, _mm256_set1_epi8((char)off));
}

// Dense rows: R rows share each 32-byte input step; groups of G (a multiple of 32) columns summed in
// integers, then scaled. QB = 4 reads the input in split order (xs: even columns, then odd, per 32).
template <int QB, int R>
inline void denseq_rows_avx2(const int8_t* xq, const float* sx, const int32_t* xsum, const uint8_t* q, i64 qrow,
                             const h16* sc, i64 gr, i64 cols, i64 G, float* y) {
  __m256 acc[R];
  for (int r = 0; r < R; ++r) acc[r] = _mm256_setzero_ps();
  for (i64 g = 0; g * G < cols; ++g) {
    const i64 j1 = std::min(cols, g * G + G);
    __m256i d[R];
    for (int r = 0; r < R; ++r) d[r] = _mm256_setzero_si256();
    for (i64 j = g * G; j < j1; j += 32) {
      const __m256i x = _mm256_loadu_si256((const __m256i*)(xq + j));
      const __m256i ax = _mm256_abs_epi8(x);  // int8: |x| against sign(x) * w, shared by the R rows
#pragma GCC unroll 8
      for (int r = 0; r < R; ++r) {
        const uint8_t* w = q + r * qrow + j * QB / 8;
        // rows of 2-8 KB are short streams: each fetches its place two blocks of rows ahead
        if (R > 1 && ((j * QB / 8) & 63) == 0) _mm_prefetch((const char*)(w + 2 * R * qrow), FAR_HINT);
        if constexpr (QB == 8) {
          const __m256i sw = _mm256_sign_epi8(_mm256_loadu_si256((const __m256i*)w), x);  // |w| <= 127
          d[r] = _mm256_add_epi32(d[r], _mm256_madd_epi16(_mm256_maddubs_epi16(ax, sw), _mm256_set1_epi16(1)));
        } else {
          const __m256i p = _mm256_maddubs_epi16(nibbles_split(w, 0), x);
          d[r] = _mm256_add_epi32(d[r], _mm256_madd_epi16(p, _mm256_set1_epi16(1)));
        }
      }
    }
#pragma GCC unroll 8
    for (int r = 0; r < R; ++r) {
      __m256i v = d[r];
      if constexpr (QB == 4) v = _mm256_sub_epi32(v, _mm256_set1_epi32(xsum[g]));
      acc[r] = _mm256_fmadd_ps(_mm256_cvtepi32_ps(v), _mm256_set1_ps(sc[r * gr + g] * sx[g]), acc[r]);
    }
  }
  for (int r = 0; r < R; ++r) y[r] = hsum8(acc[r]);
}

// The input of a dense int4 product in split order (per 32 columns: even columns, then odd) and 8 * the
// sum of each group's inputs, spread over the 8 lanes (subtracted per lane: 8 * sum / 8 = the sum).
struct SplitX {
  int8_t* x = nullptr;
  int32_t* sum = nullptr;
  i64 cap = 0, scap = 0;
  ~SplitX() { free(x), free(sum); }
};
thread_local SplitX split_x;

inline void make_split_x(const int8_t* xq, i64 cols, i64 G) {
  SplitX& b = split_x;
  const i64 padded = cdiv(cols, 32) * 32, groups = cdiv(cols, G);
  if (padded > b.cap) free(b.x), b.cap = padded, b.x = (int8_t*)aligned_alloc(64, cdiv(padded, 64) * 64);
  if (groups > b.scap) free(b.sum), b.scap = groups, b.sum = (int32_t*)aligned_alloc(64, cdiv(groups * 4, 64) * 64);
  for (i64 j = 0; j < padded; j += 32)
    for (int i = 0; i < 16; ++i) b.x[j + i] = xq[j + 2 * i], b.x[j + 16 + i] = xq[j + 2 * i + 1];
  for (i64 g = 0; g < groups; ++g) {
    int32_t s = 0;
    for (i64 j = g * G; j < std::min(cols, g * G + G); ++j) s += xq[j];
    b.sum[g] = s;  // 8 * s over 8 lanes: s a lane
  }
}

template <int QB>
void denseq_gemv_avx2(const uint8_t* q, const h16* scales, i64 rows, i64 cols, i64 G, float* out, const float* bias,
                      bool relu) {
  const int8_t* xq = xbuf.q;
  const float* sx = xbuf.s;
  const int32_t* xsum = nullptr;
  if constexpr (QB == 4) make_split_x(xq, cols, G), xq = split_x.x, xsum = split_x.sum;
  const i64 qrow = cols * QB / 8, gr = cdiv(cols, G);
#pragma omp parallel num_threads(call_threads)
  {
    const int nth = omp_get_num_threads(), tid = omp_get_thread_num();
    const i64 o0 = rows * tid / nth, o1 = rows * (tid + 1) / nth;
    i64 o = o0;
    for (; o + 4 <= o1; o += 4)
      denseq_rows_avx2<QB, 4>(xq, sx, xsum, q + o * qrow, qrow, scales + o * gr, gr, cols, G, out + o);
    for (; o < o1; ++o) denseq_rows_avx2<QB, 1>(xq, sx, xsum, q + o * qrow, qrow, scales + o * gr, gr, cols, G, out + o);
    for (o = o0; o < o1; ++o) {
      const float y = out[o] + (bias ? bias[o] : 0.f);
      out[o] = relu && y < 0.f ? 0.f : y;
    }
  }
}

// 2:4 rows, 32 kept values (64 columns) a step: 128-bit half L of the step holds kept values 16L ..
// 16L+15, in the order the weights load in (int8: value order; int4: the 8 even values, then the 8
// odd ones: low nibbles, then high), so the weights need no shuffle. Their inputs are gathered by two
// in-lane byte shuffles: of XA (half L: the 16 columns of values 16L .. 16L+7) and XB (values 16L+8
// ..), arranged once per chunk for all rows, then one dword blend. The shuffle control comes from the
// step's 8 code bytes: half L's 4 code bytes (one dword, spread to the half's four dwords by one
// vpermd), each dword shifted right by 0, 2, 4, 6 bits (one vpsrlvd) and masked to 2 bits, so byte
// 4k + b of the half is field k of code byte b, the code of value 4b + k; one byte shuffle puts each
// value's code under its byte, then its group's column within the 16 is added.
template <int QB>
struct Nm24Consts {
  __m256i fshift, three, place, base, mlo, mhi;
  static constexpr int blend = QB == 8 ? 0xCC : 0xAA;  // dwords taken from the XB shuffle
  Nm24Consts() {
    alignas(32) uint8_t pl[32], b[32], lo[32], hi[32];
    for (int L = 0; L < 2; ++L)
      for (int i = 0; i < 16; ++i) {
        const int p = 16 * L + i;
        const int j = 16 * L + (QB == 8 ? i : i < 8 ? 2 * i : 2 * (i - 8) + 1);  // value at byte p
        pl[p] = (uint8_t)(4 * (j % 4) + (j % 16) / 4), b[p] = (uint8_t)(((j % 8) / 2) * 4);
        lo[p] = i < 8 ? 0x0F : 0, hi[p] = i < 8 ? 0 : 0x0F;
      }
    auto ld = [](const uint8_t* v) { return _mm256_load_si256((const __m256i*)v); };
    fshift = _mm256_setr_epi32(0, 2, 4, 6, 0, 2, 4, 6);
    three = _mm256_set1_epi8(3), place = ld(pl), base = ld(b), mlo = ld(lo), mhi = ld(hi);
  }
};

// A 32-bit load broadcast to every lane (vbroadcastss from memory: no lane-crossing shuffle).
inline __m256i bcast32(const uint8_t* p) { return _mm256_castps_si256(_mm256_broadcast_ss((const float*)p)); }

template <int QB>
inline __m256i nm24_control(const uint8_t* code, const Nm24Consts<QB>& k) {
  const __m256i c = _mm256_blend_epi32(bcast32(code), bcast32(code + 4), 0xF0);
  const __m256i f = _mm256_and_si256(_mm256_srlv_epi32(c, k.fshift), k.three);
  return _mm256_add_epi8(_mm256_shuffle_epi8(f, k.place), k.base);
}

// The step's 32 kept values as signed bytes, in the order above.
template <int QB>
inline __m256i nm24_weights(const uint8_t* q, const Nm24Consts<QB>& k) {
  if constexpr (QB == 8) return _mm256_loadu_si256((const __m256i*)q);
  // half L: bytes 8L .. 8L+7 (values 16L .. 16L+15) twice, low nibbles kept in the first copy, high in the second
  const __m256i w = _mm256_permute4x64_epi64(_mm256_castsi128_si256(_mm_loadu_si128((const __m128i*)q)), 0x50);
  const __m256i v = _mm256_or_si256(_mm256_and_si256(w, k.mlo), _mm256_and_si256(_mm256_srli_epi16(w, 4), k.mhi));
  return _mm256_sub_epi8(v, _mm256_set1_epi8(8));
}

// One row-chunk: `steps` steps of 32 kept values against the chunk's arranged inputs; groups of gm
// (16, 32 or 64) kept values, scale(g) the weight scale times the input scale of group g.
template <int QB, class Scale>
inline __m256 nm24_row(const uint8_t* cr, const uint8_t* qr, const __m256i* xa, const __m256i* xb, i64 steps, i64 gm,
                       const Nm24Consts<QB>& k, Scale scale, __m256 acc) {
  __m256i whole = _mm256_setzero_si256();
  for (i64 h = 0; h < steps; ++h) {
    const __m256i ctl = nm24_control<QB>(cr + 8 * h, k);
    const __m256i xg = _mm256_blend_epi32(_mm256_shuffle_epi8(xa[h], ctl), _mm256_shuffle_epi8(xb[h], ctl),
                                          Nm24Consts<QB>::blend);
    const __m256i d = dot_s8(nm24_weights<QB>(qr + h * 32 * QB / 8, k), xg);
    if (gm == 64) {
      whole = _mm256_add_epi32(whole, d);
    } else if (gm == 32) {
      acc = _mm256_fmadd_ps(_mm256_cvtepi32_ps(d), _mm256_set1_ps(scale(h)), acc);
    } else {  // groups of 16: half L holds group 2h + L
      const __m256 s = _mm256_blend_ps(_mm256_set1_ps(scale(2 * h)), _mm256_set1_ps(scale(2 * h + 1)), 0xF0);
      acc = _mm256_fmadd_ps(_mm256_cvtepi32_ps(d), s, acc);
    }
  }
  if (gm == 64) acc = _mm256_fmadd_ps(_mm256_cvtepi32_ps(whole), _mm256_set1_ps(scale(0)), acc);
  return acc;
}

// 2:4 int4 whole chunks, four rows at a time (the loop of nmq_gemv_avx2 for QB = 4, groups of 32 or
// 64 kept values). Row o's chunk is 32 bytes (byte g: group g's kept values, the first in the low
// nibble) and 16 code bytes (byte b, field k: the code of value 4b + k, value 2g + e the e-th kept
// value of group g); a quad's rows are consecutive, so its 128 value bytes and 64 code bytes are too.
// The four rows' value bytes are transposed by dwords: vector s holds dword s of each row (half 0:
// groups 4s .. 4s+3, columns 16s .. 16s+15) and dword s + 4 (half 1: columns 64 + 16s ..), so byte
// 4r + j of a half is row r's group j of those four. Its low nibbles (first kept values) and high
// nibbles (second) then all draw on one 16-byte source of inputs per half (xs[s], arranged once per
// chunk): one byte shuffle gathers a vector's 32 inputs, where the row-at-a-time loop needs two and a
// blend. The shuffle control of lane 4r + j is 4j + the value's code. Its code byte, for both of
// the group's values, is byte 2s + j/2 (half 1: 8 + 2s + j/2) of row r (field 0 or 2 for the first
// value, 1 or 3 for the second): the quad's codes are transposed by 16-bit words so that qword s of a
// half holds those two bytes of the four rows (Q), next to Q >> 4 (64-bit shift). Masked with 0x33,
// byte b of [Q | Q >> 4] has field 0 of Q's byte b in bits 0-1, byte 8 + b field 2; shifted right by
// 2 first, fields 1 and 3. Bits 2-3 and 7 come out clear and the shuffle ignores bits 4-6, so one
// byte shuffle (`place`, before the mask: both values' controls) and the column base finish them. Integer sums stay in 16 bits until
// the quad's chunk is done: a lane sums 8 products of (q + 8) * x <= 2 * 15 * 127 each (30480).
#if defined(__AVX2__) && !defined(NMS_VNNI)
// Rows r .. r+3 of a chunk (values qr, codes cr) against the chunk's inputs xs: int32 lane r of half L
// is row r's sum over kept values 32L .. 32L+31 (its group L with groups of 32).
// (The constants are literals, so that the compiler reads them as memory operands: the quad's work
// needs the 16 vector registers, and copies held in registers were spilled inside the loop.)
inline __m256i q4_quad(const uint8_t* qr, const uint8_t* cr, const __m256i* xs) {
  // lane 4r + j: its byte of [Q | Q >> 4] (place) and its group's first column among the 16 (base)
  const __m256i place = _mm256_setr_epi8(0, 8, 1, 9, 2, 10, 3, 11, 4, 12, 5, 13, 6, 14, 7, 15,
                                         0, 8, 1, 9, 2, 10, 3, 11, 4, 12, 5, 13, 6, 14, 7, 15);
  const __m256i base = _mm256_setr_epi8(0, 4, 8, 12, 0, 4, 8, 12, 0, 4, 8, 12, 0, 4, 8, 12,
                                        0, 4, 8, 12, 0, 4, 8, 12, 0, 4, 8, 12, 0, 4, 8, 12);
  // a half [row A's words 0-3 (half 1: 4-7) | row B's] -> A w0, B w0, A w1, B w1, ..
  const __m256i words = _mm256_setr_epi8(0, 1, 8, 9, 2, 3, 10, 11, 4, 5, 12, 13, 6, 7, 14, 15,
                                         0, 1, 8, 9, 2, 3, 10, 11, 4, 5, 12, 13, 6, 7, 14, 15);
  const __m256i m0f = _mm256_set1_epi8(0x0F), m33 = _mm256_set1_epi8(0x33), eight = _mm256_set1_epi8(8);
  auto ld = [](const uint8_t* p) { return _mm256_loadu_si256((const __m256i*)p); };
  // codes: [row 0 | row 1] -> per half [row 0's words 0-3 (half 1: 4-7) | row 1's] -> words interleaved
  const __m256i m01 = _mm256_shuffle_epi8(_mm256_permute4x64_epi64(ld(cr), 0xD8), words);
  const __m256i m23 = _mm256_shuffle_epi8(_mm256_permute4x64_epi64(ld(cr + 32), 0xD8), words);
  const __m256i r0 = ld(qr), r1 = ld(qr + 32), r2 = ld(qr + 64), r3 = ld(qr + 96);
  __m256i p = _mm256_setzero_si256(), c = _mm256_setzero_si256();
  auto step = [&](__m256i t, __m256i hq, __m256i x) {  // t: values, hq: [Q | Q >> 4], x: the inputs
    const __m256i hp = _mm256_shuffle_epi8(hq, place);  // each lane's code byte (the shift below crosses
    // into the next byte only bits that the mask clears)
    const __m256i e0 = _mm256_and_si256(hp, m33), e1 = _mm256_and_si256(_mm256_srli_epi16(hp, 2), m33);
    const __m256i x0 = _mm256_shuffle_epi8(x, _mm256_add_epi8(e0, base));
    const __m256i x1 = _mm256_shuffle_epi8(x, _mm256_add_epi8(e1, base));
    const __m256i w0 = _mm256_and_si256(t, m0f), w1 = _mm256_and_si256(_mm256_srli_epi16(t, 4), m0f);
    p = _mm256_add_epi16(p, _mm256_add_epi16(_mm256_maddubs_epi16(w0, x0), _mm256_maddubs_epi16(w1, x1)));
    c = _mm256_add_epi16(c, _mm256_add_epi16(_mm256_maddubs_epi16(eight, x0), _mm256_maddubs_epi16(eight, x1)));
  };
  // vectors 0 and 1 (dwords 0, 1 of each row; Q0, Q1), then 2 and 3
  const __m256i l01 = _mm256_unpacklo_epi32(r0, r1), l23 = _mm256_unpacklo_epi32(r2, r3);
  const __m256i qa = _mm256_unpacklo_epi32(m01, m23), qas = _mm256_srli_epi64(qa, 4);  // per half: Q0 Q1
  step(_mm256_unpacklo_epi64(l01, l23), _mm256_unpacklo_epi64(qa, qas), xs[0]);
  step(_mm256_unpackhi_epi64(l01, l23), _mm256_unpackhi_epi64(qa, qas), xs[1]);
  const __m256i h01 = _mm256_unpackhi_epi32(r0, r1), h23 = _mm256_unpackhi_epi32(r2, r3);
  const __m256i qb = _mm256_unpackhi_epi32(m01, m23), qbs = _mm256_srli_epi64(qb, 4);  // Q2 Q3
  step(_mm256_unpacklo_epi64(h01, h23), _mm256_unpacklo_epi64(qb, qbs), xs[2]);
  step(_mm256_unpackhi_epi64(h01, h23), _mm256_unpackhi_epi64(qb, qbs), xs[3]);
  return _mm256_madd_epi16(_mm256_sub_epi16(p, c), _mm256_set1_epi16(1));
}

// Rows [i, i + 4) of a whole chunk for i = 0, 4, .. < rows4, in order (one stream: two interleaved halves
// of the rows, as the row-at-a-time loop reads them, measured 2-8% slower from memory on the AVX2 build):
// each quad's sums times its rows' scales (groups of 64: one a row; of 32: two, [r0 g0, r0 g1, r1 g0, ...])
// and the inputs' scales, added to its partials; the same rows of the next chunk (qstride, cstride bytes
// on; 0 in the last) are fetched into L2 meanwhile.
inline void q4_quads(const uint8_t* q, const uint8_t* cd, const h16* sc, const int8_t* xc, const float* sxc, bool whole,
                     i64 rows4, i64 qstride, i64 cstride, float* part) {
  __m256i xs[4];
  for (int s = 0; s < 4; ++s)
    xs[s] = _mm256_inserti128_si256(_mm256_castsi128_si256(_mm_loadu_si128((const __m128i*)(xc + 16 * s))),
                                    _mm_loadu_si128((const __m128i*)(xc + 64 + 16 * s)), 1);
  const __m128 sx0 = _mm_set1_ps(sxc[0]);
  const __m256 sx01 = _mm256_setr_m128(sx0, _mm_set1_ps(whole ? 0.f : sxc[1]));
  const __m256i split = _mm256_setr_epi32(0, 2, 4, 6, 1, 3, 5, 7);
  for (i64 i = 0; i < rows4; i += 4) {
    const uint8_t* qr = q + i * 32;
    const uint8_t* cr = cd + i * 16;
    _mm_prefetch((const char*)(qr + qstride), FAR_HINT);
    _mm_prefetch((const char*)(qr + qstride + 64), FAR_HINT);
    _mm_prefetch((const char*)(qr + qstride + 127), FAR_HINT);
    _mm_prefetch((const char*)(cr + cstride), FAR_HINT);
    _mm_prefetch((const char*)(cr + cstride + 63), FAR_HINT);
    const __m256i d = q4_quad(qr, cr, xs);
    float* p = part + i;
    __m128 y;
    if (whole) {
      const __m128i s4 = _mm_add_epi32(_mm256_castsi256_si128(d), _mm256_extracti128_si256(d, 1));
      y = _mm_mul_ps(_mm_cvtepi32_ps(s4), _mm_mul_ps(_mm_cvtph_ps(_mm_loadl_epi64((const __m128i*)(sc + i))), sx0));
    } else {
      const __m256 s8 = _mm256_permutevar8x32_ps(_mm256_cvtph_ps(_mm_loadu_si128((const __m128i*)(sc + 2 * i))), split);
      const __m256 v = _mm256_mul_ps(_mm256_cvtepi32_ps(d), _mm256_mul_ps(s8, sx01));
      y = _mm_add_ps(_mm256_castps256_ps128(v), _mm256_extractf128_ps(v, 1));
    }
    _mm_storeu_ps(p, _mm_add_ps(_mm_loadu_ps(p), y));
  }
}
#endif

// 2:4, 64 kept values (128 columns) a chunk, groups of G (a multiple of 16) kept values.
template <int QB>
void nmq_gemv_avx2(const uint8_t* codes, const uint8_t* q, const h16* scales, i64 rows, i64 J, i64 G, float* out,
                   const float* bias, bool relu) {
  constexpr i64 jc = 64;
  static const Nm24Consts<QB> k;
  const i64 chunks = cdiv(J, jc), gpc = cdiv(jc, G), gm = std::min(jc, G);
  const int8_t* xq = xbuf.q;
  const float* sx = xbuf.s;
  nm_gemv_threads(rows, out, bias, relu, [&](i64 o0, i64 o1, float* part) {
    alignas(32) uint8_t tail_q[64], tail_c[16];
    for (i64 c = 0; c < chunks; ++c) {
      const i64 count = std::min(jc, J - c * jc), gr = cdiv(count, G), cbytes = (count * 2 + 7) / 8;
      const i64 qb = count * QB / 8, steps = cdiv(count, 32);
      const int8_t* xc = xq + c * 128;
      const float* sxc = sx + c * (jc / gm);
      const uint8_t* crow = codes + nm_code_off(c, o0, rows, jc, count, 2);
      const uint8_t* qrow = q + (c * rows * jc + o0 * count) * QB / 8;
      const h16* srow = scales + c * rows * gpc + o0 * gr;
      __m256i xa[2], xb[2];  // step h: columns 64h + [0, 16) and [32, 48); [16, 32) and [48, 64)
      for (int h = 0; h < 2; ++h) {
        auto cols16 = [&](int at) { return _mm_loadu_si128((const __m128i*)(xc + 64 * h + at)); };
        xa[h] = _mm256_inserti128_si256(_mm256_castsi128_si256(cols16(0)), cols16(32), 1);
        xb[h] = _mm256_inserti128_si256(_mm256_castsi128_si256(cols16(16)), cols16(48), 1);
      }
      auto one = [&](i64 i) {
        const uint8_t* cr = crow + i * cbytes;
        const uint8_t* qr = qrow + i * qb;
        _mm_prefetch((const char*)(qr + QPREFETCH), _MM_HINT_T0);
        if (count < jc) {  // a narrow last chunk: codes and values padded (value 0) to the whole chunk
          std::memset(tail_q, QB == 8 ? 0 : 0x88, sizeof tail_q), std::memset(tail_c, 0, sizeof tail_c);
          std::memcpy(tail_q, qr, qb), std::memcpy(tail_c, cr, cbytes);
          cr = tail_c, qr = tail_q;
        }
        auto scale = [&](i64 g) { return g < gr ? srow[i * gr + g] * sxc[g] : 0.f; };
        part[i] += hsum8(nm24_row<QB>(cr, qr, xa, xb, steps, gm, k, scale, _mm256_setzero_ps()));
      };
      const i64 nrow = o1 - o0, len = nrow / 2;
      // the common case in one tight loop: whole chunks, 1 or 2 scales a chunk; the same rows of the next chunk
      // prefetched meanwhile (a thread's rows of a chunk are short streams)
      const i64 qstride = c + 1 < chunks ? rows * qb : 0, cstride = c + 1 < chunks ? rows * 16 : 0;
      if (QB == 4 && count == jc && gm >= 32) {  // four rows at a time; the few left over row by row
        const i64 rows4 = nrow & ~(i64)3;
        q4_quads(qrow, crow, srow, xc, sxc, gm == 64, rows4, qstride, cstride, part);
        for (i64 i = rows4; i < nrow; ++i) one(i);
        continue;
      }
      if (QB == 8 && count == jc && gm >= 32) {  // int8: 8 rows at a time
        const bool whole = gm == 64;
        // row i's integer sums: whole, both steps in d0; groups of 32, step h in dh (group h)
        auto dots = [&](i64 i, __m256i& d0, __m256i& d1) {
          const uint8_t* cr = crow + i * 16;
          const uint8_t* qr = qrow + i * 64;
          _mm_prefetch((const char*)(qr + qstride), FAR_HINT);
          _mm_prefetch((const char*)(qr + qstride + 63), FAR_HINT);
          _mm_prefetch((const char*)(cr + cstride), FAR_HINT);
          __m256i xg[2];
#pragma GCC unroll 2
          for (int h = 0; h < 2; ++h) {
            const __m256i ctl = nm24_control<QB>(cr + 8 * h, k);
            xg[h] = _mm256_blend_epi32(_mm256_shuffle_epi8(xa[h], ctl), _mm256_shuffle_epi8(xb[h], ctl),
                                       Nm24Consts<QB>::blend);
          }
          d0 = dot_s8(_mm256_loadu_si256((const __m256i*)qr), xg[0]);
          d1 = dot_s8(_mm256_loadu_si256((const __m256i*)(qr + 32)), xg[1]);
          if (whole) d0 = _mm256_add_epi32(d0, d1);
        };
        // a row alone (the few past the last block of 8): scaled in floats, summed into its partial
        auto single = [&](i64 i) {
          __m256i d0, d1;
          dots(i, d0, d1);
          if (whole) {
            part[i] += hsum8(_mm256_cvtepi32_ps(d0)) * (srow[i] * sxc[0]);
          } else {
            part[i] += hsum8(_mm256_cvtepi32_ps(d0)) * (srow[2 * i] * sxc[0]) +
                       hsum8(_mm256_cvtepi32_ps(d1)) * (srow[2 * i + 1] * sxc[1]);
          }
        };
        // 8 consecutive rows: their integer sums folded into one vector (hadd tree), then scaled by the
        // 8 rows' scales at once (one float16 load and conversion) into their 8 partials
        auto fold2 = [&](i64 i, __m256i& a0, __m256i& a1) {  // rows i, i + 1: hadd of their sums
          __m256i x0, x1, y0, y1;
          dots(i, x0, x1), dots(i + 1, y0, y1);
          a0 = _mm256_hadd_epi32(x0, y0);
          if (!whole) a1 = _mm256_hadd_epi32(x1, y1);
        };
        auto fold4 = [&](i64 i, __m256i& b0, __m256i& b1) {
          __m256i a0, a1, c0, c1;
          fold2(i, a0, a1), fold2(i + 2, c0, c1);
          b0 = _mm256_hadd_epi32(a0, c0);
          if (!whole) b1 = _mm256_hadd_epi32(a1, c1);
        };
        auto lanes = [](__m256i lo4, __m256i hi4) {  // [r0..r3 low halves | high] x 2 -> r0..r7
          return _mm256_cvtepi32_ps(_mm256_add_epi32(_mm256_permute2x128_si256(lo4, hi4, 0x20),
                                                     _mm256_permute2x128_si256(lo4, hi4, 0x31)));
        };
        const __m256 vsx0 = _mm256_set1_ps(sxc[0]), vsx1 = _mm256_set1_ps(whole ? 0.f : sxc[1]);
        auto oct = [&](i64 i) {
          __m256i b0, b1, e0, e1;
          fold4(i, b0, b1), fold4(i + 4, e0, e1);
          float* p = part + i;
          if (whole) {
            const __m256 s = _mm256_cvtph_ps(_mm_loadu_si128((const __m128i*)(srow + i)));
            _mm256_storeu_ps(p, _mm256_fmadd_ps(lanes(b0, e0), _mm256_mul_ps(s, vsx0), _mm256_loadu_ps(p)));
          } else {  // scales of rows i..i+7 interleaved by group: [r0g0 r0g1 r1g0 ...], split by group
            const __m256 a = _mm256_cvtph_ps(_mm_loadu_si128((const __m128i*)(srow + 2 * i)));
            const __m256 b = _mm256_cvtph_ps(_mm_loadu_si128((const __m128i*)(srow + 2 * i + 8)));
            const __m256 g0 = _mm256_castpd_ps(_mm256_permute4x64_pd(_mm256_castps_pd(_mm256_shuffle_ps(a, b, 0x88)), 0xD8));
            const __m256 g1 = _mm256_castpd_ps(_mm256_permute4x64_pd(_mm256_castps_pd(_mm256_shuffle_ps(a, b, 0xDD)), 0xD8));
            __m256 acc = _mm256_fmadd_ps(lanes(b0, e0), _mm256_mul_ps(g0, vsx0), _mm256_loadu_ps(p));
            _mm256_storeu_ps(p, _mm256_fmadd_ps(lanes(b1, e1), _mm256_mul_ps(g1, vsx1), acc));
          }
        };
        const i64 len8 = len & ~(i64)7;
        for (i64 i = 0; i < len8; i += 8) oct(i), oct(len + i);
        for (i64 i = len8; i < len; ++i) single(i), single(len + i);
        for (i64 i = 2 * len; i < nrow; ++i) single(i);
        continue;
      }
      for (i64 i = 0; i < len; ++i) one(i), one(len + i);
      for (i64 i = 2 * len; i < nrow; ++i) one(i);
    }
  }, 1);
}
#endif

// ---------------------------------------------------------------- int8 activations, T rows: int16 products
// The batched W8A8 product of every build: the function of q_gemm_vnni (integers summed per group of Gd
// columns, then scaled by the row's weight scale times the token's activation scale), with pairwise
// 16-bit multiply-adds (AVX2 / SSE2 vpmaddwd, AVX-512BW vpmaddwd, NEON smull + addp: 2 products per
// int32 lane). The VNNI builds run it for the layouts q_gemm_vnni does not take. Exact: an int8 by int8
// product fits 16 bits and a group of Gd <= 2^15 columns an int32 (no vpmaddubsw, whose saturation
// would change the result). Any n:m layout whose weight groups are whole activation blocks, and dense.
// Weight rows are widened to int16 once per call, GR16 rows at a time; tokens sit in the lanes as in
// q_gemm_vnni: x16[tile][pair p][token][2] holds columns 2p and 2p + 1 of each token of the tile.
typedef int16_t vs16 __attribute__((vector_size(VW * 4)));
constexpr int GR16 = 4, GT16 = 2 * VW;

// Lane i: a[2i] * b[2i] + a[2i + 1] * b[2i + 1], in 32 bits.
inline vi madd16(vs16 a, vs16 b) {
#if defined(__AVX512BW__)
  return (vi)_mm512_madd_epi16((__m512i)a, (__m512i)b);
#elif defined(__AVX512F__)
  const __m512i x = (__m512i)a, y = (__m512i)b;
  const __m256i lo = _mm256_madd_epi16(_mm512_castsi512_si256(x), _mm512_castsi512_si256(y));
  const __m256i hi = _mm256_madd_epi16(_mm512_extracti64x4_epi64(x, 1), _mm512_extracti64x4_epi64(y, 1));
  return (vi)_mm512_inserti64x4(_mm512_castsi256_si512(lo), hi, 1);
#elif defined(__AVX2__)
  return (vi)_mm256_madd_epi16((__m256i)a, (__m256i)b);
#elif defined(__SSE2__)
  return (vi)_mm_madd_epi16((__m128i)a, (__m128i)b);
#elif defined(__aarch64__)
  const int16x8_t x = (int16x8_t)a, y = (int16x8_t)b;
  return (vi)vpaddq_s32(vmull_s16(vget_low_s16(x), vget_low_s16(y)), vmull_high_s16(x, y));
#else
  vi r;
  for (int i = 0; i < VW; ++i) r[i] = (int32_t)a[2 * i] * b[2 * i] + (int32_t)a[2 * i + 1] * b[2 * i + 1];
  return r;
#endif
}

// Two int16 values (one int32) in every lane pair.
inline vs16 pair_splat(const int16_t* p) {
  int32_t v;
  std::memcpy(&v, p, 4);
#if defined(__AVX512F__)
  return (vs16)_mm512_set1_epi32(v);
#elif defined(__AVX2__)
  return (vs16)_mm256_set1_epi32(v);
#elif defined(__SSE2__)
  return (vs16)_mm_set1_epi32(v);
#elif defined(__aarch64__)
  return (vs16)vdupq_n_s32(v);
#else
  vi r;
  for (int i = 0; i < VW; ++i) r[i] = v;
  return (vs16)r;
#endif
}

struct Gemm16Buf {  // the calling thread's activations for the int16 tiles (reused across calls)
  int16_t* x = nullptr;  // [T / GT16][L / 2][GT16][2] (padding: zeros)
  float* s = nullptr;    // [T / GT16][groups][GT16] activation scales (padding 0)
  i64 xcap = 0, scap = 0;
  ~Gemm16Buf() { free(x), free(s); }
  void reserve(i64 xvals, i64 sfloats) {
    if (xvals > xcap) free(x), xcap = xvals, x = (int16_t*)aligned_alloc(64, cdiv(xvals * 2, 64) * 64);
    if (sfloats > scap) free(s), scap = sfloats, s = (float*)aligned_alloc(64, cdiv(sfloats * 4, 64) * 64);
  }
};
thread_local Gemm16Buf gemm16_buf;

// The T rows of x quantized in blocks of Gd columns (quant_block) into gemm16_buf; L = groups * Gd.
inline void gemm16_x(const float* x, i64 T, i64 K, i64 Gd, i64 groups) {
  const i64 tiles = cdiv(T, GT16), L = groups * Gd;
  Gemm16Buf& b = gemm16_buf;
  b.reserve(tiles * L * GT16, tiles * groups * GT16);
  std::memset(b.x, 0, tiles * L * GT16 * 2);
  std::memset(b.s, 0, tiles * groups * GT16 * 4);
  int16_t* xs = b.x;
  float* sx = b.s;
#pragma omp parallel num_threads(call_threads)
  {
    int8_t* row = (int8_t*)aligned_alloc(64, cdiv(L, 64) * 64);
#pragma omp for schedule(static)
    for (i64 t = 0; t < T; ++t) {
      std::memset(row, 0, L);
      const i64 tile = t / GT16, lane = t % GT16;
      for (i64 g = 0; g < groups; ++g)
        sx[(tile * groups + g) * GT16 + lane] = quant_block(x + t * K, g * Gd, std::min(K, g * Gd + Gd), row, nullptr);
      int16_t* dst = xs + tile * L * GT16 + lane * 2;
      for (i64 p = 0; p < L / 2; ++p) dst[p * GT16 * 2] = row[2 * p], dst[p * GT16 * 2 + 1] = row[2 * p + 1];
    }
    free(row);
  }
}

// `count` stored values (int8, or int4 nibble pairs from a whole byte) as int16.
template <int QB>
inline void widen16(const uint8_t* q, i64 count, int16_t* out) {
  if constexpr (QB == 8) {
    for (i64 k = 0; k < count; ++k) out[k] = (int8_t)q[k];
  } else {
    for (i64 k = 0; k < count / 2; ++k) out[2 * k] = (q[k] & 15) - 8, out[2 * k + 1] = (q[k] >> 4) - 8;
    if (count & 1) out[count - 1] = (q[count / 2] & 15) - 8;
  }
}

// 2:4 codes to dense int16 with a byte shuffle: each code byte holds the offsets of 4 kept values (two
// groups of 4 columns), and table24[byte] moves their 8 bytes to the 16 bytes of those 8 columns (0x80:
// a zero). Returns the kept values done (a multiple of 4); the caller does the rest one by one.
struct Table24 {
  alignas(16) uint8_t ctl[256][16];
  Table24() {
    for (int b = 0; b < 256; ++b) {
      std::memset(ctl[b], 0x80, 16);
      for (int v = 0; v < 4; ++v) {
        const int lane = (v / 2) * 4 + ((b >> (2 * v)) & 3);
        ctl[b][2 * lane] = (uint8_t)(2 * v), ctl[b][2 * lane + 1] = (uint8_t)(2 * v + 1);
      }
    }
  }
};
inline i64 expand24(const uint8_t* code, const int16_t* vals, i64 count, int16_t* out) {
#if defined(__SSSE3__) || defined(__aarch64__)
  static const Table24 table;
  i64 k = 0;
  for (; 4 * k + 4 <= count; ++k) {
#if defined(__SSSE3__)
    const __m128i v = _mm_loadl_epi64((const __m128i*)(vals + 4 * k));
    const __m128i c = _mm_load_si128((const __m128i*)table.ctl[code[k]]);
    _mm_storeu_si128((__m128i*)(out + 8 * k), _mm_shuffle_epi8(v, c));
#else
    const uint8x16_t v = vcombine_u8(vld1_u8((const uint8_t*)(vals + 4 * k)), vdup_n_u8(0));
    vst1q_u8((uint8_t*)(out + 8 * k), vqtbl1q_u8(v, vld1q_u8(table.ctl[code[k]])));
#endif
  }
  return 4 * k;
#else
  (void)code, (void)vals, (void)count, (void)out;
  return 0;
#endif
}

// Rows [o, o + GR16) of the weight widened to int16 (L values a row, zero where n:m dropped a value or
// past the columns) and their scales per group of Gd columns (sw[r * groups + g]). kind 0: n:m; 2: dense.
template <int QB>
void gemm16_expand(int kind, const uint8_t* codes, const uint8_t* q, const h16* scales, i64 rows, i64 cols, int n,
                   int m, i64 jc, int bits, i64 G, i64 o, i64 Gd, i64 groups, int16_t* w, float* sw, int16_t* tmp) {
  const i64 L = groups * Gd;
  std::memset(w, 0, GR16 * L * 2);
  for (int r = 0; r < GR16; ++r) {
    const i64 row = o + r;
    int16_t* wr = w + r * L;
    float* sr = sw + r * groups;
    if (row >= rows) {
      for (i64 g = 0; g < groups; ++g) sr[g] = 0.f;
      continue;
    }
    if (kind == 2) {
      widen16<QB>(q + row * cols * QB / 8, cols, wr);
      for (i64 g = 0; g < groups; ++g) sr[g] = scales[row * groups + g];
      continue;
    }
    const i64 J = cols / m * n, chunks = cdiv(J, jc), cc = jc / n * m, gpc = cdiv(jc, G), gm = Gd / m * n;
    for (i64 c = 0; c < chunks; ++c) {
      const i64 count = std::min(jc, J - c * jc);
      const uint8_t* code = codes + nm_code_off(c, row, rows, jc, count, bits);
      int16_t* vals = tmp;
      widen16<QB>(q + (c * rows * jc + row * count) * QB / 8, count, vals);
      int16_t* wc = wr + c * cc;
      const uint32_t mask = (1u << bits) - 1;
      i64 j = 0, base = 0;
      if (n == 2 && m == 4) j = expand24(code, vals, count, wc), base = j * 2;
      for (; j < count; base += m)
        for (int t = 0; t < n; ++t, ++j) {
          const i64 bit = j * bits;
          uint32_t word = code[bit >> 3];
          if ((bit & 7) + bits > 8) word |= (uint32_t)code[(bit >> 3) + 1] << 8;
          wc[base + (word >> (bit & 7) & mask)] = vals[j];
        }
      const i64 gr = cdiv(count, G);
      for (i64 gi = 0; gi < cdiv(count, gm); ++gi) sr[c * (cc / Gd) + gi] = scales[c * rows * gpc + row * gr + gi];
    }
  }
}

// GR16 widened rows against one tile of GT16 tokens: acc[r][t] = the products (bias and ReLU not applied).
inline void gemm16_tile(const int16_t* w, i64 L, const float* sw, const int16_t* xt, const float* sx, i64 groups,
                        i64 Gd, float acc[GR16][GT16]) {
  vf f[GR16][2];
  for (int r = 0; r < GR16; ++r) f[r][0] = f[r][1] = vf{};
  for (i64 g = 0; g < groups; ++g) {
    vi a[GR16][2];
    for (int r = 0; r < GR16; ++r) a[r][0] = a[r][1] = vi{};
    for (i64 p = g * Gd / 2; p < (g + 1) * Gd / 2; ++p) {
      vs16 x0, x1;
      std::memcpy(&x0, xt + p * GT16 * 2, sizeof x0);
      std::memcpy(&x1, xt + p * GT16 * 2 + VW * 2, sizeof x1);
#pragma GCC unroll 4
      for (int r = 0; r < GR16; ++r) {
        const vs16 b = pair_splat(w + r * L + 2 * p);
        a[r][0] += madd16(x0, b);
        a[r][1] += madd16(x1, b);
      }
    }
    const vf s0 = vload(sx + g * GT16), s1 = vload(sx + g * GT16 + VW);
#pragma GCC unroll 4
    for (int r = 0; r < GR16; ++r) {
      const vf sc = vsplat(sw[r * groups + g]);
      f[r][0] += __builtin_convertvector(a[r][0], vf) * (s0 * sc);
      f[r][1] += __builtin_convertvector(a[r][1], vf) * (s1 * sc);
    }
  }
  for (int r = 0; r < GR16; ++r) vstore(acc[r], f[r][0]), vstore(acc[r] + VW, f[r][1]);
}

// Whether q_gemm16 takes a layout: dense with even groups, or n:m whose weight groups (min(G, jc) kept
// values) are whole groups of m columns, an even number of columns, and divide the chunk.
inline bool q_gemm16_takes(int kind, int n, int m, i64 jc, i64 G) {
  if (kind == 2) return G % 2 == 0;
  const i64 gm = std::min(G, jc);
  return kind == 0 && gm % n == 0 && (gm / n * m) % 2 == 0 && jc % gm == 0;
}

template <int QB>
void q_gemm16(int kind, const uint8_t* codes, const uint8_t* q, const h16* scales, i64 rows, i64 cols, int n, int m,
              i64 jc, int bits, i64 G, const float* x, i64 T, float* out, const float* bias, bool relu) {
  const i64 Gd = kind == 2 ? G : std::min(G, jc) / n * m, groups = cdiv(cols, Gd), L = groups * Gd;
  const i64 tiles = cdiv(T, GT16), blocks = cdiv(rows, GR16);
  gemm16_x(x, T, cols, Gd, groups);
  const int16_t* xs = gemm16_buf.x;
  const float* sx = gemm16_buf.s;
#pragma omp parallel num_threads(call_threads)
  {
    int16_t* w = (int16_t*)aligned_alloc(64, cdiv(GR16 * L * 2, 64) * 64);
    float* sw = (float*)aligned_alloc(64, cdiv(GR16 * groups * 4, 64) * 64);
    int16_t* tmp = (int16_t*)aligned_alloc(64, cdiv(jc * 2 + 2, 64) * 64);
    alignas(64) float acc[GR16][GT16];
#pragma omp for schedule(static)
    for (i64 bl = 0; bl < blocks; ++bl) {
      const i64 o = bl * GR16;
      gemm16_expand<QB>(kind, codes, q, scales, rows, cols, n, m, jc, bits, G, o, Gd, groups, w, sw, tmp);
      for (i64 tile = 0; tile < tiles; ++tile) {
        gemm16_tile(w, L, sw, xs + tile * L * GT16, sx + tile * groups * GT16, groups, Gd, acc);
        store_tile(acc, o, rows, tile * GT16, std::min<i64>(GT16, T - tile * GT16), out, bias, relu);
      }
    }
    free(w), free(sw), free(tmp);
  }
}

