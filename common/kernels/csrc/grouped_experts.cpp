// Routed experts in one call on CPU, for bfloat16 or float32 weights: the whole of
// common/kernels/grouped_experts.grouped_swiglu (why: there) without its twenty-odd operators per layer.
//
// The weights come in strip order (gemm_strips.h), or tile order for AMX (gemm_amx.h; common/model/moe.py
// packs them so at load); the last `shared` of them are shared experts, which every token takes with weight 1
// besides its routed ones. A counting sort groups the (token, expert) pairs by expert, keeping token order
// within an expert; the pairs' rows are gathered (widened to float32) in that order, each GEMM round runs
// every expert's rows in one grouped product (bf16_gemm.cpp), SiLU-and-multiply runs on float32, and each
// token sums its weighted rows in the sorted order, as the torch path's index_add does. In tile order the
// rows are gathered as bfloat16, SiLU-and-multiply is made with the first product and rounded to bfloat16,
// as the tiles take it, and each expert's output rows are rounded to bfloat16 before the sums, as a bfloat16
// expert's output is. Gather, SiLU and sums run on every thread: a prefill chunk has thousands of pairs.

#include <ATen/Parallel.h>
#include <torch/extension.h>

#include <algorithm>
#include <utility>
#include <vector>

#include "bf16_gemm.h"
#include "gemm_amx.h"
#include "gemm_strips.h"
#include "scratch.h"
#include "simd.h"

