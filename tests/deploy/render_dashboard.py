"""Draw the Grafana dashboard's panels with matplotlib from a real Prometheus (Grafana itself is not needed).

    .venv/bin/python -m tests.deploy.render_dashboard --out docs/dashboard.png
    .venv/bin/python -m tests.deploy.render_dashboard --prometheus http://127.0.0.1:9090 --minutes 30

Without --prometheus it runs the stack of tests/deploy/test_dashboard.py: `latentmoe up` (the `mini` preset
by default: KV-cache service, two attention workers, a router with two Ray expert actors), scraped every
second by a Prometheus on loopback, under a seeded load that rises and falls for --duration seconds. With
--prometheus it draws the last --minutes of an existing one (e.g. the compose deployment's). Layout (gridPos),
titles, queries, legends and units all come from deploy/grafana/dashboards/latentmoe.json.
"""

from __future__ import annotations

import argparse
import contextlib
import io
import math
import random
import re
import sys
import tempfile
import threading
import time
from datetime import datetime
from pathlib import Path

from tests.deploy.prometheus import Prometheus, PrometheusAPI
from tests.deploy.test_dashboard import dashboard, generate, panels, prometheus_jobs
from tests.processes import start_up, stop

SCRAPE_S = 1.0


# ------------------------------------------------------------------------------------------- own stack
def drive_load(model_dir: str, grpc_address: str, duration: float, seed: int) -> None:
    """Seeded traffic for `duration` s: up to 8 concurrent clients of the router (a sine-shaped ramp up and
    down; half the prompts share one of three 64-token system prompts, some carry a stop token)."""
    import grpc

    from common.config import ModelConfig
    from latentmoe.v1 import router_pb2_grpc

    vocab = ModelConfig.from_file(model_dir).vocab_size
    rng = random.Random(seed)
    systems = [[rng.randrange(2, vocab) for _ in range(64)] for _ in range(3)]
    start, clients = time.monotonic(), 8
    channel = grpc.insecure_channel(grpc_address)
    stub = router_pb2_grpc.RouterStub(channel)

    def wanted(elapsed: float) -> int:
        return 1 + round((clients - 1) * (0.5 - 0.5 * math.cos(2 * math.pi * elapsed / (duration / 1.5))))

    def client(i: int) -> None:
        r = random.Random(seed * 100 + i)
        while (elapsed := time.monotonic() - start) < duration:
            if i >= wanted(elapsed):
                time.sleep(0.5)
                continue
            prefix = systems[r.randrange(3)] if r.random() < 0.5 else []
            prompt = prefix + [r.randrange(2, vocab) for _ in range(r.randint(4, 96))]
            params = {"max_tokens": r.randint(8, 48)}
            if r.random() < 0.2:
                params["stop_token_ids"] = [r.randrange(2, vocab) for _ in range(200)]
            generate(stub, prompt, **params)

    threads = [threading.Thread(target=client, args=(i,), daemon=True) for i in range(clients)]
    for t in threads:
        t.start()
    for t in threads:
        t.join(timeout=duration + 300)
    channel.close()


@contextlib.contextmanager
def own_stack(model: str, duration: float, seed: int):
    """Yields (Prometheus, start, end) after the load has run; stops everything on exit. A small KV cache
    (600 tokens) and --max-num-seqs 4 make requests wait and get preempted at the load's peaks."""
    from common.checkpoint import resolve_model
    from common.config import ModelConfig

    model_dir = str(resolve_model(model))
    config = ModelConfig.from_file(model_dir)
    kv_bytes = 600 * (config.kv_lora_rank + config.qk_rope_head_dim) * config.num_hidden_layers * 4
    work = Path(tempfile.mkdtemp(prefix="latentmoe-dashboard-"))
    with contextlib.ExitStack() as cleanup:
        proc, _, services = start_up(model_dir, "--max-num-seqs", "4", "--kv-cache-memory", str(kv_bytes))
        cleanup.callback(stop, proc, 60)
        prom = Prometheus(work / "prometheus", prometheus_jobs(services)).start()
        cleanup.callback(prom.stop)
        start = time.time()
        print(f"driving {duration:.0f} s of load ...", file=sys.stderr)
        drive_load(model_dir, services["router"]["grpc"], duration, seed)
        end = min(time.time(), start + duration)  # not the drained tail of the last requests
        time.sleep(3 * SCRAPE_S)  # the last samples of the load
        yield prom, start, end


