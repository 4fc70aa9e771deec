// out[r, c] = sum_i x[r * ldx + i] * w[i, c] for r < M, c0 <= c < c1: the scheme for products where
// each weight meets several rows (batched decode, an expert's share of a batch). A thread widens a panel of
// KC weight rows x 64 columns into float32 once (it stays in L1), then runs tiles of rows over it, their
// accumulators in registers: with AVX-512, 4 rows x 64 columns, per weight row 4 vector loads and 4
// broadcasts feeding 16 independent FMAs, where gemm_acc.h's scheme (accumulators in memory, a few chains)
// reaches half the FMA rate; with AVX2's 16 registers, 6 rows x 16 columns (12 registers), one vector load
// and 6 broadcasts feeding 12 (one row x 64 columns, its FMAs each loading a weight, was 10% slower: as
// many loads as FMAs). Sums run over i in order, as in gemm_acc.h, so the bits do not depend on the scheme
// or the thread split. panel_product, the tiles over one panel, also serves the prefill attention
// (varlen_attention.cpp).
#pragma once

#include <algorithm>
#include <cstdint>
#include <type_traits>

#include "simd.h"

constexpr int64_t PANEL_COLUMNS = 64;  // a panel's width: callers split columns between threads by it
// The multiply-adds a caller gives a thread at least: forking the threads costs microseconds.
constexpr int64_t GEMM_GRAIN = 131072;

// Where a weight's columns c..c+15 of row r start (c a multiple of 16; they lie side by side in memory, as
// c..c+31 do from a multiple of 32): a row-major [K, N] weight, ld elements a row. gemm_strips.h's StripOrder
// is the other layout.
template <typename W>
struct RowMajor {
  using element = W;
  const W* w;
  int64_t ld;
  const W* at(int64_t r, int64_t c) const { return w + r * ld + c; }
};

