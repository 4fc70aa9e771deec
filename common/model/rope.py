"""Rotary position embedding for MLA's decoupled `pe` parts, with YaRN context extension.

Only `q_pe` and `k_pe` are rotated; the `nope` parts and the latent `c_kv` carry no position, which is what
lets MLA cache one position-free latent per token. DeepSeek lays the rotary dims out as interleaved pairs
(x0, x1), (x2, x3), ...; we de-interleave while rotating, so q and k come out in the same half-split layout
and their dot products are unchanged.
"""

import math

import torch
from torch import nn

from common.config import ModelConfig, RopeConfig, yarn_mscale
from common.kernels import cpu_extension


def inverse_frequencies(rope: RopeConfig, dim: int) -> tuple[torch.Tensor, float]:
    """Per-pair angular frequencies and the cos/sin magnitude factor (1 unless YaRN)."""
    pos_freqs = rope.theta ** (torch.arange(0, dim, 2, dtype=torch.float32, device="cpu") / dim)
    if rope.type == "default":
        return 1.0 / pos_freqs, 1.0

    factor, original = rope.factor, rope.original_max_position_embeddings

    def correction_dim(rotations: float) -> float:
        return dim * math.log(original / (rotations * 2 * math.pi)) / (2 * math.log(rope.theta))

    low, high = correction_dim(rope.beta_fast), correction_dim(rope.beta_slow)
    if rope.truncate:
        low, high = math.floor(low), math.ceil(high)
    low, high = max(low, 0), min(high, dim - 1)
    if low == high:
        high += 0.001
    ramp = ((torch.arange(dim // 2, dtype=torch.float32, device="cpu") - low) / (high - low)).clamp(0, 1)
    extrapolation = 1 - ramp  # high-frequency dims keep their original speed, low ones are interpolated
    inv_freq = (1.0 / (factor * pos_freqs)) * (1 - extrapolation) + (1.0 / pos_freqs) * extrapolation

    if rope.attention_factor is not None:
        magnitude = float(rope.attention_factor)
    elif rope.mscale and rope.mscale_all_dim:
        magnitude = yarn_mscale(factor, rope.mscale) / yarn_mscale(factor, rope.mscale_all_dim)
    else:
        magnitude = yarn_mscale(factor)
    return inv_freq, magnitude


class RotaryEmbedding(nn.Module):
    """cos/sin of every position up to max_position_embeddings, worked out once (vLLM's cos_sin_cache): a
    step looks its positions up, shared by every layer, where working them out would cost it half a dozen
    operators (a fifth of a millisecond of a one-sequence decode step here)."""

    def __init__(self, config: ModelConfig) -> None:
        super().__init__()
        self.config = config
        self.reset_buffers()

    def reset_buffers(self) -> None:
        inv_freq, magnitude = inverse_frequencies(self.config.rope, self.config.qk_rope_head_dim)
        old = getattr(self, "cos_table", None)
        device = old.device if old is not None and old.device.type != "meta" else "cpu"
        positions = torch.arange(self.config.max_position_embeddings, dtype=torch.float32, device="cpu")
        freqs = positions[:, None] * inv_freq[None, :]
        self.register_buffer("cos_table", (freqs.cos() * magnitude).to(device), persistent=False)
        self.register_buffer("sin_table", (freqs.sin() * magnitude).to(device), persistent=False)

    def forward(self, positions: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """cos, sin of shape [T, dim/2] in float32; positions must lie below max_position_embeddings."""
        return self.cos_table[positions], self.sin_table[positions]


def apply_rotary(x: torch.Tensor, cos: torch.Tensor, sin: torch.Tensor, interleaved: bool) -> torch.Tensor:
    """Rotate x [T, ..., dim] by its token's angles; returns the half-split layout [x1' | x2'] (one C++ call
    on CPU where common/kernels/cpu_extension.py builds)."""
    if x.dim() in (2, 3) and x.stride(-1) == 1 and cpu_extension.runs(x):
        return cpu_extension.module().rotary(x, cos, sin, interleaved)
    x1, x2 = (x[..., 0::2], x[..., 1::2]) if interleaved else x.chunk(2, dim=-1)
    shape = (cos.shape[0],) + (1,) * (x.dim() - 2) + (cos.shape[1],)
    cos, sin = cos.view(shape), sin.view(shape)
    x1, x2 = x1.float(), x2.float()
    return torch.cat((x1 * cos - x2 * sin, x2 * cos + x1 * sin), dim=-1).to(x.dtype)