# ------------------------------------------------------------------------------------------- drawing
def legend(fmt: str, labels: dict[str, str], expr: str) -> str:
    if fmt and fmt != "__auto":
        return re.sub(r"\{\{\s*(\w+)\s*\}\}", lambda m: labels.get(m.group(1), ""), fmt)
    shown = {k: v for k, v in labels.items() if k != "__name__"}
    return ", ".join(f"{k}={v}" for k, v in shown.items()) or expr[:40]


def scale(unit: str) -> tuple[float, str]:
    if unit == "percentunit":
        return 100.0, "%"
    if unit.startswith("suffix:"):
        return 1.0, unit.split(":", 1)[1].strip()
    return 1.0, {"s": "seconds", "reqps": "requests/s", "ops": "per second", "none": ""}.get(unit, unit)


def finite(values: list[list]) -> tuple[list[float], list[float]]:
    pts = [(float(t), float(v)) for t, v in values if math.isfinite(float(v))]
    return [t for t, _ in pts], [v for _, v in pts]


def render(api: PrometheusAPI, start: float, end: float, out: Path) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.dates as mdates
    import matplotlib.pyplot as plt
    import numpy as np
    from PIL import Image

    board = dashboard()
    step = max(1.0, round((end - start) / 200))
    variables = {
        "__rate_interval": f"{int(max(4 * SCRAPE_S, 2 * step))}s",
        "__interval": f"{int(step)}s",
        "__range": f"{int(end - start)}s",
    }

    def expand(expr: str) -> str:
        return re.sub(r"\$\{?(\w+)\}?", lambda m: variables[m.group(1)], expr)

    items = panels(board)
    rows = max(p["gridPos"]["y"] + p["gridPos"]["h"] for p in items)
    unit_in, width_in, top_in, side_in = 0.42, 24.0, 0.7, 0.25  # one grid row; figure width; margins
    height_in = top_in + rows * unit_in + side_in
    plt.style.use("dark_background")
    fig = plt.figure(figsize=(width_in, height_in), dpi=80)

    def place(
        pos: dict, title_in: float = 0.3, ticks_in: float = 0.35, label_in: float = 0.55
    ) -> list[float]:
        """The axes of a gridPos in figure fractions, leaving room for the title, tick labels, y label."""
        col_in = (width_in - 2 * side_in) / 24
        left = side_in + pos["x"] * col_in + label_in
        right = side_in + (pos["x"] + pos["w"]) * col_in - 0.15
        top = height_in - top_in - pos["y"] * unit_in - title_in
        bottom = height_in - top_in - (pos["y"] + pos["h"]) * unit_in + ticks_in
        return [left / width_in, bottom / height_in, (right - left) / width_in, (top - bottom) / height_in]

    fig.suptitle(
        f"{board['title']} - {datetime.fromtimestamp(start):%Y-%m-%d %H:%M:%S} to "
        f"{datetime.fromtimestamp(end):%H:%M:%S}",
        fontsize=16,
        y=1 - 0.25 / height_in,
    )
    clock = mdates.DateFormatter("%H:%M:%S")
    for panel in items:
        pos = panel["gridPos"]
        if panel["type"] == "row":
            ax = fig.add_axes(place(pos, title_in=0, ticks_in=0, label_in=0))
            ax.axis("off")
            ax.text(0, 0.3, panel["title"], fontsize=14, fontweight="bold", va="center")
            continue
        ax = fig.add_axes(place(pos, label_in=0.1 if panel["type"] == "stat" else 0.55))
        ax.set_title(panel["title"], fontsize=10, loc="left")
        unit = panel.get("fieldConfig", {}).get("defaults", {}).get("unit", "")
        factor, label = scale(unit)
        targets = panel["targets"]
        if panel["type"] == "table":  # the layer x expert matrix: an instant query at the end
            series = api.query_range(expand(targets[0]["expr"]), end, end, 1)
            cells = {
                (int(s["metric"]["layer"]), int(s["metric"]["expert"])): float(s["values"][-1][1])
                for s in series
            }
            layers = sorted({k[0] for k in cells})
            experts = sorted({k[1] for k in cells})
            data = np.array([[cells.get((la, e), np.nan) for e in experts] for la in layers])
            image = ax.imshow(data, aspect="auto", cmap="RdYlBu_r", vmin=0, vmax=2, interpolation="nearest")
            ax.set_yticks(range(len(layers)), [f"layer {la}" for la in layers], fontsize=7)
            ax.set_xticks(range(len(experts)), experts, fontsize=7)
            ax.set_xlabel("expert", fontsize=8)
            fig.colorbar(image, ax=ax, pad=0.01, label="x layer mean")
            continue
        if panel["type"] == "heatmap":
            series = api.query_range(expand(targets[0]["expr"]), start, end, step)
            series.sort(key=lambda s: (int(s["metric"]["layer"]), int(s["metric"]["expert"])))
            times = np.arange(start, end + step / 2, step)
            data = np.full((len(series), len(times)), np.nan)
            for i, s in enumerate(series):
                for t, v in s["values"]:
                    data[i, min(len(times) - 1, int(round((float(t) - start) / step)))] = float(v)
            extent = [mdates.date2num(datetime.fromtimestamp(x)) for x in (start, end)] + [len(series), 0]
            image = ax.imshow(data, aspect="auto", cmap="inferno", extent=extent, interpolation="nearest")
            ax.xaxis.set_major_formatter(clock)
            every = max(1, len(series) // 16)
            ticks = list(range(0, len(series), every))
            ax.set_yticks([t + 0.5 for t in ticks])
            ax.set_yticklabels([legend(targets[0]["legendFormat"], series[t]["metric"], "") for t in ticks])
            ax.tick_params(labelsize=7)
            fig.colorbar(image, ax=ax, pad=0.01, label="tokens/s")
            continue
        lines = 0
        last = None
        for target in targets:
            for s in api.query_range(expand(target["expr"]), start, end, step):
                ts, vs = finite(s["values"])
                if not ts:
                    continue
                when = [datetime.fromtimestamp(t) for t in ts]
                ax.plot(
                    when,
                    [v * factor for v in vs],
                    lw=1.2,
                    label=legend(target["legendFormat"], s["metric"], ""),
                )
                last = vs[-1] * factor
                lines += 1
        ax.xaxis.set_major_formatter(clock)
        ax.tick_params(labelsize=7)
        if panel["type"] == "stat":
            text = "no data" if last is None else f"{last:.3g}{' ' + label if label else ''}"
            ax.text(
                0.5,
                0.5,
                text,
                transform=ax.transAxes,
                ha="center",
                va="center",
                fontsize=20,
                fontweight="bold",
                color="#73bf69",
            )
            ax.set_yticks([])
            ax.set_xticks([])
            for line in ax.get_lines():
                line.set_alpha(0.35)
            continue
        ax.set_ylabel(label, fontsize=8)
        ax.grid(alpha=0.2)
        if lines:
            ax.legend(fontsize=7, loc="upper left", ncol=2 if lines > 4 else 1, framealpha=0.3)
        else:
            ax.text(0.5, 0.5, "no data", transform=ax.transAxes, ha="center", va="center", color="grey")
    out.parent.mkdir(parents=True, exist_ok=True)
    buffer = io.BytesIO()
    fig.savefig(buffer, format="png")
    buffer.seek(0)
    # A 256-colour palette keeps the picture a few hundred kB (Pillow comes with matplotlib).
    Image.open(buffer).convert("RGB").quantize(colors=256).save(out, optimize=True)
    print(f"wrote {out}", file=sys.stderr)


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--out", type=Path, default=Path("docs/dashboard.png"))
    p.add_argument("--prometheus", help="URL of an existing Prometheus to draw from (default: run the stack)")
    p.add_argument("--minutes", type=float, default=30, help="with --prometheus: the time range drawn")
    p.add_argument("--model", default="mini", help="own stack: checkpoint directory or preset")
    p.add_argument("--duration", type=float, default=90, help="own stack: seconds of load")
    p.add_argument("--seed", type=int, default=0)
    args = p.parse_args(argv)
    if args.prometheus:
        end = time.time()
        render(PrometheusAPI(args.prometheus), end - args.minutes * 60, end, args.out)
        return 0
    with own_stack(args.model, args.duration, args.seed) as (prom, start, end):
        render(prom, start, end, args.out)
    return 0


if __name__ == "__main__":
    sys.exit(main())
