// A token per row of logits, drawn by inverting the row's softmax's cumulative distribution at a uniform u
// (common/engine/sampler.py): the first token whose cumulative probability exceeds u. In torch that is four
// passes over the rows (softmax, cumsum, a copy, the search), 0.3-0.5 ms for 64 rows of an 8k vocabulary.
// Here a row is read twice, for its max and to exponentiate it into a thread's buffer.
//
// Any fixed order of the tokens inverts the distribution as well as the vocabulary's; this one runs lane by
// lane, the order in which 16 lanes' running sums add up: lane j holds tokens j, j + 16, j + 32, ... So the
// sums are vector adds, and the search walks the 16 lanes' totals, then one lane's tokens. Walking a lane
// repeats its running sum's additions in the same order, so it reaches the lane's total bit for bit and the
// search always stops on a token of positive weight. Tokens more than 87 below the row's best (filtered ones
// are -inf) weigh 0: under 1e-38 of the best one's weight.

#include <ATen/Parallel.h>
#include <torch/extension.h>

#include <cmath>
#include <limits>

#include "kernels.h"
#include "scratch.h"
#include "simd.h"

namespace {

int64_t draw(const float* logits, int64_t V, float u, float* weights) {
  const f32x16 none = splat(-std::numeric_limits<float>::infinity());
  const f32x16 shift = splat(max_of(logits, V)), floor = splat(-87.0f);
  f32x16 sums = zeros();
  for (int64_t i = 0; i < V; i += 16) {
    const mask16 mask = tail_mask(i, V);
    const f32x16 x = sub(where(mask, load(logits + i, mask), none), shift);
    const f32x16 w = where(less(x, floor), zeros(), exp16(x));
    store(weights + i, w);
    sums = add(sums, w);
  }
  alignas(64) float lanes[16];
  store(lanes, sums);
  float totals[16];  // running totals over lanes 0..j
  float total = 0.0f;
  for (int j = 0; j < 16; ++j) totals[j] = total += lanes[j];
  // u * total < total; a u within half an ulp of 1 could round up to it.
  const float target = std::min(u * total, std::nextafter(total, 0.0f));
  int j = 0;
  while (totals[j] <= target) ++j;
  const float before = j == 0 ? 0.0f : totals[j - 1];
  float sum = 0.0f;
  for (int64_t i = j;; i += 16)
    if (before + (sum += weights[i]) > target) return i;
}

}  // namespace

// logits [B, V] float32 (unit column stride), u [B] float32 in [0, 1) -> int64 [B].
torch::Tensor inverse_cdf_draw(const torch::Tensor& logits, const torch::Tensor& u) {
  TORCH_CHECK_VALUE(logits.device().is_cpu() && logits.scalar_type() == torch::kFloat32 &&
                        logits.dim() == 2 && logits.stride(1) == 1 && logits.size(1) > 0,
                    "logits must be a float32 CPU tensor [rows, vocab] with unit column stride");
  TORCH_CHECK_VALUE(u.device().is_cpu() && u.scalar_type() == torch::kFloat32 && u.is_contiguous() &&
                        u.numel() == logits.size(0),
                    "u must be a contiguous float32 CPU tensor of one value a row");
  const int64_t B = logits.size(0), V = logits.size(1);
  auto tokens = torch::empty({B}, torch::kInt64);
  const float* rows = logits.data_ptr<float>();
  const float* uniforms = u.data_ptr<float>();
  int64_t* out = tokens.data_ptr<int64_t>();
  at::parallel_for(0, B, 1, [&](int64_t r0, int64_t r1) {
    float* weights = scratch(Scratch::row, (V + 15) / 16 * 16);
    for (int64_t r = r0; r < r1; ++r) out[r] = draw(rows + r * logits.stride(0), V, uniforms[r], weights);
  });
  return tokens;
}