namespace gemm_packed_detail {

constexpr int64_t KC = 128;             // weight rows per panel at most: 128 x 64 float32 = 32 KiB
constexpr int V = PANEL_COLUMNS / 16;   // 16-column vectors per panel
constexpr int TILE_ROWS = VECTOR_REGISTERS >= 32 ? 4 : 6;    // a tile: TILE_ROWS rows x TILE_VECTORS
constexpr int TILE_VECTORS = VECTOR_REGISTERS >= 32 ? V : 1;  // vectors of 16 columns
constexpr bool DIRECT_ROW = VECTOR_REGISTERS < 32;        // a single row skips the panel (direct_row)
constexpr int64_t ROW_BLOCK = 128;      // rows multiplied over a panel at a time (their x stays in L2)
constexpr int64_t PREFETCH_PANELS = 3;  // how far ahead the weights are asked for (measured: 2-4 are close)

// Asks for one panel row's weights (the lines of 64 columns) ahead of their use: at a few rows per weight
// the product waits on memory, and in a panel's short runs the hardware prefetchers fall behind.
template <typename Weights>
inline void prefetch_row(const Weights& w, int64_t r, int64_t c) {
  constexpr int64_t per_line = 64 / sizeof(typename Weights::element);
  for (int64_t j = 0; j < PANEL_COLUMNS; j += per_line)
    _mm_prefetch(reinterpret_cast<const char*>(w.at(r, c + j)), _MM_HINT_T0);
}

// R rows x 64 columns of out (= on the first panel, += after) from x's rows times one panel, TILE_VECTORS
// vectors of columns at a time; x's row r holds x[r * ldx + i * incx] for i < kc. The loops over rows and
// vectors are unrolled from the start and the panel's loop walks pointers: otherwise GCC keeps a copy of
// the accumulators on the stack, stored every iteration (twice the time).
template <int R>
inline void tile(const float* x, int64_t ldx, int64_t incx, const float* panel, int64_t kc, float* o,
                 int64_t ldo, const mask16* mask, bool first) {
  constexpr int C = TILE_VECTORS;
  for (int c = 0; c < V; c += C) {
    f32x16 acc[R][C];
    #pragma GCC unroll 16
    for (int r = 0; r < R; ++r) {
      #pragma GCC unroll 16
      for (int v = 0; v < C; ++v) acc[r][v] = first ? zeros() : load(o + r * ldo + 16 * (c + v), mask[c + v]);
    }
    const float* xi = x;
    for (const float *p = panel + 16 * c, *const end = p + kc * PANEL_COLUMNS; p < end;
         p += PANEL_COLUMNS, xi += incx) {
      f32x16 wv[C];
      #pragma GCC unroll 16
      for (int v = 0; v < C; ++v) wv[v] = load(p + 16 * v);
      #pragma GCC unroll 16
      for (int r = 0; r < R; ++r) {
        const f32x16 xb = splat(xi[r * ldx]);
        #pragma GCC unroll 16
        for (int v = 0; v < C; ++v) acc[r][v] = fmadd(xb, wv[v], acc[r][v]);
      }
    }
    #pragma GCC unroll 16
    for (int r = 0; r < R; ++r) {
      #pragma GCC unroll 16
      for (int v = 0; v < C; ++v) store(o + r * ldo + 16 * (c + v), acc[r][v], mask[c + v]);
    }
  }
}

// One row x 64 columns of out (= on the first panel, += after) from kc weight rows from row k, columns from
// n, read in place, widened in registers: for a single row, which cannot repay widening a panel (with AVX2
// a panel's stores and loads cost more than the product; on AVX-512 the panels reach the memory's rate).
template <typename Weights>
inline void direct_row(const float* x, const Weights& w, int64_t k, int64_t n, int64_t kc, float* o,
                       const mask16* mask, bool first) {
  f32x16 acc[V];
  for (int v = 0; v < V; ++v) acc[v] = first ? zeros() : load(o + 16 * v, mask[v]);
  for (int64_t i = 0; i < kc; ++i) {
    const f32x16 xb = splat(x[i]);
    for (int v = 0; v < V; ++v) acc[v] = fmadd(xb, load_weights(w.at(k + i, n + 16 * v), mask[v]), acc[v]);
  }
  for (int v = 0; v < V; ++v) store(o + 16 * v, acc[v], mask[v]);
}

// direct_row for 64 columns of bfloat16 weights that all exist: each half of a weight row's 64 columns, a
// cache line, widened as its even and odd columns (load_bf16_even and _odd: a shift or an and for 16
// columns, where widening in column order takes a shuffle and a shift for 8, and on AVX2 CPUs those share
// few ports); the sums go out of column order and back once per call. The same sums in the same order as
// direct_row's.
template <typename Weights>
inline void direct_row_pairs(const float* x, const Weights& w, int64_t k, int64_t n, int64_t kc, float* o,
                             bool first) {
  f32x16 even[2], odd[2];
  for (int h = 0; h < 2; ++h) {
    if (first)
      even[h] = odd[h] = zeros();
    else
      deinterleave(load(o + 32 * h), load(o + 32 * h + 16), even[h], odd[h]);
  }
  for (int64_t i = 0; i < kc; ++i) {
    const f32x16 xb = splat(x[i]);
    for (int h = 0; h < 2; ++h) {
      const uint16_t* line = w.at(k + i, n + 32 * h);
      even[h] = fmadd(xb, load_bf16_even(line), even[h]);
      odd[h] = fmadd(xb, load_bf16_odd(line), odd[h]);
    }
  }
  for (int h = 0; h < 2; ++h) {
    f32x16 a, b;
    interleave(even[h], odd[h], a, b);
    store(o + 32 * h, a);
    store(o + 32 * h + 16, b);
  }
}

// tile<rows> for rows known at run time (1..R).
template <int R>
inline void tile_of(int rows, const float* x, int64_t ldx, int64_t incx, const float* panel, int64_t kc,
                    float* o, int64_t ldo, const mask16* mask, bool first) {
  if constexpr (R > 0) {
    if (rows == R) return tile<R>(x, ldx, incx, panel, kc, o, ldo, mask, first);
    tile_of<R - 1>(rows, x, ldx, incx, panel, kc, o, ldo, mask, first);
  }
}

}  // namespace gemm_packed_detail

