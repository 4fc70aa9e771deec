// The DeepSeekMoE gate of a layer in one call on CPU: the whole of common/model/moe.py's Gate.forward (the
// variants are described there), which in torch is five operators for V2's greedy gate and a dozen for V3's,
// together worth more than the arithmetic at a decode step's few tokens.
//
// Each thread takes a range of tokens: their logits, x (widened to float32) times the input-major float32
// weight [h, E], through gemm_packed.h (a row's sums in the same order whatever the other rows), then per
// token in float32: softmax or sigmoid scores; the correction bias added for choosing only; the best
// `topk_group` groups kept; the top k experts by that choice, best first (ties: the lower id); their
// unbiased scores, renormalised and scaled.

#include <ATen/Parallel.h>
#include <torch/extension.h>

#include <cmath>
#include <limits>
#include <string>
#include <tuple>
#include <vector>

#include "gemm_packed.h"
#include "scratch.h"
#include "simd.h"

namespace {

struct GateSpec {
  int64_t experts, top_k, groups, top_groups;
  bool softmax, grouped, top2_group_score;  // grouped: group-limited; top2: V3's noaux_tc group score
  bool normalise;
  float scaling;
  const float* bias;  // nullptr, or the correction bias [experts]
};

// The indices of the n largest of v[0..size), best first, ties to the lower index, into out: one pass, each
// value against the n-th best so far (n is a top-k's few), where n passes over every value cost a prefill's
// gate a third of its time.
void largest(const float* v, int64_t size, int64_t n, int64_t* out) {
  int64_t kept = 0;
  for (int64_t e = 0; e < size; ++e) {
    if (kept == n && !(v[e] > v[out[n - 1]])) continue;
    int64_t i = kept < n ? kept++ : n - 1;  // a free place, or the n-th best's
    for (; i > 0 && v[e] > v[out[i - 1]]; --i) out[i] = out[i - 1];
    out[i] = e;
  }
}

// choose's working rows, a thread's (kept: scratch.h).
struct GateScratch {
  std::vector<float> scores, choice, group_scores;
  std::vector<int64_t> best_groups;
  std::vector<char> taken;
  void fit(const GateSpec& g) {
    grow(scores, g.experts);
    grow(choice, g.experts);
    grow(group_scores, g.groups);
    grow(best_groups, g.groups);
  }
};

// One token: logits [E] -> ids [k] (best first) and their weights [k].
void choose(const float* logits, const GateSpec& g, GateScratch& w, int64_t* ids, float* weights) {
  const int64_t E = g.experts;
  std::vector<float>& scores = w.scores;
  std::vector<float>& choice = w.choice;
  std::vector<float>& group_scores = w.group_scores;
  float* score = scores.data();
  if (g.softmax) {  // 16 experts at a time
    const f32x16 best = splat(max_of(logits, E));
    f32x16 sums = zeros();
    for (int64_t e = 0; e < E; e += 16) {
      const mask16 mask = tail_mask(e, E);
      const f32x16 p = where(mask, exp16(sub(load(logits + e, mask), best)), zeros());
      store(score + e, p, mask);
      sums = add(sums, p);
    }
    const f32x16 total = splat(sum_lanes(sums));
    for (int64_t e = 0; e < E; e += 16) {
      const mask16 mask = tail_mask(e, E);
      store(score + e, divide(load(score + e, mask), total), mask);
    }
  } else {
    for (int64_t e = 0; e < E; e += 16) {
      const mask16 mask = tail_mask(e, E);
      const f32x16 minus = sub(zeros(), load(logits + e, mask));
      store(score + e, divide(splat(1.0f), add(splat(1.0f), exp16(minus))), mask);
    }
  }
  for (int64_t e = 0; e < E; ++e) choice[e] = g.bias ? scores[e] + g.bias[e] : scores[e];
  if (g.grouped) {
    const int64_t size = E / g.groups;
    for (int64_t q = 0; q < g.groups; ++q) {
      const float* c = choice.data() + q * size;
      if (g.top2_group_score) {
        int64_t two[2];
        largest(c, size, 2, two);
        group_scores[q] = c[two[0]] + c[two[1]];
      } else {
        group_scores[q] = c[0];
        for (int64_t e = 1; e < size; ++e) group_scores[q] = std::max(group_scores[q], c[e]);
      }
    }
    largest(group_scores.data(), g.groups, g.top_groups, w.best_groups.data());
    w.taken.assign(g.groups, 0);
    for (int64_t j = 0; j < g.top_groups; ++j) w.taken[w.best_groups[j]] = 1;
    for (int64_t e = 0; e < E; ++e)
      if (!w.taken[e / size]) choice[e] = -std::numeric_limits<float>::infinity();
  }
  largest(choice.data(), E, g.top_k, ids);
  float sum = 0.0f;
  for (int64_t j = 0; j < g.top_k; ++j) sum += weights[j] = scores[ids[j]];
  for (int64_t j = 0; j < g.top_k; ++j) {
    if (g.normalise && g.top_k > 1) weights[j] /= sum + 1e-20f;
    if (g.scaling != 1.0f) weights[j] *= g.scaling;
  }
}

template <typename T>
void gate_rows(const T* x, const float* w, int64_t T_, int64_t h, const GateSpec& g, int64_t* ids,
               float* weights) {
  const int64_t E = g.experts;
  const int64_t grain = std::max<int64_t>(1, GEMM_GRAIN / std::max<int64_t>(1, h * E));
  at::parallel_for(0, T_, grain, [&](int64_t t0, int64_t t1) {
    const int64_t rows = t1 - t0;
    float* xs = scratch(Scratch::gemm_rows, rows * h);
    for (int64_t t = t0; t < t1; ++t) widen(x + t * h, xs + (t - t0) * h, h);
    float* logits = scratch(Scratch::gemm_sums, rows * E);
    gemm_packed(xs, h, RowMajor<float>{w, E}, logits, E, rows, h, 0, E);
    GateScratch& work = kept<GateScratch>();
    work.fit(g);
    for (int64_t t = t0; t < t1; ++t)
      choose(logits + (t - t0) * E, g, work, ids + t * g.top_k, weights + t * g.top_k);
  });
}

}  // namespace

