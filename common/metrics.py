"""Every Prometheus metric of latentmoe, defined once; services expose them on /metrics.

Names follow Prometheus conventions: `latentmoe_` prefix, base units (`_seconds`), `_total` for counters.
Label sets stay bounded: the largest is (layer, expert) on latentmoe_expert_tokens_total, i.e. MoE layers x
routed experts series (7 x 32 for the mini model, 58 x 256 for DeepSeek-V3); `worker` is one value per
expert or attention worker, `reason` one of stop|length|abort.
"""

from __future__ import annotations

import collections

import numpy as np
import torch
from prometheus_client import Counter, Gauge, Histogram

_LATENCY_BUCKETS = (0.001, 0.0025, 0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1, 2.5, 5, 10, 25, 60)

# --- expert load ---------------------------------------------------------------------------------------
EXPERT_TOKENS = Counter(
    "latentmoe_expert_tokens_total", "Tokens routed to each routed expert", ["layer", "expert"]
)
EXPERT_IMBALANCE = Gauge(
    "latentmoe_expert_load_imbalance",
    "Max over mean expert load of a MoE layer over the recent window of steps (1 = perfectly balanced)",
    ["layer"],
)
EXPERT_WORKER_TOKENS = Counter(
    "latentmoe_expert_worker_tokens_total", "(token, expert) pairs computed by each expert worker", ["worker"]
)
EXPERT_WORKER_LATENCY = Histogram(
    "latentmoe_expert_worker_latency_seconds",
    "Latency of one RunExperts call",
    ["worker"],
    buckets=_LATENCY_BUCKETS,
)
EXPERT_WORKER_COMPUTE = Counter(
    "latentmoe_expert_worker_compute_seconds_total",
    "Time expert workers spent on RunExperts calls (the rest of their latency is transport and queueing)",
    ["worker"],
)
EXPERT_WORKER_RESTARTS = Counter(
    "latentmoe_expert_worker_restarts_total", "Expert actor restarts seen by the router", ["worker"]
)

# --- attention workers -------------------------------------------------------------------------------
ATTENTION_TOKENS = Counter(
    "latentmoe_attention_tokens_total",
    "New tokens attended by each attention worker (all layers)",
    ["worker"],
)
ATTENTION_BLOCKS_PULLED = Counter(
    "latentmoe_attention_blocks_pulled_total",
    "KV blocks an attention worker copied from the KV-cache service (hot-copy misses)",
    ["worker"],
)
ATTENTION_WORKER_COMPUTE = Counter(
    "latentmoe_attention_worker_compute_seconds_total",
    "Time attention workers spent on Attend calls (the rest of their latency is transport and queueing)",
    ["worker"],
)
ATTENTION_WORKER_LATENCY = Histogram(
    "latentmoe_attention_worker_latency_seconds",
    "Latency of one Attend call (one layer of one micro-batch)",
    ["worker"],
    buckets=_LATENCY_BUCKETS,
)
ATTENTION_WORKER_LOSSES = Counter(
    "latentmoe_attention_worker_losses_total",
    "Attention workers the router dropped (gone, or frozen past the keepalive); their sequences moved",
    ["worker"],
)

# --- KV cache ----------------------------------------------------------------------------------------------
KV_BLOCKS = Gauge("latentmoe_kv_cache_blocks", "KV-cache blocks by state", ["state"])  # total|used|cached
KV_USAGE = Gauge("latentmoe_kv_cache_usage_ratio", "Fraction of KV-cache blocks referenced by sequences")
PREFIX_QUERIES = Counter(
    "latentmoe_prefix_cache_queries_total", "Prompt tokens looked up in the prefix cache"
)
PREFIX_HITS = Counter("latentmoe_prefix_cache_hits_total", "Prompt tokens found in the prefix cache")
PREEMPTIONS = Counter(
    "latentmoe_preemptions_total", "Sequences preempted (recomputed later) for lack of pages"
)

