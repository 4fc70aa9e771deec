// RMSNorm and rotary embedding as one call each, on CPU. Why: common/kernels/cpu_extension.py. Both compute
// in float32 and round where the reference (common/model/norm.py, common/model/rope.py) rounds, so a
// bfloat16 model gets the same values up to float32 summation order.

#include <ATen/Parallel.h>
#include <torch/extension.h>

#include <cmath>

#include "simd.h"

namespace {

constexpr int64_t GRAIN_ROWS = 16;

// out = weight * T(x * rsqrt(mean(x^2) + eps)): the normalised row is rounded to T before the weight
// multiplies it (in T), as in the reference. With a residual (contiguous, like out), x is first added into
// it, residual = T(x + residual), and the sum is what is normalised: the pre-norm layer's residual add.
template <typename T>
void rms_norm_rows(const T* x, int64_t row_stride, T* residual, const T* weight, T* out, int64_t rows,
                   int64_t dim, float eps) {
  at::parallel_for(0, rows, GRAIN_ROWS, [&](int64_t r0, int64_t r1) {
    for (int64_t r = r0; r < r1; ++r) {
      const T* xr = x + r * row_stride;
      if (residual != nullptr) {
        T* res = residual + r * dim;
        for (int64_t d = 0; d < dim; d += 16) {
          const mask16 mask = tail_mask(d, dim);
          store16(res + d, add(load16(xr + d, mask), load16(res + d, mask)), mask);
        }
        xr = res;
      }
      f32x16 squares = zeros();  // the lanes past a row's end load as zeros
      for (int64_t d = 0; d < dim; d += 16) {
        const f32x16 v = load16(xr + d, tail_mask(d, dim));
        squares = fmadd(v, v, squares);
      }
      const f32x16 inv = splat(1.0f / std::sqrt(sum_lanes(squares) / dim + eps));
      T* o = out + r * dim;
      for (int64_t d = 0; d < dim; d += 16) {
        const mask16 mask = tail_mask(d, dim);
        const f32x16 normalised = rounded_as<T>(mul(load16(xr + d, mask), inv));
        store16(o + d, mul(load16(weight + d, mask), normalised), mask);
      }
    }
  });
}

// x [T, G, dim] (unit stride in the last dimension) rotated by its token's angles into out [T, G, dim] (its
// own strides, unit in the last dimension; not x itself) in the half-split layout: [x1 cos - x2 sin | x2 cos
// + x1 sin], where x1, x2 are the halves of x or, when interleaved, its even and odd elements.
template <typename T>
void rotary_rows(const T* x, int64_t token_stride, int64_t group_stride, const float* cos, const float* sin,
                 T* out, int64_t out_token_stride, int64_t out_group_stride, int64_t tokens, int64_t groups,
                 int64_t dim, bool interleaved) {
  const int64_t half = dim / 2;
  at::parallel_for(0, tokens, GRAIN_ROWS, [&](int64_t t0, int64_t t1) {
    for (int64_t t = t0; t < t1; ++t)
      for (int64_t g = 0; g < groups; ++g) {
        const T* xr = x + t * token_stride + g * group_stride;
        T* o = out + t * out_token_stride + g * out_group_stride;
        for (int64_t i = 0; i < half; i += 16) {  // 16 pairs at a time
          const mask16 mask = tail_mask(i, half);
          f32x16 x1, x2;
          if (interleaved)  // x1, x2 the even and odd elements
            deinterleave(load16(xr + 2 * i, tail_mask(2 * i, dim)),
                         load16(xr + 2 * i + 16, tail_mask(2 * i + 16, dim)), x1, x2);
          else
            x1 = load16(xr + i, mask), x2 = load16(xr + half + i, mask);
          const f32x16 c = load(cos + t * half + i, mask), s = load(sin + t * half + i, mask);
          store16(o + i, sub(mul(x1, c), mul(x2, s)), mask);
          store16(o + half + i, add(mul(x2, c), mul(x1, s)), mask);
        }
      }
  });
}

void check_float(const torch::Tensor& x) {
  TORCH_CHECK_VALUE(x.device().is_cpu(), "CPU tensors only");
  TORCH_CHECK_VALUE(x.scalar_type() == torch::kFloat32 || x.scalar_type() == torch::kBFloat16,
                    "float32 or bfloat16 expected, got ", x.scalar_type());
}

}  // namespace

