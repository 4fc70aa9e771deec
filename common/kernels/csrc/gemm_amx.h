// out[r, c] = sum_i x[r, i] * w[i, c] for r < M, c0 <= c < c1 on AMX tiles, with w bfloat16 in tile order
// and x rounded to bfloat16: the products of bfloat16 weights on a CPU with AMX, at every row count.
//
// A tile multiply (TDPBF16PS) takes the weight with pairs of rows interleaved: a row of the B tile holds
// rows 2j and 2j + 1 of 16 columns as (w[2j, c], w[2j + 1, c]) pairs. Tile order is strip order
// (gemm_strips.h) with each strip's pairs of rows so interleaved, [ceil(N / 32), K / 2, 64]: row pair j of a
// strip holds columns 0-15 of its two rows, then columns 16-31 (common/kernels/strips.py makes it; K is a
// multiple of 32, the rows of one tile). The B tiles then load straight from it, each strip still one
// sequential stream. One multiply is a 16 x 16 x 32 product, as many multiply-adds as 512 AVX-512 FMAs: at a
// few rows an expert the product costs what streaming its weight costs, and at hundreds (a prefill's
// experts) it runs several times faster than FMAs. Sums are float32 in the unit's own order, so the bits
// differ from the strip kernel's; x is rounded to bfloat16 as torch's bfloat16 GEMM takes it, once per call
// (tile_rows: the routed experts gather their rows so, bfloat16 rows are copied as they are).
#pragma once

#include <ATen/Parallel.h>

#include <algorithm>
#include <cstdint>
#include <type_traits>

#include "gemm_strips.h"
#include "scratch.h"
#include "simd.h"

constexpr int64_t TILE_K = 32;  // weight rows a tile multiply takes: tile order's K is a multiple of it
namespace gemm_amx_detail {
constexpr int64_t TILE_ROWS = 16;  // rows of an A or C tile, row pairs of a B tile
// Rows multiplied by every strip before the next rows are: their A tiles (at K = 512, 272 KiB) stay in L2
// while the strips go by. Strip by strip over all rows, a prefill's 2,048 rows (2.2 MiB) came from L3 again
// for every strip.
constexpr int64_t PASS_ROWS = 256;
}  // namespace gemm_amx_detail

// Rows of x as the tiles take them: bfloat16, lda apart, then a block of 32 zero rows after the last.
struct TileRows {
  const uint16_t* rows;
  int64_t lda;
};

// A thread's scratch for R rows of K bfloat16 as the tiles take them: K + TILE_K apart (K apart, a tile's 16
// rows would share a few cache sets), then a block of zero rows, which the last block of the last rows reads
// (a block's rows past its expert's are multiplied, never stored).
inline uint16_t* padded_rows(Scratch use, int64_t R, int64_t K) {
  const int64_t lda = K + TILE_K, after = 2 * gemm_amx_detail::TILE_ROWS;
  uint16_t* rows = reinterpret_cast<uint16_t*>(scratch(use, ((R + after) * lda + 1) / 2));
  std::fill(rows + R * lda, rows + (R + after) * lda, 0);
  return rows;
}

// R rows of K as the tiles take them, once for all of a call's products: row r is row_of(r), float32
// rounded to bfloat16 or bfloat16 copied as it is.
template <typename T, typename RowOf>
TileRows tile_rows(Scratch use, int64_t R, int64_t K, RowOf row_of) {
  const int64_t lda = K + TILE_K;
  uint16_t* rows = padded_rows(use, R, K);
  at::BFloat16* p = reinterpret_cast<at::BFloat16*>(rows);
  at::parallel_for(0, R, 64, [&](int64_t r0, int64_t r1) {
    for (int64_t r = r0; r < r1; ++r) {
      const T* row = row_of(r);
      if constexpr (std::is_same_v<T, float>)
        narrow(row, p + r * lda, K);
      else
        std::copy_n(row, K, p + r * lda);
    }
  });
  return {rows, lda};
}

#if defined(__AMX_TILE__) && defined(__AMX_BF16__)

#include <sys/syscall.h>
#include <unistd.h>

// Whether this process may use the tiles: Linux grants their state on request, once for the process.
inline bool amx_ready() {
  static const bool ready = [] {
    constexpr long ARCH_REQ_XCOMP_PERM = 0x1023, XFEATURE_XTILEDATA = 18;
    return syscall(SYS_arch_prctl, ARCH_REQ_XCOMP_PERM, XFEATURE_XTILEDATA) == 0;
  }();
  return ready;
}

