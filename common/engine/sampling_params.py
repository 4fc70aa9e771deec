"""Per-request sampling parameters, validated once at the API boundary so the engine can trust them."""

from __future__ import annotations

import math
from collections.abc import Mapping
from dataclasses import dataclass, field, fields
from typing import Any, NoReturn

GREEDY_EPS = 1e-5  # temperatures below this are treated as exactly greedy (argmax)


def _is_int(x: Any) -> bool:
    return isinstance(x, int) and not isinstance(x, bool)


def _is_real(x: Any) -> bool:
    return isinstance(x, (int, float)) and not isinstance(x, bool) and math.isfinite(x)


@dataclass
class SamplingParams:
    n: int = 1
    temperature: float = 1.0  # 0 = greedy (exactly argmax)
    top_p: float = 1.0  # in (0, 1]
    top_k: int = 0  # 0 or -1 = disabled
    min_p: float = 0.0  # in [0, 1], relative to the most likely token
    seed: int | None = None
    max_tokens: int = 16
    stop_token_ids: list[int] = field(default_factory=list)
    stop: list[str] = field(default_factory=list)  # a plain str is accepted and wrapped into a list
    ignore_eos: bool = False
    logprobs: int | None = None  # None = none; k >= 0 = sampled token's logprob plus the top-k alternatives
    skip_special_tokens: bool = True
    include_stop_str_in_output: bool = False

    def __post_init__(self) -> None:
        def fail(name: str, rule: str) -> NoReturn:
            raise ValueError(f"{name} must be {rule}, got {getattr(self, name)!r}")

        if not _is_int(self.n) or self.n < 1:
            fail("n", "an integer >= 1")
        if not _is_real(self.temperature) or self.temperature < 0:
            fail("temperature", "a number >= 0")
        if not _is_real(self.top_p) or not 0 < self.top_p <= 1:
            fail("top_p", "in (0, 1]")
        if not _is_int(self.top_k) or self.top_k < -1:
            fail("top_k", "an integer >= 1, or 0 / -1 to disable it")
        if not _is_real(self.min_p) or not 0 <= self.min_p <= 1:
            fail("min_p", "in [0, 1]")
        if self.seed is not None and (not _is_int(self.seed) or not 0 <= self.seed < 2**64):
            fail("seed", "None or an integer in [0, 2**64)")
        if not _is_int(self.max_tokens) or self.max_tokens < 1:
            fail("max_tokens", "an integer >= 1")
        if not isinstance(self.stop_token_ids, (list, tuple)) or not all(
            _is_int(t) and t >= 0 for t in self.stop_token_ids
        ):
            fail("stop_token_ids", "a list of non-negative integers")
        if isinstance(self.stop, str):
            self.stop = [self.stop]
        if not isinstance(self.stop, (list, tuple)) or not all(isinstance(s, str) for s in self.stop):
            fail("stop", "a string or a list of strings")
        if not all(self.stop):
            fail("stop", "non-empty strings")  # an empty stop string would match before any output
        for name in ("ignore_eos", "skip_special_tokens", "include_stop_str_in_output"):
            if not isinstance(getattr(self, name), bool):
                fail(name, "a boolean")
        if self.logprobs is not None and (not _is_int(self.logprobs) or self.logprobs < 0):
            fail("logprobs", "None or an integer >= 0")
        # Normalise JSON-ish input (ints where floats are meant, tuples for lists) and own the lists.
        self.temperature, self.top_p, self.min_p = map(float, (self.temperature, self.top_p, self.min_p))
        self.stop_token_ids, self.stop = list(self.stop_token_ids), list(self.stop)

    @property
    def greedy(self) -> bool:
        return self.temperature < GREEDY_EPS

    @classmethod
    def from_dict(cls, d: Mapping[str, Any]) -> SamplingParams:
        """Build from a JSON-like object (HTTP/gRPC); null means 'use the default', as in OpenAI's API."""
        if not isinstance(d, Mapping):
            raise ValueError(f"sampling parameters must be an object, got {type(d).__name__}")
        known = {f.name: f for f in fields(cls)}
        unknown = sorted(str(k) for k in d if k not in known)
        if unknown:
            raise ValueError(f"unknown sampling parameter(s): {', '.join(unknown)}")
        nullable = {name for name, f in known.items() if f.default is None}
        return cls(**{k: v for k, v in d.items() if v is not None or k in nullable})
