// A decoder layer of a decode step as one call (decode_layer.cpp). The groups of weights are what
// common/model/mla.py and moe.py give the kernels (MLA.query_weights, MLA.latent_weights, Gate.kernel_args).
#pragma once

#include <torch/extension.h>

#include <optional>
#include <string>
#include <tuple>

class DecodeLayer {
 public:
  using Tensor = torch::Tensor;
  using Norm = std::tuple<Tensor, double>;  // weight, eps
  // q_proj, or q_a_proj, its bias, q_a_layernorm's weight and q_b_proj; q_a_layernorm's eps
  using QueryWeights = std::tuple<std::optional<Tensor>, std::optional<Tensor>, std::optional<Tensor>,
                                  std::optional<Tensor>, std::optional<Tensor>, double>;
  using LatentWeights = std::tuple<Tensor, std::optional<Tensor>, Tensor, double>;  // kv_a_proj, bias, norm
  // heads, d_R, d_c, interleaved rope, softmax scale
  using Attention = std::tuple<int64_t, int64_t, int64_t, bool, double>;
  using GateArgs = std::tuple<Tensor, std::optional<Tensor>, int64_t, std::string, std::string, int64_t,
                              int64_t, bool, double>;
  using Experts = std::tuple<Tensor, Tensor, int64_t>;  // w13, w2 (strip order), shared experts among them
  using Dense = std::tuple<Tensor, Tensor>;  // a dense layer's MLP: gate_up_proj, down_proj

  // input_projection: q_proj's (or q_a_proj's) and kv_a_proj's weights side by side, where MLA.pack joined
  // them (the two products from x in one; the queries' and latents' own weights are then views of it).
  // The MLP: the gate and the experts, or a dense MLP.
  DecodeLayer(Norm input_norm, Norm post_norm, QueryWeights queries, LatentWeights latents,
              std::optional<Tensor> input_projection, Tensor w_uk, Tensor w_uv_t, Tensor o_proj,
              std::optional<Tensor> o_bias, Attention attention, std::optional<GateArgs> gate,
              std::optional<Experts> experts, std::optional<Dense> mlp);

  // (the MLP's output, the residual stream)
  std::tuple<Tensor, Tensor> forward(const Tensor& x, const std::optional<Tensor>& residual,
                                     const Tensor& cos, const Tensor& sin, const Tensor& pages,
                                     const Tensor& slots, const Tensor& block_tables,
                                     const Tensor& context_lens, const std::optional<Tensor>& counts) const;

 private:
  Norm input_norm, post_norm;
  QueryWeights queries;
  LatentWeights latents;
  std::optional<Tensor> input_projection;
  Tensor w_uk, w_uv_t, o_proj;
  std::optional<Tensor> o_bias;
  Attention attention;
  std::optional<GateArgs> gate;
  std::optional<Experts> experts;
  std::optional<Dense> mlp;
};
