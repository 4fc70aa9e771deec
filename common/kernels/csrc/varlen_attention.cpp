// out [Tq, H, Dv] = attention over packed variable-length sequences (prefill chunks), causal with the queries
// at the end of their context or full, on CPU. Why and when: common/kernels/cpu_attention.py.
//
// FlashAttention's schedule: a work item is (sequence, head, tile of up to 64 queries); it walks its keys 64
// at a time with the online softmax, so no score tile is larger than 64 x 64. Both products run in
// gemm_packed.h's register tiles: the scores transposed, s^T [keys, queries] = k [keys, D] @ q^T [D, 64],
// where q^T (scaled, built once per item) is the panel, and out [queries, Dv] += p [queries, keys] @
// v [keys, Dv], p read out of s^T by strides and v widened into 64-column panels. In between, the softmax
// runs down the keys for 16 queries at a time. Threads take items as they finish, a sequence's head at a
// time, the costliest first. Where every head reads the same keys and values (absorbed MLA), the heads are
// folded into the query rows (Shape::group). On a CPU with AMX, bfloat16 whose widths are whole tiles takes
// both products on the tiles instead, in the same transposed layout, items of 256 query rows and 64 keys a
// step (attend_tiles).

#include <ATen/Parallel.h>
#include <torch/extension.h>

#include <algorithm>
#include <atomic>
#include <limits>
#include <type_traits>
#include <vector>

#include "gemm_amx.h"
#include "gemm_packed.h"
#include "scratch.h"

namespace {

constexpr int64_t TILE = PANEL_COLUMNS;  // queries per item and keys per step on FMAs: a panel's width
// Queries per item on the tiles: a step's keys and values, read and interleaved once, serve 16 blocks of
// queries (4x512 and 1x2048 prompts, 8 heads: 7-15% faster than items of 64 or 128).
constexpr int64_t TILES_ITEM = 256;
constexpr float NEG_INF = -std::numeric_limits<float>::infinity();

template <typename T>
struct Operand {  // q, k or v: rows [tokens, heads, dim], the last dimension contiguous
  const T* data;
  int64_t token, head;  // strides, in elements
  int64_t tokens;        // rows: a tile must not read past the last
  const T* row(int64_t t, int64_t h) const { return data + t * token + h * head; }
};

struct Shape {
  int64_t heads, dk, dv;
  float scale;
  bool causal;
  // Query rows a position: 1, or where every head reads the same keys and values (MQA, as absorbed MLA's
  // prefill gives them) the heads, folded into the rows so a step's keys and values serve all of them.
  int64_t group = 1;
};

// One thread's scratch: q^T [Dk, 64], widened keys [64, Dk], s^T and then p^T [64 keys, 64 queries],
// a value panel [64 keys, 64], the running output [64, Dv], max, denominator and rescale factor [64]. The
// panels are read by aligned loads: each part starts on a cache line.
struct FmaScratch {
  LineVector<float> buffer;
  float *q_t, *keys, *s_t, *v_panel, *o, *m, *l, *alpha;
  void fit(const Shape& s) {
    grow(buffer, (2 * s.dk + s.dv + 2 * TILE + 3) * TILE + 8 * 16);
    float* next = buffer.data();
    auto take = [&](int64_t n) {  // n floats, starting on a cache line
      float* part = next;
      next += (n + 15) / 16 * 16;
      return part;
    };
    q_t = take(s.dk * TILE), keys = take(TILE * s.dk), s_t = take(TILE * TILE), v_panel = take(TILE * TILE);
    o = take(TILE * s.dv), m = take(TILE), l = take(TILE), alpha = take(TILE);
  }
};

struct Item {
  int64_t q0, k0, q_len, k_len, head;  // the sequence's query rows and keys, the head
  int64_t group;                       // query rows a position (Shape::group)
  int64_t first, width;                // the item's first query row, its most rows
  int64_t cost;                        // query-key pairs it scores
  int64_t head_cost;                   // the pairs of every item of its sequence and head

