// The Python bindings of every kernel in this folder: one extension, built by ../cpu_extension.py.

#include <torch/extension.h>

#include "decode_layer.h"
#include "decode_model.h"
#include "gemm_amx.h"
#include "kernels.h"

// Every kernel lets go of the GIL while it runs (it touches no Python object), as torch's own operators do:
// the gRPC and engine threads of a service keep running beside a kernel call.
PYBIND11_MODULE(TORCH_EXTENSION_NAME, m) {
  const auto nogil = py::call_guard<py::gil_scoped_release>();
  m.def("amx_ready", &amx_ready, "whether AMX tiles multiply here: built for them, granted by the OS");
  m.def("bf16_mm", &bf16_mm, "x @ w for a bfloat16 w, in x's dtype", nogil);
  m.def("bf16_bmm", &bf16_bmm, "x[b] @ w[b] for a bfloat16 w, in x's dtype", nogil);
  m.def("grouped_swiglu", &grouped_swiglu, "a layer's experts (in strip order) in one call",
        py::arg("x"), py::arg("expert_ids"), py::arg("weights"), py::arg("w13"), py::arg("w2"),
        py::arg("shared") = 0, nogil);
  m.def("moe_gate", &moe_gate, "a MoE layer's gate: (weights, expert ids) of each token's top k experts",
        py::arg("x"), py::arg("weight"), py::arg("bias"), py::arg("top_k"), py::arg("scoring"),
        py::arg("method"), py::arg("n_group"), py::arg("topk_group"), py::arg("norm_topk_prob"),
        py::arg("routed_scaling_factor"), py::arg("counts") = py::none(), nogil);
  m.def("paged_latent_decode", &paged_latent_decode, "absorbed MLA decode over paged latents", nogil);
  m.def("flash_attn_varlen", &flash_attn_varlen, "attention over packed sequences (prefill)", nogil);
  m.def("rms_norm", &rms_norm, "weight * x / rms(x), computed in float32 (x first added into residual)",
        py::arg("x"), py::arg("weight"), py::arg("eps"), py::arg("residual") = py::none(), nogil);
  m.def("silu_and_mul", &silu_and_mul, "silu(gate) * up of [rows, 2I], computed in float32", nogil);
  m.def("rotary", &rotary, "rotary embedding into the half-split layout, computed in float32", nogil);
  m.def("mla_queries", &mla_queries, "a MLA layer's queries, q_pe rotated (absorbed, given W_UK)", nogil);
  m.def("mla_cache_latents", &mla_cache_latents, "a MLA layer's cache entries, written into its pages",
        nogil);
  m.def("mla_output", &mla_output, "absorbed MLA's latent outputs through W_UV and o_proj", nogil);
  m.def("inverse_cdf_draw", &inverse_cdf_draw, "a token a row: its softmax's inverse CDF at u", nogil);
  using L = DecodeLayer;
  using Tensor = torch::Tensor;
  py::class_<L>(m, "DecodeLayer", "a decoder layer of a decode step as one call, weights bound")
      .def(py::init<L::Norm, L::Norm, L::QueryWeights, L::LatentWeights, std::optional<Tensor>, Tensor,
                    Tensor, Tensor, std::optional<Tensor>, L::Attention, std::optional<L::GateArgs>,
                    std::optional<L::Experts>, std::optional<L::Dense>>(),
           py::kw_only(), py::arg("input_norm"), py::arg("post_norm"), py::arg("queries"), py::arg("latents"),
           py::arg("input_projection"), py::arg("w_uk"), py::arg("w_uv_t"), py::arg("o_proj"),
           py::arg("o_bias"), py::arg("attention"), py::arg("gate"), py::arg("experts"), py::arg("mlp"))
      .def("__call__", &L::forward, py::arg("x"), py::arg("residual"), py::arg("cos"), py::arg("sin"),
           py::arg("pages"), py::arg("slots"), py::arg("block_tables"), py::arg("context_lens"),
           py::arg("counts"), nogil);
  using M = DecodeModel;
  py::class_<M>(m, "DecodeModel", "a decode step of the whole model as one call, weights bound")
      .def(py::init<Tensor, Tensor, Tensor, std::vector<L>, L::Norm, Tensor, bool>(), py::kw_only(),
           py::arg("embedding"), py::arg("cos_table"), py::arg("sin_table"), py::arg("layers"),
           py::arg("norm"), py::arg("lm_head"), py::arg("tied_lm_head"))
      .def("__call__", &M::forward, py::arg("ids"), py::arg("positions"), py::arg("pages"), py::arg("slots"),
           py::arg("block_tables"), py::arg("context_lens"), py::arg("counts"), nogil);
}
