"""The captured decode step (common/engine/decode_graph.py) against the modules it stands in for: the same
logits, cache entries and expert counts bit for bit, and only where the modules take the kernels' path."""

from pathlib import Path

import pytest
import torch

from common.checkpoint import load_model, write_random_checkpoint
from common.config import EngineConfig
from common.engine.decode_graph import DecodeGraph
from common.engine.engine import LLMEngine
from common.engine.sampling_params import SamplingParams
from common.kernels import bf16_gemm, cpu_extension
from common.kvcache import BlockPool
from common.model.mla import AttentionBatch
from common.model.moe import MoE
from services.cli import build_parser, engine_config
from tests.model_configs import CONFIGS

pytestmark = pytest.mark.skipif(
    not cpu_extension.available(), reason="the CPU kernels need AVX-512 or AVX2 with FMA, and a compiler"
)
DTYPES = [torch.float32] + ([torch.bfloat16] if bf16_gemm.available() else [])


def model_of(
    tmp_path: Path,
    name: str,
    dtype: torch.dtype,
    bias: bool = False,
    shape: dict | None = None,
    **load: object,
):
    config = {**CONFIGS[name], "attention_bias": bias, **(shape or {})}
    directory = write_random_checkpoint(tmp_path / name, config, seed=3)
    config, model = load_model(directory, dtype, progress=False, **load)  # type: ignore[arg-type]
    return config, model


def step_of(config, dtype: torch.dtype, decodes: list[tuple[list[int], int]]):
    """A pool of random pages and a decode-only batch over them, with each token's id and position."""
    gen = torch.Generator().manual_seed(4)
    pool = BlockPool(config.num_hidden_layers, 16, 4, config.latent_dim, dtype, "cpu")
    pool.pages.copy_(torch.randn(pool.pages.shape, generator=gen))
    batch = AttentionBatch.build([], decodes, pool.block_size)
    ids = torch.randint(2, config.vocab_size, (len(decodes),), generator=gen)
    return pool, batch, ids, torch.tensor([n - 1 for _, n in decodes])


def counted(model) -> list[torch.Tensor]:
    """Fresh expert counts on every gate (as the engine gives them), to compare what each path adds."""
    counts = []
    for layer in model.layers:
        if isinstance(layer.mlp, MoE):
            layer.mlp.gate.counts = torch.zeros(layer.mlp.gate.num_experts, dtype=torch.int64)
            counts.append(layer.mlp.gate.counts)
    return counts


# Latents (and a low-rank query) of whole strips: their first products' weights are packed and joined.
WHOLE_STRIPS = {"v2_lite": {"kv_lora_rank": 48}, "v3": {"kv_lora_rank": 48, "q_lora_rank": 64}}


@pytest.mark.parametrize("dtype", DTYPES)
@pytest.mark.parametrize(
    "name, bias, shape",
    [
        ("v2_lite", False, None),
        ("v3", False, None),
        ("v2_group_yarn", True, None),
        ("v2_lite", False, WHOLE_STRIPS["v2_lite"]),
        ("v3", False, WHOLE_STRIPS["v3"]),
        ("v2_lite_tied", False, None),
    ],
)
def test_a_decode_step_gives_the_modules_bits(tmp_path: Path, name: str, bias: bool, shape, dtype) -> None:
    """Without and with a low-rank query, biases, every gate method; shared experts inside the routed
    experts' call; a dense first layer; the queries' and latents' first products as one (bfloat16 packed);
    an lm_head tied to the embedding."""
    config, model = model_of(tmp_path, name, dtype, bias, shape)
    joined = [layer.self_attn.input_projection() is not None for layer in model.layers]
    whole_strips = shape in WHOLE_STRIPS.values()
    assert all(joined) if whole_strips and dtype is torch.bfloat16 else not any(joined)
    graph = DecodeGraph.capture(model)
    assert graph is not None
    pool, batch, ids, positions = step_of(config, dtype, [([0, 1], 7), ([2], 1), ([3, 4, 5], 9)])
    assert graph.takes(batch, pool)
    with torch.inference_mode():
        counts, pages = counted(model), pool.pages.clone()
        want = model(ids, positions, batch, pool)
        want_pages, want_counts = pool.pages.clone(), [c.clone() for c in counts]
        pool.pages.copy_(pages)
        counts = counted(model)
        got = graph(ids, positions, batch, pool)
    assert torch.equal(got, want)
    assert torch.equal(pool.pages, want_pages)
    assert all(torch.equal(a, b) for a, b in zip(counts, want_counts, strict=True))
    assert sum(int(c.sum()) for c in counts) == 3 * config.num_experts_per_tok * len(counts)


