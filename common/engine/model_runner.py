"""Turns a scheduled step into flat forward passes: prefill chunks first, then one token per decode.

Where the latent pages live is the attention backend's business: `LocalAttention` keeps them in this process;
the distributed router's backend keeps them on attention workers and asks for two micro-batches, which then
run in two threads so one's remote attention overlaps the other's expert calls (ping-pong).
"""

from __future__ import annotations

import logging
from collections.abc import Callable
from concurrent.futures import ThreadPoolExecutor, wait
from typing import Any, Protocol

import numpy as np
import torch

from common.engine.decode_graph import DecodeGraph
from common.engine.scheduler import SchedulerOutput
from common.engine.sequence import Sequence
from common.kvcache import BlockManager, BlockPool
from common.model.decoder import DeepseekModel
from common.model.mla import AttentionBatch, int_tensor

log = logging.getLogger(__name__)
MAX_STEP_ATTEMPTS = 3  # a step survives the loss of two remote workers

Span = tuple[Sequence, int]  # a sequence and how many new tokens it computes this step
Part = tuple[list[Span], list[Sequence]]  # a micro-batch: prefill chunks, then decodes


class WorkerLost(RuntimeError):
    """A remote part of the model went away mid-step. The backend has already moved its sequences elsewhere
    (their pages are recomputed or pulled from the KV cache), so the step can run again from the start."""


class PagesDoNotFit(RuntimeError):
    """The step's pages do not fit where its attention runs (an attention worker's hot copy), even after
    moving sequences between workers: these sequences wait, preempted by recompute, as when the KV cache
    runs out of pages."""

    def __init__(self, seqs: list[Sequence]) -> None:
        super().__init__(f"{len(seqs)} sequences do not fit the attention workers' hot copies")
        self.seqs = seqs


class AttentionBackend(Protocol):
    micro_batches: int  # the most parts to cut a step into (they run concurrently)
    micro_batch_min_tokens: int  # a step is cut only into parts of at least this many tokens (0: always)
    blocks: Any  # the block manager whose tables say where each sequence's pages are
    needs_mla_weights: bool  # False: the model's MLA layers are replaced by stand-ins that call elsewhere
    max_blocks_per_sequence: int  # the most pages one sequence may hold (it bounds the context length)

    def copy_blocks(self, copies: list[tuple[int, int]]) -> None:
        """Apply the step's copy-on-write page copies before anything attends."""

    def prepare(self, parts: list[Part]) -> list[tuple[Any, Any]]:
        """For each micro-batch, the (batch, cache) arguments its attention layers get. Called once per step,
        before any micro-batch runs."""


class LocalAttention:
    """The paged latent pool in this process: one micro-batch per step."""

    micro_batches = 1
    micro_batch_min_tokens = 0
    needs_mla_weights = True

    def __init__(self, pool: BlockPool, blocks: BlockManager) -> None:
        self.pool, self.blocks = pool, blocks
        self.max_blocks_per_sequence = blocks.num_blocks

    def copy_blocks(self, copies: list[tuple[int, int]]) -> None:
        self.pool.copy_blocks(copies)

    def prepare(self, parts: list[Part]) -> list[tuple[AttentionBatch, BlockPool]]:
        table = self.blocks.block_table
        return [
            (
                AttentionBatch.build(
                    [(table(s.seq_id), s.num_computed_tokens, n) for s, n in prefills],
                    [(table(s.seq_id), s.num_tokens) for s in decodes],
                    self.pool.block_size,
                    self.pool.device,
                ),
                self.pool,
            )
            for prefills, decodes in parts
        ]


