"""`latentmoe up` on loopback: KV-cache service, 2 attention workers, a router with 2 expert actors on a local
Ray, each a separate process. Greedy tokens equal the in-process engine's and transformers'; expert load is
spread over both actors; a prefix computed on one attention worker is a cache hit on the other."""

from __future__ import annotations

import os
import re
import signal
import threading
import time
import urllib.request
from concurrent.futures import ThreadPoolExecutor

import grpc
import pytest
import torch

from common.config import EngineConfig, ModelConfig
from common.engine.engine import LLMEngine
from common.engine.sampling_params import SamplingParams
from latentmoe.v1 import router_pb2, router_pb2_grpc
from tests.processes import start_up, stop

transformers = pytest.importorskip("transformers")

PROMPTS = [[3, 4, 5], list(range(20, 61)), [7], [(7 * i) % 250 + 2 for i in range(19)], list(range(90, 99))]
SHARED = list(range(100, 132))  # two full blocks of 16
MAX_TOKENS = 12
LONG = 48  # generations that a worker is stopped or killed in the middle of
KEEPALIVE_S = 2.0


@pytest.fixture(scope="module")
def topology(checkpoint_dir):
    path = checkpoint_dir("v3")
    proc, ready, services = start_up(
        path, "--block-size", "16", "--kv-cache-memory", "8000000", "--worker-keepalive", str(KEEPALIVE_S)
    )
    assert set(services) == {"kvcache", "attention-0", "attention-1", "router"}, proc.startup_output
    channel = grpc.insecure_channel(ready.group(1))
    yield {"channel": channel, "path": path, "metrics": ready.group(2), "services": services}
    channel.close()
    assert stop(proc, timeout=60) == 0, "latentmoe up did not stop cleanly"
    alive = [name for name, s in services.items() if os.path.exists(f"/proc/{s['pid']}")]
    assert not alive, f"still running after latentmoe up stopped: {alive}"


def generate(channel, ids, max_tokens=MAX_TOKENS, first_token: threading.Event | None = None):
    """(tokens, cached prompt tokens) of a greedy generation; sets `first_token` as the first one arrives."""
    stub = router_pb2_grpc.RouterStub(channel)
    params = router_pb2.SamplingParams(temperature=0, max_tokens=max_tokens, ignore_eos=True)
    request = router_pb2.GenerateRequest(token_ids=router_pb2.TokenIds(ids=ids), params=params)
    tokens, cached = [], 0
    for response in stub.Generate(request, timeout=120):
        tokens += [t for c in response.completions for t in c.delta_token_ids]
        cached = response.usage.cached_prompt_tokens
        if first_token is not None and tokens:
            first_token.set()
    return tokens, cached


def in_flight(pool: ThreadPoolExecutor, channel, max_tokens: int) -> list:
    """Every prompt generating at once; returns when each has its first token (the rest is still to come)."""
    started = [threading.Event() for _ in PROMPTS]
    running = [
        pool.submit(generate, channel, p, max_tokens, e) for p, e in zip(PROMPTS, started, strict=True)
    ]
    for event in started:
        assert event.wait(60)
    return running


def scrape(url: str, name: str) -> dict[str, float]:
    """{worker label: value} of one metric family."""
    text = urllib.request.urlopen(url, timeout=10).read().decode()
    return {m[1]: float(m[2]) for m in re.finditer(rf'^{name}\{{worker="([^"]+)"\}} (\S+)', text, re.M)}


def test_topology_gives_the_in_process_and_transformers_tokens(topology):
    with ThreadPoolExecutor(len(PROMPTS)) as pool:  # concurrent: they share steps and micro-batches
        got = list(pool.map(lambda p: generate(topology["channel"], p)[0], PROMPTS))

    engine = LLMEngine.from_checkpoint(topology["path"], EngineConfig(dtype="float32", kv_cache_memory=8e6))
    params = SamplingParams(temperature=0, max_tokens=MAX_TOKENS, ignore_eos=True)
    assert got == [o.outputs[0].token_ids for o in engine.generate(PROMPTS, params)]

    ref = transformers.AutoModelForCausalLM.from_pretrained(topology["path"], dtype=torch.float32).eval()
    ref.generation_config.eos_token_id = None
    for prompt, tokens in zip(PROMPTS, got, strict=True):
        out = ref.generate(torch.tensor([prompt]), max_new_tokens=MAX_TOKENS, do_sample=False, pad_token_id=0)
        assert tokens == out[0, len(prompt) :].tolist()

    experts = scrape(topology["metrics"], "latentmoe_expert_worker_tokens_total")
    assert set(experts) == {"expert-0", "expert-1"} and min(experts.values()) > 0, experts
    attention = scrape(topology["metrics"], "latentmoe_attention_worker_latency_seconds_count")
    assert set(attention) == {"attention-0", "attention-1"} and min(attention.values()) > 0, attention


