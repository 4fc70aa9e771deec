"""The Ray deployment against a real Ray cluster: `ray start` + `ray job submit` of deploy/ray/job.py.

The cluster is started with the `ray start` commands of docker-compose.yml (ray-head's first step, and the
ray-worker service's command, which joins it with --block), each given a loopback address (127.0.0.2 for the
head, 127.0.0.3 for the worker: two Ray nodes on this machine), free ports, explicit resources and its own
--temp-dir. Token auth is off (RAY_AUTH_MODE=disabled): everything listens on loopback. The job is submitted
through the dashboard's job API with the repository as its working directory, as the README says, with this
venv's interpreter; it places two expert actors (one per node) and must print the greedy tokens of the
in-process engine. Teardown stops exactly the processes this test started: each `ray start` runs in a new
session, every Ray process it spawns stays in that session, and only that session's processes are signalled
(never `ray stop`, which would stop every cluster on the machine).

deploy/ray/cluster.yaml is checked with the cluster launcher's own config preparation and JSON schema (no
cloud is reached), and its `ray start` commands with Ray's own command-line parser.
"""

from __future__ import annotations

import contextlib
import json
import os
import random
import re
import shlex
import shutil
import signal
import socket
import subprocess
import sys
import tempfile
import time
import urllib.request
from pathlib import Path

import pytest
import yaml

from common.config import EngineConfig
from common.engine.engine import LLMEngine
from common.engine.sampling_params import SamplingParams
from tests.deploy.test_compose import PYPROJECT, ROOT, flag_value, ray_start_argv, replace_flags
from tests.processes import live_pids, stat_fields

RAY = str(Path(sys.executable).parent / "ray")
HEAD_IP, WORKER_IP = "127.0.0.2", "127.0.0.3"
START_TIMEOUT_S = 120
JOB_TIMEOUT_S = 300
STOP_GRACE_S = 10
PROMPTS = [[1, 2, 3], [5, 6, 7, 8, 9, 10, 11]]
MAX_TOKENS = 4


_GIVEN: set[int] = set()  # never hand out the same port twice


def free_port(host: str = "127.0.0.1") -> int:
    """A free port below the ephemeral range. Ray's own servers bind port 0 and may be handed a port that an
    ephemeral probe just released, so a port picked that way can be taken before its Ray process binds it
    (seen once as the runtime-env agent's port answering with another server's HTTP 405)."""
    low, _high = map(int, Path("/proc/sys/net/ipv4/ip_local_port_range").read_text().split())
    for _ in range(1000):
        port = random.randrange(max(1024, low - 12000), low)
        if port in _GIVEN:
            continue
        with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as s:
            try:
                s.bind((host, port))
            except OSError:
                continue
            _GIVEN.add(port)
            return port
    raise AssertionError("no free port below the ephemeral range")


def ray_env() -> dict[str, str]:
    env = {**os.environ, "RAY_AUTH_MODE": "disabled", "RAY_USAGE_STATS_ENABLED": "0"}
    for name in ("RAY_ADDRESS", "RAY_API_SERVER_ADDRESS", "RAY_AUTH_TOKEN", "RAY_AUTH_TOKEN_PATH"):
        env.pop(name, None)
    return env


def node_flags(ip: str, temp_dir: str, num_cpus: int) -> list[str]:
    """What a second Ray node on the same machine needs: its own address and ports, explicit resources."""
    ports = [
        "--node-manager-port",
        "--object-manager-port",
        "--dashboard-agent-listen-port",
        "--dashboard-agent-grpc-port",
        "--runtime-env-agent-port",
    ]
    return [
        f"--node-ip-address={ip}",
        f"--temp-dir={temp_dir}",
        f"--num-cpus={num_cpus}",
        "--num-gpus=0",
        f"--object-store-memory={100 << 20}",
        *(f"{flag}={free_port()}" for flag in ports),
    ]


