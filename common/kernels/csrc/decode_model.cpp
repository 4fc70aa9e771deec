// A decode step of the whole model as one call: what common/model/decoder.py's DeepseekModel.forward makes
// of a decode-only batch, the embedding, the rotary tables' rows, every layer (decode_layer.cpp), the final
// norm and the lm_head, in the same order with the same kernels, so the same bits. Between the layers'
// calls, the modules around them cost a one-sequence step of the mini model about 0.1 ms of Python.

#include "decode_model.h"

#include <utility>

#include "kernels.h"

DecodeModel::DecodeModel(Tensor embedding, Tensor cos_table, Tensor sin_table,
                         std::vector<DecodeLayer> layers, DecodeLayer::Norm norm, Tensor lm_head,
                         bool tied_lm_head)
    : embedding(std::move(embedding)),
      cos_table(std::move(cos_table)),
      sin_table(std::move(sin_table)),
      layers(std::move(layers)),
      norm(std::move(norm)),
      lm_head(std::move(lm_head)),
      tied_lm_head(tied_lm_head) {}

torch::Tensor DecodeModel::forward(const Tensor& ids, const Tensor& positions, const Tensor& pages,
                                   const Tensor& slots, const Tensor& block_tables,
                                   const Tensor& context_lens,
                                   const std::vector<std::optional<Tensor>>& counts) const {
  const int64_t L = static_cast<int64_t>(layers.size());
  TORCH_CHECK_VALUE(pages.dim() == 4 && pages.size(0) == L, "pages must be [", L,
                    ", num_blocks, block_size, entry_dim]");
  TORCH_CHECK_VALUE(static_cast<int64_t>(counts.size()) == L, "give ", L, " expert counts (or Nones)");
  Tensor x = at::embedding(embedding, ids);
  const Tensor cos = cos_table.index_select(0, positions), sin = sin_table.index_select(0, positions);
  std::optional<Tensor> residual;
  for (int64_t i = 0; i < L; ++i) {
    auto [y, res] = layers[i].forward(x, residual, cos, sin, pages.select(0, i), slots, block_tables,
                                      context_lens, counts[i]);
    x = std::move(y);
    residual = std::move(res);
  }
  const auto& [norm_w, eps] = norm;
  const Tensor h = rms_norm(x, norm_w, eps, residual);
  return (tied_lm_head ? at::linear(h, lm_head) : linear_product(h, lm_head)).to(torch::kFloat32);
}
