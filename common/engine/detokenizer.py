"""Incremental detokenisation for streaming, with stop strings.

Decoding one token at a time is wrong twice over: byte-level BPE splits multi-byte characters across tokens,
and decoders such as SentencePiece's treat a leading space differently at the start of a text. So each step
decodes a short window of recent tokens twice, with and without the newest ones, and emits the difference
(vLLM's detokenize_incrementally / HF TextStreamer idea). While the window ends in U+FFFD the newest tokens
stop mid-character, so they wait for the next token. The window restarts after every emission, so a step
costs O(window), not O(length). A caller that wants only the whole text at the end and has no stop string
(the batch API) defers: the ids wait, and flush decodes them in one window.
"""

from __future__ import annotations

from collections.abc import Sequence

import tokenizers

REPLACEMENT_CHAR = "\ufffd"  # what decode() makes of an incomplete UTF-8 sequence
PROMPT_CONTEXT = 5  # prompt tokens decoded ahead of the output, for decoders that look at the left context


class IncrementalDetokenizer:
    """Turns output token ids into text deltas for one sequence; stops at the first stop string."""

    def __init__(
        self,
        tokenizer: tokenizers.Tokenizer,
        prompt_ids: Sequence[int],
        skip_special_tokens: bool = True,
        stop: Sequence[str] = (),
        include_stop_str_in_output: bool = False,
        deferred: bool = False,
    ) -> None:
        """deferred: add() only keeps the ids and the text is there after flush(); a step of 64 sequences
        spent about 0.4 ms decoding windows otherwise. Stop strings need the text as it grows."""
        if isinstance(stop, str) or not all(isinstance(s, str) and s for s in stop):
            raise ValueError(f"stop must be a sequence of non-empty strings, got {stop!r}")
        if deferred and stop:
            raise ValueError("stop strings are matched as the text grows: they cannot be deferred")
        self._deferred = deferred
        self._tokenizer = tokenizer
        self._skip_special_tokens = skip_special_tokens
        self._stop = list(stop)
        self._include_stop = include_stop_str_in_output
        # The window: ids[:read] are already decoded (context only), ids[read:] are not yet.
        self._ids = list(prompt_ids[-PROMPT_CONTEXT:])
        if self._decode(self._ids).endswith(REPLACEMENT_CHAR):
            self._ids = []  # the prompt stops mid-character: its tail would corrupt the first delta
        self._read = len(self._ids)
        self._emitted: list[str] = []  # deltas returned so far
        self._pending = ""  # decoded but held back: it may be the beginning of a stop string
        self._stopped: str | None = None

    @property
    def text(self) -> str:
        """The output text so far (held-back text included), cut at the stop string if one matched; a deferred
        detokenizer's once it is flushed."""
        if len(self._emitted) > 1:
            self._emitted = ["".join(self._emitted)]  # callers may ask every step: join each delta only once
        return "".join(self._emitted) + self._pending

    @property
    def stopped(self) -> str | None:
        """The stop string that ended the output, or None."""
        return self._stopped

    def add(self, token_id: int) -> str:
        """Append one generated token; return the text that is now safe to stream (maybe "")."""
        if self._stopped is not None:
            return ""
        self._ids.append(token_id)
        if self._deferred:
            return ""
        self._decode_window(final=False)
        return self._release(final=False)

    def flush(self) -> str:
        """At the end of the request, return whatever was held back and is not part of a stop string."""
        if self._stopped is not None:
            return ""
        self._decode_window(final=True)
        return self._release(final=True)

    def _decode(self, ids: Sequence[int]) -> str:
        return self._tokenizer.decode(ids, skip_special_tokens=self._skip_special_tokens)

    def _decode_window(self, final: bool) -> None:
        """Move the text of the window's undecoded tokens into pending, unless they end mid-character."""
        if self._read == len(self._ids):
            return
        prefix = self._decode(self._ids[: self._read])
        full = self._decode(self._ids)
        if len(full) > len(prefix) and (final or not full.endswith(REPLACEMENT_CHAR)):
            self._pending += full[len(prefix) :]
            self._ids = self._ids[self._read :]  # the newly decoded tokens become the next step's context
            self._read = len(self._ids)

    def _release(self, final: bool) -> str:
        """Emit pending text, cut at a stop string, keeping back a tail that may begin one."""
        pending = self._pending
        if not self._stop:  # the usual case, without the searches below (a third of a token's cost)
            return self._emit(pending, rest="")
        # Emitted text never holds the start of a stop string, so every match lies wholly in pending.
        matches = [(i + len(s), i, s) for s in self._stop if (i := pending.find(s)) >= 0]
        if matches:
            end, start, self._stopped = min(matches)  # the stop string that completed first
            cut = end if self._include_stop else start
            return self._emit(pending[:cut], rest="")
        keep = 0 if final else max((_overlap(pending, s) for s in self._stop), default=0)
        return self._emit(pending[: len(pending) - keep], rest=pending[len(pending) - keep :])

    def _emit(self, delta: str, rest: str) -> str:
        self._pending = rest
        if delta:
            self._emitted.append(delta)
        return delta


def _overlap(text: str, stop: str) -> int:
    """Length of the longest suffix of `text` that is a proper prefix of `stop`."""
    for n in range(min(len(text), len(stop) - 1), 0, -1):
        if text.endswith(stop[:n]):
            return n
    return 0