def session_pids(sid: int) -> list[int]:
    """The live processes of session `sid` (field 6 of /proc/PID/stat)."""
    return [pid for pid in live_pids() if (f := stat_fields(pid)) and int(f[3]) == sid and f[0] != "Z"]


def stop_session(sid: int) -> list[str]:
    """Stop every process of the session we started, in `ray stop`'s order (raylet, then the other Ray
    processes, then gcs_server): SIGTERM, then SIGKILL for what is left after a grace period. Returns the
    names of the processes that needed SIGKILL."""

    def name(pid: int) -> str:
        try:
            return Path(f"/proc/{pid}/comm").read_text().strip()
        except OSError:
            return ""

    def bucket(pid: int) -> int:
        return {"raylet": 0, "gcs_server": 2}.get(name(pid), 1)

    killed = []
    for b in range(3):
        pids = [pid for pid in session_pids(sid) if bucket(pid) == b]
        for sig in (signal.SIGTERM, signal.SIGKILL):
            for pid in pids:
                with contextlib.suppress(ProcessLookupError):
                    os.kill(pid, sig)
            deadline = time.monotonic() + STOP_GRACE_S
            while time.monotonic() < deadline:
                pids = [pid for pid in pids if pid in session_pids(sid)]
                if not pids:
                    break
                time.sleep(0.2)
            if sig == signal.SIGTERM:
                killed += [name(pid) for pid in pids]
    # Anything that started meanwhile (a worker process forked during shutdown) gets SIGKILL too.
    deadline = time.monotonic() + STOP_GRACE_S
    while session_pids(sid) and time.monotonic() < deadline:
        for pid in session_pids(sid):
            killed.append(name(pid))
            with contextlib.suppress(ProcessLookupError):
                os.kill(pid, signal.SIGKILL)
        time.sleep(0.2)
    left = {pid: name(pid) for pid in session_pids(sid)}
    assert not left, f"processes of session {sid} survive SIGKILL: {left}"
    return killed


def alive_nodes(dashboard: str) -> list[str]:
    with urllib.request.urlopen(f"{dashboard}/nodes?view=summary", timeout=10) as response:
        summary = json.load(response)["data"]["summary"]
    return sorted(n["raylet"]["nodeManagerAddress"] for n in summary if n["raylet"]["state"] == "ALIVE")


