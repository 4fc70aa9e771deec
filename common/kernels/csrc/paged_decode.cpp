// out [B, H, Dv] = one query per sequence and head attending over that sequence's paged MLA latents, on CPU.
// Why and when: common/kernels/cpu_attention.py.
//
// FlashAttention's online softmax with a page as the tile: for each page, the scores of every head against
// the page's tokens, one rescale of each head's running output, then the page's weighted values added in.
// Absorbed MLA is MQA-like (every head reads the same latent rows), so a page is widened from bfloat16 once
// for all heads, and both products are GEMMs with the heads as one dimension. A work item is (sequence,
// split of its context, group of heads); a thread runs whole items in a fixed order and a log-sum-exp
// combine merges a sequence's splits in split order, so the result does not depend on the thread count.
// Unless the caller fixes their number, the splits depend on the context's length alone, so neither does
// the result depend on the batch (another split sums in another order). The heads form more than one group
// only where there are fewer splits than threads (a lone sequence's short context would keep one core
// busy): a head's sums are the same in any group. On a CPU with AMX, bfloat16 latents whose widths are whole
// tiles take both products on the tiles instead, straight from the page, in groups of up to 16 heads
// (attend_tiles): mini's 64-sequence decode about 3x faster than on FMAs.

#include <ATen/Parallel.h>
#include <torch/extension.h>

#include <algorithm>
#include <cmath>
#include <limits>
#include <type_traits>
#include <vector>

#include "gemm_acc.h"
#include "gemm_amx.h"
#include "scratch.h"

