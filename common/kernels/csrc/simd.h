// The kernels' vector: 16 float32 lanes and a mask of the lanes that exist, for AVX-512 (one register) or
// AVX2 with FMA (two registers, so every operation is two instructions). The kernels are written once over
// these; what depends on the count of vector registers (32 or 16) is a tile's size, chosen beside each tile
// from VECTOR_REGISTERS. Also: bfloat16 widening and rounding, a vector exp.
#pragma once

#include <immintrin.h>

#include <torch/extension.h>

#include <algorithm>
#include <cstdint>
#include <cstring>
#include <limits>

#if defined(__AVX512F__)

constexpr int VECTOR_REGISTERS = 32;
using f32x16 = __m512;
using mask16 = __mmask16;

inline f32x16 zeros() { return _mm512_setzero_ps(); }
inline f32x16 splat(float v) { return _mm512_set1_ps(v); }
inline f32x16 load(const float* p) { return _mm512_loadu_ps(p); }
inline f32x16 load(const float* p, mask16 m) { return _mm512_maskz_loadu_ps(m, p); }
inline void store(float* p, f32x16 v) { _mm512_storeu_ps(p, v); }
inline void store(float* p, f32x16 v, mask16 m) { _mm512_mask_storeu_ps(p, m, v); }
inline f32x16 add(f32x16 a, f32x16 b) { return _mm512_add_ps(a, b); }
inline f32x16 sub(f32x16 a, f32x16 b) { return _mm512_sub_ps(a, b); }
inline f32x16 mul(f32x16 a, f32x16 b) { return _mm512_mul_ps(a, b); }
inline f32x16 divide(f32x16 a, f32x16 b) { return _mm512_div_ps(a, b); }
inline f32x16 maximum(f32x16 a, f32x16 b) { return _mm512_max_ps(a, b); }
inline f32x16 fmadd(f32x16 a, f32x16 b, f32x16 c) { return _mm512_fmadd_ps(a, b, c); }  // a * b + c
inline f32x16 fnmadd(f32x16 a, f32x16 b, f32x16 c) { return _mm512_fnmadd_ps(a, b, c); }  // c - a * b
inline f32x16 where(mask16 m, f32x16 a, f32x16 b) { return _mm512_mask_blend_ps(m, b, a); }  // m ? a : b
inline mask16 less(f32x16 a, f32x16 b) { return _mm512_cmp_ps_mask(a, b, _CMP_LT_OQ); }

// Lanes 0..count-1 (none when count <= 0, all from 16 on).
inline mask16 first_lanes(int64_t count) {
  return count >= 16 ? mask16(0xFFFF) : count <= 0 ? mask16(0) : mask16((1u << count) - 1);
}
// Lanes first..15.
inline mask16 lanes_from(int64_t first) { return mask16(~first_lanes(first)); }

inline f32x16 round_to_integer(f32x16 x) {
  return _mm512_roundscale_ps(x, _MM_FROUND_TO_NEAREST_INT | _MM_FROUND_NO_EXC);
}
inline f32x16 times_power_of_two(f32x16 p, f32x16 n) { return _mm512_scalef_ps(p, n); }  // p * 2^n

// 16 bfloat16 as float32: a bfloat16 is the top half of a float32, so widening is a shift.
inline f32x16 load_bf16(const uint16_t* p, mask16 m) {
  const __m256i half = _mm256_maskz_loadu_epi16(m, p);
  return _mm512_castsi512_ps(_mm512_slli_epi32(_mm512_cvtepu16_epi32(half), 16));
}