@pytest.fixture(scope="module")
def cluster():
    """A two-node Ray cluster on loopback started from the compose file's `ray start` commands."""
    # Short: Ray's unix sockets live under it (108-byte path limit), so not pytest's deep tmp_path.
    temp_dir = tempfile.mkdtemp(prefix="lmray-")
    env = ray_env()
    gcs_port, dashboard_port = free_port(), free_port()
    head_flags = replace_flags(
        ray_start_argv("ray-head"),
        {
            "--port": str(gcs_port),
            "--dashboard-host": "127.0.0.1",
            "--dashboard-port": str(dashboard_port),
            "--metrics-export-port": str(free_port()),
        },
    )
    # Compose gives the head no CPU and runs two worker replicas; this cluster has one worker node, so the
    # head offers CPUs too (the later --num-cpus wins) and the job's two actors still spread over two nodes.
    head_cmd = [RAY, "start", *head_flags, *node_flags(HEAD_IP, f"{temp_dir}/head", 2)]
    head_cmd += ["--include-dashboard=true", f"--ray-client-server-port={free_port()}"]
    worker_flags = replace_flags(
        ray_start_argv("ray-worker"),
        {"--address": f"{HEAD_IP}:{gcs_port}", "--metrics-export-port": str(free_port())},
    )
    assert "--block" in worker_flags  # the worker stays in the foreground, as in its container
    # Its own temp dir: nodes sharing one would share (and clean up) each other's runtime_env files.
    worker_cmd = [RAY, "start", *worker_flags, *node_flags(WORKER_IP, f"{temp_dir}/worker", 2)]
    sessions: list[int] = []
    started: list[subprocess.Popen] = []
    dashboard = f"http://127.0.0.1:{dashboard_port}"
    log = Path(temp_dir) / "ray-start.log"
    try:
        with log.open("w") as out:
            head = subprocess.Popen(
                head_cmd, env=env, stdout=out, stderr=subprocess.STDOUT, start_new_session=True
            )
            sessions.append(head.pid)
            started.append(head)
            assert head.wait(timeout=START_TIMEOUT_S) == 0, log.read_text()[-4000:]
            worker = subprocess.Popen(
                worker_cmd, env=env, stdout=out, stderr=subprocess.STDOUT, start_new_session=True
            )
            sessions.append(worker.pid)
            started.append(worker)
        deadline = time.monotonic() + START_TIMEOUT_S
        nodes: list[str] = []
        while nodes != [HEAD_IP, WORKER_IP]:
            assert worker.poll() is None, "the worker node exited:\n" + log.read_text()[-4000:]
            assert time.monotonic() < deadline, f"nodes alive: {nodes}\n" + log.read_text()[-4000:]
            time.sleep(1)
            try:
                nodes = alive_nodes(dashboard)
            except OSError:
                nodes = []
        yield {"dashboard": dashboard, "env": env, "gcs": f"{HEAD_IP}:{gcs_port}", "temp_dir": temp_dir}
    finally:
        problems = []
        for sid in reversed(sessions):  # the worker node first, then the head
            try:
                needed_sigkill = stop_session(sid)
                if needed_sigkill:
                    print(f"session {sid}: SIGKILL for {needed_sigkill}")
            except AssertionError as e:
                problems.append(str(e))
        for proc in started:  # reap our two direct children
            with contextlib.suppress(subprocess.TimeoutExpired):
                proc.wait(timeout=STOP_GRACE_S)
        shutil.rmtree(temp_dir, ignore_errors=True)
        assert not problems, problems


def job_command(dashboard: str, model: str, *job_args: str) -> list[str]:
    """The README's `ray job submit --working-dir . -- python -m deploy.ray.job ...`, with our python."""
    return [
        RAY,
        "job",
        "submit",
        "--address",
        dashboard,
        "--working-dir",
        str(ROOT),
        "--",
        sys.executable,
        "-m",
        "deploy.ray.job",
        "--model",
        model,
        *job_args,
    ]


def json_lines(text: str) -> list[dict]:
    # "\n" only: generated text may hold characters str.splitlines() also splits on (\x1c, \u2028, ...).
    return [json.loads(line) for line in text.split("\n") if line.startswith('{"index"')]


def test_ray_job_submit_generates_the_in_process_tokens(cluster, checkpoint_dir):
    path = checkpoint_dir("v3")
    args = ["--expert-workers", "2", "--max-tokens", str(MAX_TOKENS), "--temperature", "0", "--ignore-eos"]
    args += ["--dtype", "float32", "--kv-cache-memory", "8000000"]
    for prompt in PROMPTS:
        args += ["--prompt-ids", ",".join(map(str, prompt))]
    start = time.monotonic()
    done = subprocess.run(
        job_command(cluster["dashboard"], path, *args),
        cwd=ROOT,
        env=cluster["env"],
        capture_output=True,
        text=True,
        timeout=JOB_TIMEOUT_S,
    )
    output = done.stdout + done.stderr
    assert done.returncode == 0 and "succeeded" in output, output[-6000:]
    assert time.monotonic() - start < JOB_TIMEOUT_S

    # The job joined both nodes and spread its two expert actors over them.
    assert re.search(r"joined the Ray cluster: 2 nodes", output), output[-6000:]
    assert re.search(r"placed 2 expert actors on 2 nodes", output), output[-6000:]

    records = json_lines(done.stdout)
    engine = LLMEngine.from_checkpoint(path, EngineConfig(dtype="float32", kv_cache_memory=8e6))
    want = engine.generate(PROMPTS, SamplingParams(temperature=0, max_tokens=MAX_TOKENS, ignore_eos=True))
    assert [r["index"] for r in records] == list(range(len(PROMPTS)))
    for record, prompt, out in zip(records, PROMPTS, want):
        assert record["prompt_token_ids"] == prompt
        assert record["token_ids"] == out.outputs[0].token_ids and len(record["token_ids"]) == MAX_TOKENS
        assert record["text"] == out.outputs[0].text and record["finish_reason"] == "length"


