// What bf16_gemm.cpp shares with the kernels built on its grouped product.
#pragma once

#include <torch/extension.h>

#include <cstdint>

inline const uint16_t* bf16_bits(const torch::Tensor& w) {
  return reinterpret_cast<const uint16_t*>(w.data_ptr<at::BFloat16>());
}

// out rows off[e]..off[e+1] [., N] = x rows off[e]..off[e+1] [., K] @ w[e] [K, N], for every e < E, with
// bfloat16 (as bits) or float32 weights in strip order (gemm_strips.h): strips [E, ceil(N / 32), K, 32].
void grouped_product(const float* x, const uint16_t* strips, float* out, const int64_t* off, int64_t E,
                     int64_t K, int64_t N);
void grouped_product(const float* x, const float* strips, float* out, const int64_t* off, int64_t E,
                     int64_t K, int64_t N);