class ModelRunner:
    def __init__(
        self,
        model: DeepseekModel,
        attention: AttentionBackend,
        device: torch.device,
        before_attempt: Callable[[], None] = lambda: None,
        enforce_eager: bool = False,
    ) -> None:
        """before_attempt runs before every attempt at a step, so what a failed attempt recorded (the gates'
        expert load) can be dropped instead of counted twice. Unless enforce_eager, where the attention is
        local and the kernels run, decode-only steps replay the layers' kernel calls without the modules
        around them (common/engine/decode_graph.py)."""
        self.model, self.attention, self.device = model, attention, device
        local = isinstance(attention, LocalAttention)
        self.decode_graph = DecodeGraph.capture(model) if local and not enforce_eager else None
        self.before_attempt = before_attempt
        parts = attention.micro_batches
        self._threads = None
        if parts > 1:
            # One OpenMP thread each: the micro-batches run side by side, and extra OpenMP teams would make
            # every team's idle workers sleep between ops (common/torch_thread.py).
            self._threads = ThreadPoolExecutor(parts, "micro-batch", torch.set_num_threads, (1,))

    @torch.inference_mode()
    def warm_up(self, num_tokens: int) -> None:
        """One prefill chunk of num_tokens through the model before serving, on the local pool's first pages
        (call it while no sequence holds any). A process's first large chunk pays for growing its scratch
        and building its kernels (mini, 2,048 tokens on CPU: about 90 ms more than later chunks); as vLLM's
        profile run at start-up does, this moves that cost from the first requests to start-up."""
        if not isinstance(self.attention, LocalAttention):
            return
        pool = self.attention.pool
        num_tokens = min(num_tokens, pool.capacity_tokens)
        table = list(range(-(-num_tokens // pool.block_size)))
        batch = AttentionBatch.build([(table, 0, num_tokens)], [], pool.block_size, pool.device)
        positions = torch.arange(num_tokens, device=self.device)
        self.model(torch.zeros_like(positions), positions, batch, pool, positions[-1:])
        self.before_attempt()  # its expert load is no request's

    def run(self, step: SchedulerOutput) -> tuple[torch.Tensor, list[Sequence]]:
        """Returns logits [S, V] (float32) for the S sequences that sample a token this step, in order."""
        if step.copies:
            self.attention.copy_blocks(step.copies)
        for _ in range(MAX_STEP_ATTEMPTS - 1):
            try:
                return self._run(step)
            except WorkerLost as e:
                log.warning("%s: running the step again", e)
        return self._run(step)

    def _run(self, step: SchedulerOutput) -> tuple[torch.Tensor, list[Sequence]]:
        self.before_attempt()
        backend = self.attention
        count = self.micro_batches(step.num_tokens, backend.micro_batches, backend.micro_batch_min_tokens)
        parts = self.split(step, count)
        jobs = list(zip(parts, self.attention.prepare(parts), strict=True))
        if self._threads is None or len(jobs) == 1:
            return self.forward(*jobs[0])
        futures = [self._threads.submit(self.forward, *job) for job in jobs]
        wait(futures)  # all of them, even when one failed: a rerun must not overlap a straggler
        results = [f.result() for f in futures]
        return torch.cat([logits for logits, _ in results]), [s for _, seqs in results for s in seqs]

    @staticmethod
    def micro_batches(num_tokens: int, most: int, min_tokens: int) -> int:
        """How many parts to cut a step into: overlap pays only when each part computes long enough to hide
        the other's calls, so small steps (a decode of a few dozen sequences on CPU cores) run whole."""
        return max(1, min(most, num_tokens // min_tokens)) if min_tokens else most

    @staticmethod
    def split(step: SchedulerOutput, parts: int) -> list[Part]:
        """Cut the step's sequences into up to `parts` contiguous groups of about equal token counts."""
        spans: list[tuple[Sequence, int, bool]] = [(s, n, True) for s, n in step.prefills]
        spans += [(s, 1, False) for s in step.decodes]
        cuts, done = [0], 0
        for i, (_, n, _) in enumerate(spans):
            done += n
            later_groups = parts - len(cuts)
            if (
                later_groups > 0
                and done * parts >= step.num_tokens * len(cuts)
                and len(spans) - i > later_groups
            ):
                cuts.append(i + 1)
        cuts.append(len(spans))
        groups = [spans[a:b] for a, b in zip(cuts, cuts[1:]) if b > a]
        return [([(s, n) for s, n, p in g if p], [s for s, _, p in g if not p]) for g in groups]

    @torch.inference_mode()
    def forward(self, part: Part, attention: tuple[Any, Any]) -> tuple[torch.Tensor, list[Sequence]]:
        prefills, decodes = part
        ids: list[int] = []
        positions: list[int] = []
        sampling: list[Sequence] = []
        logits_rows: list[int] = []
        for seq, n in prefills:
            start = seq.num_computed_tokens
            ids += seq.token_ids[start : start + n]
            positions += range(start, start + n)
            if start + n == seq.num_tokens:
                sampling.append(seq)
                logits_rows.append(len(ids) - 1)
        for seq in decodes:
            ids.append(seq.last_token_id)
            positions.append(seq.num_tokens - 1)
            sampling.append(seq)
            logits_rows.append(len(ids) - 1)
        batch, cache = attention
        token_ids = int_tensor(ids, np.int64, self.device)
        token_positions = int_tensor(positions, np.int64, self.device)
        graph = self.decode_graph
        if graph is not None and graph.takes(batch, cache):  # decodes only: every row samples
            return graph(token_ids, token_positions, batch, cache), sampling
        every_row = len(logits_rows) == len(ids)  # a decode-only step samples every row: no rows to pick
        rows = None if every_row else int_tensor(logits_rows, np.int64, self.device)
        return self.model(token_ids, token_positions, batch, cache, rows), sampling
