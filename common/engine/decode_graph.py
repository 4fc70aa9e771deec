"""A decode step of the model as one C++ call, its arguments bound once (CPU).

On CPU the modules already hand a decode step's work to a few C++ calls a layer (csrc/): norms, MLA's
queries, latents, attention and output, the gate, the experts. At a step of a few sequences those calls'
arithmetic is small and the Python around them is not: module calls, parameter lookups, the checks that
pick a path, about 2 ms of an 8 ms one-sequence step of the mini model on a 2-core CPU. This is the CPU's
counterpart of the CUDA graphs vLLM replays for decode: captured once the weights are final
(`DecodeGraph.capture`), replayed at every decode-only step, making the calls the modules make on that path
with the same arguments in the same order, so its logits are theirs bit for bit. The calls are made from
C++ (csrc/decode_layer.cpp a layer, csrc/decode_model.cpp the embedding, the layers, the final norm and the
lm_head): from Python, eight calls a layer converting their arguments cost a one-sequence step about 0.15 ms
more, and the modules between the layers about 0.1 ms. The modules stay the reference and the path for
everything else (prefill chunks, other devices, remote attention or experts).
"""

from __future__ import annotations

import torch

from common.kernels import bf16_gemm, cpu_extension
from common.kvcache import BlockPool
from common.model.decoder import DecoderLayer, DeepseekModel
from common.model.linear import Linear
from common.model.mla import MLA, AttentionBatch
from common.model.moe import MLP, MoE, RoutedExperts


def _layer(layer: DecoderLayer) -> object:
    """DecoderLayer.forward on a decode-only batch: the kernel calls its modules make there, in one C++ call
    with the weights bound once (csrc/decode_layer.cpp)."""
    attn, mlp = layer.self_attn, layer.mlp
    assert isinstance(attn, MLA)
    gate = experts = dense = None
    if isinstance(mlp, MoE):
        gate = mlp.gate.kernel_args()
        experts = (mlp.experts.w13, mlp.experts.w2, mlp.experts.num_shared)  # shared experts among them
    else:
        dense = (mlp.gate_up_proj, mlp.down_proj)
    before, after = layer.input_layernorm, layer.post_attention_layernorm
    w_uk, w_uv_t = attn.absorbed_weights()
    return cpu_extension.module().DecodeLayer(
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
        mlp=dense,
    )


class DecodeGraph:
    """DeepseekModel.forward on the decode-only batches the C++ kernels take, as one call."""

    def __init__(self, model: DeepseekModel) -> None:
        self.dtype = model.embed_tokens.weight.dtype
        self.gates = [layer.mlp.gate if isinstance(layer.mlp, MoE) else None for layer in model.layers]
        tied = not isinstance(model.lm_head, Linear)  # an nn.Linear on the embedding's own table
        self.kernels = cpu_extension.module().DecodeModel(
            embedding=model.embed_tokens.weight,
            cos_table=model.rotary.cos_table,
            sin_table=model.rotary.sin_table,
            layers=[_layer(layer) for layer in model.layers],  # type: ignore[arg-type]
            norm=(model.norm.weight, model.norm.eps),
            lm_head=model.lm_head.weight if tied else model.lm_head.weight_t,
            tied_lm_head=tied,
        )

    def __call__(
        self, ids: torch.Tensor, positions: torch.Tensor, batch: AttentionBatch, cache: BlockPool
    ) -> torch.Tensor:
        """float32 logits [T, vocab], as DeepseekModel.forward gives them."""
        counts = [None if gate is None else gate.counts for gate in self.gates]  # the engine may swap them
        return self.kernels(
            ids, positions, cache.pages, batch.slot_mapping, batch.block_tables, batch.context_lens, counts
        )

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
        if model.norm.weight.dtype is not dtype or not isinstance(model.lm_head, Linear | torch.nn.Linear):
            return None
        for layer in model.layers:
            norms = (layer.input_layernorm.weight, layer.post_attention_layernorm.weight)
            if type(layer.self_attn) is not MLA or any(w.dtype is not dtype for w in norms):
                return None
            mlp = layer.mlp
            if type(mlp) is MLP:
                if mlp.gate_up_proj.dtype is not dtype:
                    return None
            elif not isinstance(mlp, MoE) or not (
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
