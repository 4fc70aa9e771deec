"""Checkpoints in the Hugging Face Hub layout: safetensors weights (single file or sharded with
`model.safetensors.index.json`), `config.json` and `tokenizer.json`.

Loading is memory-mapped and casts to the serving dtype as it copies; it can take only a subset of the routed
experts (an expert worker holds a shard). `write_random_checkpoint` writes small random models in exactly the
published layout, so tests and benchmarks never download anything.
"""

from __future__ import annotations

import json
import os
import random
from collections.abc import Iterator, Sequence
from pathlib import Path
from typing import Any

import torch
from safetensors import safe_open
from safetensors.torch import save_file
from tokenizers import Tokenizer, decoders, models, pre_tokenizers, trainers
from tqdm import tqdm

from common.config import ModelConfig
from common.kernels import cpu_extension
from common.kernels.strips import in_strip_order

BOS_TOKEN = "<｜begin▁of▁sentence｜>"
EOS_TOKEN = "<｜end▁of▁sentence｜>"
INDEX_FILE = "model.safetensors.index.json"
SINGLE_FILE = "model.safetensors"


class CheckpointError(RuntimeError):
    """A checkpoint that cannot be loaded; the message names the file and the tensor."""


# ---------------------------------------------------------------------------------------------- reading
class CheckpointReader:
    """Name -> tensor access over the safetensors files of a checkpoint directory, memory-mapped."""

    def __init__(self, directory: str | Path) -> None:
        self.directory = Path(directory)
        index = self.directory / INDEX_FILE
        if index.is_file():
            try:
                weight_map = json.loads(index.read_text())["weight_map"]
            except (json.JSONDecodeError, KeyError) as e:
                raise CheckpointError(f"{index}: not a safetensors index ({e})") from e
            self.files = {name: self.directory / file for name, file in weight_map.items()}
        elif (self.directory / SINGLE_FILE).is_file():
            path = self.directory / SINGLE_FILE
            with safe_open(path, "pt") as f:
                self.files = dict.fromkeys(f.keys(), path)
        else:
            raise CheckpointError(f"{self.directory}: no {SINGLE_FILE} or {INDEX_FILE}")
        for path in set(self.files.values()):
            if not path.is_file():
                raise CheckpointError(f"{path}: listed in {INDEX_FILE} but missing")
        self._open: dict[Path, Any] = {}

    def __contains__(self, name: str) -> bool:
        return name in self.files

    def _file(self, name: str) -> Any:
        path = self.files.get(name)
        if path is None:
            raise CheckpointError(f"{self.directory}: tensor {name!r} is missing")
        if path not in self._open:
            self._open[path] = safe_open(path, "pt")
        return self._open[path]

    def shape(self, name: str) -> tuple[int, ...]:
        """The stored shape, read from the header only."""
        return tuple(self._file(name).get_slice(name).get_shape())

    def get(self, name: str) -> torch.Tensor:
        """The tensor as stored; a missing name is a CheckpointError."""
        try:
            return self._file(name).get_tensor(name)
        except CheckpointError:
            raise
        except Exception as e:  # a truncated or corrupt file
            raise CheckpointError(f"{self.files[name]}: cannot read tensor {name!r} ({e})") from e


def _hub_targets(model: torch.nn.Module, config: ModelConfig) -> Iterator[tuple[str, torch.Tensor]]:
    """Yield (Hub tensor name, destination view in our module) for every weight the model needs.

    Our module names equal the Hub's except where we fuse: gate/up projections into `gate_up_proj`, and the
    per-expert tensors of a layer into stacked `w13` / `w2`. Matmul weights are kept input-major ([in, out],
    common/model/linear.py), so they are written through transposed views of the Hub's [out, in] tensors.
    """
    yield "model.embed_tokens.weight", model.embed_tokens.weight
    yield "model.norm.weight", model.norm.weight
    if not config.tie_word_embeddings:
        yield "lm_head.weight", model.lm_head.weight
    for i, layer in enumerate(model.layers):
        yield from layer_targets(layer, i)


