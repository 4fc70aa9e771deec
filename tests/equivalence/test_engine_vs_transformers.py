"""The engine under continuous batching gives transformers' greedy tokens, whatever the schedule."""

from __future__ import annotations

import pytest
import torch

from common.config import EngineConfig
from common.engine.engine import LLMEngine
from common.engine.sampling_params import SamplingParams
from common.kernels import cpu_extension

transformers = pytest.importorskip("transformers")

SHARED = list(range(40, 56))  # a 16-token prefix that later requests find in the prefix cache
PROMPTS = [
    [3, 4, 5],
    SHARED + [7, 8],
    list(range(100, 141)),
    [9],
    SHARED + [60, 61, 62, 63, 64],
    [(11 * i) % 380 + 2 for i in range(23)],
    SHARED + [70],
    [200, 201, 202, 203, 204, 205, 206],
]
ARRIVAL_STEP = [0, 0, 0, 2, 5, 5, 9, 14]
MAX_TOKENS = 24


def reference(path: str) -> list[list[int]]:
    ref = transformers.AutoModelForCausalLM.from_pretrained(path, dtype=torch.float32).eval()
    ref.generation_config.eos_token_id = None
    return [
        ref.generate(torch.tensor([p]), max_new_tokens=MAX_TOKENS, do_sample=False, pad_token_id=0)[
            0, len(p) :
        ].tolist()
        for p in PROMPTS
    ]


@pytest.mark.parametrize("name", ["v2_lite", "v3"])
def test_staggered_chunked_preempted_batch_matches_transformers(name, checkpoint_dir):
    path = checkpoint_dir(name)
    latent_bytes_per_block = 4 * 4 * 48 * (4 if name == "v3" else 3)  # 4 tokens x float32 x latent x layers
    config = EngineConfig(
        dtype="float32",
        device="cpu",
        block_size=4,
        kv_cache_memory=40 * latent_bytes_per_block,  # 160 tokens for ~400 needed: forces preemption
        max_num_batched_tokens=16,  # long prompts are prefilled in chunks
        max_num_seqs=8,
    )
    engine = LLMEngine.from_checkpoint(path, config)
    assert engine.blocks.num_blocks == 40
    # Decode-only steps replay the captured kernel calls where the kernels run: they are compared here too.
    assert (engine.runner.decode_graph is not None) == cpu_extension.available()
    params = SamplingParams(temperature=0, max_tokens=MAX_TOKENS, ignore_eos=True)
    results: dict[str, list[int]] = {}
    cached: dict[str, int] = {}
    step = 0
    while len(results) < len(PROMPTS):
        for i, arrival in enumerate(ARRIVAL_STEP):
            if arrival == step:
                engine.add_request(PROMPTS[i], params, request_id=str(i))
        for out in engine.step():
            if out.finished:
                results[out.request_id] = out.outputs[0].token_ids
                cached[out.request_id] = out.num_cached_tokens
        engine.blocks.check_invariants()
        step += 1
        assert step < 2000

    want = reference(path)
    for i in range(len(PROMPTS)):
        assert results[str(i)] == want[i], f"request {i}"
    assert engine.scheduler.num_preemptions > 0
    assert any(cached[str(i)] >= 16 for i in (4, 6)), cached  # the shared prefix was reused
    assert engine.blocks.num_used_blocks == 0
