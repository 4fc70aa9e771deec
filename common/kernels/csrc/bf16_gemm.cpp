// out [M, N] float32 = x [M, K] float32 @ w [K, N] bfloat16 (input-major, row-major), for CPUs with AVX-512
// but without bfloat16 units, at decode's few rows. Why: common/kernels/bf16_gemm.py.
//
// Each thread owns a range of 16-column vectors and streams the weight rows over it, KB rows at a time
// (contiguous reads; walking one column block down all K rows would stride across pages instead). A
// bfloat16 is the top half of a float32, so widening is a shift, and every product is exact in float32.
// The accumulators stay in `out`, cache-resident for a thread's columns, loaded once per KB weight rows; RB
// rows of x at a time give the FMAs independent chains.

#include <ATen/Parallel.h>
#include <immintrin.h>
#include <torch/extension.h>

#include <array>
#include <vector>

namespace {

constexpr int64_t KB = 16;              // weight rows held in registers per pass over the columns
constexpr int RB = 4;                   // rows of x per accumulator block
constexpr int64_t GRAIN_ELEMS = 32768;  // weight elements a thread gets at least (forking costs microseconds)

inline __mmask16 tail_mask(int64_t n, int64_t N) {
  return n + 16 <= N ? __mmask16(0xFFFF) : __mmask16((1u << (N - n)) - 1);
}

inline __m512 load_bf16(const uint16_t* p, __mmask16 mask) {
  const __m256i half = _mm256_maskz_loadu_epi16(mask, p);
  return _mm512_castsi512_ps(_mm512_slli_epi32(_mm512_cvtepu16_epi32(half), 16));
}

template <int R>
inline void rows(const float* x, const __m512* wv, int64_t kn, float* o, int64_t K, int64_t N,
                 __mmask16 mask) {
  __m512 acc[R];
  for (int r = 0; r < R; ++r) acc[r] = _mm512_maskz_loadu_ps(mask, o + r * N);
  for (int64_t i = 0; i < kn; ++i)
    for (int r = 0; r < R; ++r) acc[r] = _mm512_fmadd_ps(_mm512_set1_ps(x[r * K + i]), wv[i], acc[r]);
  for (int r = 0; r < R; ++r) _mm512_mask_storeu_ps(o + r * N, mask, acc[r]);
}

void columns(const float* x, const uint16_t* w, float* out, int64_t M, int64_t K, int64_t N, int64_t v0,
             int64_t v1) {
  for (int64_t m = 0; m < M; ++m)
    for (int64_t v = v0; v < v1; ++v)
      _mm512_mask_storeu_ps(out + m * N + v * 16, tail_mask(v * 16, N), _mm512_setzero_ps());
  __m512 wv[KB];
  for (int64_t k = 0; k < K; k += KB) {
    const int64_t kn = std::min(KB, K - k);
    for (int64_t v = v0; v < v1; ++v) {
      const int64_t n = v * 16;
      const __mmask16 mask = tail_mask(n, N);
      for (int64_t i = 0; i < kn; ++i) wv[i] = load_bf16(w + (k + i) * N + n, mask);
      int64_t m = 0;
      for (; m + RB <= M; m += RB) rows<RB>(x + m * K + k, wv, kn, out + m * N + n, K, N, mask);
      for (; m < M; ++m) rows<1>(x + m * K + k, wv, kn, out + m * N + n, K, N, mask);
    }
  }
}

// x and out float32, w bfloat16, all contiguous CPU tensors.
void check_operands(const torch::Tensor& x, const torch::Tensor& w, const torch::Tensor& out) {
  TORCH_CHECK(x.scalar_type() == torch::kFloat32 && out.scalar_type() == torch::kFloat32,
              "x and out must be float32");
  TORCH_CHECK(w.scalar_type() == torch::kBFloat16, "w must be bfloat16");
  TORCH_CHECK(x.device().is_cpu() && w.device().is_cpu() && out.device().is_cpu(), "CPU tensors only");
  TORCH_CHECK(x.is_contiguous() && w.is_contiguous() && out.is_contiguous(),
              "x, w and out must be contiguous");
}

}  // namespace

