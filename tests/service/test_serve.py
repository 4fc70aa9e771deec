"""`latentmoe serve` as a real process on loopback: the gRPC API, health, reflection, errors, metrics."""

from __future__ import annotations

import json
import re
import subprocess
import sys
import urllib.request

import grpc
import pytest
from grpc_health.v1 import health_pb2, health_pb2_grpc
from grpc_reflection.v1alpha import reflection_pb2, reflection_pb2_grpc

from common.config import EngineConfig
from common.engine.engine import LLMEngine
from common.engine.sampling_params import SamplingParams
from latentmoe.v1 import router_pb2, router_pb2_grpc
from tests.processes import start_until_ready, stop

PROMPTS = [[3, 4, 5], list(range(20, 45)), [7]]


def serve_argv(path: str, *extra: str) -> list[str]:
    flags = ["--port", "0", "--metrics-port", "0", "--dtype", "float32", "--block-size", "16"]
    return [
        sys.executable,
        "-m",
        "services.cli",
        "serve",
        "--model",
        path,
        *flags,
        "--kv-cache-memory",
        "8000000",
        *extra,
    ]


@pytest.fixture(scope="module")
def server(checkpoint_dir):
    path = checkpoint_dir("v3")
    proc, ready = start_until_ready(serve_argv(path))
    channel = grpc.insecure_channel(ready.group(1))
    yield {"channel": channel, "address": ready.group(1), "metrics": ready.group(2), "path": path}
    channel.close()
    assert stop(proc) == 0, "serve did not stop cleanly on SIGTERM"


def generate(channel, ids, **params) -> tuple[list[int], str, str]:
    stub = router_pb2_grpc.RouterStub(channel)
    request = router_pb2.GenerateRequest(
        token_ids=router_pb2.TokenIds(ids=ids), params=router_pb2.SamplingParams(**params)
    )
    tokens, text, reason = [], "", ""
    for response in stub.Generate(request, timeout=60):
        for c in response.completions:
            tokens += c.delta_token_ids
            text += c.delta_text
            reason = c.finish_reason or reason
    return tokens, text, reason


def test_health_and_reflection(server):
    health = health_pb2_grpc.HealthStub(server["channel"])
    for service in ("", "latentmoe.v1.Router"):
        status = health.Check(health_pb2.HealthCheckRequest(service=service), timeout=10).status
        assert status == health_pb2.HealthCheckResponse.SERVING
    stub = reflection_pb2_grpc.ServerReflectionStub(server["channel"])
    responses = stub.ServerReflectionInfo(iter([reflection_pb2.ServerReflectionRequest(list_services="")]))
    names = {s.name for r in responses for s in r.list_services_response.service}
    assert {"latentmoe.v1.Router", "grpc.health.v1.Health"} <= names


def test_greedy_tokens_equal_the_in_process_engine(server):
    engine = LLMEngine.from_checkpoint(server["path"], EngineConfig(dtype="float32", kv_cache_memory=8e6))
    want = engine.generate(PROMPTS, SamplingParams(temperature=0, max_tokens=12, ignore_eos=True))
    for prompt, out in zip(PROMPTS, want):
        tokens, text, reason = generate(
            server["channel"], prompt, temperature=0, max_tokens=12, ignore_eos=True
        )
        assert tokens == out.outputs[0].token_ids and text == out.outputs[0].text and reason == "length"


def test_bad_requests_get_invalid_argument_and_harm_nothing(server):
    stub = router_pb2_grpc.RouterStub(server["channel"])
    bad = [
        router_pb2.GenerateRequest(),
        router_pb2.GenerateRequest(token_ids=router_pb2.TokenIds(ids=[])),
        router_pb2.GenerateRequest(token_ids=router_pb2.TokenIds(ids=[1, 99999])),
        router_pb2.GenerateRequest(text="hi", params=router_pb2.SamplingParams(top_p=1.5)),
        router_pb2.GenerateRequest(text="hi", params=router_pb2.SamplingParams(max_tokens=0)),
    ]
    for request in bad:
        with pytest.raises(grpc.RpcError) as err:
            list(stub.Generate(request, timeout=30))
        assert err.value.code() == grpc.StatusCode.INVALID_ARGUMENT and err.value.details()
    tokens, _, _ = generate(server["channel"], [5, 6], temperature=0, max_tokens=3, ignore_eos=True)
    assert len(tokens) == 3
    info = stub.ModelInfo(router_pb2.ModelInfoRequest(), timeout=10)
    assert info.model_type == "deepseek_v3" and json.loads(info.config_json)["n_routed_experts"] == 8


