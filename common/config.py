"""Model configuration parsed from a Hugging Face `config.json`, and the serving settings.

DeepSeek checkpoints exist in two spellings: the Hub's original one (`rope_theta`, `rope_scaling`,
`scoring_func`, `topk_method`, ...) and the newer transformers one (`rope_parameters`). Both parse into the
same `ModelConfig`; every field that changes the math is honoured, and a value we cannot serve is an error
that names the field.
"""

from __future__ import annotations

import functools
import json
import math
from dataclasses import dataclass, field, fields
from pathlib import Path
from typing import Any


class ConfigError(ValueError):
    """A config.json value latentmoe cannot serve; the message names the field."""


@dataclass(frozen=True)
class RopeConfig:
    """Rotary embedding of the decoupled `pe` parts, with optional YaRN context extension."""

    theta: float = 10000.0
    type: str = "default"  # "default" or "yarn"
    factor: float = 1.0
    original_max_position_embeddings: int | None = None
    beta_fast: float = 32.0
    beta_slow: float = 1.0
    mscale: float = 1.0
    mscale_all_dim: float = 0.0
    attention_factor: float | None = None
    truncate: bool = True


@dataclass(frozen=True)
class ModelConfig:
    model_type: str
    vocab_size: int
    hidden_size: int
    intermediate_size: int
    num_hidden_layers: int
    num_attention_heads: int
    max_position_embeddings: int
    # Multi-head Latent Attention
    q_lora_rank: int | None
    kv_lora_rank: int
    qk_rope_head_dim: int
    qk_nope_head_dim: int
    v_head_dim: int
    rope: RopeConfig
    rope_interleave: bool
    attention_bias: bool
    # DeepSeekMoE
    n_routed_experts: int
    n_shared_experts: int
    num_experts_per_tok: int
    moe_intermediate_size: int
    first_k_dense_replace: int
    moe_layer_freq: int
    topk_method: str
    scoring_func: str
    n_group: int
    topk_group: int
    norm_topk_prob: bool
    routed_scaling_factor: float
    # the rest
    rms_norm_eps: float
    tie_word_embeddings: bool
    bos_token_id: int | None
    eos_token_ids: tuple[int, ...]
    extra: dict[str, Any] = field(default_factory=dict, compare=False, repr=False)

    # ------------------------------------------------------------------ derived
    @property
    def qk_head_dim(self) -> int:
        return self.qk_nope_head_dim + self.qk_rope_head_dim

    @property
    def latent_dim(self) -> int:
        """Width of one cached entry per token and layer: `c_kv` + `k_pe`."""
        return self.kv_lora_rank + self.qk_rope_head_dim

    @property
    def softmax_scale(self) -> float:
        """1/sqrt(d_qk), times YaRN's mscale^2 when the config asks (DeepSeek's long-context recipe)."""
        scale = self.qk_head_dim**-0.5
        if self.rope.type == "yarn" and self.rope.mscale_all_dim:
            m = yarn_mscale(self.rope.factor, self.rope.mscale_all_dim)
            scale *= m * m
        return scale

    def is_moe_layer(self, layer: int) -> bool:
        return (
            self.n_routed_experts > 0
            and layer >= self.first_k_dense_replace
            and layer % self.moe_layer_freq == 0
        )

    @property
    def moe_layers(self) -> list[int]:
        return [i for i in range(self.num_hidden_layers) if self.is_moe_layer(i)]

    # ------------------------------------------------------------------ parsing
    @classmethod
    def from_file(cls, path: str | Path) -> ModelConfig:
        path = Path(path)
        if path.is_dir():
            path = path / "config.json"
        if not path.is_file():
            raise ConfigError(f"{path}: config.json not found")
        try:
            raw = json.loads(path.read_text())
        except json.JSONDecodeError as e:
            raise ConfigError(f"{path}: not valid JSON ({e})") from e
        return cls.from_dict(raw)

    @classmethod
    def from_dict(cls, raw: dict[str, Any]) -> ModelConfig:
        return _parse(raw)

    def to_hub_dict(self) -> dict[str, Any]:
        """The Hub's original config.json spelling (what DeepSeek publishes)."""
        d: dict[str, Any] = {
            "architectures": [
                "DeepseekV3ForCausalLM" if self.model_type == "deepseek_v3" else "DeepseekV2ForCausalLM"
            ],
            "model_type": self.model_type,
            "torch_dtype": "bfloat16",
        }
        for f in fields(self):
            if f.name in ("model_type", "rope", "extra", "eos_token_ids"):
                continue
            d[f.name] = getattr(self, f.name)
        d["eos_token_id"] = (
            self.eos_token_ids[0] if len(self.eos_token_ids) == 1 else list(self.eos_token_ids)
        )
        d["rope_theta"] = self.rope.theta
        d["rope_scaling"] = None
        if self.rope.type == "yarn":
            d["rope_scaling"] = {
                "type": "yarn",
                "factor": self.rope.factor,
                "original_max_position_embeddings": self.rope.original_max_position_embeddings,
                "beta_fast": self.rope.beta_fast,
                "beta_slow": self.rope.beta_slow,
                "mscale": self.rope.mscale,
                "mscale_all_dim": self.rope.mscale_all_dim,
            }
        if self.model_type == "deepseek_v2":
            d.pop("rope_interleave")  # V2 always rotates interleaved pairs
        return d


