// out[r, c] += sum_i x[r * xr + i * xi] * w[i * ldw + c] for r < M, i < K, c0 <= c < c1: the FMA scheme of
// the paged decode's small products (strided operands, a handful of rows). KB rows of w sit in registers
// (widened by a shift where w is bfloat16 bits) while RB rows of x at a time stream past them, RB
// independent FMA chains; the accumulators stay in `out`, cache-resident, loaded once per KB rows of w. Each
// sum runs over i in order, so a result does not depend on how the columns are split between threads.
#pragma once

#include <algorithm>
#include <cstdint>

#include "simd.h"

#if !defined(__AVX512F__)
// fma_rows for a vector of which only the lower 8 lanes exist (8 heads' scores, a tail), on AVX2 where those
// are a register of their own: half the FMAs, the same sums.
template <int R>
inline void fma_rows_low(const float* x, int64_t xr, int64_t xi, const f32x16* wv, int64_t kn, float* o,
                         int64_t ldo, __m256i mask) {
  __m256 acc[R];
  for (int r = 0; r < R; ++r) acc[r] = load(o + r * ldo, mask);
  for (int64_t i = 0; i < kn; ++i)
    for (int r = 0; r < R; ++r)
      acc[r] = _mm256_fmadd_ps(_mm256_set1_ps(x[r * xr + i * xi]), wv[i].lo, acc[r]);
  for (int r = 0; r < R; ++r) store(o + r * ldo, acc[r], mask);
}
#endif

template <int R>
inline void fma_rows(const float* x, int64_t xr, int64_t xi, const f32x16* wv, int64_t kn, float* o,
                     int64_t ldo, mask16 mask) {
#if !defined(__AVX512F__)
  if (none_set(mask.hi)) return fma_rows_low<R>(x, xr, xi, wv, kn, o, ldo, mask.lo);
#endif
  f32x16 acc[R];
  for (int r = 0; r < R; ++r) acc[r] = load(o + r * ldo, mask);
  for (int64_t i = 0; i < kn; ++i)
    for (int r = 0; r < R; ++r) acc[r] = fmadd(splat(x[r * xr + i * xi]), wv[i], acc[r]);
  for (int r = 0; r < R; ++r) store(o + r * ldo, acc[r], mask);
}

template <typename W>
void gemm_acc(const float* x, int64_t xr, int64_t xi, const W* w, int64_t ldw, float* out, int64_t ldo,
              int64_t M, int64_t K, int64_t c0, int64_t c1) {
  constexpr int64_t KB = 16;
  constexpr int RB = VECTOR_REGISTERS >= 32 ? 8 : 4;  // with AVX2's 16 registers w's rows come from L1
  f32x16 wv[KB];
  for (int64_t k = 0; k < K; k += KB) {
    const int64_t kn = std::min(KB, K - k);
    for (int64_t n = c0; n < c1; n += 16) {
      const mask16 mask = tail_mask(n, c1);
      for (int64_t i = 0; i < kn; ++i) wv[i] = load_weights(w + (k + i) * ldw + n, mask);
      int64_t m = 0;
      for (; m + RB <= M; m += RB)
        fma_rows<RB>(x + m * xr + k * xi, xr, xi, wv, kn, out + m * ldo + n, ldo, mask);
      for (; m + 4 <= M; m += 4)
        fma_rows<4>(x + m * xr + k * xi, xr, xi, wv, kn, out + m * ldo + n, ldo, mask);
      for (; m < M; ++m) fma_rows<1>(x + m * xr + k * xi, xr, xi, wv, kn, out + m * ldo + n, ldo, mask);
    }
  }
}