def test_only_decode_steps_the_kernels_take_are_replayed(tmp_path: Path) -> None:
    config, model = model_of(tmp_path, "v2_lite", DTYPES[-1])
    graph = DecodeGraph.capture(model)
    assert graph is not None
    pool, batch, _, _ = step_of(config, graph.dtype, [([0], 2)])
    assert graph.takes(batch, pool)
    prefill = AttentionBatch.build([([1], 0, 3)], [([0], 2)], pool.block_size)
    assert not graph.takes(prefill, pool)  # a prefill chunk runs the modules
    other = BlockPool(config.num_hidden_layers, 4, 4, config.latent_dim, torch.float16, "cpu")
    assert not graph.takes(batch, other)  # pages of another dtype: the modules' own write path
    if graph.dtype is torch.bfloat16:
        many = AttentionBatch.build([], [([0], 2)] * (bf16_gemm.MAX_ROWS + 1), pool.block_size)
        assert not graph.takes(many, pool)  # past MAX_ROWS the products go to another GEMM


def test_no_graph_where_the_experts_or_the_attention_are_elsewhere(tmp_path: Path) -> None:
    _, shard = model_of(tmp_path, "v2_lite", torch.float32, expert_ids=[0, 1, 2])
    assert DecodeGraph.capture(shard) is None  # a shard of the experts: the rest are remote
    _, router = model_of(tmp_path, "v2_lite", torch.float32, attention=False)
    assert DecodeGraph.capture(router) is None  # attention on attention workers


def test_the_engine_replays_decode_steps_unless_told_to_run_eager(checkpoint_dir) -> None:
    """Greedy tokens of a batch whose sequences finish at different steps, with and without the captured
    decode step (`--enforce-eager`, vLLM's flag), and the flag from the command line to the engine."""
    path = checkpoint_dir("v3")
    prompts = [[2, 3, 4], [5, 6, 7, 8, 9], [10] * 11]
    tokens = []
    for eager in (False, True):
        config = EngineConfig(dtype="float32", device="cpu", block_size=4, enforce_eager=eager)
        engine = LLMEngine.from_checkpoint(path, config)
        assert (engine.runner.decode_graph is None) == eager
        outputs = engine.generate(
            prompts, [SamplingParams(temperature=0, max_tokens=n, ignore_eos=True) for n in (9, 4, 7)]
        )
        tokens.append([o.outputs[0].token_ids for o in outputs])
    assert tokens[0] == tokens[1]
    assert [len(t) for t in tokens[0]] == [9, 4, 7]
    args = build_parser().parse_args(["generate", "--model", path, "--prompt", "hi", "--enforce-eager"])
    assert engine_config(args).enforce_eager and not EngineConfig().enforce_eager


@pytest.mark.parametrize("parts", ["gate", "experts", "gate, experts, mlp", ""])
def test_a_layer_binds_the_gate_and_the_experts_or_a_dense_mlp(parts: str) -> None:
    """csrc/decode_layer.cpp runs a MoE layer's gate and experts together, or a dense layer's MLP."""
    w = torch.zeros(4, 4)
    given = {
        "gate": (w, None, 2, "softmax", "greedy", 1, 1, False, 1.0),
        "experts": (w[None, None], w[None, None], 0),
        "mlp": (w, w),
    }
    with pytest.raises(ValueError, match="the gate and the experts, or a dense MLP"):
        cpu_extension.module().DecodeLayer(
            input_norm=(w[0], 1e-6),
            post_norm=(w[0], 1e-6),
            queries=(w, None, None, None, None, 0.0),
            latents=(w, None, w[0], 1e-6),
            input_projection=None,
            w_uk=w,
            w_uv_t=w,
            o_proj=w,
            o_bias=None,
            attention=(2, 2, 2, False, 1.0),
            **{name: given[name] if name in parts else None for name in given},
        )