// 32 bfloat16 (a cache line) as their even or their odd columns, one instruction each: the even ones by a
// shift, the odd ones by clearing the low halves. interleave puts such a pair back in column order.
inline f32x16 load_bf16_even(const uint16_t* p) {
  return _mm512_castsi512_ps(_mm512_slli_epi32(_mm512_loadu_si512(p), 16));
}
inline f32x16 load_bf16_odd(const uint16_t* p) {
  const __m512i high_halves = _mm512_set1_epi32(int32_t(0xFFFF0000u));
  return _mm512_castsi512_ps(_mm512_and_si512(_mm512_loadu_si512(p), high_halves));
}
inline void interleave(f32x16 even, f32x16 odd, f32x16& first, f32x16& second) {
  const __m512i low = _mm512_set_epi32(23, 7, 22, 6, 21, 5, 20, 4, 19, 3, 18, 2, 17, 1, 16, 0);
  const __m512i high = _mm512_set_epi32(31, 15, 30, 14, 29, 13, 28, 12, 27, 11, 26, 10, 25, 9, 24, 8);
  first = _mm512_permutex2var_ps(even, low, odd);
  second = _mm512_permutex2var_ps(even, high, odd);
}
inline void deinterleave(f32x16 first, f32x16 second, f32x16& even, f32x16& odd) {  // interleave undone
  const __m512i evens = _mm512_set_epi32(30, 28, 26, 24, 22, 20, 18, 16, 14, 12, 10, 8, 6, 4, 2, 0);
  const __m512i odds = _mm512_set_epi32(31, 29, 27, 25, 23, 21, 19, 17, 15, 13, 11, 9, 7, 5, 3, 1);
  even = _mm512_permutex2var_ps(first, evens, second);
  odd = _mm512_permutex2var_ps(first, odds, second);
}

// 16 floats rounded to bfloat16 as torch rounds (to nearest even, a NaN stays a NaN), as the low halves of
// 32-bit lanes.
inline __m512i bf16_rounded_bits(f32x16 v) {
  const __m512i u = _mm512_castps_si512(v);
  const __m512i odd = _mm512_and_si512(_mm512_srli_epi32(u, 16), _mm512_set1_epi32(1));
  const __m512i rounded = _mm512_add_epi32(u, _mm512_add_epi32(odd, _mm512_set1_epi32(0x7FFF)));
  return _mm512_srli_epi32(
      _mm512_mask_mov_epi32(rounded, _mm512_cmp_ps_mask(v, v, _CMP_UNORD_Q), _mm512_set1_epi32(0x7FC00000)),
      16);
}
inline f32x16 rounded_bf16(f32x16 v) {
  return _mm512_castsi512_ps(_mm512_slli_epi32(bf16_rounded_bits(v), 16));
}
inline void store_bf16(uint16_t* p, f32x16 v, mask16 m) {
  _mm256_mask_storeu_epi16(p, m, _mm512_cvtepi32_epi16(bf16_rounded_bits(v)));
}

#elif defined(__AVX2__) && defined(__FMA__)

constexpr int VECTOR_REGISTERS = 16;
struct f32x16 {
  __m256 lo, hi;
};
struct mask16 {  // all ones in a lane that exists
  __m256i lo, hi;
};

inline f32x16 zeros() { return {_mm256_setzero_ps(), _mm256_setzero_ps()}; }
inline f32x16 splat(float v) { return {_mm256_set1_ps(v), _mm256_set1_ps(v)}; }
inline f32x16 load(const float* p) { return {_mm256_loadu_ps(p), _mm256_loadu_ps(p + 8)}; }
inline void store(float* p, f32x16 v) {
  _mm256_storeu_ps(p, v.lo);
  _mm256_storeu_ps(p + 8, v.hi);
}
inline bool all_set(__m256i m) { return _mm256_testc_si256(m, _mm256_set1_epi32(-1)); }
inline bool none_set(__m256i m) { return _mm256_testz_si256(m, m); }
inline bool all_lanes(mask16 m) { return all_set(m.hi); }  // a mask of first lanes
// Masked lanes are neither read nor written (no fault past a row's end). A half wholly in or out takes a
// plain move or none: masked moves are slow (microcoded stores on some CPUs), and a row of 8 (mini's heads)
// fills one half exactly.
inline __m256 load(const float* p, __m256i m) {
  return all_set(m) ? _mm256_loadu_ps(p) : none_set(m) ? _mm256_setzero_ps() : _mm256_maskload_ps(p, m);
}
inline void store(float* p, __m256 v, __m256i m) {
  if (all_set(m))
    _mm256_storeu_ps(p, v);
  else if (!none_set(m))
    _mm256_maskstore_ps(p, m, v);
}
inline f32x16 load(const float* p, mask16 m) { return {load(p, m.lo), load(p + 8, m.hi)}; }
inline void store(float* p, f32x16 v, mask16 m) {
  store(p, v.lo, m.lo);
  store(p + 8, v.hi, m.hi);
}
inline f32x16 add(f32x16 a, f32x16 b) { return {_mm256_add_ps(a.lo, b.lo), _mm256_add_ps(a.hi, b.hi)}; }
inline f32x16 sub(f32x16 a, f32x16 b) { return {_mm256_sub_ps(a.lo, b.lo), _mm256_sub_ps(a.hi, b.hi)}; }
inline f32x16 mul(f32x16 a, f32x16 b) { return {_mm256_mul_ps(a.lo, b.lo), _mm256_mul_ps(a.hi, b.hi)}; }
inline f32x16 divide(f32x16 a, f32x16 b) { return {_mm256_div_ps(a.lo, b.lo), _mm256_div_ps(a.hi, b.hi)}; }
inline f32x16 maximum(f32x16 a, f32x16 b) { return {_mm256_max_ps(a.lo, b.lo), _mm256_max_ps(a.hi, b.hi)}; }
inline f32x16 fmadd(f32x16 a, f32x16 b, f32x16 c) {
  return {_mm256_fmadd_ps(a.lo, b.lo, c.lo), _mm256_fmadd_ps(a.hi, b.hi, c.hi)};
}
inline f32x16 fnmadd(f32x16 a, f32x16 b, f32x16 c) {
  return {_mm256_fnmadd_ps(a.lo, b.lo, c.lo), _mm256_fnmadd_ps(a.hi, b.hi, c.hi)};
}
inline f32x16 where(mask16 m, f32x16 a, f32x16 b) {
  return {_mm256_blendv_ps(b.lo, a.lo, _mm256_castsi256_ps(m.lo)),
          _mm256_blendv_ps(b.hi, a.hi, _mm256_castsi256_ps(m.hi))};
}
inline mask16 less(f32x16 a, f32x16 b) {
  return {_mm256_castps_si256(_mm256_cmp_ps(a.lo, b.lo, _CMP_LT_OQ)),
          _mm256_castps_si256(_mm256_cmp_ps(a.hi, b.hi, _CMP_LT_OQ))};
}