def param_targets(module: torch.nn.Module, prefix: str) -> Iterator[tuple[str, torch.Tensor]]:
    """(Hub name, destination) of each parameter of `module`; a Linear's input-major `weight_t` is written
    through its [out, in] view, under the Hub's name `weight`."""
    for name, param in module.named_parameters():
        if name.endswith(".weight_t"):
            if in_strip_order(param):
                raise ValueError(f"{prefix}.{name} is packed in strip order and takes no checkpoint tensor")
            name, param = name.removesuffix("_t"), param.T
        yield f"{prefix}.{name}", param


def layer_targets(layer: torch.nn.Module, i: int) -> Iterator[tuple[str, torch.Tensor]]:
    prefix = f"model.layers.{i}"
    for name, param in param_targets(layer, prefix):
        if not name.startswith(f"{prefix}.mlp.experts.") and not name.endswith(("gate_up_proj", "down_proj")):
            yield name, param
    for name, buf in layer.named_buffers():
        if name.endswith("e_score_correction_bias"):
            yield f"{prefix}.{name}", buf
    for name, module in layer.named_modules():
        if hasattr(module, "gate_up_proj"):  # dense MLP or shared experts
            half = module.gate_up_proj.shape[1] // 2
            yield f"{prefix}.{name}.gate_proj.weight", module.gate_up_proj[:, :half].T
            yield f"{prefix}.{name}.up_proj.weight", module.gate_up_proj[:, half:].T
            yield f"{prefix}.{name}.down_proj.weight", module.down_proj.T
        if hasattr(module, "w13"):  # routed experts of this shard
            yield from expert_targets(module, prefix)


def expert_targets(experts: torch.nn.Module, layer_prefix: str) -> Iterator[tuple[str, torch.Tensor]]:
    if experts.packed:
        raise ValueError("routed experts packed in strip order take no checkpoint tensors: load, then pack")
    half = experts.w13.shape[2] // 2
    for local, e in enumerate(experts.expert_ids):
        base = f"{layer_prefix}.mlp.experts.{e}"
        yield f"{base}.gate_proj.weight", experts.w13[local, :, :half].T
        yield f"{base}.up_proj.weight", experts.w13[local, :, half:].T
        yield f"{base}.down_proj.weight", experts.w2[local].T


def load_weights(
    targets: Sequence[tuple[str, torch.Tensor]], reader: CheckpointReader, progress: bool = True
) -> None:
    """Copy every named tensor into its destination, casting dtype; checks every shape before writing any."""
    for name, dest in targets:
        shape = reader.shape(name)
        if shape != tuple(dest.shape):
            raise CheckpointError(
                f"{reader.files[name]}: tensor {name!r} has shape {list(shape)}, expected {list(dest.shape)}"
            )
    with torch.no_grad():
        for name, dest in tqdm(
            targets, desc="loading weights", unit="tensor", disable=not progress, leave=False
        ):
            dest.copy_(reader.get(name))
    if any(dest.device.type == "cpu" for _, dest in targets):
        cpu_extension.available()  # built now (the first time on a machine), not in the first step


def load_model(
    directory: str | Path,
    dtype: torch.dtype = torch.bfloat16,
    device: str | torch.device = "cpu",
    expert_ids: Sequence[int] | None = None,
    progress: bool = True,
    attention: bool = True,
) -> tuple[ModelConfig, torch.nn.Module]:
    """Build the model for `directory` and load its weights (of the routed experts, only `expert_ids`).

    attention=False loads no MLA weight and leaves every layer's `self_attn` None, for a router whose
    attention runs on attention workers (it attaches their stand-ins): at DeepSeek-V3's size that is about
    11B parameters the router never reads.
    """
    from common.model.decoder import DeepseekModel

    config = ModelConfig.from_file(directory)
    reader = CheckpointReader(directory)
    with torch.device("meta"):
        model = DeepseekModel(config, expert_ids=expert_ids)
    if not attention:
        for layer in model.layers:
            layer.self_attn = None
    model = model.to(dtype=dtype).to_empty(device=device)
    if config.tie_word_embeddings:  # to_empty gave the lm_head a table of its own, which nothing loads
        model.lm_head.weight = model.embed_tokens.weight
    model.reset_buffers()
    load_weights(list(_hub_targets(model, config)), reader, progress)
    _pack(model)
    return config, model.eval().requires_grad_(False)


