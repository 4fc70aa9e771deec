"""Engine behaviour beyond greedy equivalence: sampling, n > 1, aborts, bad input, streaming."""

from __future__ import annotations

import asyncio

import pytest
import torch
from prometheus_client import REGISTRY

from common.config import EngineConfig
from common.engine.async_engine import AsyncEngine
from common.engine.engine import LLMEngine
from common.engine.model_runner import ModelRunner, WorkerLost
from common.engine.sampling_params import SamplingParams

CONFIG = EngineConfig(
    dtype="float32", device="cpu", block_size=4, kv_cache_memory=4 << 20, max_num_batched_tokens=64
)


@pytest.fixture(scope="module")
def engine(checkpoint_dir):
    return LLMEngine.from_checkpoint(checkpoint_dir("v2_lite"), CONFIG)


def run_all(engine: LLMEngine) -> dict:
    done = {}
    for _ in range(1000):
        if not engine.has_unfinished_requests():
            break
        for out in engine.step():
            if out.finished:
                done[out.request_id] = out
    return done


def assert_all_pages_released(engine: LLMEngine) -> None:
    engine.blocks.check_invariants()
    assert engine.blocks.num_used_blocks == 0
    assert engine.blocks.num_free_blocks() == engine.blocks.num_blocks


def test_seeded_sampling_is_reproducible_across_batch_compositions(engine):
    seeded = SamplingParams(temperature=0.9, top_p=0.95, top_k=50, seed=1234, max_tokens=12, ignore_eos=True)
    alone = engine.generate([[5, 6, 7]], seeded)[0].outputs[0].token_ids
    noise = SamplingParams(temperature=1.0, max_tokens=9, ignore_eos=True)
    mates = [[1, 2], [8, 9, 10, 11], list(range(30, 50))]
    batch = engine.generate([mates[0], mates[1], [5, 6, 7], mates[2]], [noise, noise, seeded, noise])
    assert batch[2].outputs[0].token_ids == alone
    other_seed = SamplingParams(
        temperature=0.9, top_p=0.95, top_k=50, seed=99, max_tokens=12, ignore_eos=True
    )
    assert engine.generate([[5, 6, 7]], other_seed)[0].outputs[0].token_ids != alone
    assert_all_pages_released(engine)


def test_n_outputs_share_the_prompt_pages(engine):
    prompt = list(range(60, 70))  # 10 tokens: 2 full blocks of 4 + a partial one
    engine.add_request(
        prompt, SamplingParams(n=3, temperature=1.0, seed=3, max_tokens=5, ignore_eos=True), "fan"
    )
    engine.step()  # prefill + fork: three sequences on the prompt's 3 pages
    seqs = engine.requests["fan"].seqs
    assert len(seqs) == 3
    tables = [engine.blocks.block_table(s.seq_id) for s in seqs]
    assert tables[0] == tables[1] == tables[2] and engine.blocks.num_used_blocks == 3
    engine.step()  # first append: each child copies the shared partial page (copy-on-write)
    tables = [engine.blocks.block_table(s.seq_id) for s in seqs]
    assert tables[0][:2] == tables[1][:2] == tables[2][:2]  # full prompt pages still shared
    assert len({t[2] for t in tables}) == 3
    assert engine.blocks.num_used_blocks == 2 + 3
    out = run_all(engine)["fan"]
    assert [len(c.token_ids) for c in out.outputs] == [5, 5, 5]
    assert len({tuple(c.token_ids) for c in out.outputs}) > 1  # independent samples
    assert_all_pages_released(engine)


def test_a_final_only_request_gets_one_output_with_everything_in_it(engine):
    """The batch API's requests (vLLM's FINAL_ONLY): no output before the last step, whose delta is the whole
    completion, the same tokens and text as a streamed request's deltas add up to."""
    params = SamplingParams(temperature=0, max_tokens=6, ignore_eos=True)
    engine.add_request([5, 6, 7], params, "streamed")
    engine.add_request([5, 6, 7], params, "final", final_only=True)
    outputs = []
    for _ in range(100):
        if not engine.has_unfinished_requests():
            break
        outputs += engine.step()
    streamed = [o for o in outputs if o.request_id == "streamed"]
    (final,) = [o for o in outputs if o.request_id == "final"]
    assert len(streamed) == 6 and final.finished
    completion = final.outputs[0]
    assert completion.delta_token_ids == completion.token_ids == streamed[-1].outputs[0].token_ids
    assert completion.text and completion.delta_text == completion.text
    assert completion.text == "".join(o.outputs[0].delta_text for o in streamed)
    assert_all_pages_released(engine)


