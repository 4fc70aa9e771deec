// A decoder layer of a decode step as one call, its weights bound once: the kernel calls that
// common/engine/decode_graph.py's DecodeLayer makes, in the same order with the same arguments, so the same
// bits (the queries' and latents' first products, where MLA.pack joined their weights, are one product:
// each column's sum is the same). At a one-sequence step each call from Python costs microseconds of argument
// conversion and glue beside a few tens of microseconds of work; a layer made eight such calls.

#include "decode_layer.h"

#include <utility>

#include "kernels.h"

DecodeLayer::DecodeLayer(Norm input_norm, Norm post_norm, QueryWeights queries, LatentWeights latents,
                         std::optional<torch::Tensor> input_projection, torch::Tensor w_uk,
                         torch::Tensor w_uv_t, torch::Tensor o_proj, std::optional<torch::Tensor> o_bias,
                         Attention attention, std::optional<GateArgs> gate, std::optional<Experts> experts,
                         std::optional<Dense> mlp)
    : input_norm(std::move(input_norm)),
      post_norm(std::move(post_norm)),
      queries(std::move(queries)),
      latents(std::move(latents)),
      input_projection(std::move(input_projection)),
      w_uk(std::move(w_uk)),
      w_uv_t(std::move(w_uv_t)),
      o_proj(std::move(o_proj)),
      o_bias(std::move(o_bias)),
      attention(attention),
      gate(std::move(gate)),
      experts(std::move(experts)),
      mlp(std::move(mlp)) {
  TORCH_CHECK_VALUE(this->gate.has_value() == this->experts.has_value() &&
                        this->gate.has_value() != this->mlp.has_value(),
                    "give the gate and the experts, or a dense MLP");
}

std::tuple<torch::Tensor, torch::Tensor> DecodeLayer::forward(
    const torch::Tensor& x, const std::optional<torch::Tensor>& residual, const torch::Tensor& cos,
    const torch::Tensor& sin, const torch::Tensor& pages, const torch::Tensor& slots,
    const torch::Tensor& block_tables, const torch::Tensor& context_lens,
    const std::optional<torch::Tensor>& counts) const {
  const auto& [norm_w, norm_eps] = input_norm;
  const torch::Tensor res = residual ? *residual : x;  // rms_norm adds x into a given residual in place
  const torch::Tensor h = rms_norm(x, norm_w, norm_eps, residual);
  const auto& [q_proj, q_a_proj, q_a_bias, q_a_norm, q_b_proj, q_eps] = queries;
  const auto& [heads, rope_dim, kv_rank, interleaved, scale] = attention;
  const auto& [kv_a_proj, kv_a_bias, kv_a_norm, kv_eps] = latents;
  torch::Tensor q;
  if (input_projection) {  // both first products at once: the latents' columns last
    const torch::Tensor both = bf16_mm(h, *input_projection);
    const int64_t latent_columns = pages.size(2), query_columns = both.size(1) - latent_columns;
    const bool low_rank = !q_proj;
    q = mla_queries_from(both.narrow(1, 0, query_columns), low_rank ? q_a_norm : std::nullopt,
                         low_rank ? q_b_proj : std::nullopt, q_eps, cos, sin, interleaved, heads, rope_dim,
                         w_uk);
    mla_cache_latents_from(both.narrow(1, query_columns, latent_columns), kv_a_norm, kv_eps, cos, sin,
                           interleaved, pages, slots);
  } else {
    q = mla_queries(h, q_proj, q_a_proj, q_a_bias, q_a_norm, q_b_proj, q_eps, cos, sin, interleaved, heads,
                    rope_dim, w_uk);
    mla_cache_latents(h, kv_a_proj, kv_a_bias, kv_a_norm, kv_eps, cos, sin, interleaved, pages, slots);
  }
  const torch::Tensor out = paged_latent_decode(q, pages, block_tables, context_lens, scale, kv_rank, 0);
  const auto& [post_w, post_eps] = post_norm;
  const torch::Tensor y = rms_norm(mla_output(out, w_uv_t, o_proj, o_bias), post_w, post_eps, res);
  if (mlp) {  // MLP.forward's products
    const auto& [gate_up, down] = *mlp;
    return {linear_product(silu_and_mul(linear_product(y, gate_up)), down), res};
  }
  const auto& [weight, bias, top_k, scoring, method, n_group, topk_group, norm_topk_prob, scaling] = *gate;
  const auto [weights, ids] = moe_gate(y, weight, bias, top_k, scoring, method, n_group, topk_group,
                                       norm_topk_prob, scaling, counts);
  const auto& [w13, w2, shared] = *experts;
  return {grouped_swiglu(y, ids, weights, w13, w2, shared), res};
}
