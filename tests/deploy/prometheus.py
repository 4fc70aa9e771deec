"""A real Prometheus server for tests: found on PATH or installed from Debian's `prometheus` package, started
on a free loopback port with a generated config and a throwaway TSDB, queried over its HTTP API, stopped."""

from __future__ import annotations

import json
import os
import shutil
import signal
import socket
import subprocess
import time
import urllib.error
import urllib.parse
import urllib.request
from pathlib import Path
from typing import Any

import pytest

INSTALL_TIMEOUT_S = 900
READY_TIMEOUT_S = 60


def find_or_install(binary: str = "prometheus") -> str:
    """Path of `binary` (prometheus or promtool, both in Debian's package); installs the package with apt-get
    when running as root, else skips the calling test with the reason."""
    path = shutil.which(binary)
    if path:
        return path
    if os.name != "posix" or os.geteuid() != 0:
        pytest.skip(f"{binary} is not installed and this user cannot install it (apt-get needs root)")
    if shutil.which("apt-get") is None:
        pytest.skip(f"{binary} is not installed and there is no apt-get to install it")
    env = {**os.environ, "DEBIAN_FRONTEND": "noninteractive"}
    for cmd in (["apt-get", "update"], ["apt-get", "install", "-y", "prometheus"]):
        try:
            done = subprocess.run(
                cmd, env=env, capture_output=True, text=True, timeout=INSTALL_TIMEOUT_S, check=False
            )
        except subprocess.TimeoutExpired:
            pytest.skip(f"`{' '.join(cmd)}` did not finish in {INSTALL_TIMEOUT_S} s")
        if done.returncode != 0:
            pytest.skip(f"`{' '.join(cmd)}` failed (no network?): {done.stderr.strip()[-400:]}")
    path = shutil.which(binary)
    if not path:
        pytest.skip(f"the prometheus package installed no {binary} on PATH")
    return path


def free_port(host: str = "127.0.0.1") -> int:
    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as s:
        s.bind((host, 0))
        return s.getsockname()[1]


class PrometheusAPI:
    """Queries over the HTTP API of a Prometheus at `url`."""

    def __init__(self, url: str) -> None:
        self.url = url.rstrip("/")

    def _get(self, path: str, params: dict[str, Any]) -> dict[str, Any]:
        url = f"{self.url}{path}?" + urllib.parse.urlencode(params)
        try:
            with urllib.request.urlopen(url, timeout=10) as r:
                body = json.load(r)
        except urllib.error.HTTPError as e:
            body = json.load(e)
        if body.get("status") != "success":
            raise AssertionError(f"{params.get('query')!r}: {body.get('errorType')}: {body.get('error')}")
        return body["data"]

    def query(self, expr: str) -> list[dict[str, Any]]:
        """Evaluate an instant query now; returns the series ([{"metric": {...}, "value": [t, "v"]}, ...], or
        "values" lists for a range selector). Raises AssertionError with Prometheus' message when the query
        is rejected."""
        data = self._get("/api/v1/query", {"query": expr})
        if data["resultType"] in ("scalar", "string"):
            return [{"metric": {}, "value": data["result"]}]
        return data["result"]

    def query_range(self, expr: str, start: float, end: float, step: float) -> list[dict[str, Any]]:
        """[{"metric": {...}, "values": [[t, "v"], ...]}, ...]"""
        data = self._get("/api/v1/query_range", {"query": expr, "start": start, "end": end, "step": step})
        if data["resultType"] == "scalar":
            return [{"metric": {}, "values": data["result"]}]
        return data["result"]

    def value(self, expr: str) -> float | None:
        """The value of a query that yields one series, None if it yields none."""
        series = self.query(expr)
        assert len(series) <= 1, f"{expr!r} gave {len(series)} series"
        return float(series[0]["value"][1]) if series else None

    def targets_up(self) -> dict[str, str]:
        with urllib.request.urlopen(f"{self.url}/api/v1/targets", timeout=10) as r:
            active = json.load(r)["data"]["activeTargets"]
        return {t["scrapeUrl"]: t["health"] for t in active}


class Prometheus(PrometheusAPI):
    """One Prometheus process scraping `targets` ({job: ["host:port", ...]}) every `scrape_interval`.

    The config is written as JSON (a subset of YAML) next to the TSDB, under `workdir`."""

    def __init__(self, workdir: Path, targets: dict[str, list[str]], scrape_interval: str = "1s") -> None:
        self.binary = find_or_install("prometheus")
        self.workdir = Path(workdir)
        self.workdir.mkdir(parents=True, exist_ok=True)
        self.config_path = self.workdir / "prometheus.yml"
        config = {
            "global": {"scrape_interval": scrape_interval, "scrape_timeout": scrape_interval},
            "scrape_configs": [
                {"job_name": job, "static_configs": [{"targets": hosts}]} for job, hosts in targets.items()
            ],
        }
        self.config_path.write_text(json.dumps(config, indent=2))
        self.num_targets = sum(len(hosts) for hosts in targets.values())
        self.proc: subprocess.Popen | None = None
        super().__init__("")
        self.log_path = self.workdir / "prometheus.log"

    def start(self) -> Prometheus:
        for _attempt in range(3):  # the free port can be taken between picking and binding it
            port = free_port()
            self.url = f"http://127.0.0.1:{port}"
            with open(self.log_path, "w") as log:
                self.proc = subprocess.Popen(
                    [
                        self.binary,
                        f"--config.file={self.config_path}",
                        f"--storage.tsdb.path={self.workdir / 'data'}",
                        f"--web.listen-address=127.0.0.1:{port}",
                        "--log.level=warn",
                    ],
                    stdout=log,
                    stderr=subprocess.STDOUT,
                )
            if self._wait_ready():
                self._wait_first_scrapes()
                return self
            if self.proc.poll() is None:
                self.stop()
                raise RuntimeError(f"prometheus not ready in {READY_TIMEOUT_S} s: {self.log()}")
        raise RuntimeError(f"prometheus did not start: {self.log()}")

    def _wait_ready(self) -> bool:
        deadline = time.monotonic() + READY_TIMEOUT_S
        while time.monotonic() < deadline:
            if self.proc.poll() is not None:
                return False
            try:
                with urllib.request.urlopen(f"{self.url}/-/ready", timeout=2) as r:
                    if r.status == 200:
                        return True
            except (urllib.error.URLError, OSError):
                pass
            time.sleep(0.2)
        return False

    def _wait_first_scrapes(self) -> None:
        """Until every target was scraped once (Prometheus hands targets to the scrapers up to ~5 s after
        start): so counters have a sample from before whatever the caller does next."""
        deadline = time.monotonic() + READY_TIMEOUT_S
        while time.monotonic() < deadline:
            if self.value("count(up == 1)") == self.num_targets:
                return
            time.sleep(0.2)
        health = self.targets_up()
        self.stop()
        raise RuntimeError(f"prometheus did not scrape every target in {READY_TIMEOUT_S} s: {health}")

    def log(self) -> str:
        return self.log_path.read_text()[-2000:] if self.log_path.exists() else ""

    def stop(self, timeout: float = 30) -> int:
        """SIGTERM, wait; SIGKILL only if it does not exit. Returns the exit code."""
        if self.proc is None:
            return 0
        if self.proc.poll() is None:
            self.proc.send_signal(signal.SIGTERM)
            try:
                self.proc.wait(timeout=timeout)
            except subprocess.TimeoutExpired:
                self.proc.kill()
                self.proc.wait(timeout=timeout)
        return self.proc.returncode