  int64_t queries() const { return std::min(width, q_len - first); }
  int64_t shift() const { return k_len - q_len / group; }  // causal: position i sees keys 0 .. shift + i
  int64_t keys(bool causal) const {  // the keys its last row sees
    return causal ? std::min(k_len, shift() + (first + queries() - 1) / group + 1) : k_len;
  }
};

// Queries first..first+tq of one sequence and head, over keys 0..k_end of its context.
template <typename T>
void attend(const Operand<T>& q, const Operand<T>& k, const Operand<T>& v, T* out, const Item& it,
            const Shape& s, FmaScratch& w) {
  const int64_t H = s.heads, Dk = s.dk, Dv = s.dv, h = it.head;
  const int64_t tq = it.queries(), shift = it.shift(), k_end = it.keys(s.causal);
  std::fill(w.q_t, w.q_t + Dk * TILE, 0.0f);
  for (int64_t i = 0; i < tq; ++i) {
    const T* row = q.row(it.q0 + it.first + i, h);
    for (int64_t d = 0; d < Dk; ++d) w.q_t[d * TILE + i] = static_cast<float>(row[d]) * s.scale;
  }
  std::fill(w.m, w.m + TILE, NEG_INF);
  std::fill(w.l, w.l + TILE, 0.0f);
  std::fill(w.o, w.o + tq * Dv, 0.0f);
  mask16 all[TILE / 16];
  std::fill(all, all + TILE / 16, first_lanes(16));

  for (int64_t ks = 0; ks < k_end; ks += TILE) {
    const int64_t n = std::min(TILE, k_end - ks);
    const float* keys;
    int64_t ldk;
    if constexpr (std::is_same_v<T, float>) {
      keys = k.row(it.k0 + ks, h);
      ldk = k.token;
    } else {
      for (int64_t j = 0; j < n; ++j) widen(k.row(it.k0 + ks + j, h), w.keys + j * Dk, Dk);
      keys = w.keys;
      ldk = Dk;
    }
    float* s_t = w.s_t;
    panel_product(keys, ldk, 1, w.q_t, Dk, s_t, TILE, n, all, true);

    for (int64_t c = 0; c < tq; c += 16) {  // online softmax down the keys, 16 queries at a time
      // Key ks + j is visible to the queries (lanes) at positions from it on.
      auto visible = [&](int64_t j) {
        return lanes_from(s.causal ? (ks + j - shift) * s.group - (it.first + c) : 0);
      };
      const f32x16 old = load(w.m + c);
      f32x16 top = old;
      for (int64_t j = 0; j < n; ++j) top = where(visible(j), maximum(top, load(s_t + j * TILE + c)), top);
      f32x16 sum = zeros();
      for (int64_t j = 0; j < n; ++j) {
        const f32x16 p = where(visible(j), exp16(sub(load(s_t + j * TILE + c), top)), zeros());
        store(s_t + j * TILE + c, p);
        sum = add(sum, p);
      }
      // Key 0 is visible to every query, so top is finite from the first step on; exp(-inf - top) there
      // is about 0 (exp16's floor) and multiplies the zeros of l and o.
      const f32x16 alpha = exp16(sub(old, top));
      store(w.l + c, fmadd(load(w.l + c), alpha, sum));
      store(w.m + c, top);
      store(w.alpha + c, alpha);
    }
    for (int64_t i = 0; i < tq; ++i)
      for (int64_t d = 0; d < Dv; ++d) w.o[i * Dv + d] *= w.alpha[i];

    for (int64_t c0 = 0; c0 < Dv; c0 += TILE) {  // o [tq, Dv] += p [tq, n] @ v [n, Dv], a panel at a time
      const int64_t width = std::min(TILE, Dv - c0);
      mask16 mask[TILE / 16];
      for (int64_t c = 0; c < TILE; c += 16) mask[c / 16] = tail_mask(c, width);
      for (int64_t j = 0; j < n; ++j) {
        float* panel_row = w.v_panel + j * TILE;
        std::fill(panel_row + width, panel_row + TILE, 0.0f);
        widen(v.row(it.k0 + ks + j, h) + c0, panel_row, width);
      }
      panel_product(s_t, 1, TILE, w.v_panel, n, w.o + c0, Dv, tq, mask, false);
    }
  }
  for (int64_t i = 0; i < tq; ++i) {
    T* row = out + ((it.q0 + it.first + i) * H + h) * Dv;
    const float inv = 1.0f / w.l[i];
    for (int64_t d = 0; d < Dv; ++d) row[d] = static_cast<T>(w.o[i * Dv + d] * inv);
  }
}

#if defined(__AMX_TILE__) && defined(__AMX_BF16__)

constexpr int64_t KEYS = 64;     // keys a step on the tiles: four C tiles of scores, two blocks of p
constexpr int64_t QUERIES = 16;  // queries a block: the scores' columns (a vector's lanes), then p's rows

// Whether attend_tiles takes a problem of this shape: bfloat16 on AMX, dimensions in whole tiles.
bool on_tiles(const Shape& s, bool bf16) {
  return bf16 && amx_ready() && s.dk % TILE_K == 0 && s.dv % 64 == 0;
}

// What a thread keeps for attend_tiles: an item's queries with pairs of dimensions transposed, per block of
// 16 the B of the scores' product [Dk / 2, 16, 2]; a step's keys, copied only at the end of k (a tile reads
// 16 rows); its values with pairs of keys interleaved, the B of the output's product [32, Dv, 2]; a block's
// scores, transposed [64 keys, 16 queries]; its probabilities in bfloat16, the A [2, 16, 32]; their product
// with the values [16, Dv]; the item's running output [256, Dv], max and denominator [256].
struct TileScratch {
  LineVector<uint16_t> q_pairs, keys, v_pairs, p;
  LineVector<float> scores, pv, o, m, l;
  void fit(const Shape& s) {
    grow(q_pairs, TILES_ITEM * s.dk);
    grow(keys, KEYS * s.dk);
    grow(v_pairs, KEYS * s.dv);
    grow(p, QUERIES * KEYS);
    grow(scores, KEYS * QUERIES);
    grow(pv, QUERIES * s.dv);
    grow(o, TILES_ITEM * s.dv);
    grow(m, TILES_ITEM);
    grow(l, TILES_ITEM);
  }
};

// attend on AMX's tiles for bfloat16, the paged decode's layout: the scores transposed, s^T [keys, 16
// queries] = k @ q^T on the tiles with the keys' rows straight from k as the A (the item's queries' pairs
// transposed once), so the online softmax runs down the keys with the queries in the lanes (no horizontal
// reduction, no scalar exp); then p @ v with p rounded to bfloat16 (as the paged decode rounds it), its pairs
// of keys transposed to the queries' rows (16 x 16 transposes of 32-bit pairs), the values' pairs of keys
// interleaved once a step for the item's blocks, added into the rescaled running output.
template <typename T>
void attend_tiles(const Operand<T>& q, const Operand<T>& k, const Operand<T>& v, T* out, const Item& it,
                  const Shape& s, TileScratch& w) {
  const int64_t H = s.heads, Dk = s.dk, Dv = s.dv, h = it.head;
  const int64_t tq = it.queries(), shift = it.shift(), k_end = it.keys(s.causal);
  const int64_t blocks = (tq + QUERIES - 1) / QUERIES;
  const auto bits = [](const T* row) { return reinterpret_cast<const uint16_t*>(row); };
  for (int64_t b = 0; b < blocks; ++b)  // q_pairs[b][pair][query]: the queries past tq zeros
    for (int64_t c = 0; c < Dk / 2; c += 16) {
      __m512i rows[16];
      for (int64_t i = 0; i < QUERIES; ++i) {
        const int64_t query = b * QUERIES + i;
        rows[i] = query < tq ? _mm512_loadu_si512(bits(q.row(it.q0 + it.first + query, h)) + 2 * c)
                             : _mm512_setzero_si512();
      }
      transpose16(rows);
      for (int64_t j = 0; j < 16; ++j)
        _mm512_storeu_si512(w.q_pairs.data() + (b * Dk / 2 + c + j) * 2 * QUERIES, rows[j]);
    }
  std::fill_n(w.m.begin(), TILES_ITEM, NEG_INF);
  std::fill_n(w.l.begin(), TILES_ITEM, 0.0f);
  std::fill(w.o.begin(), w.o.begin() + tq * Dv, 0.0f);
  const f32x16 scale = splat(s.scale), none = splat(NEG_INF);
  float* scores = w.scores.data();
  for (int64_t ks = 0; ks < k_end; ks += KEYS) {
    const int64_t n = std::min(KEYS, k_end - ks);
    const uint16_t* keys = bits(k.row(it.k0 + ks, h));
    int64_t ld = k.token * 2;  // bytes between keys
    if (it.k0 + ks + (n + 15) / 16 * 16 > k.tokens) {  // a tile would read past k's last row
      for (int64_t j = 0; j < n; ++j) std::copy_n(bits(k.row(it.k0 + ks + j, h)), Dk, w.keys.data() + j * Dk);
      keys = w.keys.data();
      ld = Dk * 2;
    }
    for (int64_t j = 0; j < (n + 31) / 32 * 32; j += 2) {  // keys j and j + 1 interleaved, zeros past n
      const uint16_t* x = j < n ? bits(v.row(it.k0 + ks + j, h)) : nullptr;
      const uint16_t* y = j + 1 < n ? bits(v.row(it.k0 + ks + j + 1, h)) : nullptr;
      interleave_rows(x, y, Dv, w.v_pairs.data() + j * Dv);
    }
    for (int64_t b = 0; b < blocks; ++b) {
      const int64_t rows = std::min(QUERIES, tq - b * QUERIES), first = it.first + b * QUERIES, g = s.group;
      // Key ks + j is visible to the block's query rows (lanes) from lane (ks + j - shift) g - first on; none
      // of them sees the keys from ks + seen on.
      const int64_t seen = s.causal ? std::min(n, shift + (first + rows - 1) / g + 1 - ks) : n;
      if (seen <= 0) continue;
      const int64_t tiles = (seen + 15) / 16;
      _tile_zero(0);
      _tile_zero(1);
      _tile_zero(2);
      _tile_zero(3);
      for (int64_t d = 0; d < Dk; d += TILE_K) {
        _tile_loadd(6, w.q_pairs.data() + (b * Dk + d) * QUERIES, 2 * QUERIES * 2);
        const uint16_t* a = keys + d;  // C tile t: keys 16 t .. 16 t + 15 (the A tiles 4 and 5 in turn)
        const int64_t next = 8 * ld;   // 16 keys on, in elements
        _tile_loadd(4, a, ld);
        _tile_dpbf16ps(0, 4, 6);
        if (tiles > 1) {
          _tile_loadd(5, a + next, ld);
          _tile_dpbf16ps(1, 5, 6);
        }
        if (tiles > 2) {
          _tile_loadd(4, a + 2 * next, ld);
          _tile_dpbf16ps(2, 4, 6);
        }
        if (tiles > 3) {
          _tile_loadd(5, a + 3 * next, ld);
          _tile_dpbf16ps(3, 5, 6);
        }
      }
      _tile_stored(0, scores, QUERIES * 4);
      if (tiles > 1) _tile_stored(1, scores + 16 * QUERIES, QUERIES * 4);
      if (tiles > 2) _tile_stored(2, scores + 32 * QUERIES, QUERIES * 4);
      if (tiles > 3) _tile_stored(3, scores + 48 * QUERIES, QUERIES * 4);

      // Only a step across the diagonal hides some of its first `seen` keys from some of the queries.
      const bool diagonal = s.causal && ks + seen - 1 > shift + first / g;
      const auto visible = [&](int64_t j) { return lanes_from((ks + j - shift) * g - first); };
      f32x16 raw = none;  // the step's largest score, before the scale (which is positive)
      for (int64_t j = 0; j < seen; ++j) {
        const f32x16 x = load(scores + j * QUERIES);
        raw = maximum(raw, diagonal ? where(visible(j), x, none) : x);
      }
      // Key 0 is visible to every query, so top is finite from the first step on.
      const f32x16 old = load(w.m.data() + b * QUERIES), top = maximum(old, mul(raw, scale));
      const f32x16 minus_top = sub(zeros(), top);
      const auto probability = [&](int64_t j) {  // exp(score * scale - top); 0 for keys not seen
        if (j >= seen) return zeros();
        const f32x16 p = exp16(fmadd(load(scores + j * QUERIES), scale, minus_top));
        return diagonal ? where(visible(j), p, zeros()) : p;
      };
      f32x16 sum = zeros();
      const int64_t halves = (seen + 31) / 32;
      for (int64_t half = 0; half < halves; ++half) {  // p of 32 keys, rounded: [16 key pairs, 16 queries]
        __m512i pairs[16];                             // transposed to [16 queries, 32 keys], the A of p @ v
        for (int64_t i = 0; i < 16; ++i) {
          const int64_t j = half * 32 + 2 * i;
          const f32x16 even = probability(j), odd = probability(j + 1);
          sum = add(add(sum, even), odd);
          pairs[i] = _mm512_or_si512(bf16_rounded_bits(even), _mm512_slli_epi32(bf16_rounded_bits(odd), 16));
        }
        transpose16(pairs);
        for (int64_t r = 0; r < QUERIES; ++r)
          _mm512_storeu_si512(w.p.data() + (half * QUERIES + r) * 32, pairs[r]);
      }
      const f32x16 correction = exp16(sub(old, top));  // about 0 on the first step (m = -inf), l and o 0
      float* l = w.l.data() + b * QUERIES;
      store(l, fmadd(load(l), correction, sum));
      store(w.m.data() + b * QUERIES, top);
      for (int64_t c = 0; c < Dv; c += 64)  // pv 64 columns at a time; Dv * 4 bytes between rows
        probabilities_times_values(w.p.data(), QUERIES * 32, w.v_pairs.data() + 2 * c, 32 * Dv, Dv * 4,
                                   halves, w.pv.data() + c);
      alignas(64) float factor[QUERIES];
      store(factor, correction);
      for (int64_t r = 0; r < rows; ++r) {  // o = o * correction + p @ v
        const f32x16 f = splat(factor[r]);
        float* o = w.o.data() + (b * QUERIES + r) * Dv;
        const float* pv = w.pv.data() + r * Dv;
        for (int64_t d = 0; d < Dv; d += 16) store(o + d, fmadd(load(o + d), f, load(pv + d)));
      }
    }
  }
  for (int64_t i = 0; i < tq; ++i) {
    T* row = out + ((it.q0 + it.first + i) * H + h) * Dv;
    const f32x16 inv = splat(1.0f / w.l[i]);
    for (int64_t d = 0; d < Dv; d += 16)
      store16(row + d, mul(load(w.o.data() + i * Dv + d), inv), first_lanes(16));
  }
}

#else

struct TileScratch {
  void fit(const Shape&) {}
};
bool on_tiles(const Shape&, bool) { return false; }
template <typename T>
void attend_tiles(const Operand<T>&, const Operand<T>&, const Operand<T>&, T*, const Item&, const Shape&,
                  TileScratch&) {}

#endif

template <typename T>
Operand<T> operand(const torch::Tensor& x, int64_t group) {  // heads folded into the tokens' rows, group > 1
  if (group > 1) return {x.data_ptr<T>(), x.stride(1), 0, x.size(0) * group};
  return {x.data_ptr<T>(), x.stride(0), x.stride(1), x.size(0)};
}

template <typename T>
void run(const torch::Tensor& q, const torch::Tensor& k, const torch::Tensor& v, torch::Tensor& out,
         std::vector<Item>& items, const Shape& s, bool tiles) {  // tiles: on_tiles for these q, k, v
  // A sequence's head at a time, its keys and values then read from a core's cache by all its query tiles
  // (the costliest head first, its costliest tile first).
  std::stable_sort(items.begin(), items.end(), [](const Item& a, const Item& b) {
    return a.head_cost != b.head_cost ? a.head_cost > b.head_cost : a.cost > b.cost;
  });
  const Operand<T> qo = operand<T>(q, s.group), ko = operand<T>(k, 1), vo = operand<T>(v, 1);
  T* op = out.data_ptr<T>();
  std::atomic<size_t> next{0};
  const int64_t threads = std::min<int64_t>(at::get_num_threads(), items.size());
  at::parallel_for(0, threads, 1, [&](int64_t, int64_t) {
    if (tiles) {
      TileScratch& w = kept<TileScratch>();
      w.fit(s);
      configure_tiles();
      for (size_t i; (i = next++) < items.size();) attend_tiles(qo, ko, vo, op, items[i], s, w);
      release_tiles();
      return;
    }
    FmaScratch& w = kept<FmaScratch>();
    w.fit(s);
    for (size_t i; (i = next++) < items.size();) attend(qo, ko, vo, op, items[i], s, w);
  });
}

}  // namespace

