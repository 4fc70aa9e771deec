"""The DeepSeek-V2/V3 decoder: embeddings, pre-norm layers of MLA + (dense MLP | DeepSeekMoE), final norm,
lm_head. Module names follow the Hub checkpoints, so weights load by name."""

from __future__ import annotations

from collections.abc import Sequence

import torch
from torch import nn

from common.config import ModelConfig
from common.kvcache import BlockPool
from common.model.linear import Linear
from common.model.mla import MLA, AttentionBatch
from common.model.moe import MLP, MoE
from common.model.norm import RMSNorm
from common.model.rope import RotaryEmbedding


class DecoderLayer(nn.Module):
    def __init__(self, config: ModelConfig, layer: int, expert_ids: Sequence[int] | None = None) -> None:
        super().__init__()
        self.input_layernorm = RMSNorm(config.hidden_size, config.rms_norm_eps)
        self.self_attn = MLA(config, layer)
        self.post_attention_layernorm = RMSNorm(config.hidden_size, config.rms_norm_eps)
        self.mlp: MoE | MLP = (
            MoE(config, expert_ids)
            if config.is_moe_layer(layer)
            else MLP(config.hidden_size, config.intermediate_size)
        )

    def forward(
        self,
        x: torch.Tensor,
        residual: torch.Tensor | None,
        cos: torch.Tensor,
        sin: torch.Tensor,
        batch: AttentionBatch,
        cache: BlockPool,
    ) -> tuple[torch.Tensor, torch.Tensor]:
        """x: the previous layer's MLP output, added to the residual stream by this layer's first norm (the
        first layer gets the embeddings and no residual). Returns (the MLP's output, the residual stream)."""
        if residual is None:
            x, residual = self.input_layernorm(x), x
        else:
            x, residual = self.input_layernorm(x, residual)
        x, residual = self.post_attention_layernorm(self.self_attn(x, cos, sin, batch, cache), residual)
        return self.mlp(x), residual


class DeepseekModel(nn.Module):
    """Runs a flat batch of tokens from many sequences; `batch` says where each lives in the paged cache."""

    def __init__(self, config: ModelConfig, expert_ids: Sequence[int] | None = None) -> None:
        super().__init__()
        self.config = config
        self.embed_tokens = nn.Embedding(config.vocab_size, config.hidden_size)
        self.layers = nn.ModuleList(
            DecoderLayer(config, i, expert_ids) for i in range(config.num_hidden_layers)
        )
        self.norm = RMSNorm(config.hidden_size, config.rms_norm_eps)
        if config.tie_word_embeddings:  # the embedding's own [vocab, hidden] table, shared
            self.lm_head = nn.Linear(config.hidden_size, config.vocab_size, bias=False)
            self.lm_head.weight = self.embed_tokens.weight
        else:
            self.lm_head = Linear(config.hidden_size, config.vocab_size)
        self.rotary = RotaryEmbedding(config)

    def reset_buffers(self) -> None:
        """Recompute the derived buffers, e.g. after building on the meta device."""
        for module in self.modules():
            if module is not self and hasattr(module, "reset_buffers"):
                module.reset_buffers()

    def forward(
        self,
        input_ids: torch.Tensor,
        positions: torch.Tensor,
        batch: AttentionBatch,
        cache: BlockPool,
        logits_indices: torch.Tensor | None = None,
    ) -> torch.Tensor:
        """input_ids, positions: [T]. Returns float32 logits for the rows in logits_indices (all if None)."""
        x, residual = self.embed_tokens(input_ids), None
        cos, sin = self.rotary(positions)
        for layer in self.layers:
            x, residual = layer(x, residual, cos, sin, batch, cache)
        if logits_indices is not None:
            x, residual = x[logits_indices], residual[logits_indices]
        x, _ = self.norm(x, residual)
        return self.lm_head(x).float()