inline mask16 first_lanes(int64_t count) {
  const __m256i n = _mm256_set1_epi32(static_cast<int32_t>(std::clamp<int64_t>(count, 0, 16)));
  return {_mm256_cmpgt_epi32(n, _mm256_setr_epi32(0, 1, 2, 3, 4, 5, 6, 7)),
          _mm256_cmpgt_epi32(n, _mm256_setr_epi32(8, 9, 10, 11, 12, 13, 14, 15))};
}
inline mask16 lanes_from(int64_t first) {
  const mask16 m = first_lanes(first);
  return {_mm256_xor_si256(m.lo, _mm256_set1_epi32(-1)), _mm256_xor_si256(m.hi, _mm256_set1_epi32(-1))};
}
// How many lanes a mask of first_lanes holds.
inline int count_lanes(mask16 m) {
  return __builtin_popcount(_mm256_movemask_ps(_mm256_castsi256_ps(m.lo))) +
         __builtin_popcount(_mm256_movemask_ps(_mm256_castsi256_ps(m.hi)));
}

inline f32x16 round_to_integer(f32x16 x) {
  constexpr int nearest = _MM_FROUND_TO_NEAREST_INT | _MM_FROUND_NO_EXC;
  return {_mm256_round_ps(x.lo, nearest), _mm256_round_ps(x.hi, nearest)};
}
// p * 2^n for integral n from -252 on, as two exact scalings by 2^(n/2) (each a normal float's exponent);
// n is capped at 254, past which p * 2^n is inf anyway.
inline __m256 times_power_of_two(__m256 p, __m256 n) {
  const __m256i k = _mm256_min_epi32(_mm256_cvtps_epi32(n), _mm256_set1_epi32(254));
  const __m256i half = _mm256_srai_epi32(k, 1);
  auto power = [](__m256i e) {  // 2^e: e + 127 in the exponent's bits
    return _mm256_castsi256_ps(_mm256_slli_epi32(_mm256_add_epi32(e, _mm256_set1_epi32(127)), 23));
  };
  return _mm256_mul_ps(_mm256_mul_ps(p, power(half)), power(_mm256_sub_epi32(k, half)));
}
inline f32x16 times_power_of_two(f32x16 p, f32x16 n) {
  return {times_power_of_two(p.lo, n.lo), times_power_of_two(p.hi, n.hi)};
}