def test_compose_router_places_its_expert_actors_on_the_cluster(cluster, checkpoint_dir):
    """ray-head's second step, the router, joins the cluster the compose `ray start` commands started (given
    its address, which `auto` finds inside the container) and spreads its 2 expert actors over the nodes. The
    attention flags are dropped: the attention workers and the KV-cache service run in test_compose.py."""
    import grpc

    from latentmoe.v1 import router_pb2, router_pb2_grpc
    from tests.deploy.test_compose import command_steps, drop_flags, local_argv, our_services, service_argv
    from tests.processes import start_until_ready, stop

    path = checkpoint_dir("v3")
    [serve] = [s for s in command_steps(service_argv(our_services()["ray-head"])) if s[0] != "ray"]
    assert flag_value(serve, "--ray-address") == "auto" and flag_value(serve, "--expert-workers") == "2"
    local = {"--model": path, "--host": "127.0.0.1", "--port": "0", "--metrics-port": "0"}
    argv = replace_flags(drop_flags(serve, {"--attention-workers", "--kv-cache"}), local)
    argv = replace_flags(argv, {"--ray-address": cluster["gcs"]}) + ["--dtype", "float32"]
    proc, ready = start_until_ready(local_argv(argv), env=cluster["env"])
    try:
        [placed] = [
            line for line in proc.startup_output.splitlines() if "routed experts on 2 Ray actors" in line
        ]
        assert HEAD_IP in placed and WORKER_IP in placed, placed  # one actor per node
        with grpc.insecure_channel(ready.group(1)) as channel:
            stub = router_pb2_grpc.RouterStub(channel)
            params = router_pb2.SamplingParams(temperature=0, max_tokens=MAX_TOKENS, ignore_eos=True)
            got = []
            for prompt in PROMPTS:
                request = router_pb2.GenerateRequest(token_ids=router_pb2.TokenIds(ids=prompt), params=params)
                got.append(
                    [
                        t
                        for r in stub.Generate(request, timeout=120)
                        for c in r.completions
                        for t in c.delta_token_ids
                    ]
                )
        engine = LLMEngine.from_checkpoint(path, EngineConfig(dtype="float32", kv_cache_memory=8e6))
        want = engine.generate(PROMPTS, SamplingParams(temperature=0, max_tokens=MAX_TOKENS, ignore_eos=True))
        assert got == [o.outputs[0].token_ids for o in want]
    finally:
        assert stop(proc) == 0


def test_job_entry_as_a_driver_rejects_bad_input_clearly(cluster, checkpoint_dir):
    """`python -m deploy.ray.job` run directly on a node joins the cluster too; bad input is a clear error."""
    env = cluster["env"]
    base = [
        sys.executable,
        "-m",
        "deploy.ray.job",
        "--ray-address",
        cluster["gcs"],
        "--model",
        checkpoint_dir("v3"),
    ]
    base += ["--dtype", "float32"]
    done = subprocess.run(
        [*base, "--expert-workers", "9", "--prompt-ids", "1,2"],
        cwd=ROOT,
        env=env,
        capture_output=True,
        text=True,
        timeout=JOB_TIMEOUT_S,
    )
    assert done.returncode == 2, done.stdout + done.stderr
    assert "--expert-workers must be 1..8" in done.stderr and "joined the Ray cluster: 2 nodes" in done.stderr
    for bad, message in (([], "give at least one --prompt"), (["--prompt-ids", "1,x"], "comma-separated")):
        done = subprocess.run([*base, *bad], cwd=ROOT, env=env, capture_output=True, text=True, timeout=120)
        assert done.returncode == 2 and message in done.stderr, done.stderr