void mm_out(const torch::Tensor& x, const torch::Tensor& w, torch::Tensor& out) {
  TORCH_CHECK(x.dim() == 2 && w.dim() == 2 && out.dim() == 2, "x, w and out must be 2-D");
  check_operands(x, w, out);
  const int64_t M = x.size(0), K = x.size(1), N = w.size(1);
  TORCH_CHECK(w.size(0) == K, "x [M, K] and w [K, N] do not match: K = ", K, " and ", w.size(0));
  TORCH_CHECK(out.size(0) == M && out.size(1) == N, "out must be [", M, ", ", N, "]");
  const float* xp = x.data_ptr<float>();
  const auto* wp = reinterpret_cast<const uint16_t*>(w.data_ptr<at::BFloat16>());
  float* op = out.data_ptr<float>();
  const int64_t grain = std::max<int64_t>(1, GRAIN_ELEMS / std::max<int64_t>(1, 16 * K));
  at::parallel_for(0, (N + 15) / 16, grain,
                   [&](int64_t v0, int64_t v1) { columns(xp, wp, op, M, K, N, v0, v1); });
}

// Routed experts: rows offsets[e]..offsets[e+1] of x times w[e], for every expert e, in one call (at decode
// an expert gets a few rows, and a call per expert costs more in dispatch than in arithmetic).
void grouped_mm_out(const torch::Tensor& x, const torch::Tensor& w, const torch::Tensor& offsets,
                    torch::Tensor& out) {
  TORCH_CHECK(x.dim() == 2 && w.dim() == 3 && out.dim() == 2 && offsets.dim() == 1,
              "x [R, K], w [E, K, N], offsets [E + 1] and out [R, N] expected");
  check_operands(x, w, out);
  TORCH_CHECK(offsets.scalar_type() == torch::kInt64 && offsets.device().is_cpu() && offsets.is_contiguous(),
              "offsets must be a contiguous int64 CPU tensor");
  const int64_t R = x.size(0), K = x.size(1), E = w.size(0), N = w.size(2);
  TORCH_CHECK(w.size(1) == K, "x [R, K] and w [E, K, N] do not match: K = ", K, " and ", w.size(1));
  TORCH_CHECK(out.size(0) == R && out.size(1) == N, "out must be [", R, ", ", N, "]");
  TORCH_CHECK(offsets.size(0) == E + 1, "offsets must have ", E + 1, " entries");
  const int64_t* off = offsets.data_ptr<int64_t>();
  TORCH_CHECK(off[0] == 0 && off[E] == R, "offsets must run from 0 to ", R);
  for (int64_t e = 0; e < E; ++e) TORCH_CHECK(off[e] <= off[e + 1], "offsets must not decrease");
  // Work items: (expert, a range of column vectors), each about GRAIN_ELEMS weight elements.
  const int64_t vecs = (N + 15) / 16;
  const int64_t chunk = std::max<int64_t>(1, GRAIN_ELEMS / std::max<int64_t>(1, 16 * K));
  std::vector<std::array<int64_t, 3>> items;
  for (int64_t e = 0; e < E; ++e)
    if (off[e + 1] > off[e])
      for (int64_t v = 0; v < vecs; v += chunk) items.push_back({e, v, std::min(vecs, v + chunk)});
  const float* xp = x.data_ptr<float>();
  const auto* wp = reinterpret_cast<const uint16_t*>(w.data_ptr<at::BFloat16>());
  float* op = out.data_ptr<float>();
  at::parallel_for(0, static_cast<int64_t>(items.size()), 1, [&](int64_t i0, int64_t i1) {
    for (int64_t i = i0; i < i1; ++i) {
      const auto [e, v0, v1] = items[i];
      columns(xp + off[e] * K, wp + e * K * N, op + off[e] * N, off[e + 1] - off[e], K, N, v0, v1);
    }
  });
}

PYBIND11_MODULE(TORCH_EXTENSION_NAME, m) {
  m.def("mm_out", &mm_out, "out = x @ w (float32 x, bfloat16 w)");
  m.def("grouped_mm_out", &grouped_mm_out, "out[rows of e] = x[rows of e] @ w[e] for every expert e");
}
