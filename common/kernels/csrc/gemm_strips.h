// out[r, c] = sum_i x[r * ldx + i] * w[i, c] for r < M, c0 <= c < c1, with w in strip order: the scheme
// for products where each weight meets only a few rows (an expert's share of a decode batch).
//
// Strip order keeps a weight [K, N] as [ceil(N / 32), K, 32]: strip s holds columns 32 s .. 32 s + 31 of
// every row, zeros past N (common/kernels/strips.py makes it). A tile of up to STRIP_MAX_ROWS
// rows x one strip keeps its accumulators in registers down all K rows while the strip streams past in
// memory order, so the weights arrive as one sequential stream (which the prefetchers follow) and are never
// written anywhere: gemm_packed.h widens panels into L1 first, which pays off only when many rows reuse
// them, and reads a [K, N] weight in runs of a panel's width. A bfloat16 strip row is one cache line,
// widened in registers by two instructions (the even columns by a shift, the odd ones by a mask) and put
// back in column order once, at the end. Sums run over i in order, as in gemm_packed.h, so the bits do not
// depend on the scheme.
#pragma once

#include <cstdint>

#include "simd.h"

constexpr int64_t STRIP_COLUMNS = 32;   // a strip's width: a cache line of bfloat16
// Rows a tile holds: 24 accumulators of AVX-512's 32 vector registers; of AVX2's 16, 12 (each vector is two).
constexpr int64_t STRIP_MAX_ROWS = VECTOR_REGISTERS >= 32 ? 12 : 3;

// Where columns c..c+15 of row r of a weight in strip order start (c a multiple of 16): the panels of
// gemm_packed.h read strips through it, for the experts with many rows.
template <typename W>
struct StripOrder {
  using element = W;
  const W* w;
  int64_t K;
  const W* at(int64_t r, int64_t c) const {
    return w + (c / STRIP_COLUMNS * K + r) * STRIP_COLUMNS + c % STRIP_COLUMNS;
  }
};

namespace gemm_strips_detail {

constexpr int64_t PREFETCH_BYTES = 4096;  // how far ahead the stream is asked for (measured: 4-16 KiB close)

// Half h of a strip row as a vector: bfloat16 as its even (h = 0) or odd (h = 1) columns, float32 as its
// first or second 16 columns.
template <int h>
inline f32x16 load_half(const uint16_t* p) {
  return h == 0 ? load_bf16_even(p) : load_bf16_odd(p);
}
template <int h>
inline f32x16 load_half(const float* p) {
  return load(p + 16 * h);
}

// The 32 columns of what load_half made, in order, at o (the columns past the product's last masked out).
inline void store_row(const uint16_t*, f32x16 even, f32x16 odd, const mask16* mask, float* o) {
  f32x16 first, second;
  interleave(even, odd, first, second);
  store(o, first, mask[0]);
  store(o + 16, second, mask[1]);
}
inline void store_row(const float*, f32x16 a, f32x16 b, const mask16* mask, float* o) {
  store(o, a, mask[0]);
  store(o + 16, b, mask[1]);
}

// R rows of out x one strip (K rows of STRIP_COLUMNS at w), a strip row's halves one after the other: on
// AVX2 3 rows' 12 accumulators leave room for one half's two registers, not both halves' four (GCC still
// keeps one accumulator on the stack, to hold the rows' broadcasts for both halves: measured no slower than
// broadcasting again). The loop walks pointers: with an index, GCC keeps a copy of the accumulators on the
// stack, stored every iteration.
template <int R, typename W>
void tile(const float* x, int64_t ldx, const W* w, int64_t K, float* o, int64_t ldo, const mask16* mask) {
  f32x16 acc[R][2];
  #pragma GCC unroll 16
  for (int r = 0; r < R; ++r) acc[r][0] = acc[r][1] = zeros();
  for (const float* const end = x + K; x < end; ++x, w += STRIP_COLUMNS) {
    _mm_prefetch(reinterpret_cast<const char*>(w) + PREFETCH_BYTES, _MM_HINT_T0);
    const f32x16 a = load_half<0>(w);
    #pragma GCC unroll 16
    for (int r = 0; r < R; ++r) acc[r][0] = fmadd(splat(x[r * ldx]), a, acc[r][0]);
    const f32x16 b = load_half<1>(w);
    #pragma GCC unroll 16
    for (int r = 0; r < R; ++r) acc[r][1] = fmadd(splat(x[r * ldx]), b, acc[r][1]);
  }
  #pragma GCC unroll 16
  for (int r = 0; r < R; ++r) store_row(w, acc[r][0], acc[r][1], mask, o + r * ldo);
}

// tile<rows> for a rows known at run time (1..R).
template <int R = STRIP_MAX_ROWS, typename W>
void tile_of(int rows, const float* x, int64_t ldx, const W* w, int64_t K, float* o, int64_t ldo,
             const mask16* mask) {
  if constexpr (R > 0) {
    if (rows == R) return tile<R>(x, ldx, w, K, o, ldo, mask);
    tile_of<R - 1>(rows, x, ldx, w, K, o, ldo, mask);
  }
}

}  // namespace gemm_strips_detail

// The product over any number of rows, a strip at a time, the rows in as few tiles of even size as fit;
// c0 is a multiple of STRIP_COLUMNS, c1 at most the weight's N.
template <typename W>
void gemm_strips(const float* x, int64_t ldx, const W* w, float* out, int64_t ldo, int64_t M, int64_t K,
                 int64_t c0, int64_t c1) {
  using namespace gemm_strips_detail;
  const int64_t tiles = (M + STRIP_MAX_ROWS - 1) / STRIP_MAX_ROWS;
  for (int64_t n = c0; n < c1; n += STRIP_COLUMNS) {
    const mask16 mask[2] = {tail_mask(n, c1), tail_mask(n + 16, c1)};
    const W* strip = w + n * K;  // strip n / 32, each K x 32 elements
    for (int64_t t = 0, m = 0; t < tiles; ++t) {
      const int64_t rows = (M - m) / (tiles - t);
      tile_of(int(rows), x + m * ldx, ldx, strip, K, out + m * ldo + n, ldo, mask);
      m += rows;
    }
  }
}
