// MLA's steps around its attention, one call each on CPU: a layer's queries, its new tokens' latent cache
// entries written into the pages, and the absorbed attention's output back to the hidden size. In torch
// (common/model/mla.py, which stays the reference and the path elsewhere) they are some thirty operators and
// module calls a layer, which at a decode step's few tokens cost more than their arithmetic. These calls
// run the same products and kernels in the same order (bf16_gemm.cpp for a bfloat16 weight, ATen's matmul
// for a float32 one, norm_rope.cpp's RMSNorm and rotary), so their results are the torch path's, bit for bit.

#include <torch/extension.h>

#include <cstring>
#include <optional>

#include "bf16_gemm.h"
#include "kernels.h"

namespace {

// out = x [H, T, K] @ w, a weight per head (as linear_product's), written into out [H, T, N] at its strides.
void product_into(const torch::Tensor& x, const torch::Tensor& w, const torch::Tensor& out) {
  if (w.scalar_type() == torch::kBFloat16) return bf16_bmm_into(x, w, out);
  out.copy_(at::matmul(x, w));
}

torch::Tensor projection(const torch::Tensor& x, const torch::Tensor& w,
                         const std::optional<torch::Tensor>& bias) {
  torch::Tensor y = linear_product(x, w);
  return bias ? y.add_(*bias) : y;
}

}  // namespace

// [T, H, d_nope + d_R] with q_pe rotated into the half-split layout; with w_uk [H, d_nope, d_c], the absorbed
// queries [T, H, d_c + d_R] (q_nope @ W_UK, then q_pe). The projection is q_proj, or with a low-rank query
// q_b_proj(RMSNorm(q_a_proj(x))).
torch::Tensor mla_queries(const torch::Tensor& x, const std::optional<torch::Tensor>& q_proj,
                          const std::optional<torch::Tensor>& q_a_proj,
                          const std::optional<torch::Tensor>& q_a_bias,
                          const std::optional<torch::Tensor>& q_a_norm,
                          const std::optional<torch::Tensor>& q_b_proj, double eps, const torch::Tensor& cos,
                          const torch::Tensor& sin, bool interleaved, int64_t heads, int64_t rope_dim,
                          const std::optional<torch::Tensor>& w_uk) {
  TORCH_CHECK_VALUE(x.dim() == 2, "x must be [T, hidden]");
  TORCH_CHECK_VALUE(q_proj.has_value() != (q_a_proj && q_a_norm && q_b_proj),
                    "give q_proj, or q_a_proj, q_a_norm and q_b_proj");
  if (q_proj)
    return mla_queries_from(linear_product(x, *q_proj), std::nullopt, std::nullopt, eps, cos, sin,
                            interleaved, heads, rope_dim, w_uk);
  return mla_queries_from(projection(x, *q_a_proj, q_a_bias), q_a_norm, q_b_proj, eps, cos, sin, interleaved,
                          heads, rope_dim, w_uk);
}

// mla_queries from the first projection's output: q_proj's [T, H * (d_nope + d_R)], or q_a_proj's
// [T, q_lora_rank] (with q_a_norm and q_b_proj), its rows at any stride (a decode layer makes it in one
// product with kv_a_proj's).
torch::Tensor mla_queries_from(const torch::Tensor& first, const std::optional<torch::Tensor>& q_a_norm,
                               const std::optional<torch::Tensor>& q_b_proj, double eps,
                               const torch::Tensor& cos, const torch::Tensor& sin, bool interleaved,
                               int64_t heads, int64_t rope_dim, const std::optional<torch::Tensor>& w_uk) {
  TORCH_CHECK_VALUE(first.dim() == 2 && first.stride(1) == 1, "the first projection must be [T, columns]");
  TORCH_CHECK_VALUE(q_a_norm.has_value() == q_b_proj.has_value(), "give q_a_norm and q_b_proj, or neither");
  const torch::Tensor q_flat =
      q_b_proj ? linear_product(rms_norm(first, *q_a_norm, eps, std::nullopt), *q_b_proj) : first;
  TORCH_CHECK_VALUE(heads > 0 && q_flat.size(1) % heads == 0 && q_flat.size(1) / heads > rope_dim,
                    "the query projection's ", q_flat.size(1), " columns are not ", heads,
                    " heads wider than ", rope_dim);
  const torch::Tensor q = q_flat.view({first.size(0), heads, -1});
  const int64_t nope_dim = q.size(2) - rope_dim;
  const torch::Tensor q_nope = q.narrow(2, 0, nope_dim), q_pe = q.narrow(2, nope_dim, rope_dim);
  if (!w_uk) {  // q_pe rotated into q's own columns, where a cat would copy all of q
    q_pe.copy_(rotary(q_pe, cos, sin, interleaved));
    return q;
  }
  const int64_t rank = columns_of(*w_uk);
  torch::Tensor absorbed = at::empty({first.size(0), heads, rank + rope_dim}, q.options());
  product_into(q_nope.transpose(0, 1), *w_uk, absorbed.narrow(2, 0, rank).transpose(0, 1));
  rotary_into(q_pe, cos, sin, interleaved, absorbed.narrow(2, rank, rope_dim));  // no copy of a rotated q_pe
  return absorbed;
}

