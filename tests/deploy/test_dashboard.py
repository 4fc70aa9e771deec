"""The monitoring deployment against the real thing: every query of the Grafana dashboard is evaluated by a
real Prometheus scraping real latentmoe processes after real traffic, and the numbers must add up.

The stack is `latentmoe up` on loopback (tiny V3 checkpoint, float32): the KV-cache service, two attention
workers, and the router with its routed experts on two Ray expert actors, each a process, scraped as the
compose deployment's Prometheus scrapes them (jobs `router`, `kvcache`, `attention`). The router gets gRPC
traffic: requests sharing a prefix (prefix-cache hits), some finished by a stop token, the rest by length,
some concurrent. Every dashboard query must evaluate without error AND return at least one series with a
finite value. The one series that exists only after a fault (expert worker restarts) is queried with
`or vector(0)` by the dashboard, so it has data too.

Then the counts are checked exactly on the router: sum(latentmoe_expert_tokens_total) ==
latentmoe_routed_tokens_total == the (token, expert) pairs the expert workers computed == the pairs computed
independently from the config and the responses' usage; token, prefix-hit and finished-request counters equal
what the responses say; the attention workers attended every computed token.
"""

from __future__ import annotations

import contextlib
import json
import math
import re
import subprocess
import time
import urllib.parse
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

import grpc
import pytest
import yaml
from prometheus_client.metrics import MetricWrapperBase

from common import metrics
from latentmoe.v1 import router_pb2, router_pb2_grpc
from tests.deploy.prometheus import Prometheus, find_or_install
from tests.model_configs import CONFIGS
from tests.processes import start_up, stop

ROOT = Path(__file__).resolve().parents[2]
DASHBOARD = ROOT / "deploy" / "grafana" / "dashboards" / "latentmoe.json"
PROMETHEUS_CONFIG = ROOT / "deploy" / "prometheus" / "prometheus.yml"
DATASOURCES = ROOT / "deploy" / "grafana" / "provisioning" / "datasources" / "prometheus.yml"
DASHBOARD_PROVIDERS = ROOT / "deploy" / "grafana" / "provisioning" / "dashboards" / "latentmoe.yml"

ROUTER_JOB = "router"
# Grafana's built-in variables, as Grafana would expand them for a short time range at a 1 s scrape interval.
GRAFANA_VARIABLES = {
    "__rate_interval": "1m",
    "__interval": "15s",
    "__interval_ms": "15000",
    "__range": "5m",
    "__range_s": "300",
    "__range_ms": "300000",
}

V3 = CONFIGS["v3"]
MOE_LAYERS = sum(
    1
    for i in range(V3["num_hidden_layers"])
    if i >= V3["first_k_dense_replace"] and i % V3.get("moe_layer_freq", 1) == 0
)
TOP_K = V3["num_experts_per_tok"]
BLOCK_SIZE = 16
PREFIX = list(range(10, 50))  # 40 tokens: 2 full blocks of 16, reusable by a later prompt that extends it
DEADLINE_S = 30


def routed_pairs(prompt_tokens: int, cached_prompt_tokens: int, completion_tokens: int) -> int:
    """(token, expert) pairs one request sends through the gates: every prompt token not served from the
    prefix cache and every generated token but the last passes through the model once, each MoE layer routing
    it to top-k experts."""
    return (prompt_tokens - cached_prompt_tokens + completion_tokens - 1) * TOP_K * MOE_LAYERS


# ------------------------------------------------------------------------------------------- the dashboard
def dashboard() -> dict:
    return json.loads(DASHBOARD.read_text())


def panels(board: dict) -> list[dict]:
    out = []
    for panel in board["panels"]:
        out.append(panel)
        out.extend(panel.get("panels", []))  # panels inside collapsed rows
    return out


def dashboard_queries(board: dict) -> list[dict]:
    """Every Prometheus target of every panel: {panel, refId, expr, legend, instant}."""
    return [
        {
            "panel": panel["title"],
            "refId": target["refId"],
            "expr": target["expr"],
            "legend": target.get("legendFormat", ""),
            "instant": target.get("instant", False),
        }
        for panel in panels(board)
        for target in panel.get("targets", [])
    ]


def expand(expr: str) -> str:
    """Substitute Grafana's variables ($name, ${name}, [[name]]) as Grafana would before sending the query."""
    pattern = re.compile(r"\$\{(\w+)(?::\w+)?\}|\[\[(\w+)\]\]|\$(\w+)")

    def value(m: re.Match) -> str:
        name = next(g for g in m.groups() if g)
        assert name in GRAFANA_VARIABLES, f"unknown Grafana variable ${name} in {expr!r}"
        return GRAFANA_VARIABLES[name]

    return pattern.sub(value, expr)


