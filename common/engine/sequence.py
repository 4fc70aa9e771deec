"""Request and sequence state. Token ids are the source of truth: the KV cache can be rebuilt from them."""

from __future__ import annotations

import enum
import itertools
import time
from dataclasses import dataclass, field

import torch

from common.engine.detokenizer import IncrementalDetokenizer
from common.engine.sampling_params import SamplingParams


class SequenceStatus(enum.Enum):
    WAITING = "waiting"
    RUNNING = "running"
    FINISHED = "finished"


_seq_ids = itertools.count()


@dataclass
class Sequence:
    """One generated continuation (a request with n > 1 has n of them, forked after the prompt)."""

    request: Request
    index: int  # which of the request's n outputs
    output_ids: list[int] = field(default_factory=list)
    num_computed_tokens: int = 0  # tokens whose latent KV is in the cache
    status: SequenceStatus = SequenceStatus.WAITING
    finish_reason: str | None = None  # stop | length | abort
    detokenizer: IncrementalDetokenizer | None = None
    generator: torch.Generator | None = None
    logprobs: list[dict] = field(default_factory=list)
    last_token_time: float | None = None
    seq_id: int = field(default_factory=lambda: next(_seq_ids))
    # streaming cursor: what the caller has already been given
    sent_tokens: int = 0
    pending_text: str = ""

    @property
    def token_ids(self) -> list[int]:
        return self.request.prompt_ids + self.output_ids

    @property
    def last_token_id(self) -> int:
        """The newest token, the one a decode feeds (token_ids[-1] without building token_ids)."""
        return self.output_ids[-1] if self.output_ids else self.request.prompt_ids[-1]

    @property
    def num_tokens(self) -> int:
        return len(self.request.prompt_ids) + len(self.output_ids)

    @property
    def is_prefilling(self) -> bool:
        """More than the newest token lacks KV: a (possibly chunked, possibly recomputed) prefill."""
        return self.num_computed_tokens < self.num_tokens - 1 or not self.output_ids

    @property
    def finished(self) -> bool:
        return self.status is SequenceStatus.FINISHED


@dataclass
class Request:
    request_id: str
    prompt_ids: list[int]
    params: SamplingParams
    arrival_time: float = field(default_factory=time.monotonic)
    seqs: list[Sequence] = field(default_factory=list)
    num_cached_tokens: int = 0  # prompt tokens served from the prefix cache at admission
    first_scheduled_time: float | None = None
    first_token_time: float | None = None
    # Only the last output is wanted (the batch API; vLLM's RequestOutputKind.FINAL_ONLY): no output is built
    # for the steps before, where a streaming caller gets every step's delta.
    final_only: bool = False

    @property
    def finished(self) -> bool:
        return all(s.finished for s in self.seqs)
