// The Python bindings of every kernel in this folder: one extension, built by ../cpu_extension.py.

#include <torch/extension.h>

#include <optional>
#include <string>
#include <tuple>

torch::Tensor bf16_mm(const torch::Tensor& x, const torch::Tensor& w);
torch::Tensor bf16_bmm(const torch::Tensor& x, const torch::Tensor& w);
torch::Tensor grouped_swiglu(const torch::Tensor& x, const torch::Tensor& expert_ids,
                             const torch::Tensor& weights, const torch::Tensor& w13, const torch::Tensor& w2,
                             int64_t shared);
std::tuple<torch::Tensor, torch::Tensor> moe_gate(const torch::Tensor& x, const torch::Tensor& weight,
                                                  const std::optional<torch::Tensor>& bias, int64_t top_k,
                                                  const std::string& scoring, const std::string& method,
                                                  int64_t n_group, int64_t topk_group, bool norm_topk_prob,
                                                  double routed_scaling_factor);
torch::Tensor paged_latent_decode(const torch::Tensor& q, const torch::Tensor& pages,
                                  const torch::Tensor& block_tables, const torch::Tensor& context_lens,
                                  double scale, int64_t value_dim, int64_t num_splits);
torch::Tensor flash_attn_varlen(const torch::Tensor& q, const torch::Tensor& k, const torch::Tensor& v,
                                const torch::Tensor& cu_seqlens_q, const torch::Tensor& cu_seqlens_k,
                                double scale, bool causal);
torch::Tensor rms_norm(const torch::Tensor& x, const torch::Tensor& weight, double eps,
                       const std::optional<torch::Tensor>& residual);
torch::Tensor silu_and_mul(const torch::Tensor& x);
torch::Tensor rotary(const torch::Tensor& x, const torch::Tensor& cos, const torch::Tensor& sin,
                     bool interleaved);

// Every kernel lets go of the GIL while it runs (it touches no Python object), as torch's own operators do:
// the gRPC and engine threads of a service keep running beside a kernel call.
PYBIND11_MODULE(TORCH_EXTENSION_NAME, m) {
  const auto nogil = py::call_guard<py::gil_scoped_release>();
  m.def("bf16_mm", &bf16_mm, "x @ w for a bfloat16 w, in x's dtype", nogil);
  m.def("bf16_bmm", &bf16_bmm, "x[b] @ w[b] for a bfloat16 w, in x's dtype", nogil);
  m.def("grouped_swiglu", &grouped_swiglu, "a layer's experts (in strip order) in one call",
        py::arg("x"), py::arg("expert_ids"), py::arg("weights"), py::arg("w13"), py::arg("w2"),
        py::arg("shared") = 0, nogil);
  m.def("moe_gate", &moe_gate, "a MoE layer's gate: (weights, expert ids) of each token's top k experts",
        nogil);
  m.def("paged_latent_decode", &paged_latent_decode, "absorbed MLA decode over paged latents", nogil);
  m.def("flash_attn_varlen", &flash_attn_varlen, "attention over packed sequences (prefill)", nogil);
  m.def("rms_norm", &rms_norm, "weight * x / rms(x), computed in float32 (x first added into residual)",
        py::arg("x"), py::arg("weight"), py::arg("eps"), py::arg("residual") = py::none(), nogil);
  m.def("silu_and_mul", &silu_and_mul, "silu(gate) * up of [rows, 2I], computed in float32", nogil);
  m.def("rotary", &rotary, "rotary embedding into the half-split layout, computed in float32", nogil);
}