def load_tokenizer(directory: str | Path) -> Tokenizer:
    path = Path(directory) / "tokenizer.json"
    if not path.is_file():
        raise CheckpointError(f"{path}: tokenizer.json not found")
    try:
        return Tokenizer.from_file(str(path))
    except Exception as e:
        raise CheckpointError(f"{path}: not a tokenizers file ({e})") from e


# ---------------------------------------------------------------------------------------------- writing
PRESETS: dict[str, dict] = {
    # Correctness tests: every code path, small enough for float32 runs in seconds.
    "tiny": {
        "model_type": "deepseek_v2",
        "vocab_size": 512,
        "hidden_size": 64,
        "intermediate_size": 128,
        "num_hidden_layers": 3,
        "num_attention_heads": 4,
        "num_key_value_heads": 4,
        "max_position_embeddings": 2048,
        "q_lora_rank": None,
        "kv_lora_rank": 32,
        "qk_rope_head_dim": 16,
        "qk_nope_head_dim": 16,
        "v_head_dim": 16,
        "n_routed_experts": 8,
        "n_shared_experts": 1,
        "num_experts_per_tok": 2,
        "moe_intermediate_size": 32,
        "first_k_dense_replace": 1,
        "moe_layer_freq": 1,
        "topk_method": "greedy",
        "scoring_func": "softmax",
        "norm_topk_prob": False,
        "routed_scaling_factor": 1.0,
        "rope_theta": 10000.0,
        "rope_scaling": None,
        "rms_norm_eps": 1e-6,
        "tie_word_embeddings": False,
        "bos_token_id": 0,
        "eos_token_id": 1,
    },
    # The benchmark model: about 111M parameters, DeepSeek-V2-Lite's shape scaled down.
    "mini": {
        "model_type": "deepseek_v2",
        "vocab_size": 8192,
        "hidden_size": 512,
        "intermediate_size": 1408,
        "num_hidden_layers": 8,
        "num_attention_heads": 8,
        "num_key_value_heads": 8,
        "max_position_embeddings": 4096,
        "q_lora_rank": None,
        "kv_lora_rank": 128,
        "qk_rope_head_dim": 32,
        "qk_nope_head_dim": 64,
        "v_head_dim": 64,
        "n_routed_experts": 32,
        "n_shared_experts": 2,
        "num_experts_per_tok": 4,
        "moe_intermediate_size": 256,
        "first_k_dense_replace": 1,
        "moe_layer_freq": 1,
        "topk_method": "greedy",
        "scoring_func": "softmax",
        "norm_topk_prob": False,
        "routed_scaling_factor": 1.0,
        "rope_theta": 10000.0,
        "rope_scaling": None,
        "rms_norm_eps": 1e-6,
        "tie_word_embeddings": False,
        "bos_token_id": 0,
        "eos_token_id": 1,
    },
}


def random_weights(config: ModelConfig, seed: int = 0) -> dict[str, torch.Tensor]:
    """Hub-named random weights, scaled so activations and logits stay O(1) (clear greedy winners)."""
    from common.model.decoder import DeepseekModel

    with torch.device("meta"):
        model = DeepseekModel(config)
    gen = torch.Generator().manual_seed(seed)
    tensors: dict[str, torch.Tensor] = {}
    for name, dest in _hub_targets(model, config):
        shape = tuple(dest.shape)
        if name.endswith("norm.weight"):
            t = 1.0 + 0.1 * torch.randn(shape, generator=gen)
        elif name.endswith("e_score_correction_bias"):
            t = 0.1 * torch.randn(shape, generator=gen)
        elif name == "model.embed_tokens.weight":
            t = torch.randn(shape, generator=gen)
        else:
            t = torch.randn(shape, generator=gen) / shape[-1] ** 0.5
        tensors[name] = t
    return tensors