namespace gemm_amx_detail {

struct alignas(64) TileConfig {
  uint8_t palette, start_row, reserved[14];
  uint16_t bytes_per_row[16];
  uint8_t rows[16];
};

// The weights of the step PREFETCH_BYTES ahead (a step reads TILE_K rows of a strip, 2 KiB in tile order),
// asked for into L1. A strip streams from memory once, in its first block of rows, and at a few rows there
// is little to multiply while each B tile load waits for its lines; the tiles are not renamed, so one step's
// loads wait for the step before's multiplies, and the loads reach memory one step at a time. Asked ahead,
// they find their lines in L1: half of a 512 x 768 weight from memory at one row, one thread, 40 -> 31 us;
// the mini model's decode steps 2-4% shorter at 1 and 64 sequences (4 KiB ahead; 2 and 8 KiB were slower).
constexpr int64_t PREFETCH_BYTES = 4096;
inline void prefetch_step(const uint16_t* w) {
  const char* ahead = reinterpret_cast<const char*>(w) + PREFETCH_BYTES;
  for (int64_t line = 0; line < TILE_K * STRIP_COLUMNS * 2; line += 64)
    _mm_prefetch(ahead + line, _MM_HINT_T0);
}

// 16 R rows x 32 columns into tiles 0-3: R blocks of 16 rows of x (bfloat16, lda apart, at a) against two
// runs of 16 columns in tile order, `left` and `right`, each a strip's half (a strip's two halves: left =
// strip, right = strip + 32; or the same half of w13's gate and up). Tiles: C at 0-3 (a block's left and
// right), A at 4-5, B at 6-7; their numbers must be constants, hence the second block spelled out. After each
// step of 32 rows of the weight, share(step, steps) makes its share of the block before's epilogue (Pending):
// the tile unit multiplies while the vector units round or activate, where one after the other the tiles
// waited (mini's experts at 2,048 / 64 tokens 6.6-7.5 -> 5.5-6.3 / 0.65-0.68 -> 0.60-0.63 ms a layer, hot;
// a 2,048 x 512 x 512 product rounded to bfloat16 0.68-0.69 -> 0.62-0.65 ms; the same bits). With
// `stream`, the block that first reads these strips asks for their weights ahead (prefetch_step).
template <int R, typename Share>
inline void multiply(const uint16_t* a, int64_t lda, int64_t K, const uint16_t* left, const uint16_t* right,
                     bool stream, Share&& share) {
  _tile_zero(0);
  _tile_zero(1);
  if constexpr (R == 2) {
    _tile_zero(2);
    _tile_zero(3);
  }
  const int64_t steps = K / TILE_K;
  for (int64_t step = 0; step < steps; ++step) {
    const int64_t k = step * TILE_K;
    if (stream) {
      prefetch_step(left + k * STRIP_COLUMNS);
      if (right != left + 32) prefetch_step(right + k * STRIP_COLUMNS);
    }
    _tile_loadd(4, a + k, lda * 2);
    _tile_loadd(6, left + k * STRIP_COLUMNS, 128);
    _tile_loadd(7, right + k * STRIP_COLUMNS, 128);
    _tile_dpbf16ps(0, 4, 6);
    _tile_dpbf16ps(1, 4, 7);
    if constexpr (R == 2) {
      _tile_loadd(5, a + TILE_ROWS * lda + k, lda * 2);
      _tile_dpbf16ps(2, 5, 6);
      _tile_dpbf16ps(3, 5, 7);
    }
    share(step, steps);
  }
}

// What multiply<R> left in the C tiles, 16 R rows x 32 columns, to o (rows ldo apart).
template <int R>
inline void store(float* o, int64_t ldo) {
  _tile_stored(0, o, ldo * 4);
  _tile_stored(1, o + 16, ldo * 4);
  if constexpr (R == 2) {
    _tile_stored(2, o + TILE_ROWS * ldo, ldo * 4);
    _tile_stored(3, o + TILE_ROWS * ldo + 16, ldo * 4);
  }
}

// A block's epilogue still to make from its float32 sums (in one of two buffers the blocks take in turn),
// row by row, `rows` of them: made in shares while the next block multiplies (multiply's `share`), the rest
// once the last block is done.
template <typename Row>
struct Pending {
  Row row;  // row(r) makes row r of the block's epilogue
  int64_t rows = 0;
  void share(int64_t step, int64_t steps) const {
    for (int64_t r = rows * step / steps; r < rows * (step + 1) / steps; ++r) row(r);
  }
};

// 16 rows x a whole strip of each half into tiles 0-3: C at 0-1 (gate's 32 columns), 2-3 (up's); A at 4; B
// at 5-7. For a few rows, where the product streams its weight: each strip is read whole, front to back,
// the strip before's epilogue made in shares as in multiply, both halves' weights asked for ahead.
template <typename Share>
inline void multiply_strips(const uint16_t* a, int64_t lda, int64_t K, const uint16_t* gate,
                            const uint16_t* up, Share&& share) {
  _tile_zero(0);
  _tile_zero(1);
  _tile_zero(2);
  _tile_zero(3);
  const int64_t steps = K / TILE_K;
  for (int64_t step = 0; step < steps; ++step, gate += TILE_K * STRIP_COLUMNS, up += TILE_K * STRIP_COLUMNS) {
    prefetch_step(gate);
    prefetch_step(up);
    _tile_loadd(4, a + step * TILE_K, lda * 2);
    _tile_loadd(5, gate, 128);
    _tile_loadd(6, gate + 32, 128);
    _tile_dpbf16ps(0, 4, 5);
    _tile_dpbf16ps(1, 4, 6);
    _tile_loadd(7, up, 128);
    _tile_loadd(5, up + 32, 128);
    _tile_dpbf16ps(2, 4, 7);
    _tile_dpbf16ps(3, 4, 5);
    share(step, steps);
  }
}

// The C tiles 0-3 to sums: gate and up blocks of 16 x 16, as SwigluRows reads them.
inline void store_tiles(float* sums) {
  constexpr int64_t TILE = TILE_ROWS * 16;  // floats of a C tile
  _tile_stored(0, sums, 64);  // all four, though a block of 16 rows by halves reads only two
  _tile_stored(1, sums + TILE, 64);
  _tile_stored(2, sums + 2 * TILE, 64);
  _tile_stored(3, sums + 3 * TILE, 64);
}

// Pending's row for gemm_amx_swiglu: a block's or strip's rows of act (`width` columns, 16 or 32) from the
// C tiles' sums, silu(gate) * up rounded to bfloat16, as SiLU-and-multiply makes it of the two products'
// float32 sums: `gate(r, c)` is where row r's gate sums of columns c..c+15 sit (up's `up` floats later).
template <typename GateAt>
struct SwigluRows {
  const float* sums;
  at::BFloat16* act;
  int64_t ld, width, up;
  GateAt gate;
  void operator()(int64_t r) const {
    for (int64_t c = 0; c < width; c += 16) {
      const float* g = sums + gate(r, c);
      store16(act + r * ld + c, mul(silu16(load(g)), load(g + up)), first_lanes(16));
    }
  }
};

}  // namespace gemm_amx_detail

