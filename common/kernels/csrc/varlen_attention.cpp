// out [Tq, H, Dv] = attention over packed variable-length sequences (prefill chunks), causal with the queries
// at the end of their context or full, on CPU. Why and when: common/kernels/cpu_attention.py.
//
// FlashAttention's schedule: a work item is (sequence, head, tile of up to 64 queries); it walks its keys 64
// at a time with the online softmax, so no score tile is larger than 64 x 64. Both products run in
// gemm_packed.h's register tiles: the scores transposed, s^T [keys, queries] = k [keys, D] @ q^T [D, 64],
// where q^T (scaled, built once per item) is the panel, and out [queries, Dv] += p [queries, keys] @
// v [keys, Dv], p read out of s^T by strides and v widened into 64-column panels. In between, the softmax
// runs down the keys for 16 queries at a time. Threads take items as they finish, the costliest first. On a
// CPU with AMX, bfloat16 whose widths are whole tiles takes both products on the tiles instead, 32 keys a
// step (attend_tiles): mini's prefill of 32 prompts of 64 tokens about 2x faster than on FMAs.

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

constexpr int64_t TILE = PANEL_COLUMNS;  // queries per item and keys per step: a panel's width
constexpr float NEG_INF = -std::numeric_limits<float>::infinity();

template <typename T>
struct Operand {  // q, k or v: rows [tokens, heads, dim], the last dimension contiguous
  const T* data;
  int64_t token, head;  // strides, in elements
  const T* row(int64_t t, int64_t h) const { return data + t * token + h * head; }
};

struct Shape {
  int64_t heads, dk, dv;
  float scale;
  bool causal;
};

