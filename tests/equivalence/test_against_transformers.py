"""Our model against Hugging Face transformers' DeepseekV2/V3 on the same random Hub-layout checkpoint.

float32 logits within 1e-4 on ragged prompts, the absorbed decode form equal to the naive form, and greedy
generation token-identical through the real engine (paged cache, chunked prefill, continuous batching).
"""

from __future__ import annotations

import pytest
import torch

from common.checkpoint import load_model
from common.config import EngineConfig
from common.engine.engine import LLMEngine
from common.engine.sampling_params import SamplingParams
from common.kvcache import BlockPool
from common.model.mla import AttentionBatch
from tests.model_configs import CONFIGS

transformers = pytest.importorskip("transformers")

PROMPTS = [[5], [11, 12, 13, 14, 15], list(range(20, 37)), [(7 * i) % 380 + 2 for i in range(40)]]
BLOCK = 16


@pytest.fixture(scope="module", params=sorted(CONFIGS))
def pair(request, checkpoint_dir):
    path = checkpoint_dir(request.param)
    config, ours = load_model(path, dtype=torch.float32, progress=False)
    ref = transformers.AutoModelForCausalLM.from_pretrained(path, dtype=torch.float32).eval()
    return request.param, path, config, ours, ref


def prefill(config, model, prompts, block=BLOCK, dtype=torch.float32):
    """All prompts in one flat forward; returns per-prompt logits [len, V], the pool and block tables."""
    per_seq = -(-max(map(len, prompts)) // block) + 2
    pool = BlockPool(config.num_hidden_layers, per_seq * len(prompts), block, config.latent_dim, dtype)
    # Interleaved (non-contiguous) block tables, like a real allocator hands out.
    tables = [list(range(i, per_seq * len(prompts), len(prompts))) for i in range(len(prompts))]
    batch = AttentionBatch.build([(t, 0, len(p)) for t, p in zip(tables, prompts)], [], block)
    ids = torch.tensor([t for p in prompts for t in p])
    positions = torch.cat([torch.arange(len(p)) for p in prompts])
    with torch.no_grad():
        logits = model(ids, positions, batch, pool)
    return list(logits.split([len(p) for p in prompts])), pool, tables


def test_config_parsed_as_published(pair):
    name, _, config, _, ref = pair
    assert config.model_type == CONFIGS[name]["model_type"]
    assert config.latent_dim == ref.config.kv_lora_rank + ref.config.qk_rope_head_dim
    assert config.softmax_scale == pytest.approx(ref.model.layers[0].self_attn.scaling)


def test_logits_match_transformers(pair):
    _, _, config, ours, ref = pair
    logits, _, _ = prefill(config, ours, PROMPTS)
    for prompt, got in zip(PROMPTS, logits):
        with torch.no_grad():
            want = ref(torch.tensor([prompt])).logits[0]
        assert (got - want).abs().max().item() < 1e-4, f"prompt of {len(prompt)} tokens"


def test_absorbed_decode_equals_naive(pair):
    """One more token per sequence, attended by the weight-absorbed form and by the naive form."""
    _, _, config, ours, ref = pair
    _, pool, tables = prefill(config, ours, PROMPTS)
    nxt = torch.tensor([3, 4, 5, 6])
    positions = torch.tensor([len(p) for p in PROMPTS])
    decode = AttentionBatch.build([], [(t, len(p) + 1) for t, p in zip(tables, PROMPTS)], BLOCK)
    naive = AttentionBatch.build([(t, len(p), 1) for t, p in zip(tables, PROMPTS)], [], BLOCK)
    with torch.no_grad():
        absorbed_logits = ours(nxt, positions, decode, pool)
        naive_logits = ours(nxt, positions, naive, pool)
        want = torch.stack([ref(torch.tensor([p + [int(t)]])).logits[0, -1] for p, t in zip(PROMPTS, nxt)])
    assert (absorbed_logits - naive_logits).abs().max().item() < 1e-4
    assert (absorbed_logits - want).abs().max().item() < 1e-4


def test_absorbed_prefill_equals_naive_prefill(pair):
    """A chunk after a cached prefix, attended both ways on the same gathered context."""
    _, _, config, ours, _ = pair
    _, pool, tables = prefill(config, ours, [p[:-3] for p in PROMPTS if len(p) > 3])
    tables = tables[: len(PROMPTS) - 1]
    chunks = [p[-3:] for p in PROMPTS if len(p) > 3]
    batch = AttentionBatch.build([(t, len(p) - 3, 3) for t, p in zip(tables, PROMPTS[1:])], [], BLOCK)
    x = torch.randn(batch.num_tokens, config.hidden_size)
    attn = ours.layers[0].self_attn
    positions = torch.cat([torch.arange(len(p) - 3, len(p)) for p in PROMPTS[1:]])
    cos, sin = ours.rotary(positions)
    with torch.no_grad():
        q = attn.queries(x, cos, sin, absorb=False)
        attn.cache_latents(x, cos, sin, batch.slot_mapping, pool)
        context = pool.gather(0, batch.context_slots)
        naive = attn.attend_naive(q, context, batch)
        absorbed_q = attn.queries(x, cos, sin, absorb=True)
        absorbed = attn.absorb_output(attn.attend_absorbed_prefill(absorbed_q, context, batch))
    assert sum(map(len, chunks)) == batch.num_tokens
    assert (naive - absorbed).abs().max().item() < 1e-5


@pytest.mark.parametrize("name", sorted(CONFIGS))
def test_bfloat16_as_close_to_float32_as_transformers_bfloat16(name, checkpoint_dir):
    """In bfloat16 (matmuls upcast to float32 on CPUs without bfloat16 units, common.config.matmul_dtype),
    prefill and absorbed-decode logits stay as close to the float32 reference as transformers' own bfloat16
    logits do."""
    path = checkpoint_dir(name)
    config, ours = load_model(path, dtype=torch.bfloat16, progress=False)
    refs = {
        dtype: transformers.AutoModelForCausalLM.from_pretrained(path, dtype=dtype).eval()
        for dtype in (torch.float32, torch.bfloat16)
    }
    logits, pool, tables = prefill(config, ours, PROMPTS, dtype=torch.bfloat16)
    nxt = [3, 4, 5, 6]
    decode = AttentionBatch.build([], [(t, len(p) + 1) for t, p in zip(tables, PROMPTS)], BLOCK)
    with torch.no_grad():
        logits.append(ours(torch.tensor(nxt), torch.tensor([len(p) for p in PROMPTS]), decode, pool))
        want = {}
        for dtype, ref in refs.items():
            want[dtype] = [ref(torch.tensor([p])).logits[0].float() for p in PROMPTS]
            last = [ref(torch.tensor([p + [t]])).logits[0, -1].float() for p, t in zip(PROMPTS, nxt)]
            want[dtype].append(torch.stack(last))
    for i, got in enumerate(logits):
        ours_error = (got.float() - want[torch.float32][i]).abs().max().item()
        ref_error = (want[torch.bfloat16][i] - want[torch.float32][i]).abs().max().item()
        assert ours_error <= 2 * ref_error + 1e-3, f"{name}, logits {i}: {ours_error} against {ref_error}"


def test_greedy_generation_token_identical(pair):
    name, path, _, ours, ref = pair
    engine_config = EngineConfig(
        dtype="float32", device="cpu", block_size=BLOCK, kv_cache_memory=8 << 20, max_num_batched_tokens=24
    )  # small budget: prompts are chunk-prefilled
    engine = LLMEngine.from_checkpoint(path, engine_config)
    outputs = engine.generate(PROMPTS, SamplingParams(temperature=0, max_tokens=32, ignore_eos=True))
    ref.generation_config.eos_token_id = None
    for prompt, out in zip(PROMPTS, outputs):
        want = ref.generate(torch.tensor([prompt]), max_new_tokens=32, do_sample=False, pad_token_id=0)
        assert out.outputs[0].token_ids == want[0, len(prompt) :].tolist(), f"{name}: prompt of {len(prompt)}"
    assert engine.blocks.num_used_blocks == 0