// rows [16] of 16 32-bit lanes, transposed in place: lane j of row i goes to lane i of row j.
inline void transpose16(__m512i rows[16]) {
  __m512i t[16];
  for (int i = 0; i < 16; i += 2) {
    t[i] = _mm512_unpacklo_epi32(rows[i], rows[i + 1]);
    t[i + 1] = _mm512_unpackhi_epi32(rows[i], rows[i + 1]);
  }
  for (int i = 0; i < 16; i += 4)
    for (int j = 0; j < 2; ++j) {
      rows[i + 2 * j] = _mm512_unpacklo_epi64(t[i + j], t[i + j + 2]);
      rows[i + 2 * j + 1] = _mm512_unpackhi_epi64(t[i + j], t[i + j + 2]);
    }
  for (int i = 0; i < 16; i += 8)
    for (int j = 0; j < 4; ++j) {
      t[i + j] = _mm512_shuffle_i32x4(rows[i + j], rows[i + j + 4], 0x88);
      t[i + j + 4] = _mm512_shuffle_i32x4(rows[i + j], rows[i + j + 4], 0xDD);
    }
  for (int j = 0; j < 8; ++j) {
    rows[j] = _mm512_shuffle_i32x4(t[j], t[j + 8], 0x88);
    rows[j + 8] = _mm512_shuffle_i32x4(t[j], t[j + 8], 0xDD);
  }
}