def build_tokenizer(vocab_size: int, seed: int = 0) -> Tokenizer:
    """A byte-level BPE tokenizer whose vocabulary covers exactly ids 0..vocab_size-1 (0 = BOS, 1 = EOS)."""
    if vocab_size < 258:
        raise ValueError(f"vocab_size must be >= 258 (2 special + 256 byte tokens), got {vocab_size}")
    rng = random.Random(seed)
    syllables = [c + v for c in "bcdfghjklmnprstvwz" for v in "aeiou"] + list("aeiou")
    words = ["".join(rng.choices(syllables, k=rng.randint(1, 4))) for _ in range(4000)]
    corpus = [" ".join(rng.choices(words, k=50)) for _ in range(2000)]
    tok = Tokenizer(models.BPE())
    tok.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    tok.decoder = decoders.ByteLevel()
    trainer = trainers.BpeTrainer(
        vocab_size=vocab_size,
        special_tokens=[BOS_TOKEN, EOS_TOKEN],
        initial_alphabet=pre_tokenizers.ByteLevel.alphabet(),
        show_progress=False,
    )
    tok.train_from_iterator(corpus, trainer)
    missing = vocab_size - tok.get_vocab_size()
    if missing > 0:  # a small corpus may run out of merges: fill the rest so every id decodes
        tok.add_special_tokens([f"<|reserved_{i}|>" for i in range(missing)])
    assert tok.get_vocab_size() == vocab_size
    return tok


def write_random_checkpoint(
    out: str | Path,
    config: str | dict,
    seed: int = 0,
    dtype: torch.dtype = torch.bfloat16,
    max_shard_bytes: int | None = None,
) -> Path:
    """Write config.json, tokenizer.json and random safetensors weights (sharded above max_shard_bytes)."""
    raw = dict(PRESETS[config]) if isinstance(config, str) else dict(config)
    model_config = ModelConfig.from_dict(raw)
    out = Path(out)
    out.mkdir(parents=True, exist_ok=True)
    tensors = {k: v.to(dtype).contiguous() for k, v in random_weights(model_config, seed).items()}
    # The correction bias is a float32 buffer in every implementation.
    tensors = {k: v.float() if k.endswith("e_score_correction_bias") else v for k, v in tensors.items()}

    shards: list[dict[str, torch.Tensor]] = [{}]
    size = 0
    for name, t in tensors.items():
        nbytes = t.numel() * t.element_size()
        if max_shard_bytes and shards[-1] and size + nbytes > max_shard_bytes:
            shards.append({})
            size = 0
        shards[-1][name] = t
        size += nbytes
    metadata = {"format": "pt"}
    if len(shards) == 1:
        save_file(shards[0], out / SINGLE_FILE, metadata=metadata)
    else:
        weight_map = {}
        for i, shard in enumerate(shards):
            file = f"model-{i + 1:05d}-of-{len(shards):05d}.safetensors"
            save_file(shard, out / file, metadata=metadata)
            weight_map.update(dict.fromkeys(shard, file))
        total = sum(t.numel() * t.element_size() for t in tensors.values())
        (out / INDEX_FILE).write_text(
            json.dumps({"metadata": {"total_size": total}, "weight_map": weight_map})
        )

    (out / "config.json").write_text(json.dumps(raw, indent=2))
    build_tokenizer(model_config.vocab_size, seed).save(str(out / "tokenizer.json"))
    (out / "tokenizer_config.json").write_text(
        json.dumps(
            {"bos_token": BOS_TOKEN, "eos_token": EOS_TOKEN, "tokenizer_class": "PreTrainedTokenizerFast"}
        )
    )
    return out