torch::Tensor flash_attn_varlen(const torch::Tensor& q, const torch::Tensor& k, const torch::Tensor& v,
                                const torch::Tensor& cu_seqlens_q, const torch::Tensor& cu_seqlens_k,
                                double scale, bool causal) {
  TORCH_CHECK_VALUE(q.dim() == 3 && k.dim() == 3 && v.dim() == 3, "q, k, v must be [tokens, heads, dim]");
  TORCH_CHECK_VALUE(k.size(0) == v.size(0) && k.size(1) == v.size(1) && q.size(1) == k.size(1) &&
                        q.size(2) == k.size(2),
                    "incompatible q ", q.sizes(), ", k ", k.sizes(), ", v ", v.sizes());
  TORCH_CHECK_VALUE(q.scalar_type() == k.scalar_type() && k.scalar_type() == v.scalar_type() &&
                        (q.scalar_type() == torch::kFloat32 || q.scalar_type() == torch::kBFloat16),
                    "q, k and v must all be float32 or all bfloat16");
  TORCH_CHECK_VALUE(q.device().is_cpu() && k.device().is_cpu() && v.device().is_cpu(), "CPU tensors only");
  TORCH_CHECK_VALUE(q.stride(2) == 1 && k.stride(2) == 1 && v.stride(2) == 1,
                    "q, k and v must be contiguous in their last dimension");
  TORCH_CHECK_VALUE(cu_seqlens_q.scalar_type() == torch::kInt32 &&
                        cu_seqlens_k.scalar_type() == torch::kInt32 && cu_seqlens_q.is_contiguous() &&
                        cu_seqlens_k.is_contiguous(),
                    "cu_seqlens must be contiguous int32");
  TORCH_CHECK_VALUE(cu_seqlens_q.dim() == 1 && cu_seqlens_q.sizes() == cu_seqlens_k.sizes() &&
                        cu_seqlens_q.size(0) >= 1,
                    "cu_seqlens_q and cu_seqlens_k must both be [batch + 1]");
  Shape s{q.size(1), q.size(2), v.size(2), static_cast<float>(scale), causal};
  const int32_t* cq = cu_seqlens_q.data_ptr<int32_t>();
  const int32_t* ck = cu_seqlens_k.data_ptr<int32_t>();
  const int64_t batch = cu_seqlens_q.size(0) - 1;
  TORCH_CHECK_VALUE(cq[0] == 0 && ck[0] == 0 && cq[batch] <= q.size(0) && ck[batch] <= k.size(0),
                    "cu_seqlens must start at 0 and end within q's and k's rows");
  const bool tiles = on_tiles(s, q.scalar_type() == torch::kBFloat16);
  const int64_t width = tiles ? TILES_ITEM : TILE, heads = s.heads;
  if (heads > 1 && k.stride(1) == 0 && v.stride(1) == 0 && q.stride(0) == heads * q.stride(1)) {
    s.group = heads;
    s.heads = 1;
  }
  std::vector<Item> items;
  for (int64_t b = 0; b < batch; ++b) {
    const int64_t q_len = cq[b + 1] - cq[b], k_len = ck[b + 1] - ck[b];
    TORCH_CHECK_VALUE(q_len >= 0 && k_len >= 0, "cu_seqlens must not decrease");
    if (q_len == 0) continue;
    TORCH_CHECK_VALUE(k_len > 0 && (!causal || q_len <= k_len), "sequence ", b, ": ", q_len,
                      " queries cannot attend to ", k_len, " keys");
    for (int64_t h = 0; h < s.heads; ++h) {
      const size_t head_items = items.size();
      int64_t head_cost = 0;
      for (int64_t first = 0; first < q_len * s.group; first += width) {
        Item item{cq[b] * s.group, ck[b], q_len * s.group, k_len, h, s.group, first, width, 0, 0};
        item.cost = item.queries() * item.keys(causal);
        head_cost += item.cost;
        items.push_back(item);
      }
      for (size_t i = head_items; i < items.size(); ++i) items[i].head_cost = head_cost;
    }
  }
  auto out = q.new_empty({q.size(0), heads, s.dv});  // rows of no sequence stay unset, as in torch's path
  if (items.empty()) return out;
  if (q.scalar_type() == torch::kFloat32)
    run<float>(q, k, v, out, items, s, tiles);
  else
    run<at::BFloat16>(q, k, v, out, items, s, tiles);
  return out;
}