// Rows x and y of `columns` bfloat16 (a multiple of 32; nullptr reads as zeros) as pairs, the B of a tile
// product over them: out[2c] = x[c], out[2c + 1] = y[c].
inline void interleave_rows(const uint16_t* x, const uint16_t* y, int64_t columns, uint16_t* out) {
  alignas(64) static const uint16_t first_half[32] = {0,  32, 1,  33, 2,  34, 3,  35, 4,  36, 5,
                                                       37, 6,  38, 7,  39, 8,  40, 9,  41, 10, 42,
                                                       11, 43, 12, 44, 13, 45, 14, 46, 15, 47};
  const __m512i low = _mm512_load_si512(first_half);
  const __m512i high = _mm512_add_epi16(low, _mm512_set1_epi16(16));
  for (int64_t c = 0; c < columns; c += 32) {
    const __m512i a = x != nullptr ? _mm512_loadu_si512(x + c) : _mm512_setzero_si512();
    const __m512i b = y != nullptr ? _mm512_loadu_si512(y + c) : _mm512_setzero_si512();
    _mm512_storeu_si512(out + 2 * c, _mm512_permutex2var_epi16(a, low, b));
    _mm512_storeu_si512(out + 2 * c + 32, _mm512_permutex2var_epi16(a, high, b));
  }
}

// out [16, 64] (rows ld bytes apart) = the sum over `blocks` blocks of 32 of p [16, 32] (bfloat16, rows 64
// bytes apart, blocks p_step apart) @ the values' pairs [16 pairs, 64 columns, 2] (rows ld bytes apart,
// blocks v_step apart): an attention's output product on the tiles. C tiles 0-3 (16 columns each), A 4, B
// 6-7.
inline void probabilities_times_values(const uint16_t* p, int64_t p_step, const uint16_t* v, int64_t v_step,
                                       int64_t ld, int64_t blocks, float* out) {
  _tile_zero(0);
  _tile_zero(1);
  _tile_zero(2);
  _tile_zero(3);
  for (int64_t b = 0; b < blocks; ++b, p += p_step, v += v_step) {
    _tile_loadd(4, p, 64);
    _tile_loadd(6, v, ld);
    _tile_dpbf16ps(0, 4, 6);
    _tile_loadd(7, v + 32, ld);
    _tile_dpbf16ps(1, 4, 7);
    _tile_loadd(6, v + 64, ld);
    _tile_dpbf16ps(2, 4, 6);
    _tile_loadd(7, v + 96, ld);
    _tile_dpbf16ps(3, 4, 7);
  }
  _tile_stored(0, out, ld);
  _tile_stored(1, out + 16, ld);
  _tile_stored(2, out + 32, ld);
  _tile_stored(3, out + 48, ld);
}

// Eight tiles of 16 rows x 64 bytes, as gemm_amx uses them: a thread configures its tiles before its
// products, since other code (oneDNN) may have configured them otherwise, and releases them after.
inline void configure_tiles() {
  gemm_amx_detail::TileConfig config{};
  config.palette = 1;
  for (int t = 0; t < 8; ++t) {
    config.rows[t] = gemm_amx_detail::TILE_ROWS;
    config.bytes_per_row[t] = 64;
  }
  _tile_loadconfig(&config);
}
inline void release_tiles() { _tile_release(); }

// out[r, c] for r < M, c0 <= c < c1 from M rows as tile_rows makes them and a weight in tile order; c0 is a
// multiple of STRIP_COLUMNS, c1 at most the weight's N; out float32, or bfloat16 rounded from the float32
// sums. The calling thread's tiles must be configured.
template <typename O>
inline void gemm_amx(const uint16_t* a, int64_t lda, const uint16_t* w, O* out, int64_t ldo, int64_t M,
                     int64_t K, int64_t c0, int64_t c1) {
  using namespace gemm_amx_detail;
  constexpr int64_t BLOCK = 2 * TILE_ROWS;
  alignas(64) float sums[2][BLOCK * STRIP_COLUMNS];
  struct Rows {  // a block's rows from its sums: copied (a part of a block in float32) or rounded
    const float* sums;
    O* out;
    int64_t ldo, columns;
    void operator()(int64_t r) const {
      if constexpr (std::is_same_v<O, float>)
        std::copy_n(sums + r * STRIP_COLUMNS, columns, out + r * ldo);
      else
        narrow(sums + r * STRIP_COLUMNS, out + r * ldo, columns);
    }
  };
  Pending<Rows> pending{};
  int turn = 0;
  const auto share = [&](int64_t step, int64_t steps) { pending.share(step, steps); };
  for (int64_t pass = 0; pass < M; pass += PASS_ROWS)
    for (int64_t n = c0; n < c1; n += STRIP_COLUMNS) {
      const int64_t columns = std::min(STRIP_COLUMNS, c1 - n);
      for (int64_t m = pass; m < std::min(M, pass + PASS_ROWS); m += BLOCK) {
        const int64_t rows = std::min(BLOCK, M - m);
        const bool two = rows > TILE_ROWS;
        O* o = out + m * ldo + n;
        if (two)
          multiply<2>(a + m * lda, lda, K, w + n * K, w + n * K + 32, m == pass, share);
        else
          multiply<1>(a + m * lda, lda, K, w + n * K, w + n * K + 32, m == pass, share);
        pending.rows = 0;  // made in its shares
        if constexpr (std::is_same_v<O, float>)
          if (rows == (two ? BLOCK : TILE_ROWS) && columns == STRIP_COLUMNS) {  // a whole block: straight out
            two ? store<2>(o, ldo) : store<1>(o, ldo);
            continue;
          }
        float* s = sums[turn ^= 1];
        two ? store<2>(s, STRIP_COLUMNS) : store<1>(s, STRIP_COLUMNS);
        pending = {Rows{s, o, ldo, columns}, rows};
      }
    }
  pending.share(0, 1);
}