// 8 bfloat16 as float32, by a shift.
inline __m256 load_bf16(const uint16_t* p) {
  const __m128i bits = _mm_loadu_si128(reinterpret_cast<const __m128i*>(p));
  return _mm256_castsi256_ps(_mm256_slli_epi32(_mm256_cvtepu16_epi32(bits), 16));
}
inline f32x16 load_bf16(const uint16_t* p, mask16 m) {  // m: first lanes
  if (all_lanes(m)) return {load_bf16(p), load_bf16(p + 8)};
  uint16_t part[16] = {};
  std::memcpy(part, p, sizeof(uint16_t) * count_lanes(m));
  return {load_bf16(part), load_bf16(part + 8)};
}

inline f32x16 load_bf16_even(const uint16_t* p) {
  const __m256i a = _mm256_loadu_si256(reinterpret_cast<const __m256i*>(p));
  const __m256i b = _mm256_loadu_si256(reinterpret_cast<const __m256i*>(p + 16));
  return {_mm256_castsi256_ps(_mm256_slli_epi32(a, 16)), _mm256_castsi256_ps(_mm256_slli_epi32(b, 16))};
}
inline f32x16 load_bf16_odd(const uint16_t* p) {
  const __m256i a = _mm256_loadu_si256(reinterpret_cast<const __m256i*>(p));
  const __m256i b = _mm256_loadu_si256(reinterpret_cast<const __m256i*>(p + 16));
  const __m256i high_halves = _mm256_set1_epi32(int32_t(0xFFFF0000u));
  return {_mm256_castsi256_ps(_mm256_and_si256(a, high_halves)),
          _mm256_castsi256_ps(_mm256_and_si256(b, high_halves))};
}
inline void interleave(f32x16 even, f32x16 odd, f32x16& first, f32x16& second) {
  auto zip = [](__m256 e, __m256 o, __m256& a, __m256& b) {  // e0 o0 e1 o1 .. e3 o3 | e4 o4 .. e7 o7
    const __m256 low = _mm256_unpacklo_ps(e, o), high = _mm256_unpackhi_ps(e, o);
    a = _mm256_permute2f128_ps(low, high, 0x20);
    b = _mm256_permute2f128_ps(low, high, 0x31);
  };
  zip(even.lo, odd.lo, first.lo, first.hi);
  zip(even.hi, odd.hi, second.lo, second.hi);
}
inline void deinterleave(f32x16 first, f32x16 second, f32x16& even, f32x16& odd) {  // interleave undone
  auto unzip = [](__m256 a, __m256 b, __m256& e, __m256& o) {
    const __m256 low = _mm256_permute2f128_ps(a, b, 0x20), high = _mm256_permute2f128_ps(a, b, 0x31);
    e = _mm256_shuffle_ps(low, high, 0x88);
    o = _mm256_shuffle_ps(low, high, 0xDD);
  };
  unzip(first.lo, first.hi, even.lo, odd.lo);
  unzip(second.lo, second.hi, even.hi, odd.hi);
}

inline __m256i bf16_rounded_bits(__m256 v) {
  const __m256i u = _mm256_castps_si256(v);
  const __m256i odd = _mm256_and_si256(_mm256_srli_epi32(u, 16), _mm256_set1_epi32(1));
  const __m256i rounded = _mm256_add_epi32(u, _mm256_add_epi32(odd, _mm256_set1_epi32(0x7FFF)));
  const __m256 nan = _mm256_cmp_ps(v, v, _CMP_UNORD_Q);
  return _mm256_srli_epi32(
      _mm256_castps_si256(_mm256_blendv_ps(_mm256_castsi256_ps(rounded),
                                           _mm256_castsi256_ps(_mm256_set1_epi32(0x7FC00000)), nan)),
      16);
}
inline f32x16 rounded_bf16(f32x16 v) {
  return {_mm256_castsi256_ps(_mm256_slli_epi32(bf16_rounded_bits(v.lo), 16)),
          _mm256_castsi256_ps(_mm256_slli_epi32(bf16_rounded_bits(v.hi), 16))};
}
inline void store_bf16(uint16_t* p, f32x16 v, mask16 m) {  // m: first lanes
  // packus interleaves the halves' 128-bit lanes; the permute puts them back in order.
  const __m256i bits = _mm256_permute4x64_epi64(
      _mm256_packus_epi32(bf16_rounded_bits(v.lo), bf16_rounded_bits(v.hi)), 0xD8);
  if (all_lanes(m)) return _mm256_storeu_si256(reinterpret_cast<__m256i*>(p), bits);
  alignas(32) uint16_t part[16];
  _mm256_store_si256(reinterpret_cast<__m256i*>(part), bits);
  std::memcpy(p, part, sizeof(uint16_t) * count_lanes(m));
}

