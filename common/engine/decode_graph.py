"""A decode step's decoder layers as one flat run of kernel calls, their arguments bound once (CPU).

On CPU the modules already hand a decode step's work to a few C++ calls a layer (csrc/): norms, MLA's
queries, latents, attention and output, the gate, the experts. At a step of a few sequences those calls'
arithmetic is small and the Python around them is not: module calls, parameter lookups, the checks that
pick a path, about 2 ms of an 8 ms one-sequence step of the mini model on a 2-core CPU. This is the CPU's
counterpart of the CUDA graphs vLLM replays for decode: captured once the weights are final
(`DecodeGraph.capture`), replayed at every decode-only step, making the calls the modules make on that path
with the same arguments in the same order, so its logits are theirs bit for bit. A layer's calls are made
from C++ (csrc/decode_layer.cpp): from Python, eight calls a layer converting their arguments cost a
one-sequence step about 0.15 ms more. The modules stay the reference and the path for everything else
(prefill chunks, other devices, remote attention or experts).
"""

from __future__ import annotations

import torch

from common.kernels import bf16_gemm, cpu_extension
from common.kvcache import BlockPool
from common.model.decoder import DecoderLayer, DeepseekModel
from common.model.mla import MLA, AttentionBatch
from common.model.moe import Gate, MoE, RoutedExperts


class DecodeLayer:
    """DecoderLayer.forward on a decode-only batch: the kernel calls its modules make there, in one C++ call
    with the weights bound once (csrc/decode_layer.cpp); a dense MLP runs as its module (once a step)."""

    def __init__(self, layer: DecoderLayer) -> None:
        attn = layer.self_attn
        assert isinstance(attn, MLA)
        self.layer, self.mlp = attn.layer, layer.mlp
        self.gate: Gate | None = None
        gate = experts = None
        if isinstance(layer.mlp, MoE):
            self.gate, routed = layer.mlp.gate, layer.mlp.experts
            gate = self.gate.kernel_args()
            experts = (routed.w13, routed.w2, routed.num_shared)  # shared experts among them
        before, after = layer.input_layernorm, layer.post_attention_layernorm
        w_uk, w_uv_t = attn.absorbed_weights()
        self.kernels = cpu_extension.module().DecodeLayer(
            input_norm=(before.weight, before.eps),
            post_norm=(after.weight, after.eps),
            queries=attn.query_weights(),
            latents=attn.latent_weights(),
            input_projection=attn.input_projection(),
            w_uk=w_uk,
            w_uv_t=w_uv_t,
            o_proj=attn.o_proj.weight_t,
            o_bias=attn.o_proj.bias,
            attention=(attn.num_heads, attn.rope_dim, attn.kv_rank, attn.interleaved, attn.scale),
            gate=gate,
            experts=experts,
        )

    def __call__(
        self,
        x: torch.Tensor,
        residual: torch.Tensor | None,
        cos: torch.Tensor,
        sin: torch.Tensor,
        batch: AttentionBatch,
        cache: BlockPool,
    ) -> tuple[torch.Tensor, torch.Tensor]:
        counts = None if self.gate is None else self.gate.counts
        y, residual = self.kernels(
            x,
            residual,
            cos,
            sin,
            cache.layer(self.layer),
            batch.slot_mapping,
            batch.block_tables,
            batch.context_lens,
            counts,
        )
        return (y if self.gate is not None else self.mlp(y)), residual


class DecodeGraph:
    """The decoder layers of a model whose decode step runs on the C++ kernels, as DecodeLayers."""

    def __init__(self, model: DeepseekModel) -> None:
        self.dtype = model.embed_tokens.weight.dtype
        self.layers = [DecodeLayer(layer) for layer in model.layers]  # type: ignore[arg-type]

    @classmethod
    def capture(cls, model: DeepseekModel) -> DecodeGraph | None:
        """Once the weights are loaded and packed (they must not change after): the graph, or None where
        the modules' decode path is not the kernels' (another device or dtype, kernels that do not build,
        attention or experts elsewhere)."""
        dtype = model.embed_tokens.weight.dtype
        if not (
            cpu_extension.available()
            and model.embed_tokens.weight.is_cpu
            and (dtype is torch.float32 or (dtype is torch.bfloat16 and bf16_gemm.available()))
        ):
            return None
        for layer in model.layers:
            norms = (layer.input_layernorm.weight, layer.post_attention_layernorm.weight)
            if type(layer.self_attn) is not MLA or any(w.dtype is not dtype for w in norms):
                return None
            mlp = layer.mlp
            if isinstance(mlp, MoE) and not (
                type(mlp.experts) is RoutedExperts
                and mlp.experts.holds_all
                and mlp.experts.packed
                and mlp.experts.w13.dtype is dtype
                and mlp.shared_experts is None  # they joined the routed experts (MoE.pack)
            ):
                return None
        return cls(model)

    def takes(self, batch: AttentionBatch, cache: object) -> bool:
        """Whether this step is one the graph replays: decodes only, whose products take the kernels' path
        (in bfloat16, up to bf16_gemm.MAX_ROWS rows), on a local page pool of the model's dtype."""
        return (
            batch.num_prefill_tokens == 0
            and isinstance(cache, BlockPool)
            and cache.dtype is self.dtype
            and (self.dtype is torch.float32 or batch.num_tokens <= bf16_gemm.MAX_ROWS)
        )