def resolve_model(model: str) -> Path:
    """A checkpoint directory, or a preset name (tiny, mini): its random checkpoint, written once into the
    user's cache directory (XDG_CACHE_HOME or ~/.cache) so every later start reuses it."""
    path = Path(model)
    if model in PRESETS and not (path / "config.json").exists():
        cache = (
            Path(os.environ.get("XDG_CACHE_HOME") or Path.home() / ".cache") / "latentmoe" / "presets" / model
        )
        if not (cache / "config.json").exists():
            write_random_checkpoint(cache.with_suffix(".tmp"), model)
            cache.with_suffix(".tmp").rename(cache)
        return cache
    if not (path / "config.json").exists():
        raise CheckpointError(
            f"{path}: not a checkpoint directory (no config.json) nor a preset {sorted(PRESETS)}"
        )
    return path


def load_expert_shard(
    directory: str | Path,
    expert_ids: Sequence[int],
    dtype: torch.dtype = torch.bfloat16,
    device: str | torch.device = "cpu",
    progress: bool = True,
) -> tuple[ModelConfig, dict[int, torch.nn.Module]]:
    """Only the given routed experts of every MoE layer (an expert worker's shard): {layer: RoutedExperts}."""
    from common.model.moe import RoutedExperts

    config = ModelConfig.from_file(directory)
    bad = [e for e in expert_ids if not 0 <= e < config.n_routed_experts]
    if bad:
        raise CheckpointError(f"{directory}: expert ids {bad} outside 0..{config.n_routed_experts - 1}")
    reader = CheckpointReader(directory)
    shards: dict[int, torch.nn.Module] = {}
    for layer in config.moe_layers:
        with torch.device("meta"):
            experts = RoutedExperts(config, expert_ids)
        experts = experts.to(dtype=dtype).to_empty(device=device)
        experts.reset_buffers()
        shards[layer] = experts.eval().requires_grad_(False)
    targets = [t for layer, m in shards.items() for t in expert_targets(m, f"model.layers.{layer}")]
    load_weights(targets, reader, progress)
    _pack(*shards.values())
    return config, shards


def _pack(*modules: torch.nn.Module) -> None:
    """Once loaded, weights in the layouts their kernels read best: first the routed experts, with their
    layer's shared experts where all are here (MoE.pack, RoutedExperts.pack), then MLA's projections, the
    dense MLPs and shared experts left, and lm_head (MLA.pack, MLP.pack, Linear.pack)."""
    from common.model.linear import Linear
    from common.model.mla import MLA
    from common.model.moe import MLP, MoE, RoutedExperts

    for module in modules:
        for m in list(module.modules()):
            if isinstance(m, MoE | RoutedExperts):
                m.pack()
        for m in list(module.modules()):
            if isinstance(m, MLA | MLP):
                m.pack()
        if isinstance(lm_head := getattr(module, "lm_head", None), Linear):
            lm_head.pack()


def load_attention_layers(
    directory: str | Path,
    dtype: torch.dtype = torch.bfloat16,
    device: str | torch.device = "cpu",
    progress: bool = True,
) -> tuple[ModelConfig, torch.nn.ModuleList]:
    """Only the MLA weights of every layer (an attention worker's share of the model)."""
    from common.model.mla import MLA

    config = ModelConfig.from_file(directory)
    reader = CheckpointReader(directory)
    with torch.device("meta"):
        layers = torch.nn.ModuleList(MLA(config, i) for i in range(config.num_hidden_layers))
    layers = layers.to(dtype=dtype).to_empty(device=device)
    targets = [t for i, mla in enumerate(layers) for t in param_targets(mla, f"model.layers.{i}.self_attn")]
    load_weights(targets, reader, progress)
    _pack(layers)
    return config, layers.eval().requires_grad_(False)