// act[r, c] = silu(x @ w[:, c]) * (x @ w[:, I + c]) for r < M, c0 <= c < c1 <= I, rounded to bfloat16: an
// expert's w13 [K, 2I] in tile order, its gate and up halves multiplied side by side, so their float32 sums
// never leave the thread (a product of w13 and then SiLU-and-multiply write and read them back, a prefill
// chunk's experts some 100 MB a layer), and bit for bit what those make. c0 and I are multiples of
// STRIP_COLUMNS; x's rows as tile_rows makes them. The calling thread's tiles must be configured.
inline void gemm_amx_swiglu(const uint16_t* a, int64_t lda, const uint16_t* w, at::BFloat16* act, int64_t ld,
                            int64_t M, int64_t K, int64_t I, int64_t c0, int64_t c1) {
  using namespace gemm_amx_detail;
  constexpr int64_t BLOCK = 2 * TILE_ROWS;
  constexpr int64_t TILE = TILE_ROWS * 16;
  alignas(64) float sums[2][4 * TILE];
  int turn = 0;
  if (M <= TILE_ROWS) {  // a few rows: whole strips, 16 rows
    auto gate_at = [](int64_t r, int64_t c) { return c / 16 * TILE + r * 16; };
    Pending<SwigluRows<decltype(gate_at)>> pending{};
    for (int64_t n = c0; n < c1; n += STRIP_COLUMNS) {
      multiply_strips(a, lda, K, w + n * K, w + (I + n) * K,
                      [&](int64_t step, int64_t steps) { pending.share(step, steps); });
      float* s = sums[turn ^= 1];
      store_tiles(s);
      pending = {{s, act + n, ld, STRIP_COLUMNS, 2 * TILE, gate_at}, M};
    }
    pending.share(0, 1);
    return;
  }
  // more: 32 rows of half a strip of each, 16 columns of gate, of up
  auto gate_at = [](int64_t r, int64_t) { return r / TILE_ROWS * 2 * TILE + r % TILE_ROWS * 16; };
  Pending<SwigluRows<decltype(gate_at)>> pending{};
  const auto share = [&](int64_t step, int64_t steps) { pending.share(step, steps); };
  for (int64_t pass = 0; pass < M; pass += PASS_ROWS)
    for (int64_t n = c0; n < c1; n += 16) {
      const uint16_t* gate = w + n / STRIP_COLUMNS * STRIP_COLUMNS * K + n % STRIP_COLUMNS * 2;
      const uint16_t* up = gate + I * K;
      for (int64_t m = pass; m < std::min(M, pass + PASS_ROWS); m += BLOCK) {
        const int64_t rows = std::min(BLOCK, M - m);
        if (rows > TILE_ROWS)
          multiply<2>(a + m * lda, lda, K, gate, up, m == pass, share);
        else
          multiply<1>(a + m * lda, lda, K, gate, up, m == pass, share);
        float* s = sums[turn ^= 1];
        store_tiles(s);
        pending = {{s, act + m * ld + n, ld, 16, TILE, gate_at}, rows};
      }
    }
  pending.share(0, 1);
}

#else

inline bool amx_ready() { return false; }
inline void configure_tiles() {}
inline void release_tiles() {}
template <typename O>
inline void gemm_amx(const uint16_t*, int64_t, const uint16_t*, O*, int64_t, int64_t, int64_t, int64_t,
                     int64_t) {}
inline void gemm_amx_swiglu(const uint16_t*, int64_t, const uint16_t*, at::BFloat16*, int64_t, int64_t,
                            int64_t, int64_t, int64_t, int64_t) {}

#endif