namespace {

constexpr int64_t SPLIT_TOKENS = 512;  // context tokens per work item, when the caller does not choose
// Heads a group holds at least, a register of scores (8 on AVX2, 16 with AVX-512): each group widens the same
// pages and runs whole score vectors, which fewer heads do not repay (groups of 4 were slower on AVX2).
constexpr int64_t MIN_GROUP_HEADS = VECTOR_REGISTERS >= 32 ? 16 : 8;
constexpr float NEG_INF = -std::numeric_limits<float>::infinity();

struct Shape {
  int64_t heads, dim, value_dim, block_size, max_blocks, split_len;
  float scale;
};

// A row of scores, one per head: H rounded up to 8, the padding's queries zero. Rows of whole halves of a
// vector, which AVX2 reads and writes without masked moves (slow there); no one reads the padding's scores.
inline int64_t score_row(int64_t heads) { return (heads + 7) / 8 * 8; }

// attend's scratch of one thread: the scaled query transposed [D, Hp], a page widened to float32
// [block_size, D], its scores and then probabilities [block_size, Hp], each head's rescale factor [H].
struct FmaScratch {
  LineVector<float> q_t, rows, scores, correction;
  void fit(const Shape& s) {
    grow(q_t, s.dim * score_row(s.heads));
    grow(rows, std::max(s.block_size, s.heads) * s.dim);  // holds q too, before the first page
    grow(scores, s.block_size * score_row(s.heads));
    grow(correction, s.heads);
  }
};

// The partial softmax of H heads' queries q [H, D] over one sequence's tokens [begin, end): running max
// m [H], denominator l [H] and unnormalised output o [H, Dv]. Per page, two small GEMMs: scores [n, Hp] =
// rows [n, D] @ q^T [D, Hp], and o [H, Dv] += p [H, n] @ rows [n, :Dv]; the softmax in between runs over 16
// heads at a time.
template <typename T>
void attend(const T* q, int64_t H, const T* pages, const int32_t* table, int64_t begin, int64_t end,
            const Shape& s, FmaScratch& w, float* m, float* l, float* o) {
  const int64_t D = s.dim, Dv = s.value_dim, bs = s.block_size, Hp = score_row(H);
  widen(q, w.rows.data(), H * D);
  std::fill(w.q_t.begin(), w.q_t.begin() + D * Hp, 0.0f);
  for (int64_t h = 0; h < H; ++h)
    for (int64_t d = 0; d < D; ++d) w.q_t[d * Hp + h] = w.rows[h * D + d] * s.scale;
  std::fill(m, m + H, NEG_INF);
  std::fill(l, l + H, 0.0f);
  std::fill(o, o + H * Dv, 0.0f);
  for (int64_t t0 = begin; t0 < end; t0 += bs) {
    const int64_t n = std::min(bs, end - t0);
    const T* page = pages + static_cast<int64_t>(table[t0 / bs]) * bs * D;
    const float* rows;
    if constexpr (std::is_same_v<T, float>) {
      rows = page;
    } else {
      widen(page, w.rows.data(), n * D);
      rows = w.rows.data();
    }
    float* scores = w.scores.data();
    std::fill(scores, scores + n * Hp, 0.0f);
    gemm_acc(rows, D, 1, w.q_t.data(), Hp, scores, Hp, n, D, 0, Hp);
    for (int64_t c = 0; c < H; c += 16) {  // online softmax, 16 heads at a time
      const mask16 mask = tail_mask(c, H), row = tail_mask(c, Hp);
      const f32x16 old = load(m + c, mask);
      f32x16 top = old;
      for (int64_t t = 0; t < n; ++t) top = maximum(top, load(scores + t * Hp + c, row));
      f32x16 sum = zeros();
      for (int64_t t = 0; t < n; ++t) {
        const f32x16 p = exp16(sub(load(scores + t * Hp + c, row), top));
        store(scores + t * Hp + c, p, row);
        sum = add(sum, p);
      }
      const f32x16 correction = exp16(sub(old, top));  // about 0 on the first page (m = -inf)
      store(l + c, fmadd(load(l + c, mask), correction, sum), mask);
      store(m + c, top, mask);
      store(w.correction.data() + c, correction, mask);
    }
    for (int64_t h = 0; h < H; ++h)
      for (int64_t d = 0; d < Dv; ++d) o[h * Dv + d] *= w.correction[h];
    gemm_acc(scores, 1, Hp, rows, D, o, Dv, H, n, 0, Dv);
  }
}

#if defined(__AMX_TILE__) && defined(__AMX_BF16__)

constexpr int64_t TILE_HEADS = 16;  // heads an item holds on the tiles: a C tile's columns, then its rows

// What a thread keeps for attend_tiles: the query's pairs of dimensions interleaved for 16 heads, the B of
// the scores' product [D / 2, 16, 2]; a page's scores [block_size, 16]; the page's probabilities, per 32
// tokens the A of the output's product [16, 32]; the page's latents with pairs of tokens interleaved, its B
// [block_size / 2, Dv, 2]; the page's product p @ v [16, Dv]; the running output of 16 heads [16, Dv].
struct TileScratch {
  LineVector<uint16_t> q_pairs, p, v_pairs;
  LineVector<float> scores, pv, o;
  void fit(const Shape& s) {
    grow(q_pairs, s.dim * TILE_HEADS);
    grow(p, s.block_size * TILE_HEADS);
    grow(v_pairs, s.block_size * s.value_dim);
    grow(scores, s.block_size * TILE_HEADS);
    grow(pv, TILE_HEADS * s.value_dim);
    grow(o, TILE_HEADS * s.value_dim);
  }
};

// Whether attend_tiles takes a problem of this shape: bfloat16 on AMX, dimensions in whole tiles.
bool on_tiles(const Shape& s, bool bf16) {
  return bf16 && amx_ready() && s.dim % TILE_K == 0 && s.value_dim % 64 == 0 && s.block_size % TILE_K == 0;
}

// attend on AMX's tiles for bfloat16, up to 16 heads: per page, scores [n, 16] = page [n, D] @ q^T on the
// tiles straight from the page (16 tokens a tile), the online softmax in float32 as attend's, then
// p @ page [n, :Dv] with p rounded to bfloat16 (as torch's bfloat16 attention rounds its probabilities before
// the value product) and the page's pairs of tokens interleaved, summed on the tiles over the whole page and
// added once into the rescaled running output. Both the query's and p's pairs are 16 x 16 transposes of
// 32-bit pairs. A head's sums do not depend on the other heads of its group, so the bits do not depend on the
// grouping either.
void attend_tiles(const at::BFloat16* q, int64_t H, const at::BFloat16* pages, const int32_t* table,
                  int64_t begin, int64_t end, const Shape& s, TileScratch& w, float* m, float* l, float* o) {
  const int64_t D = s.dim, Dv = s.value_dim, bs = s.block_size;
  const mask16 heads = first_lanes(H);
  for (int64_t k = 0; k < D / 2; k += 16) {  // q_pairs[k][h] = q's 32-bit pair k of head h
    __m512i rows[16];
    for (int64_t h = 0; h < 16; ++h)
      rows[h] = h < H ? _mm512_loadu_si512(reinterpret_cast<const uint32_t*>(q + h * D) + k)
                      : _mm512_setzero_si512();
    transpose16(rows);
    for (int64_t j = 0; j < 16; ++j)
      _mm512_storeu_si512(w.q_pairs.data() + (k + j) * 2 * TILE_HEADS, rows[j]);
  }
  std::fill(m, m + H, NEG_INF);
  std::fill(l, l + H, 0.0f);
  std::fill_n(w.o.begin(), TILE_HEADS * Dv, 0.0f);
  float* scores = w.scores.data();
  for (int64_t t0 = begin; t0 < end; t0 += bs) {
    const int64_t n = std::min(bs, end - t0), blocks = (n + TILE_K - 1) / TILE_K;
    const uint16_t* page =
        reinterpret_cast<const uint16_t*>(pages) + static_cast<int64_t>(table[t0 / bs]) * bs * D;
    for (int64_t t = 0; t < n; t += 16) {  // rows past n are the page's own, multiplied and never read
      _tile_zero(0);
      for (int64_t k = 0; k < D; k += TILE_K) {
        _tile_loadd(4, page + t * D + k, D * 2);
        _tile_loadd(6, w.q_pairs.data() + k * TILE_HEADS, 64);
        _tile_dpbf16ps(0, 4, 6);
      }
      _tile_stored(0, scores + t * TILE_HEADS, 64);
    }
    const f32x16 old = load(m, heads), scale = splat(s.scale);
    f32x16 top = old;
    for (int64_t t = 0; t < n; ++t) {
      const f32x16 v = mul(load(scores + t * TILE_HEADS), scale);
      store(scores + t * TILE_HEADS, v);
      top = maximum(top, v);
    }
    f32x16 sum = zeros();
    for (int64_t t = 0; t < n; ++t) {
      const f32x16 p = exp16(sub(load(scores + t * TILE_HEADS), top));
      store(scores + t * TILE_HEADS, p);
      sum = add(sum, p);
    }
    const f32x16 correction = exp16(sub(old, top));  // about 0 on the first page (m = -inf)
    store(l, fmadd(load(l, heads), correction, sum), heads);
    store(m, top, heads);
    for (int64_t b = 0; b < blocks; ++b) {  // p of 32 tokens: [16 token pairs, 16 heads] transposed
      __m512i pairs[16];
      const auto bits = [&](int64_t t) {  // tokens past n count as zeros
        return t < n ? bf16_rounded_bits(load(scores + t * TILE_HEADS)) : _mm512_setzero_si512();
      };
      for (int64_t j = 0; j < 16; ++j) {
        const int64_t t = b * TILE_K + 2 * j;
        pairs[j] = _mm512_or_si512(bits(t), _mm512_slli_epi32(bits(t + 1), 16));
      }
      transpose16(pairs);
      for (int64_t h = 0; h < 16; ++h)
        _mm512_storeu_si512(w.p.data() + (b * TILE_HEADS + h) * TILE_K, pairs[h]);
    }
    for (int64_t j = 0; j < blocks * TILE_K; j += 2) {  // tokens j and j + 1 interleaved
      const uint16_t* a = page + j * D;
      interleave_rows(j < n ? a : nullptr, j + 1 < n ? a + D : nullptr, Dv, w.v_pairs.data() + j * Dv);
    }
    const int64_t ld = Dv * 4;  // bytes between rows of pv and of v_pairs
    for (int64_t c = 0; c < Dv; c += 64)  // pv 64 columns at a time, over the page's blocks
      probabilities_times_values(w.p.data(), TILE_HEADS * TILE_K, w.v_pairs.data() + 2 * c, TILE_K * Dv, ld,
                                 blocks, w.pv.data() + c);
    alignas(64) float factor[16];
    store(factor, correction);
    for (int64_t h = 0; h < H; ++h) {  // o = o * correction + p @ v
      const f32x16 f = splat(factor[h]);
      float* oh = w.o.data() + h * Dv;
      const float* pvh = w.pv.data() + h * Dv;
      for (int64_t d = 0; d < Dv; d += 16) store(oh + d, fmadd(load(oh + d), f, load(pvh + d)));
    }
  }
  std::copy_n(w.o.data(), H * Dv, o);
}

#else

constexpr int64_t TILE_HEADS = 16;
struct TileScratch {
  void fit(const Shape&) {}
};
bool on_tiles(const Shape&, bool) { return false; }
void attend_tiles(const at::BFloat16*, int64_t, const at::BFloat16*, const int32_t*, int64_t, int64_t,
                  const Shape&, TileScratch&, float*, float*, float*) {}

#endif

template <typename T>
void decode(const torch::Tensor& q, const torch::Tensor& pages, const int32_t* tables, const int32_t* lens,
            const Shape& s, torch::Tensor& out) {
  const int64_t B = q.size(0), H = s.heads, D = s.dim, Dv = s.value_dim;
  std::vector<int64_t> first(B + 1, 0);  // work items of sequence b: first[b] .. first[b + 1]
  for (int64_t b = 0; b < B; ++b) first[b + 1] = first[b] + (lens[b] + s.split_len - 1) / s.split_len;
  const int64_t splits = first[B];
  // Groups of heads: one, or as many as give each thread an item, of MIN_GROUP_HEADS at least and whole
  // vectors of 16 past 16.
  const int64_t wanted = std::clamp<int64_t>(at::get_num_threads() / std::max<int64_t>(1, splits), 1, H);
  int64_t per_group = std::max(MIN_GROUP_HEADS, (H + wanted - 1) / wanted);
  if (per_group > 16) per_group = (per_group + 15) / 16 * 16;
  const bool tiles = on_tiles(s, std::is_same_v<T, at::BFloat16>);
  if (tiles) per_group = std::min(per_group, TILE_HEADS);
  const int64_t groups = (H + per_group - 1) / per_group;
  // each item's partial softmax: running max m, denominator l [splits, H], output o [splits, H, Dv]
  float* m = scratch(Scratch::decode_partials, splits * H * (Dv + 2));
  float* l = m + splits * H;
  float* o = l + splits * H;
  std::vector<int64_t> owner(splits);
  for (int64_t b = 0; b < B; ++b) std::fill(owner.begin() + first[b], owner.begin() + first[b + 1], b);
  const T* qp = q.data_ptr<T>();
  const T* pp = pages.data_ptr<T>();
  at::parallel_for(0, splits * groups, 1, [&](int64_t j0, int64_t j1) {
    FmaScratch& w = kept<FmaScratch>();  // the scratch of the path the items take
    TileScratch& on = kept<TileScratch>();
    if (tiles) {
      on.fit(s);
      configure_tiles();
    } else {
      w.fit(s);
    }
    for (int64_t j = j0; j < j1; ++j) {
      const int64_t i = j / groups, h0 = j % groups * per_group, heads = std::min(per_group, H - h0);
      const int64_t b = owner[i], begin = (i - first[b]) * s.split_len;
      const int64_t end = std::min<int64_t>(lens[b], begin + s.split_len);
      const int64_t row = i * H + h0;  // the item's first head among m, l and o's rows
      if constexpr (std::is_same_v<T, at::BFloat16>)
        if (tiles) {
          attend_tiles(qp + (b * H + h0) * D, heads, pp, tables + b * s.max_blocks, begin, end, s, on,
                       m + row, l + row, o + row * Dv);
          continue;
        }
      attend(qp + (b * H + h0) * D, heads, pp, tables + b * s.max_blocks, begin, end, s, w, m + row, l + row,
             o + row * Dv);
    }
    if (tiles) release_tiles();
  });
  T* op = out.data_ptr<T>();
  at::parallel_for(0, B, 1, [&](int64_t b0, int64_t b1) {
    float* acc = scratch(Scratch::row, Dv);
    for (int64_t b = b0; b < b1; ++b)
      for (int64_t h = 0; h < H; ++h) {
        float top = NEG_INF, den = 0.0f;
        for (int64_t i = first[b]; i < first[b + 1]; ++i) top = std::max(top, m[i * H + h]);
        std::fill_n(acc, Dv, 0.0f);
        for (int64_t i = first[b]; i < first[b + 1]; ++i) {
          const float weight = std::exp(m[i * H + h] - top);
          den += l[i * H + h] * weight;
          const float* oi = o + (i * H + h) * Dv;
          for (int64_t d = 0; d < Dv; ++d) acc[d] += oi[d] * weight;
        }
        for (int64_t d = 0; d < Dv; ++d) op[(b * H + h) * Dv + d] = static_cast<T>(acc[d] / den);
      }
  });
}

}  // namespace

