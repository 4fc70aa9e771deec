// What bf16_gemm.cpp shares with the kernels built on its grouped product.
#pragma once

#include <torch/extension.h>

#include <cstdint>

#include "gemm_amx.h"
#include "gemm_strips.h"

inline const uint16_t* bf16_bits(const torch::Tensor& w) {
  return reinterpret_cast<const uint16_t*>(w.data_ptr<at::BFloat16>());
}

// How a weight [K, N] (or E of them) is kept: row-major; in strip order, [ceil(N / 32), K, 32]
// (gemm_strips.h); in tile order, [ceil(N / 32), K / 2, 64] (gemm_amx.h, bfloat16 on a CPU with AMX).
enum class Layout { row_major, strips, tiles };

// The layout of a weight: four dimensions are strip or tile order, whose rows are 32 or 64 wide.
inline Layout layout_of(const torch::Tensor& w) {
  if (w.dim() < 4) return Layout::row_major;
  return w.size(3) == 2 * STRIP_COLUMNS ? Layout::tiles : Layout::strips;
}

// K of weights [E, K, N] in strip or tile order; 0 where w is neither.
inline int64_t rows_of(const torch::Tensor& w) {
  if (w.dim() != 4) return 0;
  return w.size(3) == STRIP_COLUMNS ? w.size(2) : w.size(3) == 2 * STRIP_COLUMNS ? 2 * w.size(2) : 0;
}

// N of a weight [K, N] or weights [E, K, N], row-major or in strip or tile order (there whole strips).
inline int64_t columns_of(const torch::Tensor& w) {
  return layout_of(w) == Layout::row_major ? w.size(-1) : w.size(1) * STRIP_COLUMNS;
}

// out rows off[e]..off[e+1] [., N] = x rows off[e]..off[e+1] [., K] @ w[e] [K, N], for every e < E, with
// bfloat16 (as bits) weights in strip or tile order, or float32 ones in strip order.
void grouped_product(const float* x, const uint16_t* w, Layout layout, float* out, const int64_t* off,
                     int64_t E, int64_t K, int64_t N);
void grouped_product(const float* x, const float* w, Layout layout, float* out, const int64_t* off,
                     int64_t E, int64_t K, int64_t N);

// grouped_product of weights in tile order on rows already so (the routed experts gather theirs so), its
// sums rounded to bfloat16 as torch's bfloat16 GEMM rounds them.
void grouped_product(TileRows x, const uint16_t* w, at::BFloat16* out, const int64_t* off, int64_t E,
                     int64_t K, int64_t N);

// act rows off[e]..off[e+1] [., I] (bfloat16, ld apart) = silu(gate) * up of x's rows through w13[e] [K, 2I]
// in tile order (gemm_amx_swiglu), I a multiple of 32: an expert's first product and its activation at once.
void grouped_swiglu_product(TileRows x, const uint16_t* w13, at::BFloat16* act, int64_t ld,
                            const int64_t* off, int64_t E, int64_t K, int64_t I);