def test_job_entry_runs_as_a_lone_script(tmp_path):
    """`ray submit deploy/ray/cluster.yaml deploy/ray/job.py ...` uploads the file alone and runs it as a
    script on the head: it needs nothing but the installed project."""
    script = tmp_path / "job.py"
    shutil.copy(ROOT / "deploy" / "ray" / "job.py", script)
    done = subprocess.run(
        [sys.executable, str(script), "--help"], cwd=tmp_path, capture_output=True, text=True, timeout=120
    )
    assert done.returncode == 0 and "--expert-workers" in done.stdout, done.stderr


# ------------------------------------------------------------------------------------------ cluster.yaml
def test_cluster_yaml_is_a_valid_cluster_launcher_config():
    from ray.autoscaler._private.util import prepare_config, validate_config
    from ray.scripts.scripts import start

    raw = yaml.safe_load((ROOT / "deploy" / "ray" / "cluster.yaml").read_text())
    config = prepare_config(raw)  # fills the provider's defaults, as `ray up` does, without reaching a cloud
    validate_config(config)  # Ray's JSON schema for cluster configs

    types = config["available_node_types"]
    head = types[config["head_node_type"]]
    workers = [t for name, t in types.items() if name != config["head_node_type"]]
    assert head["resources"].get("CPU", 0) > 0 and head["resources"].get("GPU", 0) == 0
    assert workers and all(t["resources"].get("GPU", 0) >= 1 for t in workers)
    assert sum(t["min_workers"] for t in workers) >= 2  # GPUs exist when ExpertPool asks for them

    # torch at the project's pin: CPU build on the head, CUDA build on the GPU workers; then the project.
    [torch_pin] = [d for d in PYPROJECT["project"]["dependencies"] if d.startswith("torch==")]
    for commands, index in (
        (config["head_setup_commands"], "/whl/cpu"),
        (config["worker_setup_commands"], "/whl/cu"),
    ):
        text = "\n".join(commands)
        assert re.search(rf"pip install -q {re.escape(torch_pin)} --index-url \S+{index}", text), text
        assert "pip install -q --no-build-isolation" in text and "resolve_model('mini')" in text
    assert config["file_mounts"] == {"~/latentmoe": "."} and ".gitignore" in config["rsync_filter"]

    # The `ray start` commands parse with Ray's own command line.
    starts = []
    for command in config["head_start_ray_commands"] + config["worker_start_ray_commands"]:
        for part in re.split(r";|&&", command):
            words = shlex.split(part)
            if len(words) >= 2 and Path(words[0]).name == "ray" and words[1] == "start":
                start.make_context("start", words[2:])
                starts.append(words[2:])
    head_start, worker_start = starts
    assert "--head" in head_start and flag_value(worker_start, "--address") == "$RAY_HEAD_IP:" + flag_value(
        head_start, "--port"
    )
    assert flag_value(head_start, "--metrics-export-port") == flag_value(
        worker_start, "--metrics-export-port"
    )

    # The job commands of its header (`ray job submit`, `ray submit`) run our job entry with flags it accepts.
    from deploy.ray.job import build_parser

    header = (ROOT / "deploy" / "ray" / "cluster.yaml").read_text().split("cluster_name")[0]
    jobs = re.findall(r"(?:-m deploy\.ray\.job|deploy/ray/job\.py) (--.+)", header)
    assert len(jobs) == 2, jobs
    for job in jobs:
        args = build_parser().parse_args(shlex.split(job))
        assert args.model == "mini" and args.prompts