// x [T, h] float32 or bfloat16, weight [h, E] float32 -> (weights float32 [T, k], expert ids int64 [T, k]).
// method: greedy, group_limited_greedy (V2) or noaux_tc (V3); scoring: softmax or sigmoid. counts, given
// (int64 [E]), gets each expert's choices added, atomically: micro-batches run a layer's gate side by side.
std::tuple<torch::Tensor, torch::Tensor> moe_gate(const torch::Tensor& x, const torch::Tensor& weight,
                                                  const std::optional<torch::Tensor>& bias, int64_t top_k,
                                                  const std::string& scoring, const std::string& method,
                                                  int64_t n_group, int64_t topk_group, bool norm_topk_prob,
                                                  double routed_scaling_factor,
                                                  const std::optional<torch::Tensor>& counts) {
  TORCH_CHECK_VALUE(x.dim() == 2 && x.device().is_cpu() &&
                        (x.scalar_type() == torch::kFloat32 || x.scalar_type() == torch::kBFloat16),
                    "x must be a float32 or bfloat16 CPU tensor [T, h]");
  TORCH_CHECK_VALUE(weight.dim() == 2 && weight.size(0) == x.size(1) &&
                        weight.scalar_type() == torch::kFloat32 && weight.is_contiguous(),
                    "weight must be contiguous float32 [h, E] for x [T, h]; got ", weight.sizes());
  const int64_t T = x.size(0), h = x.size(1), E = weight.size(1);
  TORCH_CHECK_VALUE(scoring == "softmax" || scoring == "sigmoid", "unknown scoring ", scoring);
  TORCH_CHECK_VALUE(method == "greedy" || method == "group_limited_greedy" || method == "noaux_tc",
                    "unknown top-k method ", method);
  const bool grouped = method != "greedy";
  TORCH_CHECK_VALUE(!grouped || (n_group >= 1 && E % n_group == 0 && 1 <= topk_group &&
                                 topk_group <= n_group),
                    "n_group must divide the ", E, " experts and topk_group lie in 1..n_group");
  TORCH_CHECK_VALUE(method != "noaux_tc" || E / n_group >= 2,
                    "noaux_tc scores a group by its best two experts: groups of one expert cannot");
  TORCH_CHECK_VALUE(1 <= top_k && top_k <= E, "top_k must lie in 1..", E);
  TORCH_CHECK_VALUE(!bias || (bias->scalar_type() == torch::kFloat32 && bias->numel() == E &&
                              bias->is_contiguous() && bias->device().is_cpu()),
                    "the correction bias must be contiguous float32 [", E, "]");
  TORCH_CHECK_VALUE(!counts || (counts->scalar_type() == torch::kInt64 && counts->numel() == E &&
                                counts->is_contiguous() && counts->device().is_cpu()),
                    "counts must be contiguous int64 [", E, "]");
  const GateSpec g{E,
                   top_k,
                   grouped ? n_group : 1,
                   grouped ? topk_group : 1,
                   scoring == "softmax",
                   grouped,
                   method == "noaux_tc",
                   norm_topk_prob,
                   static_cast<float>(routed_scaling_factor),
                   bias ? bias->data_ptr<float>() : nullptr};
  const torch::Tensor xc = x.contiguous();
  torch::Tensor weights = torch::empty({T, top_k}, x.options().dtype(torch::kFloat32));
  torch::Tensor ids = torch::empty({T, top_k}, x.options().dtype(torch::kInt64));
  const float* w = weight.data_ptr<float>();
  if (x.scalar_type() == torch::kFloat32)
    gate_rows(xc.data_ptr<float>(), w, T, h, g, ids.data_ptr<int64_t>(), weights.data_ptr<float>());
  else
    gate_rows(xc.data_ptr<at::BFloat16>(), w, T, h, g, ids.data_ptr<int64_t>(), weights.data_ptr<float>());
  if (counts) {
    int64_t* c = counts->data_ptr<int64_t>();
    const int64_t* chosen = ids.data_ptr<int64_t>();
    for (int64_t i = 0; i < T * top_k; ++i) __atomic_fetch_add(c + chosen[i], 1, __ATOMIC_RELAXED);
  }
  return {weights, ids};
}
