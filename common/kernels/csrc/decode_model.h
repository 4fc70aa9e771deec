// A decode step of the whole model as one call (decode_model.cpp).
#pragma once

#include <torch/extension.h>

#include <optional>
#include <vector>

#include "decode_layer.h"

class DecodeModel {
 public:
  using Tensor = torch::Tensor;

  // lm_head: the [hidden, vocab] weight (or in strip order) of a Linear, or with tied_lm_head the embedding's
  // own [vocab, hidden] table, which an nn.Linear multiplies.
  DecodeModel(Tensor embedding, Tensor cos_table, Tensor sin_table, std::vector<DecodeLayer> layers,
              DecodeLayer::Norm norm, Tensor lm_head, bool tied_lm_head);

  // float32 logits [T, vocab] of a decode-only batch; pages [layers, num_blocks, block_size, entry_dim];
  // counts: each layer's expert counts (None for a dense layer, or uncounted).
  Tensor forward(const Tensor& ids, const Tensor& positions, const Tensor& pages, const Tensor& slots,
                 const Tensor& block_tables, const Tensor& context_lens,
                 const std::vector<std::optional<Tensor>>& counts) const;

 private:
  Tensor embedding, cos_table, sin_table;
  std::vector<DecodeLayer> layers;
  DecodeLayer::Norm norm;
  Tensor lm_head;
  bool tied_lm_head;
};
