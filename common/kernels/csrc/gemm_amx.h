// out[r, c] = sum_i x[r * ldx + i] * w[i, c] for r < M, c0 <= c < c1 on AMX tiles, with w bfloat16 in tile
// order and x rounded to bfloat16: the products of bfloat16 weights on a CPU with AMX, at every row count.
//
// A tile multiply (TDPBF16PS) takes the weight with pairs of rows interleaved: a row of the B tile holds
// rows 2j and 2j + 1 of 16 columns as (w[2j, c], w[2j + 1, c]) pairs. Tile order is strip order
// (gemm_strips.h) with each strip's pairs of rows so interleaved, [ceil(N / 32), K / 2, 64]: row pair j of a
// strip holds columns 0-15 of its two rows, then columns 16-31 (common/kernels/strips.py makes it; K is a
// multiple of 32, the rows of one tile). The B tiles then load straight from it, each strip still one
// sequential stream. One multiply is a 16 x 16 x 32 product, as many multiply-adds as 512 AVX-512 FMAs: at a
// few rows an expert the product costs what streaming its weight costs, and at hundreds (a prefill's
// experts) it runs several times faster than FMAs. Sums are float32 in the unit's own order, so the bits
// differ from the strip kernel's; x is rounded to bfloat16 as torch's bfloat16 GEMM takes it.
#pragma once

#include <cstdint>

#include "gemm_strips.h"

constexpr int64_t TILE_K = 32;  // weight rows a tile multiply takes: tile order's K is a multiple of it

#if defined(__AMX_TILE__) && defined(__AMX_BF16__)

#include <sys/syscall.h>
#include <unistd.h>

#include <algorithm>
#include <vector>

#include "simd.h"

// Whether this process may use the tiles: Linux grants their state on request, once for the process.
inline bool amx_ready() {
  static const bool ready = [] {
    constexpr long ARCH_REQ_XCOMP_PERM = 0x1023, XFEATURE_XTILEDATA = 18;
    return syscall(SYS_arch_prctl, ARCH_REQ_XCOMP_PERM, XFEATURE_XTILEDATA) == 0;
  }();
  return ready;
}

namespace gemm_amx_detail {

constexpr int64_t TILE_ROWS = 16;  // rows of an A or C tile, row pairs of a B tile

struct alignas(64) TileConfig {
  uint8_t palette, start_row, reserved[14];
  uint16_t bytes_per_row[16];
  uint8_t rows[16];
};

// 16 R rows x a strip's 32 columns: R blocks of 16 rows of x (bfloat16 [., K] at a), the strip at w, into
// sums [16 R, 32]. Tiles: C at 0-3 (a block's two halves of the strip), A at 4-5, B at 6-7; their numbers
// must be constants, hence the second block spelled out.
template <int R>
inline void tile(const uint16_t* a, int64_t K, const uint16_t* w, float* sums) {
  _tile_zero(0);
  _tile_zero(1);
  if constexpr (R == 2) {
    _tile_zero(2);
    _tile_zero(3);
  }
  for (int64_t k = 0; k < K; k += TILE_K, w += TILE_K * STRIP_COLUMNS) {
    _tile_loadd(4, a + k, K * 2);
    _tile_loadd(6, w, 128);
    _tile_loadd(7, w + 32, 128);
    _tile_dpbf16ps(0, 4, 6);
    _tile_dpbf16ps(1, 4, 7);
    if constexpr (R == 2) {
      _tile_loadd(5, a + TILE_ROWS * K + k, K * 2);
      _tile_dpbf16ps(2, 5, 6);
      _tile_dpbf16ps(3, 5, 7);
    }
  }
  _tile_stored(0, sums, 128);
  _tile_stored(1, sums + 16, 128);
  if constexpr (R == 2) {
    _tile_stored(2, sums + TILE_ROWS * STRIP_COLUMNS, 128);
    _tile_stored(3, sums + TILE_ROWS * STRIP_COLUMNS + 16, 128);
  }
}

}  // namespace gemm_amx_detail

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

// The product over any number of rows; c0 is a multiple of STRIP_COLUMNS, c1 at most the weight's N. x's
// rows are rounded into the thread's buffer first, zeros past M up to a whole number of row blocks.
inline void gemm_amx(const float* x, int64_t ldx, const uint16_t* w, float* out, int64_t ldo, int64_t M,
                     int64_t K, int64_t c0, int64_t c1) {
  using namespace gemm_amx_detail;
  constexpr int64_t BLOCK = 2 * TILE_ROWS;
  thread_local std::vector<uint16_t> rows;
  thread_local std::vector<float> sums(BLOCK * STRIP_COLUMNS);
  rows.resize((M + BLOCK - 1) / BLOCK * BLOCK * K);
  for (int64_t m = 0; m < M; ++m) narrow(x + m * ldx, reinterpret_cast<at::BFloat16*>(rows.data()) + m * K, K);
  std::fill(rows.begin() + M * K, rows.end(), 0);
  for (int64_t n = c0; n < c1; n += STRIP_COLUMNS) {
    const int64_t columns = std::min(STRIP_COLUMNS, c1 - n);
    for (int64_t m = 0; m < M; m += BLOCK) {
      if (M - m > TILE_ROWS)
        tile<2>(rows.data() + m * K, K, w + n * K, sums.data());
      else
        tile<1>(rows.data() + m * K, K, w + n * K, sums.data());
      for (int64_t r = 0; r < std::min(BLOCK, M - m); ++r)
        std::copy_n(sums.data() + r * STRIP_COLUMNS, columns, out + (m + r) * ldo + n);
    }
  }
}

#else

inline bool amx_ready() { return false; }
inline void configure_tiles() {}
inline void release_tiles() {}
inline void gemm_amx(const float*, int64_t, const uint16_t*, float*, int64_t, int64_t, int64_t, int64_t,
                     int64_t) {
  TORCH_CHECK(false, "weights in tile order need the kernels built for AMX");
}

#endif