namespace {

// act [R, I] = silu(gate) * up of gate_up [R, 2I].
void activate(const float* gate_up, int64_t R, int64_t I, float* act) {
  at::parallel_for(0, R, 16, [&](int64_t r0, int64_t r1) {
    for (int64_t r = r0; r < r1; ++r)
      for (int64_t i = 0; i < I; i += 16) {
        const mask16 mask = tail_mask(i, I);
        const f32x16 g = load(gate_up + r * 2 * I + i, mask), u = load(gate_up + r * 2 * I + I + i, mask);
        store(act + r * I + i, mul(silu16(g), u), mask);
      }
  });
}

// Rows off[e]..off[e+1] of xs through expert e's weights, in strip or tile order, as raw pointers of bfloat16
// bits or float32.
template <typename W>
void gate_up_then_down(const float* xs, const W* w13, Layout l13, const W* w2, Layout l2, float* gate_up,
                       float* act, float* ys, const int64_t* off, int64_t R, int64_t E, int64_t h,
                       int64_t I) {
  grouped_product(xs, w13, l13, gate_up, off, E, h, 2 * I);
  activate(gate_up, R, I, act);
  grouped_product(act, w2, l2, ys, off, E, I, h);
}

// The same for both weights in tile order, the rows as the tiles take them (gemm_amx.h): the pairs' rows
// gathered as bfloat16, the activation made with the first product and rounded to bfloat16 (w2's rows, I, are
// whole tiles, so w13's halves are whole strips: gemm_amx_swiglu), and ys rounded to bfloat16, as a bfloat16
// expert's output is (in the reference, and in torch's path here). The other path stages them in float32: at
// a prefill chunk's thousands of rows some 100 MB a layer written and read back, where this writes 20.
void gate_up_then_down(TileRows xr, const uint16_t* w13, const uint16_t* w2, at::BFloat16* ys,
                       const int64_t* off, int64_t R, int64_t E, int64_t h, int64_t I) {
  uint16_t* act = padded_rows(Scratch::activation_rows, R, I);
  grouped_swiglu_product(xr, w13, reinterpret_cast<at::BFloat16*>(act), I + TILE_K, off, E, h, I);
  grouped_product(TileRows{act, I + TILE_K}, w2, ys, off, E, I, h);
}

// The pairs' rows of x [T, h] in sorted order, as float32: xs [R, h].
template <typename T>
void gather(const T* x, const std::vector<int64_t>& pair, int64_t k, int64_t h, float* xs) {
  at::parallel_for(0, pair.size(), 64, [&](int64_t r0, int64_t r1) {
    for (int64_t r = r0; r < r1; ++r) widen(x + pair[r] / k * h, xs + r * h, h);
  });
}

// The same as the tiles take them (tile_rows).
template <typename T>
TileRows gather_rows(const T* x, const std::vector<int64_t>& pair, int64_t k, int64_t h) {
  return tile_rows<T>(Scratch::gemm_rows, pair.size(), h, [&](int64_t r) { return x + pair[r] / k * h; });
}

// out [T, h] (x's dtype): token t's sum of ys[r] * gate over its pairs' rows r (float32 or bfloat16) in
// float32, in sorted order; row_of[p] is pair p's row, -1 where another shard computes it. A token's rows lie
// wherever its experts' rows went, so each is a fresh read from L3 or memory: the next token's rows are asked
// for while this token's are summed (a prefill chunk of 2,048 tokens waited on these loads for about half of
// the sums' time).
struct TokenRows {  // a token's rows and gates, in weighted_sums
  std::vector<std::pair<int64_t, float>> rows;
};

template <typename Y, typename T>
void weighted_sums(const Y* ys, const float* gate, const std::vector<int64_t>& row_of, int64_t k, int64_t h,
                   T* out) {
  const int64_t row_bytes = h * static_cast<int64_t>(sizeof(Y)), tokens = row_of.size() / k;
  at::parallel_for(0, tokens, 16, [&](int64_t t0, int64_t t1) {
    float* acc = scratch(Scratch::row, h);
    std::vector<std::pair<int64_t, float>>& rows = kept<TokenRows>().rows;
    for (int64_t t = t0; t < t1; ++t) {
      for (int64_t p = (t + 1) * k; p < std::min(t + 2, tokens) * k; ++p)
        if (row_of[p] >= 0)
          for (int64_t b = 0; b < row_bytes; b += 64)
            _mm_prefetch(reinterpret_cast<const char*>(ys + row_of[p] * h) + b, _MM_HINT_T0);
      rows.clear();
      for (int64_t p = t * k; p < (t + 1) * k; ++p)
        if (row_of[p] >= 0) rows.emplace_back(row_of[p], gate[p]);
      std::sort(rows.begin(), rows.end());
      std::fill_n(acc, h, 0.0f);
      for (const auto& [r, g] : rows) {
        const Y* y = ys + r * h;
        for (int64_t d = 0; d < h; d += 16) {
          const mask16 mask = tail_mask(d, h);
          store(acc + d, fmadd(load16(y + d, mask), splat(g), load(acc + d, mask)), mask);
        }
      }
      narrow(acc, out + t * h, h);
    }
  });
}

// Checks that w holds E weights [K, N] in strip order, [E, ceil(N / 32), K, 32], or in tile order,
// [E, ceil(N / 32), K / 2, 64].
void check_strips(const char* name, const torch::Tensor& w, int64_t E, int64_t K, int64_t N) {
  const int64_t strips = (N + STRIP_COLUMNS - 1) / STRIP_COLUMNS;
  TORCH_CHECK_VALUE(w.dim() == 4 && w.size(0) == E && w.size(1) == strips && rows_of(w) == K, name,
                    " must be ", E, " weights [", K, ", ", N, "] in strip order, [", E, ", ", strips, ", ",
                    K, ", ", STRIP_COLUMNS, "], or tile order, [", E, ", ", strips, ", ", K / 2, ", ",
                    2 * STRIP_COLUMNS, "]; got ", w.sizes());
}

}  // namespace