// out [M, 64 columns] (= if first, += otherwise) from M rows of x (row r: x[r * ldx + i * incx], i < kc)
// times a panel of kc rows x PANEL_COLUMNS float32 columns; mask: the columns that exist, 16 at a time.
inline void panel_product(const float* x, int64_t ldx, int64_t incx, const float* panel, int64_t kc,
                          float* o, int64_t ldo, int64_t M, const mask16* mask, bool first) {
  using namespace gemm_packed_detail;
  int64_t m = 0;
  for (; m + TILE_ROWS <= M; m += TILE_ROWS)
    tile<TILE_ROWS>(x + m * ldx, ldx, incx, panel, kc, o + m * ldo, ldo, mask, first);
  if (m < M)
    tile_of<TILE_ROWS - 1>(int(M - m), x + m * ldx, ldx, incx, panel, kc, o + m * ldo, ldo, mask, first);
}

namespace gemm_packed_detail {

// Panels walk the weight KC rows at a time, left to right, so each of the KC rows streams from memory
// (walking a column block down all K rows instead would stride across pages, which defeats the prefetchers
// where the rows are long); KC grows with M (more rows amortise the accumulators' loads and stores).
template <typename Weights>
void gemm_packed_rows(const float* x, int64_t ldx, const Weights& w, float* out, int64_t ldo, int64_t M,
                      int64_t K, int64_t c0, int64_t c1) {
  alignas(64) float panel[KC * PANEL_COLUMNS];
  const int64_t kc_max = std::clamp<int64_t>((M + 3) / 4 * 16, 16, KC);
  const int64_t span = (c1 - c0 + PANEL_COLUMNS - 1) / PANEL_COLUMNS * PANEL_COLUMNS;  // the panels' columns
  for (int64_t k = 0; k < K; k += kc_max) {
    const int64_t kc = std::min(kc_max, K - k);
    for (int64_t n = c0; n < c1; n += PANEL_COLUMNS) {
      mask16 mask[V];
      for (int v = 0; v < V; ++v) mask[v] = tail_mask(n + 16 * v, c1);
      // The panel the walk reaches PREFETCH_PANELS on: further along these rows, or the next rows down.
      const int64_t ahead = n - c0 + PREFETCH_PANELS * PANEL_COLUMNS;
      const int64_t ahead_k = ahead < span ? k : k + kc;
      const int64_t ahead_c = c0 + (ahead < span ? ahead : ahead - span);
      if (M == 1 && DIRECT_ROW) {
        for (int64_t i = 0; i < kc; ++i)
          if (ahead_c < c1 && ahead_k + i < K) prefetch_row(w, ahead_k + i, ahead_c);
        if constexpr (std::is_same_v<typename Weights::element, uint16_t>) {
          if (n + PANEL_COLUMNS <= c1) {
            direct_row_pairs(x + k, w, k, n, kc, out + n, k == 0);
            continue;
          }
        }
        direct_row(x + k, w, k, n, kc, out + n, mask, k == 0);
        continue;
      }
      for (int64_t i = 0; i < kc; ++i) {  // columns past c1 widen to zeros and are never stored
        if (ahead_c < c1 && ahead_k + i < K) prefetch_row(w, ahead_k + i, ahead_c);
        for (int v = 0; v < V; ++v)
          store(panel + i * PANEL_COLUMNS + 16 * v, load_weights(w.at(k + i, n + 16 * v), mask[v]));
      }
      panel_product(x + k, ldx, 1, panel, kc, out + n, ldo, M, mask, k == 0);
    }
  }
}

}  // namespace gemm_packed_detail

// The product over any number of rows, ROW_BLOCK rows at a time; w: RowMajor or StripOrder (gemm_strips.h).
template <typename Weights>
void gemm_packed(const float* x, int64_t ldx, const Weights& w, float* out, int64_t ldo, int64_t M, int64_t K,
                 int64_t c0, int64_t c1) {
  using namespace gemm_packed_detail;
  for (int64_t m = 0; m < M; m += ROW_BLOCK)
    gemm_packed_rows(x + m * ldx, ldx, w, out + m * ldo, ldo, std::min(ROW_BLOCK, M - m), K, c0, c1);
}
