// out [M, N] float32 = x [M, K] float32 @ w [K, N] bfloat16 (input-major, row-major), for CPUs with AVX-512
// or AVX2 but without bfloat16 units, at decode's row counts. Why: common/kernels/bf16_gemm.py. The grouped
// product also takes float32 weights, for the routed experts of a float32 model (grouped_experts.cpp).
//
// Each thread owns a range of 64-column blocks and multiplies them in the scheme of gemm_packed.h: a panel
// of weight rows widened to float32 once, tiles of rows in registers over it. A bfloat16 is the top half of
// a float32, so widening is a shift, and every product is exact in float32. A projection's weight kept in
// strip order (gemm_strips.h; common/model/linear.py's Linear.pack) goes through the grouped product as one
// expert: a few rows stream its strips, more widen panels from them; the same sums either way.

#include <ATen/Parallel.h>
#include <torch/extension.h>

#include <algorithm>
#include <array>
#include <atomic>
#include <vector>

#include "bf16_gemm.h"
#include "gemm_amx.h"
#include "gemm_packed.h"
#include "gemm_strips.h"
#include "scratch.h"

namespace {

constexpr int64_t STRIPS_UP_TO = 24;  // rows up to which a grouped product's expert takes its strips
// What reading one weight from memory costs, in multiply-adds: two cores copy about 8.5 G bfloat16 a
// second and multiply-add about 25 G. A product of one row is all reading: counted by its multiply-adds
// alone, a 512 x 160 weight or MLA's per-head ones (about 64 K) stayed on one thread, which reads
// memory at about half the rate of two.
constexpr int64_t READ_COST = 3;

// out [M, N] = x [M, K] @ w [K, N] over the column blocks b0..b1 (a thread's share).
template <typename W>
void columns(const float* x, const W* w, float* out, int64_t M, int64_t K, int64_t N, int64_t b0,
             int64_t b1) {
  gemm_packed(x, K, RowMajor<W>{w, N}, out, N, M, K, b0 * PANEL_COLUMNS, std::min(b1 * PANEL_COLUMNS, N));
}

// Columns c0..c1 of M rows of float32 sums, rounded to bfloat16 into out.
void round_columns(const float* sums, at::BFloat16* out, int64_t M, int64_t N, int64_t c0, int64_t c1) {
  for (int64_t m = 0; m < M; ++m) narrow(sums + m * N + c0, out + m * N + c0, c1 - c0);
}

// n float32 sums rounded to bfloat16 into out, on every thread (a product's result once it is all summed).
void round_all(const float* sums, at::BFloat16* out, int64_t n) {
  at::parallel_for(0, n, 1 << 14, [&](int64_t a, int64_t b) { narrow(sums + a, out + a, b - a); });
}

// Row r of x [..., K] at its strides (up to two leading dimensions, the last stride 1), as a function of r.
template <typename T>
auto row_at(const torch::Tensor& x) {
  const T* p = x.data_ptr<T>();
  const int64_t inner = x.dim() == 3 ? x.size(1) : 1;
  const int64_t outer_stride = x.dim() >= 2 ? x.stride(0) : 0, inner_stride = x.dim() == 3 ? x.stride(1) : 0;
  return [=](int64_t r) { return p + r / inner * outer_stride + r % inner * inner_stride; };
}

// The rows of x [..., K] at their strides, widened to float32 into rows.
template <typename T>
void widen_rows(const torch::Tensor& x, int64_t K, float* rows) {
  const auto row = row_at<T>(x);
  for (int64_t r = 0; r < x.numel() / K; ++r) widen(row(r), rows + r * K, K);
}

// x [..., K] (float32 or bfloat16, on the CPU) as contiguous float32 rows [M, K]: x's own memory when it is
// contiguous float32, otherwise widened into the calling thread's scratch (no torch operator either way).
const float* float_rows(const torch::Tensor& x, int64_t K, Scratch use) {
  TORCH_CHECK_VALUE(x.device().is_cpu(), "CPU tensors only");
  TORCH_CHECK_VALUE(x.scalar_type() == torch::kFloat32 || x.scalar_type() == torch::kBFloat16,
                    "x must be float32 or bfloat16");
  if (x.scalar_type() == torch::kFloat32 && x.is_contiguous()) return x.data_ptr<float>();
  const torch::Tensor strided = x.dim() <= 3 && x.stride(-1) == 1 ? x : x.reshape({-1, K}).contiguous();
  float* rows = scratch(use, x.numel());
  if (x.scalar_type() == torch::kFloat32)
    widen_rows<float>(strided, K, rows);
  else
    widen_rows<at::BFloat16>(strided, K, rows);
  return rows;
}

// x [..., K] as AMX's tiles take it, where x is bfloat16 (up to two leading dimensions at any strides): its
// rows copied as they are, with no float32 pass in between (float_rows, then rounding back).
TileRows copied_rows(const torch::Tensor& x, int64_t K) {
  return tile_rows<at::BFloat16>(Scratch::tile_rows, x.numel() / K, K, row_at<at::BFloat16>(x));
}

bool takes_rows_as_they_are(const torch::Tensor& x, Layout layout) {
  return layout == Layout::tiles && x.scalar_type() == torch::kBFloat16 && x.dim() <= 3 && x.stride(-1) == 1;
}

// Each expert's first row of out, its rows where the grouped product puts them: off[e] rows in, N apart.
template <typename O>
std::vector<O*> rows_by_offset(O* out, const int64_t* off, int64_t E, int64_t N) {
  std::vector<O*> first(E);
  for (int64_t e = 0; e < E; ++e) first[e] = out + off[e] * N;
  return first;
}

void check_bf16_weight(const torch::Tensor& w) {
  TORCH_CHECK_VALUE(w.scalar_type() == torch::kBFloat16, "w must be bfloat16");
  TORCH_CHECK_VALUE(w.device().is_cpu() && w.is_contiguous(), "w must be a contiguous CPU tensor");
}

}  // namespace