def test_abort_frees_every_page_at_once(engine):
    params = SamplingParams(temperature=0, max_tokens=50, ignore_eos=True)
    engine.add_request(list(range(10, 30)), params, "a")
    engine.add_request(list(range(40, 45)), params, "b")
    engine.step()
    engine.step()
    used = engine.blocks.num_used_blocks
    assert engine.abort("a") and not engine.abort("a")
    assert engine.blocks.num_used_blocks < used
    done = run_all(engine)
    assert set(done) == {"b"} and len(done["b"].outputs[0].token_ids) == 50
    assert_all_pages_released(engine)


@pytest.mark.parametrize(
    ("prompt", "params", "message"),
    [
        ([], None, "prompt is empty"),
        ("", None, "prompt is empty"),
        ([5] * 600, None, "context is"),
        ([1, 2], {"max_tokens": 0}, "max_tokens"),
        ([1, 2], {"top_p": 1.5}, "top_p"),
        ([1, 2], {"stop": 5}, "stop"),
        ([1, -3], None, "prompt token ids"),
    ],
)
def test_bad_input_is_rejected_and_others_keep_running(engine, prompt, params, message):
    engine.add_request([3, 4, 5], SamplingParams(temperature=0, max_tokens=4, ignore_eos=True), "good")
    with pytest.raises(ValueError, match=message):
        engine.add_request(prompt, SamplingParams(**params) if params else None, "bad")
    assert "bad" not in engine.requests
    done = run_all(engine)
    assert set(done) == {"good"} and len(done["good"].outputs[0].token_ids) == 4
    assert_all_pages_released(engine)


def test_a_step_of_only_unfinished_prefill_chunks(checkpoint_dir):
    small_budget = EngineConfig(**{**vars(CONFIG), "max_num_batched_tokens": 6})
    engine = LLMEngine.from_checkpoint(checkpoint_dir("v2_lite"), small_budget)
    assert engine.step() == []  # nothing to do yet
    engine.add_request(
        list(range(40, 57)), SamplingParams(temperature=0, max_tokens=3, ignore_eos=True), "long"
    )
    assert engine.step() == [] and engine.step() == []  # chunks 0-6, 6-12: nothing sampled yet
    done = run_all(engine)
    assert len(done["long"].outputs[0].token_ids) == 3
    assert_all_pages_released(engine)


def test_stop_conditions(engine):
    greedy = SamplingParams(temperature=0, max_tokens=8, ignore_eos=True)
    first = engine.generate([[7, 8, 9]], greedy)[0].outputs[0]
    stopped = engine.generate(
        [[7, 8, 9]], SamplingParams(temperature=0, max_tokens=8, stop_token_ids=[first.token_ids[2]])
    )
    assert stopped[0].outputs[0].token_ids == first.token_ids[:3]
    assert stopped[0].outputs[0].finish_reason == "stop"
    text = first.text
    if len(text) > 3:
        cut = engine.generate(
            [[7, 8, 9]], SamplingParams(temperature=0, max_tokens=8, ignore_eos=True, stop=[text[2:4]])
        )
        assert cut[0].outputs[0].text == text[: text.index(text[2:4])]
        assert cut[0].outputs[0].finish_reason == "stop"


def test_streaming_deltas_and_cancellation(engine):
    async def main():
        front = AsyncEngine(engine)
        try:
            params = SamplingParams(temperature=0, max_tokens=10, ignore_eos=True)
            deltas, ids, final = [], [], None
            async for out in front.generate([11, 12, 13], params):
                deltas.append(out.outputs[0].delta_text)
                ids += out.outputs[0].delta_token_ids
                final = out
            assert (
                final.finished
                and ids == final.outputs[0].token_ids
                and "".join(deltas) == final.outputs[0].text
            )

            with pytest.raises(ValueError, match="prompt is empty"):
                async for _ in front.generate([], params):
                    pass

            long = SamplingParams(temperature=0, max_tokens=200, ignore_eos=True)
            stream = front.generate([1, 2, 3], long)
            async for _ in stream:
                break  # the client goes away after the first delta
            await stream.aclose()
            for _ in range(200):
                await asyncio.sleep(0.01)
                if not engine.has_unfinished_requests():
                    break
        finally:
            front.shutdown()

    asyncio.run(main())
    assert_all_pages_released(engine)