// One thread's scratch: q^T [Dk, 64], widened keys [64, Dk], s^T and then p^T [64 keys, 64 queries],
// a value panel [64 keys, 64], the running output [64, Dv], max, denominator and rescale factor [64]. The
// panels are read by aligned loads: each part starts on a cache line.
struct FmaScratch {
  LineVector<float> buffer;
  float *q_t, *keys, *s_t, *v_panel, *o, *m, *l, *alpha;
  explicit FmaScratch(const Shape& s) : buffer((2 * s.dk + s.dv + 2 * TILE + 3) * TILE + 8 * 16) {
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
  int64_t q0, k0, q_len, k_len, head, first;  // the sequence's rows, the head, the tile's first query
  int64_t cost;                             // query-key pairs it scores

  int64_t queries() const { return std::min(TILE, q_len - first); }
  int64_t shift() const { return k_len - q_len; }  // causal: query i sees keys 0 .. shift + i
  int64_t keys(bool causal) const { return causal ? std::min(k_len, shift() + first + queries()) : k_len; }
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
      auto visible = [&](int64_t j) { return lanes_from(s.causal ? ks + j - (shift + it.first + c) : 0); };
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

constexpr int64_t KEYS = 32;     // keys a step on the tiles: two C tiles of scores, the K of one p tile
constexpr int64_t QUERIES = 16;  // queries a block: the rows of an A and a C tile

// Whether attend_tiles takes a problem of this shape: bfloat16 on AMX, dimensions in whole tiles.
bool on_tiles(const Shape& s, bool bf16) {
  return bf16 && amx_ready() && s.dk % TILE_K == 0 && s.dv % 64 == 0;
}

// What a thread keeps for attend_tiles: an item's queries [64, Dk]; a step's keys with pairs of dimensions
// interleaved, the B of the scores' product [Dk / 2, 32 keys, 2]; its values with pairs of keys interleaved,
// the B of the output's product [16, Dv, 2]; a block's scores [16, 32], its probabilities in bfloat16
// [16, 32] (the A), their product with the values [16, Dv]; the item's running output [64, Dv], max and
// denominator.
struct TileScratch {
  LineVector<uint16_t> q_rows, k_pairs, v_pairs, p;
  LineVector<float> scores, pv, o, m, l;
  explicit TileScratch(const Shape& s)
      : q_rows(TILE * s.dk),
        k_pairs(s.dk * KEYS),
        v_pairs(KEYS * s.dv),
        p(QUERIES * KEYS),
        scores(QUERIES * KEYS),
        pv(QUERIES * s.dv),
        o(TILE * s.dv),
        m(TILE),
        l(TILE) {}
};

// attend on AMX's tiles for bfloat16: per step of 32 keys, their pairs of dimensions transposed once (16 x 16
// transposes of 32-bit pairs) and their values' pairs of keys interleaved once for the item's blocks of 16
// queries; per block, scores [16, 32] = q @ k^T on the tiles from the item's queries (copied once), the
// online softmax in float32 as attend's, then p @ v with p rounded to bfloat16 (as the paged decode on the
// tiles rounds it), added into the rescaled running output.
template <typename T>
void attend_tiles(const Operand<T>& q, const Operand<T>& k, const Operand<T>& v, T* out, const Item& it,
                  const Shape& s, TileScratch& w) {
  const int64_t H = s.heads, Dk = s.dk, Dv = s.dv, h = it.head;
  const int64_t tq = it.queries(), shift = it.shift(), k_end = it.keys(s.causal);
  const auto bits = [](const T* row) { return reinterpret_cast<const uint16_t*>(row); };
  const int64_t padded = (tq + QUERIES - 1) / QUERIES * QUERIES;  // the last block's rows padded with zeros
  for (int64_t i = 0; i < padded; ++i) {
    uint16_t* row = w.q_rows.data() + i * Dk;
    if (i < tq)
      std::copy_n(bits(q.row(it.q0 + it.first + i, h)), Dk, row);
    else
      std::fill_n(row, Dk, 0);
  }
  std::fill(w.m.begin(), w.m.end(), NEG_INF);
  std::fill(w.l.begin(), w.l.end(), 0.0f);
  std::fill(w.o.begin(), w.o.begin() + tq * Dv, 0.0f);
  for (int64_t ks = 0; ks < k_end; ks += KEYS) {
    const int64_t n = std::min(KEYS, k_end - ks);
    for (int64_t half = 0; half < KEYS; half += 16)  // k_pairs[pair][key]: keys' 32-bit pairs transposed
      for (int64_t c = 0; c < Dk / 2; c += 16) {
        __m512i rows[16];
        for (int64_t j = 0; j < 16; ++j)
          rows[j] = half + j < n ? _mm512_loadu_si512(bits(k.row(it.k0 + ks + half + j, h)) + 2 * c)
                                 : _mm512_setzero_si512();
        transpose16(rows);
        for (int64_t j = 0; j < 16; ++j)
          _mm512_storeu_si512(w.k_pairs.data() + ((c + j) * KEYS + half) * 2, rows[j]);
      }
    for (int64_t j = 0; j < KEYS; j += 2) {  // keys j and j + 1 interleaved
      const uint16_t* x = j < n ? bits(v.row(it.k0 + ks + j, h)) : nullptr;
      const uint16_t* y = j + 1 < n ? bits(v.row(it.k0 + ks + j + 1, h)) : nullptr;
      interleave_rows(x, y, Dv, w.v_pairs.data() + j * Dv);
    }
    for (int64_t b = 0; b < tq; b += QUERIES) {
      const int64_t rows = std::min(QUERIES, tq - b), first = it.first + b;  // the block's first query
      if (s.causal && ks > shift + first + rows - 1) continue;  // no query of the block sees these keys
      _tile_zero(0);
      _tile_zero(1);
      for (int64_t d = 0; d < Dk; d += TILE_K) {
        _tile_loadd(4, w.q_rows.data() + b * Dk + d, Dk * 2);
        _tile_loadd(6, w.k_pairs.data() + d * KEYS, KEYS * 4);
        _tile_loadd(7, w.k_pairs.data() + d * KEYS + 32, KEYS * 4);
        _tile_dpbf16ps(0, 4, 6);
        _tile_dpbf16ps(1, 4, 7);
      }
      _tile_stored(0, w.scores.data(), KEYS * 4);
      _tile_stored(1, w.scores.data() + 16, KEYS * 4);
      alignas(64) float correction[QUERIES];
      const f32x16 scale = splat(s.scale), none = splat(NEG_INF);
      for (int64_t r = 0; r < QUERIES; ++r) {
        float* sr = w.scores.data() + r * KEYS;
        uint16_t* pr = w.p.data() + r * KEYS;
        // keys ks .. ks + seen - 1 are visible to this query
        const int64_t seen = r < rows ? (s.causal ? std::min(n, shift + first + r - ks + 1) : n) : 0;
        if (seen <= 0) {  // nothing here for it (or a padding row): p = 0, the output kept
          std::fill_n(pr, KEYS, 0);
          correction[r] = 1.0f;
          continue;
        }
        const mask16 lo = first_lanes(seen), hi = first_lanes(seen - 16);
        const f32x16 s0 = where(lo, mul(load(sr), scale), none);
        const f32x16 s1 = where(hi, mul(load(sr + 16), scale), none);
        const float old = w.m[b + r], top = std::max(old, _mm512_reduce_max_ps(maximum(s0, s1)));
        const f32x16 p0 = where(lo, exp16(sub(s0, splat(top))), zeros());
        const f32x16 p1 = where(hi, exp16(sub(s1, splat(top))), zeros());
        store_bf16(pr, p0, first_lanes(16));
        store_bf16(pr + 16, p1, first_lanes(16));
        correction[r] = std::exp(old - top);  // 0 on the query's first keys (old = -inf), with l and o 0
        w.l[b + r] = w.l[b + r] * correction[r] + _mm512_reduce_add_ps(add(p0, p1));
        w.m[b + r] = top;
      }
      for (int64_t c = 0; c < Dv; c += 64)  // pv 64 columns at a time; Dv * 4 bytes between rows
        probabilities_times_values(w.p.data(), 0, w.v_pairs.data() + 2 * c, 0, Dv * 4, 1, w.pv.data() + c);
      for (int64_t r = 0; r < rows; ++r) {  // o = o * correction + p @ v
        const f32x16 f = splat(correction[r]);
        float* o = w.o.data() + (b + r) * Dv;
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
  explicit TileScratch(const Shape&) {}
};
bool on_tiles(const Shape&, bool) { return false; }
template <typename T>
void attend_tiles(const Operand<T>&, const Operand<T>&, const Operand<T>&, T*, const Item&, const Shape&,
                  TileScratch&) {}

#endif

template <typename T>
Operand<T> operand(const torch::Tensor& x) {
  return {x.data_ptr<T>(), x.stride(0), x.stride(1)};
}

template <typename T>
void run(const torch::Tensor& q, const torch::Tensor& k, const torch::Tensor& v, torch::Tensor& out,
         std::vector<Item>& items, const Shape& s) {
  std::stable_sort(items.begin(), items.end(), [](const Item& a, const Item& b) { return a.cost > b.cost; });
  const Operand<T> qo = operand<T>(q), ko = operand<T>(k), vo = operand<T>(v);
  T* op = out.data_ptr<T>();
  std::atomic<size_t> next{0};
  const int64_t threads = std::min<int64_t>(at::get_num_threads(), items.size());
  const bool tiles = on_tiles(s, std::is_same_v<T, at::BFloat16>);
  at::parallel_for(0, threads, 1, [&](int64_t, int64_t) {
    if (tiles) {
      TileScratch w(s);
      configure_tiles();
      for (size_t i; (i = next++) < items.size();) attend_tiles(qo, ko, vo, op, items[i], s, w);
      release_tiles();
      return;
    }
    FmaScratch w(s);
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
  const Shape s{q.size(1), q.size(2), v.size(2), static_cast<float>(scale), causal};
  const int32_t* cq = cu_seqlens_q.data_ptr<int32_t>();
  const int32_t* ck = cu_seqlens_k.data_ptr<int32_t>();
  const int64_t batch = cu_seqlens_q.size(0) - 1;
  TORCH_CHECK_VALUE(cq[0] == 0 && ck[0] == 0 && cq[batch] <= q.size(0) && ck[batch] <= k.size(0),
                    "cu_seqlens must start at 0 and end within q's and k's rows");
  std::vector<Item> items;
  for (int64_t b = 0; b < batch; ++b) {
    const int64_t q_len = cq[b + 1] - cq[b], k_len = ck[b + 1] - ck[b];
    TORCH_CHECK_VALUE(q_len >= 0 && k_len >= 0, "cu_seqlens must not decrease");
    if (q_len == 0) continue;
    TORCH_CHECK_VALUE(k_len > 0 && (!causal || q_len <= k_len), "sequence ", b, ": ", q_len,
                      " queries cannot attend to ", k_len, " keys");
    for (int64_t first = 0; first < q_len; first += TILE)
      for (int64_t h = 0; h < s.heads; ++h) {
        Item item{cq[b], ck[b], q_len, k_len, h, first, 0};
        item.cost = item.queries() * item.keys(causal);
        items.push_back(item);
      }
  }
  auto out = q.new_empty({q.size(0), s.heads, s.dv});  // rows of no sequence stay unset, as in torch's path
  if (items.empty()) return out;
  if (q.scalar_type() == torch::kFloat32)
    run<float>(q, k, v, out, items, s);
  else
    run<at::BFloat16>(q, k, v, out, items, s);
  return out;
}