#else
#error "the CPU kernels need AVX-512 (F, BW, VL) or AVX2 with FMA"
#endif

// Lanes n..n+15 of a row of N floats that exist.
inline mask16 tail_mask(int64_t n, int64_t N) { return first_lanes(N - n); }

// 16 weights as float32, from bfloat16 bits or float32.
inline f32x16 load_weights(const uint16_t* p, mask16 mask) { return load_bf16(p, mask); }
inline f32x16 load_weights(const float* p, mask16 mask) { return load(p, mask); }

// 16 values of a float32 or bfloat16 row as float32.
inline f32x16 load16(const float* p, mask16 mask) { return load(p, mask); }
inline f32x16 load16(const at::BFloat16* p, mask16 mask) {
  return load_bf16(reinterpret_cast<const uint16_t*>(p), mask);
}

// 16 floats stored as float32, or rounded to bfloat16.
inline void store16(float* p, f32x16 v, mask16 mask) { store(p, v, mask); }
inline void store16(at::BFloat16* p, f32x16 v, mask16 mask) {
  store_bf16(reinterpret_cast<uint16_t*>(p), v, mask);
}

// n values at p (float32 or bfloat16) into float32 at out.
inline void widen(const float* p, float* out, int64_t n) { std::copy_n(p, n, out); }
inline void widen(const at::BFloat16* p, float* out, int64_t n) {
  for (int64_t i = 0; i < n; i += 16) {
    const mask16 mask = tail_mask(i, n);
    store(out + i, load16(p + i, mask), mask);
  }
}

// v as a T holds it: unchanged for float32, rounded to bfloat16 and widened back.
template <typename T>
inline f32x16 rounded_as(f32x16 v);
template <>
inline f32x16 rounded_as<float>(f32x16 v) {
  return v;
}
template <>
inline f32x16 rounded_as<at::BFloat16>(f32x16 v) {
  return rounded_bf16(v);
}

// n float32 values at p into out (float32, or rounded to bfloat16).
template <typename T>
inline void narrow(const float* p, T* out, int64_t n) {
  for (int64_t i = 0; i < n; i += 16) {
    const mask16 mask = tail_mask(i, n);
    store16(out + i, load16(p + i, mask), mask);
  }
}

// The sum of v's 16 lanes, added in lane order (the same bits on every instruction set).
inline float sum_lanes(f32x16 v) {
  alignas(64) float lanes[16];
  store(lanes, v);
  float sum = 0.0f;
  for (const float lane : lanes) sum += lane;
  return sum;
}

// The largest of x[0..n), -inf for none.
inline float max_of(const float* x, int64_t n) {
  const f32x16 none = splat(-std::numeric_limits<float>::infinity());
  f32x16 top = none;
  for (int64_t i = 0; i < n; i += 16) {
    const mask16 mask = tail_mask(i, n);
    top = maximum(top, where(mask, load(x + i, mask), none));
  }
  alignas(64) float lanes[16];
  store(lanes, top);
  return *std::max_element(lanes, lanes + 16);
}

// exp(x) for 16 floats at once: range reduction x = n ln2 + r with |r| <= ln2 / 2, a degree-6 polynomial
// for exp(r), then the scaling by 2^n; about 1 ulp. Above 88 it is inf, as exp is; below -87 about 1e-38
// instead of 0 or a denormal, which no softmax or SiLU here can tell apart.
inline f32x16 exp16(f32x16 x) {
  x = maximum(x, splat(-87.0f));
  const f32x16 n = round_to_integer(mul(x, splat(1.44269504088896341f)));
  f32x16 r = fnmadd(n, splat(0.693359375f), x);
  r = fnmadd(n, splat(-2.12194440e-4f), r);
  f32x16 p = splat(1.0f / 720);
  p = fmadd(p, r, splat(1.0f / 120));
  p = fmadd(p, r, splat(1.0f / 24));
  p = fmadd(p, r, splat(1.0f / 6));
  p = fmadd(p, r, splat(0.5f));
  p = fmadd(p, r, splat(1.0f));
  p = fmadd(p, r, splat(1.0f));
  return times_power_of_two(p, n);
}

// silu(g) = g / (1 + exp(-g)) for 16 floats.
inline f32x16 silu16(f32x16 g) { return divide(g, add(splat(1.0f), exp16(sub(zeros(), g)))); }