// weight * x / rms(x) -> [rows, dim]; with a residual [rows, dim] (contiguous, x's dtype), x is added into it
// first (in place) and the sum normalised.
torch::Tensor rms_norm(const torch::Tensor& x, const torch::Tensor& weight, double eps,
                       const std::optional<torch::Tensor>& residual) {
  check_float(x);
  TORCH_CHECK_VALUE(x.dim() == 2 && x.stride(1) == 1, "x must be [rows, dim] with unit column stride");
  TORCH_CHECK_VALUE(weight.dim() == 1 && weight.size(0) == x.size(1) && weight.is_contiguous() &&
                        weight.scalar_type() == x.scalar_type(),
                    "weight must be a contiguous [", x.size(1), "] tensor of x's dtype");
  TORCH_CHECK_VALUE(!residual || (residual->sizes() == x.sizes() && residual->is_contiguous() &&
                                  residual->scalar_type() == x.scalar_type() && residual->device().is_cpu()),
                    "residual must be a contiguous CPU tensor of x's shape and dtype");
  auto out = torch::empty(x.sizes(), x.options());
  if (x.scalar_type() == torch::kFloat32)
    rms_norm_rows(x.data_ptr<float>(), x.stride(0), residual ? residual->data_ptr<float>() : nullptr,
                  weight.data_ptr<float>(), out.data_ptr<float>(), x.size(0), x.size(1),
                  static_cast<float>(eps));
  else
    rms_norm_rows(x.data_ptr<at::BFloat16>(), x.stride(0),
                  residual ? residual->data_ptr<at::BFloat16>() : nullptr, weight.data_ptr<at::BFloat16>(),
                  out.data_ptr<at::BFloat16>(), x.size(0), x.size(1), static_cast<float>(eps));
  return out;
}

void rotary_into(const torch::Tensor& x, const torch::Tensor& cos, const torch::Tensor& sin, bool interleaved,
                 const torch::Tensor& out) {
  check_float(x);
  TORCH_CHECK_VALUE((x.dim() == 2 || x.dim() == 3) && x.stride(-1) == 1 && x.size(-1) % 2 == 0,
                    "x must be [T, dim] or [T, G, dim] with unit stride in an even last dimension");
  const int64_t tokens = x.size(0), dim = x.size(-1), groups = x.dim() == 3 ? x.size(1) : 1;
  TORCH_CHECK_VALUE(cos.scalar_type() == torch::kFloat32 && sin.scalar_type() == torch::kFloat32 &&
                        cos.is_contiguous() && sin.is_contiguous() && cos.dim() == 2 &&
                        cos.sizes() == sin.sizes() && cos.size(0) == tokens && cos.size(1) == dim / 2,
                    "cos and sin must be contiguous float32 [", tokens, ", ", dim / 2, "]");
  TORCH_CHECK_VALUE(out.sizes() == x.sizes() && out.scalar_type() == x.scalar_type() && out.stride(-1) == 1 &&
                        out.device().is_cpu() && (x.numel() == 0 || out.data_ptr() != x.data_ptr()),
                    "out must be another CPU tensor of x's shape and dtype with a unit last stride");
  const bool grouped = x.dim() == 3;
  const int64_t group_stride = grouped ? x.stride(1) : 0, out_group_stride = grouped ? out.stride(1) : 0;
  if (x.scalar_type() == torch::kFloat32)
    rotary_rows(x.data_ptr<float>(), x.stride(0), group_stride, cos.data_ptr<float>(), sin.data_ptr<float>(),
                out.data_ptr<float>(), out.stride(0), out_group_stride, tokens, groups, dim, interleaved);
  else
    rotary_rows(x.data_ptr<at::BFloat16>(), x.stride(0), group_stride, cos.data_ptr<float>(),
                sin.data_ptr<float>(), out.data_ptr<at::BFloat16>(), out.stride(0), out_group_stride, tokens,
                groups, dim, interleaved);
}

torch::Tensor rotary(const torch::Tensor& x, const torch::Tensor& cos, const torch::Tensor& sin,
                     bool interleaved) {
  auto out = torch::empty(x.sizes(), x.options());
  rotary_into(x, cos, sin, interleaved, out);
  return out;
}
