// Routed experts in one call on CPU, for bfloat16 or float32 weights: the whole of
// common/kernels/grouped_experts.grouped_swiglu (why: there) without its twenty-odd operators per layer.
//
// A counting sort groups the (token, expert) pairs by expert, keeping token order within an expert; the
// pairs' rows are gathered (widened to float32) in that order, each GEMM round runs every expert's rows in
// one grouped product (bf16_gemm.cpp), SiLU-and-multiply runs on float32, and each token sums its weighted
// rows in the sorted order, as the torch path's index_add does. Gather, SiLU and sums run on every thread:
// a prefill chunk has thousands of pairs.

#include <ATen/Parallel.h>
#include <torch/extension.h>

#include <algorithm>
#include <utility>
#include <vector>

#include "bf16_gemm.h"
#include "gemm_strips.h"
#include "scratch.h"
#include "simd.h"

namespace {

// Rows off[e]..off[e+1] of xs through expert e's weights, as raw pointers of bfloat16 bits or float32 (the
// strips null where the caller has none).
template <typename W>
void gate_up_then_down(const float* xs, const W* w13, const W* w2, const W* w13_strips, const W* w2_strips,
                       float* gate_up, float* act, float* ys, const int64_t* off, int64_t R, int64_t E,
                       int64_t h, int64_t I) {
  grouped_product(xs, w13, w13_strips, gate_up, off, E, h, 2 * I);
  at::parallel_for(0, R, 16, [&](int64_t r0, int64_t r1) {
    for (int64_t r = r0; r < r1; ++r)
      for (int64_t i = 0; i < I; i += 16) {  // silu(g) * u
        const mask16 mask = tail_mask(i, I);
        const f32x16 g = load(gate_up + r * 2 * I + i, mask), u = load(gate_up + r * 2 * I + I + i, mask);
        store(act + r * I + i, mul(silu16(g), u), mask);
      }
  });
  grouped_product(act, w2, w2_strips, ys, off, E, I, h);
}

// The pairs' rows of x [T, h] in sorted order, as float32: xs [R, h].
template <typename T>
void gather(const T* x, const std::vector<int64_t>& pair, int64_t k, int64_t h, float* xs) {
  at::parallel_for(0, pair.size(), 64, [&](int64_t r0, int64_t r1) {
    for (int64_t r = r0; r < r1; ++r) widen(x + pair[r] / k * h, xs + r * h, h);
  });
}

// out [T, h] (x's dtype): token t's sum of ys[r] * gate over its pairs' rows r, in sorted order; row_of[p] is
// pair p's row, -1 where another shard computes it.
template <typename T>
void weighted_sums(const float* ys, const float* gate, const std::vector<int64_t>& row_of, int64_t k,
                   int64_t h, T* out) {
  at::parallel_for(0, row_of.size() / k, 16, [&](int64_t t0, int64_t t1) {
    std::vector<float> acc(h);
    std::vector<std::pair<int64_t, float>> rows;
    for (int64_t t = t0; t < t1; ++t) {
      rows.clear();
      for (int64_t p = t * k; p < (t + 1) * k; ++p)
        if (row_of[p] >= 0) rows.emplace_back(row_of[p], gate[p]);
      std::sort(rows.begin(), rows.end());
      std::fill(acc.begin(), acc.end(), 0.0f);
      for (const auto& [r, g] : rows) {
#pragma omp simd
        for (int64_t d = 0; d < h; ++d) acc[d] += ys[r * h + d] * g;
      }
      narrow(acc.data(), out + t * h, h);
    }
  });
}

// w in strip order (gemm_strips.h) [E, ceil(N / 32), K, 32] for w [E, K, N], as W's raw pointer; null
// for none.
template <typename W>
const W* strips_of(const std::optional<torch::Tensor>& strips, const torch::Tensor& w) {
  if (!strips) return nullptr;
  const int64_t E = w.size(0), K = w.size(1);
  const int64_t strips_per_row = (w.size(2) + STRIP_COLUMNS - 1) / STRIP_COLUMNS;
  TORCH_CHECK_VALUE(strips->sizes() == torch::IntArrayRef({E, strips_per_row, K, STRIP_COLUMNS}) &&
                        strips->scalar_type() == w.scalar_type() && strips->is_contiguous() &&
                        strips->device().is_cpu(),
                    "strips of a weight ", w.sizes(), " must be a contiguous CPU tensor [", E, ", ",
                    strips_per_row, ", ", K, ", ", STRIP_COLUMNS, "] of its dtype, got ", strips->sizes());
  return static_cast<const W*>(strips->data_ptr());
}

}  // namespace