def metric_families() -> dict[str, tuple[set[str], set[str]]]:
    """{family: (sample names, label names)} for every metric defined in common/metrics.py."""
    families = {}
    for obj in vars(metrics).values():
        if isinstance(obj, MetricWrapperBase):
            name, kind, labels = obj._name, obj._type, set(obj._labelnames)
            if kind == "counter":
                samples = {f"{name}_total"}
            elif kind == "histogram":
                samples = {f"{name}_bucket", f"{name}_count", f"{name}_sum"}
                labels |= {"le"}
            else:
                samples = {name}
            families[name] = (samples, labels)
    return families


# ------------------------------------------------------------------------------------------- static checks
def test_prometheus_config_scrapes_the_compose_services():
    config = yaml.safe_load(PROMETHEUS_CONFIG.read_text())
    assert config["global"]["scrape_interval"] == "5s"
    jobs = {job["job_name"]: job for job in config["scrape_configs"]}
    static = {
        name: [t for group in job.get("static_configs", []) for t in group["targets"]]
        for name, job in jobs.items()
    }
    assert static["router"] == ["ray-head:9400"]
    assert static["kvcache"] == ["kvcache:9401"]
    assert static["attention"] == ["attention-0:9402", "attention-1:9402"]
    [workers] = jobs["expert-workers"]["dns_sd_configs"]  # every replica of the ray-worker service
    assert workers["names"] == ["ray-worker"] and workers["port"] == 8080 and workers["type"] == "A"
    done = subprocess.run(
        [find_or_install("promtool"), "check", "config", str(PROMETHEUS_CONFIG)],
        capture_output=True,
        text=True,
        timeout=60,
    )
    assert done.returncode == 0, done.stdout + done.stderr


def test_grafana_provisioning_and_dashboard_are_consistent():
    [source] = yaml.safe_load(DATASOURCES.read_text())["datasources"]
    assert (source["name"], source["uid"], source["type"]) == ("Prometheus", "prometheus", "prometheus")
    assert source["url"] == "http://prometheus:9090" and source["isDefault"] is True
    [provider] = yaml.safe_load(DASHBOARD_PROVIDERS.read_text())["providers"]
    assert provider["type"] == "file" and provider["options"]["path"] == "/var/lib/grafana/dashboards"

    board = dashboard()
    assert (board["uid"], board["title"]) == ("latentmoe", "latentmoe") and board["schemaVersion"] >= 36
    ids = [p["id"] for p in panels(board)]
    assert len(ids) == len(set(ids)), "panel ids must be unique"
    cells: set[tuple[int, int]] = set()
    for panel in panels(board):
        pos = panel["gridPos"]
        assert pos["x"] >= 0 and pos["x"] + pos["w"] <= 24, panel["title"]
        xs, ys = range(pos["x"], pos["x"] + pos["w"]), range(pos["y"], pos["y"] + pos["h"])
        mine = {(x, y) for x in xs for y in ys}
        assert not mine & cells, f"panel {panel['title']!r} overlaps another"
        cells |= mine
        if panel["type"] == "row":
            continue
        refs = [t["refId"] for t in panel["targets"]]
        assert panel["targets"] and len(refs) == len(set(refs)), panel["title"]
        for owner in (panel, *panel["targets"]):
            assert owner["datasource"] == {"type": "prometheus", "uid": source["uid"]}, panel["title"]

    families = metric_families()
    sample_labels = {s: labels for samples, labels in families.values() for s in samples}
    used: set[str] = set()
    for query in dashboard_queries(board):
        expr = query["expr"]
        names = set(re.findall(r"\blatentmoe_\w+", expr))
        unknown = names - set(sample_labels)
        assert names and not unknown, f"{query['panel']}: {expr!r} uses undefined metrics {unknown}"
        used |= names
        allowed = {"job", "instance"}.union(*(sample_labels[n] for n in names))
        for clause in re.findall(r"\b(?:by|without|on|ignoring)\s*\(([^)]*)\)", expr):
            labels = {label.strip() for label in clause.split(",") if label.strip()}
            assert labels <= allowed, f"{query['panel']}: {expr!r} uses unknown labels {labels - allowed}"
    missing = [name for name, (samples, _) in families.items() if not samples & used]
    assert not missing, f"metrics in common/metrics.py that no panel shows: {missing}"


# ------------------------------------------------------------------------------------------- the live stack
def prometheus_jobs(services: dict[str, dict]) -> dict[str, list[str]]:
    """The compose deployment's scrape jobs (deploy/prometheus/prometheus.yml), on the endpoints `latentmoe
    up` printed (tests.processes.start_up)."""

    def target(name: str) -> str:
        return urllib.parse.urlsplit(services[name]["metrics"]).netloc

    return {
        ROUTER_JOB: [target("router")],
        "kvcache": [target("kvcache")],
        "attention": sorted(target(name) for name in services if name.startswith("attention-")),
    }