# --- requests --------------------------------------------------------------------------------------------
REQUESTS_RUNNING = Gauge("latentmoe_requests_running", "Sequences being computed")
REQUESTS_WAITING = Gauge("latentmoe_requests_waiting", "Sequences waiting for admission")
TTFT = Histogram("latentmoe_time_to_first_token_seconds", "Arrival to first token", buckets=_LATENCY_BUCKETS)
ITL = Histogram(
    "latentmoe_inter_token_latency_seconds", "Time between two tokens of a sequence", buckets=_LATENCY_BUCKETS
)
E2E = Histogram("latentmoe_e2e_request_latency_seconds", "Arrival to finish", buckets=_LATENCY_BUCKETS)
QUEUE_TIME = Histogram(
    "latentmoe_request_queue_time_seconds", "Arrival to first scheduled", buckets=_LATENCY_BUCKETS
)
PROMPT_TOKENS = Counter("latentmoe_prompt_tokens_total", "Prompt tokens of accepted requests")
GENERATION_TOKENS = Counter("latentmoe_generation_tokens_total", "Generated tokens")
REQUESTS_FINISHED = Counter("latentmoe_requests_finished_total", "Finished requests", ["reason"])
ROUTED_TOKENS = Counter(
    "latentmoe_routed_tokens_total", "(token, expert) pairs the gate routed, over all MoE layers"
)


class ExpertLoad:
    """Counts the gates' choices per (layer, expert) and tracks each layer's imbalance over a window.

    Each MoE layer's gate adds its choices into its row of `step` (Gate.counts) inside its own call, where
    reading every gate's output after it (a forward hook per gate, then the ids counted per step) cost a
    one-sequence decode step 2-3% here."""

    def __init__(
        self, moe_layers: list[int], num_experts: int, window: int = 64, device: torch.device | str = "cpu"
    ) -> None:
        self.layers = moe_layers
        self.row = {layer: i for i, layer in enumerate(moe_layers)}
        self.num_experts = num_experts
        self.step = torch.zeros(len(moe_layers), num_experts, dtype=torch.int64, device=device)
        # Kept in numpy: its calls cost a microsecond, a torch operator several.
        self.window: collections.deque[np.ndarray] = collections.deque(maxlen=window)
        self.window_sum = np.zeros((len(moe_layers), num_experts), dtype=np.int64)
        self.unpublished = np.zeros_like(self.window_sum)  # counted, not yet added to the counters
        self._children = [
            [EXPERT_TOKENS.labels(str(layer), str(e)) for e in range(num_experts)] for layer in moe_layers
        ]
        self._imbalance = [EXPERT_IMBALANCE.labels(str(layer)) for layer in moe_layers]

    def counts_of(self, layer: int) -> torch.Tensor:
        """The row [experts] that the gate of MoE layer `layer` adds its choices into."""
        return self.step[self.row[layer]]

    def discard(self) -> None:
        """Forget this step's counts: the step is being run again (or failed)."""
        self.step.zero_()

    def flush(self, publish: bool = True) -> None:
        """After a step: count its choices into the window, and publish what is counted when asked (the
        Python loop over every (layer, expert) would cost a one-sequence step several percent every step)."""
        counts = self.step.cpu().numpy().copy()
        self.step.zero_()
        if len(self.window) == self.window.maxlen:
            self.window_sum -= self.window[0]
        self.window.append(counts)
        self.window_sum += counts
        self.unpublished += counts
        if publish:
            self.publish()

    def publish(self) -> None:
        """The counts since the last publish, and each layer's imbalance over the window."""
        total = 0
        for i, row in enumerate(self.unpublished.tolist()):
            for e, n in enumerate(row):
                if n:
                    self._children[i][e].inc(n)
                    total += n
        self.unpublished[:] = 0
        ROUTED_TOKENS.inc(total)
        mean = self.window_sum.mean(axis=1)
        imbalance = np.where(mean > 0, self.window_sum.max(axis=1) / np.maximum(mean, 1e-9), 1.0)
        for gauge, value in zip(self._imbalance, imbalance.tolist()):
            gauge.set(value)
