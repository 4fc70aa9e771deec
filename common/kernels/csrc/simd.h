// AVX-512 helpers the kernels share: masks for row tails, bfloat16 widening, a vector exp.
#pragma once

#include <immintrin.h>

#include <torch/extension.h>

#include <algorithm>
#include <cstdint>

// Lanes n..n+15 of a row of N floats that exist.
inline __mmask16 tail_mask(int64_t n, int64_t N) {
  return n + 16 <= N ? __mmask16(0xFFFF) : __mmask16((1u << (N - n)) - 1);
}

// 16 bfloat16 as float32: a bfloat16 is the top half of a float32, so widening is a shift.
inline __m512 load_bf16(const uint16_t* p, __mmask16 mask) {
  const __m256i half = _mm256_maskz_loadu_epi16(mask, p);
  return _mm512_castsi512_ps(_mm512_slli_epi32(_mm512_cvtepu16_epi32(half), 16));
}

// 16 weights as float32, from bfloat16 bits or float32.
inline __m512 load_weights(const uint16_t* p, __mmask16 mask) { return load_bf16(p, mask); }
inline __m512 load_weights(const float* p, __mmask16 mask) { return _mm512_maskz_loadu_ps(mask, p); }

// n values at p (float32 or bfloat16) into float32 at out.
inline void widen(const float* p, float* out, int64_t n) { std::copy_n(p, n, out); }
inline void widen(const at::BFloat16* p, float* out, int64_t n) {
  const auto* bits = reinterpret_cast<const uint16_t*>(p);
  for (int64_t i = 0; i < n; i += 16) {
    const __mmask16 mask = tail_mask(i, n);
    _mm512_mask_storeu_ps(out + i, mask, load_bf16(bits + i, mask));
  }
}

// 16 values of a float32 or bfloat16 row as float32.
inline __m512 load16(const float* p, __mmask16 mask) { return _mm512_maskz_loadu_ps(mask, p); }
inline __m512 load16(const at::BFloat16* p, __mmask16 mask) {
  return load_bf16(reinterpret_cast<const uint16_t*>(p), mask);
}

// 16 floats rounded to bfloat16 as torch rounds (to nearest even, a NaN stays a NaN), as the low halves of
// 32-bit lanes.
inline __m512i bf16_rounded_bits(__m512 v) {
  const __m512i u = _mm512_castps_si512(v);
  const __m512i odd = _mm512_and_si512(_mm512_srli_epi32(u, 16), _mm512_set1_epi32(1));
  const __m512i rounded = _mm512_add_epi32(u, _mm512_add_epi32(odd, _mm512_set1_epi32(0x7FFF)));
  return _mm512_srli_epi32(
      _mm512_mask_mov_epi32(rounded, _mm512_cmp_ps_mask(v, v, _CMP_UNORD_Q), _mm512_set1_epi32(0x7FC00000)),
      16);
}

// 16 floats stored as float32, or rounded to bfloat16.
inline void store16(float* p, __m512 v, __mmask16 mask) { _mm512_mask_storeu_ps(p, mask, v); }
inline void store16(at::BFloat16* p, __m512 v, __mmask16 mask) {
  _mm256_mask_storeu_epi16(reinterpret_cast<uint16_t*>(p), mask, _mm512_cvtepi32_epi16(bf16_rounded_bits(v)));
}

// v as a T holds it: unchanged for float32, rounded to bfloat16 and widened back.
template <typename T>
inline __m512 rounded_as(__m512 v);
template <>
inline __m512 rounded_as<float>(__m512 v) {
  return v;
}
template <>
inline __m512 rounded_as<at::BFloat16>(__m512 v) {
  return _mm512_castsi512_ps(_mm512_slli_epi32(bf16_rounded_bits(v), 16));
}

// n float32 values at p into out (float32, or rounded to bfloat16).
template <typename T>
inline void narrow(const float* p, T* out, int64_t n) {
  for (int64_t i = 0; i < n; i += 16) {
    const __mmask16 mask = tail_mask(i, n);
    store16(out + i, load16(p + i, mask), mask);
  }
}

// exp(x) for 16 floats at once: range reduction x = n ln2 + r with |r| <= ln2 / 2, a degree-6 polynomial
// for exp(r), then 2^n by scalef; about 1 ulp. Above 88 it is inf, as exp is; below -87 about 1e-38
// instead of 0 or a denormal, which no softmax or SiLU here can tell apart.
inline __m512 exp16(__m512 x) {
  x = _mm512_max_ps(x, _mm512_set1_ps(-87.0f));
  const __m512 n = _mm512_roundscale_ps(_mm512_mul_ps(x, _mm512_set1_ps(1.44269504088896341f)),
                                        _MM_FROUND_TO_NEAREST_INT | _MM_FROUND_NO_EXC);
  __m512 r = _mm512_fnmadd_ps(n, _mm512_set1_ps(0.693359375f), x);
  r = _mm512_fnmadd_ps(n, _mm512_set1_ps(-2.12194440e-4f), r);
  __m512 p = _mm512_set1_ps(1.0f / 720);
  p = _mm512_fmadd_ps(p, r, _mm512_set1_ps(1.0f / 120));
  p = _mm512_fmadd_ps(p, r, _mm512_set1_ps(1.0f / 24));
  p = _mm512_fmadd_ps(p, r, _mm512_set1_ps(1.0f / 6));
  p = _mm512_fmadd_ps(p, r, _mm512_set1_ps(0.5f));
  p = _mm512_fmadd_ps(p, r, _mm512_set1_ps(1.0f));
  p = _mm512_fmadd_ps(p, r, _mm512_set1_ps(1.0f));
  return _mm512_scalef_ps(p, n);
}

// silu(g) = g / (1 + exp(-g)) for 16 floats.
inline __m512 silu16(__m512 g) {
  return _mm512_div_ps(g, _mm512_add_ps(_mm512_set1_ps(1.0f), exp16(_mm512_sub_ps(_mm512_setzero_ps(), g))));
}