// Work items: (e, a range of column blocks). An item reads its weight rows in runs as long as its column
// range (a run of a few cache lines, a row apart, defeats the prefetchers), so an expert is cut into as
// few items as keep every thread busy; experts without rows are never read. The experts' rows are uneven,
// so threads take items as they finish, the largest first. The weights are row-major [E, K, N] (MLA's
// absorbed products) or in strip order (the routed experts, gemm_strips.h): there an expert with a few rows
// streams its strips, one with many widens its panels from them; the same sums either way. In tile order
// every expert goes to AMX's tiles (gemm_amx.h), whatever its rows. Expert e's rows go to out[e], ldo apart:
// float32, or on the tiles bfloat16 rounded from the float32 sums; with swiglu (on the tiles), the weights
// are w13 [K, N = 2I] and out gets SiLU-and-multiply of their halves, [., I].
template <typename W, typename O>
void grouped(const float* x, const W* w, Layout layout, O* const* out, int64_t ldo, const int64_t* off,
             int64_t E, int64_t K, int64_t N, TileRows given = {}, bool swiglu = false) {
  const bool tiles = layout == Layout::tiles;
  TORCH_CHECK((std::is_same_v<O, float>) || tiles, "bfloat16 results come from the tiles only");
  TORCH_CHECK(!swiglu || (tiles && std::is_same_v<O, at::BFloat16> && N % (2 * STRIP_COLUMNS) == 0),
              "SiLU-and-multiply is made on the tiles, into bfloat16, of halves in whole strips");
  if (tiles) {
    TORCH_CHECK((std::is_same_v<W, uint16_t>), "only bfloat16 weights come in tile order");
    TORCH_CHECK(amx_ready(), "weights in tile order need AMX, which this process cannot use");
    TORCH_CHECK_VALUE(K % TILE_K == 0, "a weight in tile order has a multiple of ", TILE_K, " rows, not ", K);
  }
  const int64_t columns = swiglu ? N / 2 : N;  // of out
  const int64_t blocks = (columns + PANEL_COLUMNS - 1) / PANEL_COLUMNS;
  // an expert's weight: in strip or tile order its columns padded to whole strips
  const int64_t size =
      K * (layout == Layout::row_major ? N : (N + STRIP_COLUMNS - 1) / STRIP_COLUMNS * STRIP_COLUMNS);
  int64_t active = 0;
  for (int64_t e = 0; e < E; ++e) active += off[e + 1] > off[e];
  const int64_t threads = at::get_num_threads();
  const int64_t pieces = std::clamp<int64_t>(2 * threads / std::max<int64_t>(1, active), 1, blocks);
  const int64_t chunk = (blocks + pieces - 1) / pieces;
  std::vector<std::array<int64_t, 3>> items;
  for (int64_t e = 0; e < E; ++e)
    if (off[e + 1] > off[e])
      for (int64_t b = 0; b < blocks; b += chunk) items.push_back({e, b, std::min(blocks, b + chunk)});
  std::stable_sort(items.begin(), items.end(), [&](const auto& a, const auto& b) {
    return off[a[0] + 1] - off[a[0]] > off[b[0] + 1] - off[b[0]];
  });
  const int64_t work = (off[E] + READ_COST * active) * K * N;
  const auto row = [&](int64_t r) { return x + r * K; };
  // x as the tiles take it, made before the items' threads start
  const TileRows a = given.rows || !tiles ? given : tile_rows<float>(Scratch::tile_rows, off[E], K, row);
  std::atomic<size_t> next{0};
  at::parallel_for(0, std::clamp<int64_t>(work / GEMM_GRAIN, 1, threads), 1, [&](int64_t, int64_t) {
    if (tiles) configure_tiles();
    for (size_t i; (i = next++) < items.size();) {
      const auto [e, b0, b1] = items[i];
      const int64_t M = off[e + 1] - off[e], c0 = b0 * PANEL_COLUMNS;
      const int64_t c1 = std::min(b1 * PANEL_COLUMNS, columns);
      const float* xe = x + off[e] * K;
      O* oe = out[e];
      if constexpr (std::is_same_v<W, uint16_t>)
        if (tiles) {
          if constexpr (std::is_same_v<O, at::BFloat16>)
            if (swiglu) {
              gemm_amx_swiglu(a.rows + off[e] * a.lda, a.lda, w + e * size, oe, ldo, M, K, columns, c0, c1);
              continue;
            }
          gemm_amx(a.rows + off[e] * a.lda, a.lda, w + e * size, oe, ldo, M, K, c0, c1);
          continue;
        }
      if constexpr (std::is_same_v<O, float>) {
        if (layout == Layout::row_major)
          gemm_packed(xe, K, RowMajor<W>{w + e * size, N}, oe, ldo, M, K, c0, c1);
        else if (M <= STRIPS_UP_TO)
          gemm_strips(xe, K, w + e * size, oe, ldo, M, K, c0, c1);
        else
          gemm_packed(xe, K, StripOrder<W>{w + e * size, K}, oe, ldo, M, K, c0, c1);
      }
    }
    if (tiles) release_tiles();
  });
}