def yarn_mscale(scale: float, mscale: float = 1.0) -> float:
    return 1.0 if scale <= 1 else 0.1 * mscale * math.log(scale) + 1.0


# ---------------------------------------------------------------------- parsing helpers
_MODEL_TYPES = ("deepseek_v2", "deepseek_v3")
_TOPK_METHODS = ("greedy", "group_limited_greedy", "noaux_tc")
_SCORING = ("softmax", "sigmoid")


def _parse(raw: dict[str, Any]) -> ModelConfig:
    model_type = raw.get("model_type")
    if model_type not in _MODEL_TYPES:
        raise ConfigError(f"model_type: expected one of {_MODEL_TYPES}, got {model_type!r}")
    v3 = model_type == "deepseek_v3"

    def get(name: str, default: Any = None, *, required: bool = False) -> Any:
        if name in raw and raw[name] is not None:
            return raw[name]
        if required:
            raise ConfigError(f"{name}: missing from config.json")
        return default

    def integer(name: str, default: Any = None, *, minimum: int = 0, required: bool = False) -> int:
        value = get(name, default, required=required)
        if isinstance(value, bool) or not isinstance(value, int) or value < minimum:
            raise ConfigError(f"{name}: expected an integer >= {minimum}, got {value!r}")
        return value

    hidden_act = get("hidden_act", "silu")
    if hidden_act != "silu":
        raise ConfigError(f"hidden_act: only 'silu' is supported, got {hidden_act!r}")
    if get("mlp_bias", False):
        raise ConfigError("mlp_bias: MLP biases are not supported (DeepSeek checkpoints have none)")
    if get("quantization_config") is not None:
        method = raw["quantization_config"].get("quant_method", "?")
        raise ConfigError(f"quantization_config: quantized checkpoints ({method}) are not supported yet")

    q_lora_rank = raw.get("q_lora_rank")
    if q_lora_rank is not None:
        q_lora_rank = integer("q_lora_rank", minimum=1)

    n_routed = integer("n_routed_experts", 0)
    topk_method = get("topk_method", "noaux_tc" if v3 else "greedy")
    if topk_method not in _TOPK_METHODS:
        raise ConfigError(f"topk_method: expected one of {_TOPK_METHODS}, got {topk_method!r}")
    scoring = get("scoring_func", "sigmoid" if v3 else "softmax")
    if scoring not in _SCORING:
        raise ConfigError(f"scoring_func: expected one of {_SCORING}, got {scoring!r}")
    n_group = integer("n_group", 1, minimum=1)
    topk_group = integer("topk_group", 1, minimum=1)
    top_k = integer("num_experts_per_tok", 1 if n_routed else 0)
    if n_routed:
        if topk_method != "greedy":
            if n_routed % n_group:
                raise ConfigError(f"n_group: {n_group} does not divide n_routed_experts={n_routed}")
            if topk_group > n_group:
                raise ConfigError(f"topk_group: {topk_group} exceeds n_group={n_group}")
            if top_k > topk_group * (n_routed // n_group):
                raise ConfigError(f"num_experts_per_tok: {top_k} exceeds the experts of {topk_group} groups")
        if not 1 <= top_k <= n_routed:
            raise ConfigError(f"num_experts_per_tok: expected 1..{n_routed}, got {top_k}")
        if topk_method == "noaux_tc" and n_routed // n_group < 2:
            raise ConfigError(
                "n_group: noaux_tc scores each group by its top-2 experts; groups need >= 2 experts"
            )

    heads = integer("num_attention_heads", required=True, minimum=1)
    kv_heads = get("num_key_value_heads", heads)
    if kv_heads != heads:
        raise ConfigError(
            f"num_key_value_heads: MLA has one latent for all heads; expected {heads}, got {kv_heads}"
        )

    eos = get("eos_token_id", [])
    eos_ids = tuple(eos) if isinstance(eos, list) else (eos,)

    rope_dim = integer("qk_rope_head_dim", required=True, minimum=2)
    if rope_dim % 2:
        raise ConfigError(f"qk_rope_head_dim: must be even, got {rope_dim}")

    known = {f.name for f in fields(ModelConfig)}
    cfg = ModelConfig(
        model_type=model_type,
        vocab_size=integer("vocab_size", required=True, minimum=1),
        hidden_size=integer("hidden_size", required=True, minimum=1),
        intermediate_size=integer("intermediate_size", required=True, minimum=1),
        num_hidden_layers=integer("num_hidden_layers", required=True, minimum=1),
        num_attention_heads=heads,
        max_position_embeddings=integer("max_position_embeddings", 4096, minimum=1),
        q_lora_rank=q_lora_rank,
        kv_lora_rank=integer("kv_lora_rank", required=True, minimum=1),
        qk_rope_head_dim=rope_dim,
        qk_nope_head_dim=integer("qk_nope_head_dim", required=True, minimum=1),
        v_head_dim=integer("v_head_dim", required=True, minimum=1),
        rope=_parse_rope(raw),
        rope_interleave=bool(get("rope_interleave", True)) if v3 else True,
        attention_bias=bool(get("attention_bias", False)),
        n_routed_experts=n_routed,
        n_shared_experts=integer("n_shared_experts", 0),
        num_experts_per_tok=top_k,
        moe_intermediate_size=integer("moe_intermediate_size", 1 if not n_routed else None, minimum=1),
        first_k_dense_replace=integer("first_k_dense_replace", 0),
        moe_layer_freq=integer("moe_layer_freq", 1, minimum=1),
        topk_method=topk_method,
        scoring_func=scoring,
        n_group=n_group,
        topk_group=topk_group,
        norm_topk_prob=bool(get("norm_topk_prob", False)),
        routed_scaling_factor=float(get("routed_scaling_factor", 1.0)),
        rms_norm_eps=float(get("rms_norm_eps", 1e-6)),
        tie_word_embeddings=bool(get("tie_word_embeddings", False)),
        bos_token_id=get("bos_token_id"),
        eos_token_ids=eos_ids,
        extra={k: v for k, v in raw.items() if k not in known},
    )
    return cfg


def _parse_rope(raw: dict[str, Any]) -> RopeConfig:
    """Accept `rope_parameters` (newer transformers) or `rope_theta` + `rope_scaling` (the Hub's original)."""
    params = raw.get("rope_parameters") or {}
    scaling = raw.get("rope_scaling") or {}
    if params and scaling:
        raise ConfigError("rope_scaling: give either rope_parameters or rope_scaling, not both")
    spec = dict(params or scaling)
    theta = spec.get("rope_theta", raw.get("rope_theta", 10000.0))
    rope_type = spec.get("rope_type", spec.get("type", "default"))
    field_name = "rope_parameters" if params else "rope_scaling"
    if rope_type not in ("default", "yarn"):
        raise ConfigError(f"{field_name}: rope type {rope_type!r} is not supported (default or yarn)")
    if rope_type == "default":
        return RopeConfig(theta=float(theta))
    max_pos = raw.get("max_position_embeddings", 4096)
    original = (
        spec.get("original_max_position_embeddings") or raw.get("original_max_position_embeddings") or max_pos
    )
    factor = spec.get("factor")
    if factor is None:
        factor = max_pos / original
    if factor < 1:
        raise ConfigError(f"{field_name}: yarn factor must be >= 1, got {factor}")
    return RopeConfig(
        theta=float(theta),
        type="yarn",
        factor=float(factor),
        original_max_position_embeddings=int(original),
        beta_fast=float(spec.get("beta_fast") or 32),
        beta_slow=float(spec.get("beta_slow") or 1),
        mscale=float(spec.get("mscale") or 1.0),
        mscale_all_dim=float(spec.get("mscale_all_dim") or 0.0),
        attention_factor=spec.get("attention_factor"),
        truncate=bool(spec.get("truncate", True)),
    )


@dataclass
class EngineConfig:
    """Serving settings (the engine's knobs, named as in vLLM where they overlap)."""

    dtype: str = "auto"  # auto | float32 | bfloat16 | float16 (auto: bfloat16 where the hardware has it)
    device: str = "auto"  # auto (CUDA when present) | cpu | cuda | cuda:N
    block_size: int = 64  # tokens per KV page; 64 is what GPU MLA decode kernels use
    kv_cache_memory: float = 1 << 30  # bytes (> 1) or a fraction of free device memory (<= 1)
    max_num_seqs: int = 256
    max_num_batched_tokens: int = 2048
    max_model_len: int | None = None  # default: the model's max_position_embeddings
    enable_prefix_caching: bool = True
    enforce_eager: bool = False  # vLLM's name: every step through the modules, no captured decode step

    def __post_init__(self) -> None:
        if self.dtype not in (*DTYPES, "auto"):
            raise ConfigError(f"dtype: expected auto or one of {sorted(DTYPES)}, got {self.dtype!r}")
        if self.max_num_seqs < 1 or self.max_num_batched_tokens < 1:
            raise ConfigError("max_num_seqs and max_num_batched_tokens must be >= 1")
        if self.kv_cache_memory <= 0:
            raise ConfigError(f"kv_cache_memory: must be > 0, got {self.kv_cache_memory}")

    @property
    def torch_dtype(self) -> Any:
        """The serving dtype; `auto` is bfloat16 on GPUs and CPUs with bfloat16 matmul units, else float32."""
        import torch

        if self.dtype != "auto":
            return getattr(torch, DTYPES[self.dtype])
        if self.torch_device.type == "cpu" and not cpu_has_native_bf16():
            return torch.float32
        return torch.bfloat16

    @property
    def torch_device(self) -> Any:
        import torch

        if self.device == "auto":
            return torch.device("cuda" if torch.cuda.is_available() else "cpu")
        return torch.device(self.device)


DTYPES = {"float32": "float32", "bfloat16": "bfloat16", "float16": "float16"}


def cpu_has_native_bf16() -> bool:
    """Whether this CPU multiplies bfloat16 in hardware (AVX512-BF16 or AMX)."""
    return bool({"avx512_bf16", "amx_bf16"} & cpu_flags())


def cpu_has_native_fp16() -> bool:
    """Whether this CPU multiplies float16 in hardware (AVX512-FP16 or AMX-FP16)."""
    return bool({"avx512_fp16", "amx_fp16"} & cpu_flags())


@functools.cache
def cpu_flags() -> frozenset[str]:
    """The instruction-set flags /proc/cpuinfo lists (empty where there is none)."""
    try:
        with open("/proc/cpuinfo") as f:
            return frozenset(next((line for line in f if line.startswith("flags")), "").split())
    except OSError:
        return frozenset()


@functools.cache
def matmul_dtype(dtype: Any, device_type: str) -> Any:
    """The dtype that matmuls of `dtype` tensors run in. Without bfloat16 (or float16) units a CPU's half-
    precision GEMM is an emulation, 3-5x slower than float32; multiplying the upcast operands in float32 gives
    the same products (exact in float32) and float32 accumulation, as a native half-precision GEMM has, while
    the weights stay half-size in memory."""
    import torch

    if device_type == "cpu" and (
        (dtype == torch.bfloat16 and not cpu_has_native_bf16())
        or (dtype == torch.float16 and not cpu_has_native_fp16())
    ):
        return torch.float32
    return dtype