torch::Tensor grouped_swiglu(const torch::Tensor& x, const torch::Tensor& expert_ids,
                             const torch::Tensor& weights, const torch::Tensor& w13, const torch::Tensor& w2,
                             const std::optional<torch::Tensor>& w13_strips,
                             const std::optional<torch::Tensor>& w2_strips) {
  TORCH_CHECK_VALUE(x.dim() == 2 && expert_ids.dim() == 2 && weights.sizes() == expert_ids.sizes() &&
                        expert_ids.size(0) == x.size(0),
                    "x [T, h], expert_ids [T, k] and weights [T, k] expected");
  TORCH_CHECK_VALUE(x.device().is_cpu() &&
                        (x.scalar_type() == torch::kFloat32 || x.scalar_type() == torch::kBFloat16),
                    "x must be a float32 or bfloat16 CPU tensor");
  TORCH_CHECK_VALUE(expert_ids.scalar_type() == torch::kInt64 && weights.scalar_type() == torch::kFloat32,
                    "expert_ids must be int64 and weights float32");
  TORCH_CHECK_VALUE(w13.dim() == 3 && w2.dim() == 3 && w13.size(0) == w2.size(0) &&
                        w13.size(1) == x.size(1) && w13.size(2) == 2 * w2.size(1) && w2.size(2) == x.size(1),
                    "w13 [E, h, 2I] and w2 [E, I, h] expected for h = ", x.size(1));
  TORCH_CHECK_VALUE(w13.scalar_type() == w2.scalar_type() && (w13.scalar_type() == torch::kBFloat16 ||
                                                                w13.scalar_type() == torch::kFloat32),
                    "w13 and w2 must both be bfloat16 or both float32");
  TORCH_CHECK_VALUE(w13.device().is_cpu() && w2.device().is_cpu() && w13.is_contiguous() &&
                        w2.is_contiguous(),
                    "w13 and w2 must be contiguous CPU tensors");
  const int64_t T = x.size(0), k = expert_ids.size(1), h = x.size(1), E = w13.size(0), I = w2.size(1);
  const torch::Tensor ids = expert_ids.contiguous(), gates = weights.contiguous(), xc = x.contiguous();
  const int64_t* id = ids.data_ptr<int64_t>();
  const float* gate = gates.data_ptr<float>();

  std::vector<int64_t> offsets(E + 1, 0);  // counting sort of the pairs by expert (-1: another shard's)
  for (int64_t p = 0; p < T * k; ++p) {
    TORCH_CHECK_VALUE(-1 <= id[p] && id[p] < E, "expert id ", id[p], " outside -1..", E - 1);
    if (id[p] >= 0) ++offsets[id[p] + 1];
  }
  for (int64_t e = 0; e < E; ++e) offsets[e + 1] += offsets[e];
  const int64_t R = offsets[E];
  std::vector<int64_t> pair(R), row_of(T * k, -1), next(offsets.begin(), offsets.end() - 1);
  for (int64_t p = 0; p < T * k; ++p)
    if (id[p] >= 0) pair[row_of[p] = next[id[p]]++] = p;

  // xs [R, h], gate_up [R, 2I], act [R, I], ys [R, h]
  float* xsp = scratch(Scratch::expert_rows, R * (2 * h + 3 * I));
  float *gu = xsp + R * h, *ap = gu + R * 2 * I, *yp = ap + R * I;
  if (x.scalar_type() == torch::kFloat32)
    gather(xc.data_ptr<float>(), pair, k, h, xsp);
  else
    gather(xc.data_ptr<at::BFloat16>(), pair, k, h, xsp);

  const int64_t* off = offsets.data();
  if (w13.scalar_type() == torch::kBFloat16)
    gate_up_then_down(xsp, bf16_bits(w13), bf16_bits(w2), strips_of<uint16_t>(w13_strips, w13),
                      strips_of<uint16_t>(w2_strips, w2), gu, ap, yp, off, R, E, h, I);
  else
    gate_up_then_down(xsp, w13.data_ptr<float>(), w2.data_ptr<float>(), strips_of<float>(w13_strips, w13),
                      strips_of<float>(w2_strips, w2), gu, ap, yp, off, R, E, h, I);

  torch::Tensor out = torch::empty({T, h}, x.options());
  if (x.scalar_type() == torch::kFloat32)
    weighted_sums(yp, gate, row_of, k, h, out.data_ptr<float>());
  else
    weighted_sums(yp, gate, row_of, k, h, out.data_ptr<at::BFloat16>());
  return out;
}