def test_a_context_beyond_the_models_positions_is_refused(checkpoint_dir):
    """The rotary tables end at max_position_embeddings (512 for the test models): vLLM refuses too."""
    config = EngineConfig(**{**vars(CONFIG), "max_model_len": 513})
    with pytest.raises(ValueError, match="max_model_len 513 is beyond the model's 512 positions"):
        LLMEngine.from_checkpoint(checkpoint_dir("v2_lite"), config)


@pytest.mark.parametrize("block_size", [1, 2, 256])
def test_every_block_size_gives_the_same_tokens(checkpoint_dir, block_size):
    path = checkpoint_dir("v2_lite")
    params = SamplingParams(temperature=0, max_tokens=6, ignore_eos=True)
    prompts = [[3, 4, 5], list(range(30, 50))]
    want = [o.outputs[0].token_ids for o in LLMEngine.from_checkpoint(path, CONFIG).generate(prompts, params)]
    engine = LLMEngine.from_checkpoint(path, EngineConfig(**{**vars(CONFIG), "block_size": block_size}))
    assert [o.outputs[0].token_ids for o in engine.generate(prompts, params)] == want
    assert_all_pages_released(engine)


def test_a_step_run_again_counts_its_expert_load_once(checkpoint_dir):
    """A remote worker lost mid-step makes the runner run the step again; the gates of the failed attempt
    have fired already, and their counts must not reach latentmoe_routed_tokens_total."""
    engine = LLMEngine.from_checkpoint(checkpoint_dir("v2_lite"), CONFIG)
    moe_layers = engine.model_config.moe_layers
    last = engine.runner.model.layers[moe_layers[-1]]
    assert len(moe_layers) >= 2  # a gate fires before the attention that fails

    class LostOnce(torch.nn.Module):
        def __init__(self, attention: torch.nn.Module) -> None:
            super().__init__()
            self.attention, self.lost = attention, False

        def forward(self, *args):
            if not self.lost:
                self.lost = True
                raise WorkerLost("injected: the worker of the last layer went away")
            return self.attention(*args)

    last.self_attn = LostOnce(last.self_attn)
    prompts = [list(range(40, 57)), [5, 6, 7]]
    params = SamplingParams(temperature=0, max_tokens=4, ignore_eos=True)
    before = REGISTRY.get_sample_value("latentmoe_routed_tokens_total")
    outputs = engine.generate(prompts, params)
    routed = REGISTRY.get_sample_value("latentmoe_routed_tokens_total") - before
    assert last.self_attn.lost
    computed = sum(len(p) + params.max_tokens - 1 for p in prompts)  # the last token is never fed back
    assert routed == computed * engine.model_config.num_experts_per_tok * len(moe_layers)
    clean = LLMEngine.from_checkpoint(checkpoint_dir("v2_lite"), CONFIG)
    want = [o.outputs[0].token_ids for o in clean.generate(prompts, params)]
    assert [o.outputs[0].token_ids for o in outputs] == want


def test_the_start_up_warm_up_runs_the_largest_chunk_and_leaves_no_trace(checkpoint_dir, monkeypatch):
    """from_checkpoint runs one chunk of max_num_batched_tokens before serving (ModelRunner.warm_up): no
    page stays taken, and no expert load or token count reaches the metrics."""
    chunks = []
    warm_up = ModelRunner.warm_up
    monkeypatch.setattr(ModelRunner, "warm_up", lambda self, n: (chunks.append(n), warm_up(self, n)))
    names = ["latentmoe_routed_tokens_total", "latentmoe_prompt_tokens_total"]
    before = [REGISTRY.get_sample_value(name) or 0.0 for name in names]
    engine = LLMEngine.from_checkpoint(checkpoint_dir("v2_lite"), CONFIG)
    assert chunks == [CONFIG.max_num_batched_tokens]
    assert_all_pages_released(engine)
    assert not engine.expert_load.step.any()
    engine.generate([[5, 6, 7]], SamplingParams(temperature=0, max_tokens=2, ignore_eos=True))
    routed, prompt = (REGISTRY.get_sample_value(name) - b for name, b in zip(names, before, strict=True))
    assert prompt == 3
    assert routed == (3 + 1) * engine.model_config.num_experts_per_tok * len(engine.model_config.moe_layers)