torch::Tensor grouped_swiglu(const torch::Tensor& x, const torch::Tensor& expert_ids,
                             const torch::Tensor& weights, const torch::Tensor& w13, const torch::Tensor& w2,
                             int64_t shared) {
  TORCH_CHECK_VALUE(x.dim() == 2 && expert_ids.dim() == 2 && weights.sizes() == expert_ids.sizes() &&
                        expert_ids.size(0) == x.size(0),
                    "x [T, h], expert_ids [T, k] and weights [T, k] expected");
  TORCH_CHECK_VALUE(x.device().is_cpu() &&
                        (x.scalar_type() == torch::kFloat32 || x.scalar_type() == torch::kBFloat16),
                    "x must be a float32 or bfloat16 CPU tensor");
  TORCH_CHECK_VALUE(expert_ids.scalar_type() == torch::kInt64 && weights.scalar_type() == torch::kFloat32,
                    "expert_ids must be int64 and weights float32");
  TORCH_CHECK_VALUE(rows_of(w2) > 0, "w2 must be [E, I, h] in strip order, [E, ceil(h / 32), I, 32], or tile "
                    "order, [E, ceil(h / 32), I / 2, 64]; got ", w2.sizes());
  const int64_t T = x.size(0), h = x.size(1), E = w2.size(0), I = rows_of(w2);
  TORCH_CHECK_VALUE(0 <= shared && shared <= E, "shared must lie in 0..", E, ", the experts w2 holds");
  check_strips("w13", w13, E, h, 2 * I);
  check_strips("w2", w2, E, I, h);
  TORCH_CHECK_VALUE(w13.scalar_type() == w2.scalar_type() && (w13.scalar_type() == torch::kBFloat16 ||
                                                                w13.scalar_type() == torch::kFloat32),
                    "w13 and w2 must both be bfloat16 or both float32");
  TORCH_CHECK_VALUE(w13.device().is_cpu() && w2.device().is_cpu() && w13.is_contiguous() &&
                        w2.is_contiguous(),
                    "w13 and w2 must be contiguous CPU tensors");
  const torch::Tensor xc = x.contiguous();
  // Every token's pairs: its routed ones, then one per shared expert (weight 1).
  const int64_t routed = E - shared, k_routed = expert_ids.size(1), k = k_routed + shared;
  std::vector<int64_t> id(T * k);
  std::vector<float> gate(T * k, 1.0f);
  {
    const torch::Tensor ids = expert_ids.contiguous(), gates = weights.contiguous();
    const int64_t* ip = ids.data_ptr<int64_t>();
    const float* gp = gates.data_ptr<float>();
    for (int64_t t = 0; t < T; ++t) {
      for (int64_t j = 0; j < k_routed; ++j) {
        const int64_t e = ip[t * k_routed + j];
        TORCH_CHECK_VALUE(-1 <= e && e < routed, "expert id ", e, " outside -1..", routed - 1);
        id[t * k + j] = e;
        gate[t * k + j] = gp[t * k_routed + j];
      }
      for (int64_t j = 0; j < shared; ++j) id[t * k + k_routed + j] = routed + j;
    }
  }

  std::vector<int64_t> offsets(E + 1, 0);  // counting sort of the pairs by expert (-1: another shard's)
  for (int64_t p = 0; p < T * k; ++p)
    if (id[p] >= 0) ++offsets[id[p] + 1];
  for (int64_t e = 0; e < E; ++e) offsets[e + 1] += offsets[e];
  const int64_t R = offsets[E];
  std::vector<int64_t> pair(R), row_of(T * k, -1), next(offsets.begin(), offsets.end() - 1);
  for (int64_t p = 0; p < T * k; ++p)
    if (id[p] >= 0) pair[row_of[p] = next[id[p]]++] = p;

  const int64_t* off = offsets.data();
  torch::Tensor out = torch::empty({T, h}, x.options());
  const auto sums = [&](const auto* ys) {
    if (x.scalar_type() == torch::kFloat32)
      weighted_sums(ys, gate.data(), row_of, k, h, out.data_ptr<float>());
    else
      weighted_sums(ys, gate.data(), row_of, k, h, out.data_ptr<at::BFloat16>());
  };
  if (layout_of(w13) == Layout::tiles && layout_of(w2) == Layout::tiles) {
    at::BFloat16* ys = reinterpret_cast<at::BFloat16*>(scratch(Scratch::gemm_sums, (R * h + 1) / 2));
    const TileRows xr = x.scalar_type() == torch::kFloat32
                             ? gather_rows(xc.data_ptr<float>(), pair, k, h)
                             : gather_rows(xc.data_ptr<at::BFloat16>(), pair, k, h);
    gate_up_then_down(xr, bf16_bits(w13), bf16_bits(w2), ys, off, R, E, h, I);
    sums(ys);
  } else {
    float* xsp = scratch(Scratch::expert_rows, R * (2 * h + 3 * I));  // xs [R, h], gate_up, act [R, I], ys
    float *gu = xsp + R * h, *ap = gu + R * 2 * I, *ys = ap + R * I;
    if (x.scalar_type() == torch::kFloat32)
      gather(xc.data_ptr<float>(), pair, k, h, xsp);
    else
      gather(xc.data_ptr<at::BFloat16>(), pair, k, h, xsp);
    if (w13.scalar_type() == torch::kBFloat16)
      gate_up_then_down(xsp, bf16_bits(w13), layout_of(w13), bf16_bits(w2), layout_of(w2), gu, ap, ys, off, R,
                        E, h, I);
    else
      gate_up_then_down(xsp, w13.data_ptr<float>(), layout_of(w13), w2.data_ptr<float>(), layout_of(w2), gu,
                        ap, ys, off, R, E, h, I);
    sums(ys);
  }
  return out;
}
