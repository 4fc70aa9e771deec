"""Continuous-batching scheduler: each step packs decodes and prefill chunks under a token budget.

Running sequences go first (oldest first): a decode costs one token, an unfinished prefill continues with
its next chunk. Then waiting sequences are admitted in arrival order while the budget, the sequence cap and
the free pages allow; admission reuses the longest cached prefix. When a decode finds no free page, the
newest running sequence is preempted by recompute: its pages are freed, its token ids kept, and it waits at
the head of the queue to be prefilled again later, producing the same tokens.
"""

from __future__ import annotations

from collections import deque
from dataclasses import dataclass, field

from common.config import EngineConfig
from common.engine.sequence import Sequence, SequenceStatus
from common.kvcache import BlockManager, NoFreeBlocksError


@dataclass
class SchedulerOutput:
    prefills: list[tuple[Sequence, int]] = field(default_factory=list)  # (sequence, chunk length)
    decodes: list[Sequence] = field(default_factory=list)
    copies: list[tuple[int, int]] = field(default_factory=list)  # copy-on-write page copies to do first
    preempted: list[Sequence] = field(default_factory=list)

    @property
    def empty(self) -> bool:
        return not self.prefills and not self.decodes

    @property
    def num_tokens(self) -> int:
        return sum(n for _, n in self.prefills) + len(self.decodes)

    def without(self, seqs: list[Sequence]) -> SchedulerOutput:
        """The same step minus `seqs` (preempted after scheduling); its page copies are already done."""
        drop = {id(s) for s in seqs}
        return SchedulerOutput(
            prefills=[(s, n) for s, n in self.prefills if id(s) not in drop],
            decodes=[s for s in self.decodes if id(s) not in drop],
            preempted=[*self.preempted, *seqs],
        )


class Scheduler:
    def __init__(self, config: EngineConfig, block_manager: BlockManager) -> None:
        self.config = config
        self.blocks = block_manager
        self.waiting: deque[Sequence] = deque()
        self.running: list[Sequence] = []
        self.watermark_blocks = max(1, block_manager.num_blocks // 100)
        self.num_preemptions = 0

    def add(self, seq: Sequence) -> None:
        self.waiting.append(seq)

    @property
    def has_work(self) -> bool:
        return bool(self.waiting or self.running)

    def schedule(self) -> SchedulerOutput:
        out = SchedulerOutput()
        budget = self.config.max_num_batched_tokens
        chosen: list[tuple[Sequence, int]] = []  # running sequences in order, while the budget lasts
        for seq in self.running:
            if budget <= 0:
                break
            n = min(seq.num_tokens - seq.num_computed_tokens, budget) if seq.is_prefilling else 1
            chosen.append((seq, n))
            budget -= n
        self._reserve_decode_slots([seq for seq, _ in chosen if not seq.is_prefilling], out)
        for seq, n in chosen:
            if seq.status is not SequenceStatus.RUNNING:  # preempted: its budget is not spent
                budget += n
            elif seq.is_prefilling:
                out.prefills.append((seq, n))
            else:
                out.decodes.append(seq)

        while (
            self.waiting and budget > 0 and len(self.running) < self.config.max_num_seqs and not out.preempted
        ):
            seq = self.waiting[0]
            tokens = seq.token_ids
            try:
                cached = self.blocks.allocate(
                    seq.seq_id, tokens, self.watermark_blocks if self.running else 0
                )
            except NoFreeBlocksError:
                break
            if seq.request.first_scheduled_time is None:
                seq.request.num_cached_tokens = cached
            seq.num_computed_tokens = cached
            seq.status = SequenceStatus.RUNNING
            self.waiting.popleft()
            self.running.append(seq)
            n = min(len(tokens) - cached, budget)
            out.prefills.append((seq, n))
            budget -= n
        return out

    def _reserve_decode_slots(self, decodes: list[Sequence], out: SchedulerOutput) -> None:
        """Give each decode a page slot for its newest token, in order; when pages run out, preempt the newest
        running sequences until the one refused fits (or is itself preempted). All appends go in one
        block-manager call, and it is tried before preempting: no query first, one round trip per refusal."""
        while decodes:
            copies, done = self.blocks.append_slots_in_order([(s.seq_id, [s.last_token_id]) for s in decodes])
            out.copies.extend(copies)
            if done == len(decodes):
                return
            victim = self.running[-1]
            self.preempt(victim)
            out.preempted.append(victim)
            decodes = [s for s in decodes[done:] if s.status is SequenceStatus.RUNNING]

    def preempt(self, seq: Sequence) -> None:
        """Back to the front of the queue, its pages freed and its token ids kept (recomputed later)."""
        self.running.remove(seq)
        self.blocks.free(seq.seq_id)
        seq.num_computed_tokens = 0
        seq.status = SequenceStatus.WAITING
        self.waiting.appendleft(seq)
        self.num_preemptions += 1

    def mark_computed(self, out: SchedulerOutput) -> None:
        for seq, n in [*out.prefills, *((s, 1) for s in out.decodes)]:
            seq.num_computed_tokens += n
            self.blocks.mark_computed(seq.seq_id, seq.num_computed_tokens)

    def fork(self, parent: Sequence, child: Sequence) -> None:
        """child shares every page of parent (copy-on-write on its first append)."""
        self.blocks.fork(parent.seq_id, child.seq_id)
        child.num_computed_tokens = parent.num_computed_tokens
        child.status = SequenceStatus.RUNNING
        self.running.append(child)

    def finish(self, seq: Sequence, reason: str) -> None:
        """Free the sequence's pages at once (finished or aborted)."""
        if seq.status is SequenceStatus.RUNNING:
            self.running.remove(seq)
        elif seq.status is SequenceStatus.WAITING and seq in self.waiting:
            self.waiting.remove(seq)
        if self.blocks.has_seq(seq.seq_id):
            self.blocks.free(seq.seq_id)
        seq.status = SequenceStatus.FINISHED
        seq.finish_reason = reason