def test_metrics_count_the_routed_tokens(server):
    generate(server["channel"], list(range(30, 40)), temperature=0, max_tokens=5, ignore_eos=True)
    text = urllib.request.urlopen(server["metrics"], timeout=10).read().decode()
    values: dict[str, float] = {}
    expert_sum = 0.0
    for line in text.splitlines():
        if line.startswith("latentmoe_expert_tokens_total{"):
            expert_sum += float(line.rsplit(" ", 1)[1])
        elif line.startswith("latentmoe_") and "{" not in line:
            name, value = line.rsplit(" ", 1)
            values[name] = float(value)
    assert expert_sum > 0 and expert_sum == values["latentmoe_routed_tokens_total"]
    assert values["latentmoe_generation_tokens_total"] >= 5
    assert "latentmoe_time_to_first_token_seconds_bucket" in text
    assert 'latentmoe_kv_cache_blocks{state="total"}' in text


def test_client_command_streams_from_the_server(server):
    address = server["address"]
    proc = subprocess.run(
        [
            sys.executable,
            "-m",
            "services.cli",
            "client",
            "generate",
            "--address",
            address,
            "--prompt-ids",
            "3,4,5",
            "--max-tokens",
            "5",
            "--temperature",
            "0",
            "--ignore-eos",
            "--json",
        ],
        capture_output=True,
        text=True,
        timeout=120,
    )
    assert proc.returncode == 0, proc.stderr
    records = [json.loads(line) for line in proc.stdout.splitlines()]
    tokens = [t for r in records for t in r["delta_token_ids"]]
    assert tokens == generate(server["channel"], [3, 4, 5], temperature=0, max_tokens=5, ignore_eos=True)[0]
    assert records[-1]["finished"] and records[-1]["finish_reason"] == "length"
    bad = subprocess.run(
        [
            sys.executable,
            "-m",
            "services.cli",
            "client",
            "generate",
            "--address",
            address,
            "--prompt-ids",
            "1",
            "--max-tokens",
            "0",
        ],
        capture_output=True,
        text=True,
        timeout=120,
    )
    assert bad.returncode == 2 and "INVALID_ARGUMENT" in bad.stderr and "max_tokens" in bad.stderr


def test_serve_with_expert_actors(checkpoint_dir):
    """`serve --expert-workers 2`: a local Ray, the routed experts on two actors, the same tokens."""
    path = checkpoint_dir("v3")
    proc, ready = start_until_ready(serve_argv(path, "--expert-workers", "2"))
    try:
        engine = LLMEngine.from_checkpoint(path, EngineConfig(dtype="float32", kv_cache_memory=8e6))
        want = engine.generate(PROMPTS, SamplingParams(temperature=0, max_tokens=8, ignore_eos=True))
        with grpc.insecure_channel(ready.group(1)) as channel:
            for prompt, out in zip(PROMPTS, want):
                tokens, _, _ = generate(channel, prompt, temperature=0, max_tokens=8, ignore_eos=True)
                assert tokens == out.outputs[0].token_ids
        text = urllib.request.urlopen(ready.group(2), timeout=10).read().decode()
        for worker in ("expert-0", "expert-1"):
            assert re.search(rf'latentmoe_expert_worker_tokens_total{{worker="{worker}"}} [1-9]', text), (
                worker
            )
    finally:
        code = stop(proc)
    assert code == 0, "serve did not stop cleanly on SIGTERM"