def generate(stub: router_pb2_grpc.RouterStub, ids: list[int], **params) -> dict:
    request = router_pb2.GenerateRequest(
        token_ids=router_pb2.TokenIds(ids=ids), params=router_pb2.SamplingParams(temperature=0, **params)
    )
    tokens, reason, usage = [], "", None
    for response in stub.Generate(request, timeout=60):
        for c in response.completions:
            tokens += c.delta_token_ids
            reason = c.finish_reason or reason
        if response.finished:
            usage = response.usage
    assert usage is not None and usage.completion_tokens == len(tokens) and usage.prompt_tokens == len(ids)
    return {"tokens": tokens, "reason": reason, "usage": usage}


def serve_traffic(stub: router_pb2_grpc.RouterStub, round_: int) -> list[dict]:
    """Requests to `serve`. Round 0: a prompt with a 40-token prefix, a probe, a stop-token finish. Round 1
    (after a scrape, so series born in round 0 see increases): the prefix again (a prefix-cache hit), the stop
    request again, and a concurrent burst (more prefix sharers among them)."""
    probe_prompt = [7, 8, 9, 11, 13]
    if round_ == 0:
        done = [generate(stub, [*PREFIX, 60, 61, 62], max_tokens=8, ignore_eos=True)]
    else:
        done = [generate(stub, [*PREFIX, 70, 71], max_tokens=6, ignore_eos=True)]
        assert done[-1]["usage"].cached_prompt_tokens == 2 * BLOCK_SIZE, "the shared prefix was not reused"
    done.append(generate(stub, probe_prompt, max_tokens=6, ignore_eos=True))
    stop_token = done[-1]["tokens"][2]
    stopped = generate(stub, probe_prompt, max_tokens=6, ignore_eos=True, stop_token_ids=[stop_token])
    assert stopped["reason"] == "stop" and stopped["tokens"][-1] == stop_token
    done.append(stopped)
    if round_ == 1:
        burst = [([*PREFIX, 80 + i], 10 + i) for i in range(3)] + [([5, 6], 12), (list(range(100, 130)), 9)]
        with ThreadPoolExecutor(len(burst)) as pool:
            futures = [pool.submit(generate, stub, ids, max_tokens=n, ignore_eos=True) for ids, n in burst]
            done += [f.result() for f in futures]
    return done


def wait_for_scrapes_after(prom: Prometheus, wall_time: float, scrapes: int = 2) -> None:
    """Until every target was scraped `scrapes` times after wall_time: the first has the final counters, the
    second gives series born during the traffic the two samples rate() needs."""
    deadline = time.monotonic() + DEADLINE_S
    while time.monotonic() < deadline:
        per_target = [sum(float(t) > wall_time for t, _ in s["values"]) for s in prom.query("up[1m]")]
        if len(per_target) == prom.num_targets and min(per_target) >= scrapes:
            return
        time.sleep(0.25)
    raise AssertionError(f"no {scrapes} scrapes after the traffic in {DEADLINE_S} s: {prom.targets_up()}")


@pytest.fixture(scope="module")
def stack(checkpoint_dir, tmp_path_factory):
    find_or_install("prometheus")  # skip before starting anything if it cannot be had
    model = checkpoint_dir("v3")
    with contextlib.ExitStack() as cleanup:
        proc, _, services = start_up(model, "--block-size", str(BLOCK_SIZE), "--kv-cache-memory", "8000000")
        cleanup.callback(stop, proc, 60)
        channel = grpc.insecure_channel(services["router"]["grpc"])
        cleanup.callback(channel.close)
        prom = Prometheus(tmp_path_factory.mktemp("prometheus"), prometheus_jobs(services)).start()
        cleanup.callback(prom.stop)
        start = time.monotonic()

        # Two rounds of traffic with scrapes in between: series born in the first round (labelled ones appear
        # at their first increment) see increases in the second, as they would under steady traffic.
        stub = router_pb2_grpc.RouterStub(channel)
        responses = []
        for round_ in range(2):
            responses += serve_traffic(stub, round_)
            wait_for_scrapes_after(prom, time.time(), scrapes=1 + round_)
        yield {"prom": prom, "responses": responses, "traffic_s": time.monotonic() - start}
        assert prom.stop() == 0, prom.log()
        channel.close()
        assert stop(proc, 60) == 0, "".join(proc.output[-50:])


