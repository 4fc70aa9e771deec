// silu(gate) * up of a SwiGLU MLP (the dense layers and the shared experts) in one call on CPU, where torch
// takes three operators (chunk, silu, mul). Float32 arithmetic, rounded where the reference rounds: silu's
// result to the dtype, then the product.

#include <ATen/Parallel.h>
#include <torch/extension.h>

#include "simd.h"

namespace {

constexpr int64_t GRAIN_ROWS = 16;

// out [rows, I] = silu(x[:, :I]) * x[:, I:], x's rows row_stride apart.
template <typename T>
void silu_and_mul_rows(const T* x, int64_t row_stride, T* out, int64_t rows, int64_t I) {
  at::parallel_for(0, rows, GRAIN_ROWS, [&](int64_t r0, int64_t r1) {
    for (int64_t r = r0; r < r1; ++r)
      for (int64_t i = 0; i < I; i += 16) {
        const mask16 mask = tail_mask(i, I);
        const f32x16 silu = rounded_as<T>(silu16(load16(x + r * row_stride + i, mask)));
        store16(out + r * I + i, mul(silu, load16(x + r * row_stride + I + i, mask)), mask);
      }
  });
}

}  // namespace

// x [rows, 2I] (gate columns, then up; unit column stride) -> silu(gate) * up [rows, I] in x's dtype.
torch::Tensor silu_and_mul(const torch::Tensor& x) {
  TORCH_CHECK_VALUE(x.device().is_cpu() &&
                        (x.scalar_type() == torch::kFloat32 || x.scalar_type() == torch::kBFloat16),
                    "x must be a float32 or bfloat16 CPU tensor");
  TORCH_CHECK_VALUE(x.dim() == 2 && x.stride(1) == 1 && x.size(1) % 2 == 0,
                    "x must be [rows, 2I] with unit column stride");
  const int64_t rows = x.size(0), I = x.size(1) / 2;
  auto out = torch::empty({rows, I}, x.options());
  if (x.scalar_type() == torch::kFloat32)
    silu_and_mul_rows(x.data_ptr<float>(), x.stride(0), out.data_ptr<float>(), rows, I);
  else
    silu_and_mul_rows(x.data_ptr<at::BFloat16>(), x.stride(0), out.data_ptr<at::BFloat16>(), rows, I);
  return out;
}