// The cache entries [RMSNorm(c_kv), rotated k_pe] of x's tokens, kv_a_proj's two parts, written at their
// slots of one layer's pages [num_blocks, block_size, d_c + d_R] (vLLM's concat_and_cache_mla with the
// projection before it). Every slot is checked before any is written.
void mla_cache_latents(const torch::Tensor& x, const torch::Tensor& kv_a_proj,
                       const std::optional<torch::Tensor>& kv_a_bias, const torch::Tensor& kv_a_norm,
                       double eps, const torch::Tensor& cos, const torch::Tensor& sin, bool interleaved,
                       const torch::Tensor& pages, const torch::Tensor& slots) {
  TORCH_CHECK_VALUE(x.dim() == 2, "x must be [T, hidden]");
  mla_cache_latents_from(projection(x, kv_a_proj, kv_a_bias), kv_a_norm, eps, cos, sin, interleaved, pages,
                         slots);
}

// mla_cache_latents from kv_a_proj's output kv [T, d_c + d_R], its rows at any stride.
void mla_cache_latents_from(const torch::Tensor& kv, const torch::Tensor& kv_a_norm, double eps,
                            const torch::Tensor& cos, const torch::Tensor& sin, bool interleaved,
                            const torch::Tensor& pages, const torch::Tensor& slots) {
  TORCH_CHECK_VALUE(kv.dim() == 2 && kv.stride(1) == 1, "kv must be [T, d_c + d_R]");
  TORCH_CHECK_VALUE(pages.dim() == 3 && pages.is_contiguous() && pages.device().is_cpu() &&
                        pages.scalar_type() == kv.scalar_type(),
                    "pages must be a contiguous CPU tensor [num_blocks, block_size, entry_dim] of the ",
                    "latents' dtype");
  TORCH_CHECK_VALUE(slots.dim() == 1 && slots.size(0) == kv.size(0) && slots.scalar_type() == torch::kInt64 &&
                        slots.is_contiguous() && slots.device().is_cpu(),
                    "slots must be contiguous int64 [", kv.size(0), "] on the CPU");
  const int64_t rank = kv_a_norm.size(0), entry_dim = pages.size(2), capacity = pages.size(0) * pages.size(1);
  TORCH_CHECK_VALUE(kv.size(1) == entry_dim, "kv_a_proj gives ", kv.size(1), " columns, the pages hold ",
                    entry_dim);
  const int64_t* slot = slots.data_ptr<int64_t>();
  for (int64_t t = 0; t < kv.size(0); ++t)
    TORCH_CHECK_INDEX(0 <= slot[t] && slot[t] < capacity, "slot ", slot[t], " outside 0..", capacity - 1);
  const torch::Tensor c_kv = rms_norm(kv.narrow(1, 0, rank), kv_a_norm, eps, std::nullopt);
  const torch::Tensor k_pe = rotary(kv.narrow(1, rank, entry_dim - rank), cos, sin, interleaved);
  // Each row as bytes: c_kv and k_pe have the pages' dtype.
  const int64_t c_bytes = c_kv.size(1) * c_kv.element_size(), k_bytes = k_pe.size(1) * k_pe.element_size();
  const char* c = static_cast<const char*>(c_kv.data_ptr());
  const char* k = static_cast<const char*>(k_pe.data_ptr());
  char* base = static_cast<char*>(pages.data_ptr());
  for (int64_t t = 0; t < kv.size(0); ++t) {
    char* entry = base + slot[t] * (c_bytes + k_bytes);
    std::memcpy(entry, c + t * c_bytes, c_bytes);
    std::memcpy(entry + c_bytes, k + t * k_bytes, k_bytes);
  }
}

// Absorbed attention's latent outputs [T, H, d_c] through W_UV (w_uv_t [H, d_c, d_v]) and o_proj:
// [T, hidden].
torch::Tensor mla_output(const torch::Tensor& o_latent, const torch::Tensor& w_uv_t,
                         const torch::Tensor& o_proj, const std::optional<torch::Tensor>& o_bias) {
  TORCH_CHECK_VALUE(o_latent.dim() == 3, "o_latent must be [T, H, d_c]");
  const int64_t T = o_latent.size(0), H = o_latent.size(1), v_dim = columns_of(w_uv_t);
  torch::Tensor o = at::empty({T, H * v_dim}, o_latent.options());  // the heads' outputs side by side
  product_into(o_latent.transpose(0, 1), w_uv_t, o.view({T, H, v_dim}).transpose(0, 1));
  return projection(o, o_proj, o_bias);
}