def test_a_prefix_computed_on_one_attention_worker_is_a_hit_on_the_other(topology):
    workers = {name: s["metrics"] for name, s in topology["services"].items() if name.startswith("attention")}
    first, cached = generate(topology["channel"], SHARED + [1, 2])
    assert cached == 0
    before = {
        w: scrape(url, "latentmoe_attention_blocks_pulled_total").get(w, 0) for w, url in workers.items()
    }
    second, cached = generate(topology["channel"], SHARED + [3])
    after = {
        w: scrape(url, "latentmoe_attention_blocks_pulled_total").get(w, 0) for w, url in workers.items()
    }
    assert cached == len(SHARED)  # served from the cache, not recomputed...
    pulled = {w: after[w] - before[w] for w in workers}
    assert sorted(pulled.values()) == [0, len(SHARED) // 16], pulled  # ...by the worker that lacked it

    engine = LLMEngine.from_checkpoint(topology["path"], EngineConfig(dtype="float32", kv_cache_memory=8e6))
    params = SamplingParams(temperature=0, max_tokens=MAX_TOKENS, ignore_eos=True)
    want = engine.generate([SHARED + [1, 2], SHARED + [3]], params)
    assert [first, second] == [o.outputs[0].token_ids for o in want]


def test_a_frozen_attention_worker_is_dropped_and_rejoins_when_it_thaws(topology):
    """A stopped process keeps its sockets open: the router's keepalive pings go unanswered, it drops the
    worker and moves its sequences to the other one; answers do not change. Once the process runs again, it
    answers the router's probe and new sequences reach it."""
    engine = LLMEngine.from_checkpoint(topology["path"], EngineConfig(dtype="float32", kv_cache_memory=8e6))
    params = SamplingParams(temperature=0, max_tokens=LONG, ignore_eos=True)
    want = [o.outputs[0].token_ids for o in engine.generate(PROMPTS, params)]
    pid = topology["services"]["attention-0"]["pid"]
    losses = "latentmoe_attention_worker_losses_total"
    lost_before = scrape(topology["metrics"], losses).get("attention-0", 0.0)
    with ThreadPoolExecutor(len(PROMPTS)) as pool:
        running = in_flight(pool, topology["channel"], LONG)
        os.kill(pid, signal.SIGSTOP)
        stopped = time.monotonic()
        try:
            assert [f.result()[0] for f in running] == want
            waited = time.monotonic() - stopped
        finally:
            os.kill(pid, signal.SIGCONT)
    assert scrape(topology["metrics"], losses)["attention-0"] == lost_before + 1
    assert waited < 6 * KEEPALIVE_S  # one unanswered ping (gRPC would wait 60 s for it by default)
    calls = "latentmoe_attention_worker_latency_seconds_count"
    before = scrape(topology["metrics"], calls).get("attention-0", 0.0)
    for _ in range(30):  # the router probes lost workers every 2 s
        assert generate(topology["channel"], PROMPTS[0], LONG)[0] == want[0]
        if scrape(topology["metrics"], calls).get("attention-0", 0.0) > before:
            break
        time.sleep(0.5)
    else:
        raise AssertionError("attention-0 got no call after it ran again")


def counter(url: str, name: str) -> float:
    text = urllib.request.urlopen(url, timeout=10).read().decode()
    return float(re.search(rf"^{name} (\S+)", text, re.M).group(1))


def test_losing_an_attention_worker_keeps_serving(topology):
    """Last in this module: attention-1's process is killed; the router moves its sequences to attention-0,
    which pulls their pages from the KV-cache service, and the answers do not change. The step that was run
    again counts its expert load once."""
    url = topology["metrics"]
    routed = counter(url, "latentmoe_routed_tokens_total")
    preempted = counter(url, "latentmoe_preemptions_total")
    lost = scrape(url, "latentmoe_attention_worker_losses_total").get("attention-1", 0.0)
    with ThreadPoolExecutor(len(PROMPTS)) as pool:
        running = in_flight(pool, topology["channel"], LONG)
        os.kill(topology["services"]["attention-1"]["pid"], signal.SIGKILL)
        results = [f.result() for f in running]
    results += [generate(topology["channel"], p, LONG) for p in PROMPTS]
    got, after = [r[0] for r in results[: len(PROMPTS)]], [r[0] for r in results[len(PROMPTS) :]]
    assert scrape(url, "latentmoe_attention_worker_losses_total")["attention-1"] == lost + 1

    # Every token computed once (prompt tokens not found in the cache, and every output token but the last)
    # is routed to k experts in each MoE layer.
    config = ModelConfig.from_file(topology["path"])
    computed = sum(len(p) - cached + LONG - 1 for p, (_, cached) in zip(PROMPTS * 2, results, strict=True))
    assert counter(url, "latentmoe_preemptions_total") == preempted  # no recompute to account for
    expected = computed * config.num_experts_per_tok * len(config.moe_layers)
    assert counter(url, "latentmoe_routed_tokens_total") - routed == expected
    engine = LLMEngine.from_checkpoint(topology["path"], EngineConfig(dtype="float32", kv_cache_memory=8e6))
    params = SamplingParams(temperature=0, max_tokens=LONG, ignore_eos=True)
    want = [o.outputs[0].token_ids for o in engine.generate(PROMPTS, params)]
    assert got == want and after == want