void grouped_product(const float* x, const uint16_t* w, Layout layout, float* out, const int64_t* off,
                     int64_t E, int64_t K, int64_t N) {
  grouped(x, w, layout, rows_by_offset(out, off, E, N).data(), N, off, E, K, N);
}

void grouped_product(const float* x, const float* w, Layout layout, float* out, const int64_t* off,
                     int64_t E, int64_t K, int64_t N) {
  grouped(x, w, layout, rows_by_offset(out, off, E, N).data(), N, off, E, K, N);
}

void grouped_product(TileRows x, const uint16_t* w, at::BFloat16* out, const int64_t* off, int64_t E,
                     int64_t K, int64_t N) {
  grouped(static_cast<const float*>(nullptr), w, Layout::tiles, rows_by_offset(out, off, E, N).data(), N, off,
          E, K, N, x);
}

void grouped_swiglu_product(TileRows x, const uint16_t* w13, at::BFloat16* act, int64_t ld,
                            const int64_t* off, int64_t E, int64_t K, int64_t I) {
  grouped(static_cast<const float*>(nullptr), w13, Layout::tiles, rows_by_offset(act, off, E, ld).data(), ld,
          off, E, K, 2 * I, x, true);
}

// x [..., K] @ w -> [..., N] in x's dtype: the projections, w [K, N] or in strip order [1, N / 32, K, 32]
// (or tile order, [1, N / 32, K / 2, 64]). A bfloat16 result is summed in float32 scratch and rounded by the
// thread that made its columns, while they are still in its cache (on the tiles block by block; in strip
// order once the product is done).
torch::Tensor bf16_mm(const torch::Tensor& x, const torch::Tensor& w) {
  check_bf16_weight(w);
  const Layout layout = layout_of(w);
  const bool strips = layout != Layout::row_major;
  TORCH_CHECK_VALUE(x.dim() >= 1 && (w.dim() == 2 || (w.dim() == 4 && w.size(0) == 1 && rows_of(w) > 0)),
                    "x [..., K] and w [K, N], [1, N / 32, K, 32] (strip order) or [1, N / 32, K / 2, 64] "
                    "(tile order) expected; got w ", w.sizes());
  const int64_t K = strips ? rows_of(w) : w.size(0), N = columns_of(w);
  TORCH_CHECK_VALUE(x.size(-1) == K, "x [..., K] and w [K, N] do not match: K = ", x.size(-1), " and ", K);
  const int64_t M = x.numel() / K;
  const bool as_they_are = takes_rows_as_they_are(x, layout);
  const float* xp = as_they_are ? nullptr : float_rows(x, K, Scratch::gemm_rows);
  std::vector<int64_t> shape = x.sizes().vec();
  shape.back() = N;
  torch::Tensor out = torch::empty(shape, x.options());
  const bool bf16_out = x.scalar_type() == torch::kBFloat16;
  const int64_t off[2] = {0, M};
  if (bf16_out && layout == Layout::tiles) {  // rounded into out block by block: no float32 sums
    at::BFloat16* o = out.data_ptr<at::BFloat16>();
    grouped(xp, bf16_bits(w), layout, &o, N, off, 1, K, N, as_they_are ? copied_rows(x, K) : TileRows{});
    return out;
  }
  float* sp = bf16_out ? scratch(Scratch::gemm_sums, M * N) : out.data_ptr<float>();
  if (strips) {
    grouped(xp, bf16_bits(w), layout, &sp, N, off, 1, K, N, as_they_are ? copied_rows(x, K) : TileRows{});
    if (bf16_out) round_all(sp, out.data_ptr<at::BFloat16>(), M * N);
    return out;
  }
  const int64_t grain = std::max<int64_t>(1, GEMM_GRAIN / std::max<int64_t>(1, PANEL_COLUMNS * K * M));
  at::parallel_for(0, (N + PANEL_COLUMNS - 1) / PANEL_COLUMNS, grain, [&](int64_t b0, int64_t b1) {
    columns(xp, bf16_bits(w), sp, M, K, N, b0, b1);
    if (bf16_out) {
      const int64_t c0 = b0 * PANEL_COLUMNS, c1 = std::min(b1 * PANEL_COLUMNS, N);
      round_columns(sp, out.data_ptr<at::BFloat16>(), M, N, c0, c1);
    }
  });
  return out;
}

