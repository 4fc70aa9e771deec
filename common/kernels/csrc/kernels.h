// Every kernel's entry point: what module.cpp binds for Python, and what a kernel built of others calls.
#pragma once

#include <torch/extension.h>

#include <optional>
#include <string>
#include <tuple>

torch::Tensor bf16_mm(const torch::Tensor& x, const torch::Tensor& w);
torch::Tensor bf16_bmm(const torch::Tensor& x, const torch::Tensor& w);
void bf16_bmm_into(const torch::Tensor& x, const torch::Tensor& w, const torch::Tensor& out);
torch::Tensor linear_product(const torch::Tensor& x, const torch::Tensor& w);
torch::Tensor grouped_swiglu(const torch::Tensor& x, const torch::Tensor& expert_ids,
                             const torch::Tensor& weights, const torch::Tensor& w13, const torch::Tensor& w2,
                             int64_t shared);
std::tuple<torch::Tensor, torch::Tensor> moe_gate(const torch::Tensor& x, const torch::Tensor& weight,
                                                  const std::optional<torch::Tensor>& bias, int64_t top_k,
                                                  const std::string& scoring, const std::string& method,
                                                  int64_t n_group, int64_t topk_group, bool norm_topk_prob,
                                                  double routed_scaling_factor,
                                                  const std::optional<torch::Tensor>& counts);
torch::Tensor paged_latent_decode(const torch::Tensor& q, const torch::Tensor& pages,
                                  const torch::Tensor& block_tables, const torch::Tensor& context_lens,
                                  double scale, int64_t value_dim, int64_t num_splits);
torch::Tensor flash_attn_varlen(const torch::Tensor& q, const torch::Tensor& k, const torch::Tensor& v,
                                const torch::Tensor& cu_seqlens_q, const torch::Tensor& cu_seqlens_k,
                                double scale, bool causal);
torch::Tensor rms_norm(const torch::Tensor& x, const torch::Tensor& weight, double eps,
                       const std::optional<torch::Tensor>& residual);
torch::Tensor silu_and_mul(const torch::Tensor& x);
torch::Tensor rotary(const torch::Tensor& x, const torch::Tensor& cos, const torch::Tensor& sin,
                     bool interleaved);
void rotary_into(const torch::Tensor& x, const torch::Tensor& cos, const torch::Tensor& sin, bool interleaved,
                 const torch::Tensor& out);
torch::Tensor mla_queries(const torch::Tensor& x, const std::optional<torch::Tensor>& q_proj,
                          const std::optional<torch::Tensor>& q_a_proj,
                          const std::optional<torch::Tensor>& q_a_bias,
                          const std::optional<torch::Tensor>& q_a_norm,
                          const std::optional<torch::Tensor>& q_b_proj, double eps, const torch::Tensor& cos,
                          const torch::Tensor& sin, bool interleaved, int64_t heads, int64_t rope_dim,
                          const std::optional<torch::Tensor>& w_uk);
torch::Tensor mla_queries_from(const torch::Tensor& first, const std::optional<torch::Tensor>& q_a_norm,
                               const std::optional<torch::Tensor>& q_b_proj, double eps,
                               const torch::Tensor& cos, const torch::Tensor& sin, bool interleaved,
                               int64_t heads, int64_t rope_dim, const std::optional<torch::Tensor>& w_uk);
void mla_cache_latents(const torch::Tensor& x, const torch::Tensor& kv_a_proj,
                       const std::optional<torch::Tensor>& kv_a_bias, const torch::Tensor& kv_a_norm,
                       double eps, const torch::Tensor& cos, const torch::Tensor& sin, bool interleaved,
                       const torch::Tensor& pages, const torch::Tensor& slots);
void mla_cache_latents_from(const torch::Tensor& kv, const torch::Tensor& kv_a_norm, double eps,
                            const torch::Tensor& cos, const torch::Tensor& sin, bool interleaved,
                            const torch::Tensor& pages, const torch::Tensor& slots);
torch::Tensor mla_output(const torch::Tensor& o_latent, const torch::Tensor& w_uv_t,
                         const torch::Tensor& o_proj, const std::optional<torch::Tensor>& o_bias);
torch::Tensor inverse_cdf_draw(const torch::Tensor& logits, const torch::Tensor& u);