def test_every_dashboard_query_returns_data(stack):
    prom, failures = stack["prom"], []
    queries = dashboard_queries(dashboard())
    assert len(queries) >= 20
    for query in queries:
        expr = expand(query["expr"])
        assert "$" not in expr, expr
        try:
            series = prom.query(expr)
        except AssertionError as e:  # a query Prometheus rejects
            failures.append(f"{query['panel']} [{query['refId']}]: {e}")
            continue
        values = [float(s["value"][1]) for s in series]
        if not any(math.isfinite(v) for v in values):
            failures.append(f"{query['panel']} [{query['refId']}]: {expr!r} -> no data {values}")
        for label in re.findall(r"\{\{\s*(\w+)\s*\}\}", query["legend"]):
            if any(label not in s["metric"] for s in series):
                failures.append(f"{query['panel']} [{query['refId']}]: no label {label!r} in {series}")
    assert not failures, "\n".join(failures)
    assert stack["traffic_s"] < 60, "rates over [1m] would no longer see all the traffic"


def test_expert_load_sums_to_the_routed_pairs(stack):
    prom, responses = stack["prom"], stack["responses"]
    want = sum(
        routed_pairs(r["usage"].prompt_tokens, r["usage"].cached_prompt_tokens, r["usage"].completion_tokens)
        for r in responses
    )
    job = f'job="{ROUTER_JOB}"'
    # No preemption: no recomputed tokens to account for.
    assert prom.value(f"sum(latentmoe_preemptions_total{{{job}}})") == 0
    per_expert = prom.value(f"sum(latentmoe_expert_tokens_total{{{job}}})")
    routed = prom.value(f"latentmoe_routed_tokens_total{{{job}}}")
    assert per_expert == routed == want, (per_expert, routed, want)
    layers = prom.query(f"count by (layer) (latentmoe_expert_tokens_total{{{job}}})")
    assert len(layers) == MOE_LAYERS and all(int(s["value"][1]) == V3["n_routed_experts"] for s in layers)
    # Each MoE layer routed every computed token to exactly top-k experts.
    per_layer = prom.query(f"sum by (layer) (latentmoe_expert_tokens_total{{{job}}})")
    assert sorted(float(s["value"][1]) for s in per_layer) == [want / MOE_LAYERS] * MOE_LAYERS

    # Every routed pair was computed by one of the two expert actors, both of which carried load.
    workers = prom.query(f"latentmoe_expert_worker_tokens_total{{{job}}}")
    assert {s["metric"]["worker"] for s in workers} == {"expert-0", "expert-1"}
    assert all(float(s["value"][1]) > 0 for s in workers)
    assert sum(float(s["value"][1]) for s in workers) == want


def test_attention_workers_attended_every_computed_token(stack):
    prom, responses = stack["prom"], stack["responses"]
    computed = sum(
        r["usage"].prompt_tokens - r["usage"].cached_prompt_tokens + r["usage"].completion_tokens - 1
        for r in responses
    )
    workers = prom.query('latentmoe_attention_tokens_total{job="attention"}')
    assert {s["metric"]["worker"] for s in workers} == {"attention-0", "attention-1"}
    assert sum(float(s["value"][1]) for s in workers) == computed


def test_request_metrics_match_the_responses(stack):
    prom, responses = stack["prom"], stack["responses"]
    job = f'job="{ROUTER_JOB}"'
    usage = [r["usage"] for r in responses]
    generated, prompt = sum(u.completion_tokens for u in usage), sum(u.prompt_tokens for u in usage)
    assert prom.value(f"latentmoe_generation_tokens_total{{{job}}}") == generated
    assert prom.value(f"latentmoe_prompt_tokens_total{{{job}}}") == prompt
    hits = sum(u.cached_prompt_tokens for u in usage)
    assert hits >= 2 * BLOCK_SIZE and prom.value(f"latentmoe_prefix_cache_hits_total{{{job}}}") == hits
    assert prom.value(f"latentmoe_prefix_cache_queries_total{{{job}}}") == prompt
    finished = {
        s["metric"]["reason"]: float(s["value"][1])
        for s in prom.query(f"latentmoe_requests_finished_total{{{job}}}")
    }
    reasons = [r["reason"] for r in responses]
    assert finished == {reason: reasons.count(reason) for reason in set(reasons)}
    assert set(reasons) == {"stop", "length"}
    assert prom.value(f"latentmoe_time_to_first_token_seconds_count{{{job}}}") == len(responses)
    assert prom.value(f"latentmoe_inter_token_latency_seconds_count{{{job}}}") == sum(
        u.completion_tokens - 1 for u in usage
    )
    assert prom.value(f"latentmoe_requests_running{{{job}}}") == 0
    assert prom.value(f'latentmoe_kv_cache_blocks{{{job}, state="total"}}') > 0