// (B, M, K, N) of x [B, M, K] @ w [B, K, N] or w in strip or tile order, checked.
std::array<int64_t, 4> bmm_shape(const torch::Tensor& x, const torch::Tensor& w) {
  check_bf16_weight(w);
  const bool strips = layout_of(w) != Layout::row_major;
  TORCH_CHECK_VALUE(x.dim() == 3 && (w.dim() == 3 || (w.dim() == 4 && rows_of(w) > 0)) &&
                        x.size(0) == w.size(0) && x.size(2) == (strips ? rows_of(w) : w.size(1)),
                    "x [B, M, K] and w [B, K, N], [B, N / 32, K, 32] (strip order) or [B, N / 32, K / 2, 64] "
                    "(tile order) do not match: ", x.sizes(), " and ", w.sizes());
  return {x.size(0), x.size(1), x.size(2), columns_of(w)};
}

// x [B, M, K] @ w -> out [B, M, N] (x's dtype, its last stride 1, other strides any): the weight-absorbed MLA
// products, one weight per head, w [B, K, N] or in strip (tile) order [B, N / 32, K, 32] ([B, N / 32, K / 2,
// 64]): the grouped product with the heads as experts. Rows go in and out at their strides (a head's rows of
// a [T, H, K] tensor), so MLA needs no transposed copies around the product; only a bfloat16 result off the
// tiles is summed in float32 scratch first.
void bf16_bmm_into(const torch::Tensor& x, const torch::Tensor& w, const torch::Tensor& out) {
  const auto [B, M, K, N] = bmm_shape(x, w);
  TORCH_CHECK_VALUE(out.sizes() == torch::IntArrayRef({B, M, N}) && out.scalar_type() == x.scalar_type() &&
                        out.stride(2) == 1,
                    "out must be [", B, ", ", M, ", ", N, "] of x's dtype with a last stride of 1");
  const Layout layout = layout_of(w);
  const bool as_they_are = takes_rows_as_they_are(x, layout);
  const float* xp = as_they_are ? nullptr : float_rows(x, K, Scratch::gemm_rows);
  const TileRows given = as_they_are ? copied_rows(x, K) : TileRows{};
  std::vector<int64_t> off(B + 1);
  for (int64_t b = 0; b <= B; ++b) off[b] = b * M;
  const auto heads = [&](auto* first) {  // each head's first row of out
    std::vector<decltype(first)> rows(B);
    for (int64_t b = 0; b < B; ++b) rows[b] = first + b * out.stride(0);
    return rows;
  };
  const uint16_t* wp = bf16_bits(w);
  if (x.scalar_type() == torch::kFloat32)
    return grouped(xp, wp, layout, heads(out.data_ptr<float>()).data(), out.stride(1), off.data(), B, K, N,
                   given);
  if (layout == Layout::tiles)
    return grouped(xp, wp, layout, heads(out.data_ptr<at::BFloat16>()).data(), out.stride(1), off.data(), B,
                   K, N, given);
  float* sp = scratch(Scratch::gemm_sums, B * M * N);
  grouped(xp, wp, layout, rows_by_offset(sp, off.data(), B, N).data(), N, off.data(), B, K, N, given);
  if (out.is_contiguous()) return round_all(sp, out.data_ptr<at::BFloat16>(), B * M * N);
  out.copy_(torch::from_blob(sp, {B, M, N}, torch::kFloat32));
}

torch::Tensor bf16_bmm(const torch::Tensor& x, const torch::Tensor& w) {
  const auto [B, M, K, N] = bmm_shape(x, w);
  torch::Tensor out = torch::empty({B, M, N}, x.options());
  bf16_bmm_into(x, w, out);
  return out;
}

// x @ w as common/model/linear.py's matmul multiplies the products it sends here: a bfloat16 weight through
// the kernel (a projection's [K, N] or in strip order [1, N / 32, K, 32], a weight per head [H, K, N] or in
// strip order [H, N / 32, K, 32]), a float32 one as torch's `x @ w`.
torch::Tensor linear_product(const torch::Tensor& x, const torch::Tensor& w) {
  if (w.scalar_type() != torch::kBFloat16) return at::matmul(x, w);
  return w.dim() == 3 || (w.dim() == 4 && w.size(0) > 1) ? bf16_bmm(x, w) : bf16_mm(x, w);
}