torch::Tensor paged_latent_decode(const torch::Tensor& q, const torch::Tensor& pages,
                                  const torch::Tensor& block_tables, const torch::Tensor& context_lens,
                                  double scale, int64_t value_dim, int64_t num_splits) {
  TORCH_CHECK_VALUE(q.dim() == 3 && pages.dim() == 3 && q.size(2) == pages.size(2),
                    "q [B, H, D] and pages [blocks, block_size, D] expected, got ", q.sizes(), " and ",
                    pages.sizes());
  TORCH_CHECK_VALUE(q.scalar_type() == pages.scalar_type() &&
                        (q.scalar_type() == torch::kFloat32 || q.scalar_type() == torch::kBFloat16),
                    "q and pages must both be float32 or both bfloat16");
  TORCH_CHECK_VALUE(block_tables.scalar_type() == torch::kInt32 &&
                        context_lens.scalar_type() == torch::kInt32,
                    "block_tables and context_lens must be int32");
  TORCH_CHECK_VALUE(q.is_contiguous() && pages.is_contiguous() && block_tables.is_contiguous() &&
                        context_lens.is_contiguous(),
                    "q, pages, block_tables and context_lens must be contiguous");
  const int64_t B = q.size(0), num_blocks = pages.size(0), bs = pages.size(1);
  TORCH_CHECK_VALUE(block_tables.dim() == 2 && block_tables.size(0) == B && context_lens.dim() == 1 &&
                        context_lens.size(0) == B,
                    "block_tables [B, max_blocks] and context_lens [B] expected for B=", B);
  TORCH_CHECK_VALUE(0 < value_dim && value_dim <= q.size(2), "value_dim ", value_dim, " must be in 1..",
                    q.size(2));
  const int64_t max_blocks = block_tables.size(1);
  const int32_t* lens = context_lens.data_ptr<int32_t>();
  const int32_t* tables = block_tables.data_ptr<int32_t>();
  int64_t longest = 0;
  for (int64_t b = 0; b < B; ++b) {
    TORCH_CHECK_VALUE(1 <= lens[b] && lens[b] <= max_blocks * bs, "context_lens must be in 1..",
                      max_blocks * bs);
    for (int64_t j = 0; j < (lens[b] + bs - 1) / bs; ++j)
      TORCH_CHECK_VALUE(0 <= tables[b * max_blocks + j] && tables[b * max_blocks + j] < num_blocks,
                        "block_tables hold a block id outside 0..", num_blocks - 1);
    longest = std::max<int64_t>(longest, lens[b]);
  }
  const int64_t split_blocks =
      num_splits > 0 ? std::max<int64_t>(1, (longest + num_splits * bs - 1) / (num_splits * bs))
                     : std::max<int64_t>(1, SPLIT_TOKENS / bs);
  const Shape s{q.size(1), q.size(2), value_dim, bs, max_blocks, split_blocks * bs,
                static_cast<float>(scale)};
  auto out = q.new_empty({B, q.size(1), value_dim});
  if (q.scalar_type() == torch::kFloat32)
    decode<float>(q, pages, tables, lens, s, out);
  else
    decode<at::BFloat16>(q, pages, tables, lens, s, out);
  return out;
}
