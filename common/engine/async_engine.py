"""Streaming front of the engine: `generate(prompt, params)` is an async iterator of deltas.

The engine is single-threaded by design: one background thread owns it and runs `step()` while there is
work. Callers on any event loop hand it commands through a queue and receive their request's outputs on an
asyncio queue. A caller that stops listening (disconnect, cancel) aborts its request, so its pages are freed.
"""

from __future__ import annotations

import asyncio
import itertools
import logging
import queue
import threading
from collections.abc import AsyncIterator, Callable, Sequence
from dataclasses import dataclass

from common.engine.engine import LLMEngine, RequestOutput
from common.engine.sampling_params import SamplingParams

log = logging.getLogger(__name__)


@dataclass
class _Stream:
    loop: asyncio.AbstractEventLoop
    queue: asyncio.Queue

    def put(self, item: RequestOutput | BaseException) -> None:
        self.loop.call_soon_threadsafe(self.queue.put_nowait, item)


class AsyncEngine:
    def __init__(self, engine: LLMEngine | Callable[[], LLMEngine]) -> None:
        """engine, or a function that builds it: then it is built on the engine thread, so loading the weights
        and every step share one thread (why that matters: common/torch_thread.py)."""
        self._commands: queue.SimpleQueue = queue.SimpleQueue()
        self._streams: dict[str, _Stream] = {}
        self._ids = itertools.count()
        self._stopped = threading.Event()
        built: queue.SimpleQueue = queue.SimpleQueue()
        build = engine if callable(engine) else lambda: engine
        self._thread = threading.Thread(target=self._run, args=(build, built), name="engine", daemon=True)
        self._thread.start()
        result = built.get()
        if isinstance(result, BaseException):
            self._thread.join()
            raise result
        self.engine: LLMEngine = result

    async def generate(
        self, prompt: str | Sequence[int], params: SamplingParams | None = None, request_id: str | None = None
    ) -> AsyncIterator[RequestOutput]:
        """Yields one RequestOutput per step that advanced the request; the last has finished=True.
        Raises ValueError before anything is queued if the prompt or params cannot be served."""
        if self._stopped.is_set():
            raise RuntimeError("engine is shut down")
        params = params or SamplingParams()
        prompt_ids = self.engine.validate_prompt(prompt, params)
        request_id = request_id if request_id is not None else f"req-{next(self._ids)}"
        stream = _Stream(asyncio.get_running_loop(), asyncio.Queue())
        self._commands.put(("add", request_id, prompt_ids, params, stream))
        finished = False
        try:
            while not finished:
                item = await stream.queue.get()
                if isinstance(item, BaseException):
                    raise item
                finished = item.finished
                yield item
        finally:
            if not finished:
                self.abort(request_id)

    def abort(self, request_id: str) -> None:
        self._commands.put(("abort", request_id))

    def shutdown(self) -> None:
        self._stopped.set()
        self._commands.put(("wake",))
        self._thread.join(timeout=30)

    # ------------------------------------------------------------------ engine thread
    def _run(self, build: Callable[[], LLMEngine], built: queue.SimpleQueue) -> None:
        try:
            self.engine = build()
        except BaseException as e:  # reported to the constructor's caller
            built.put(e)
            return
        built.put(self.engine)
        while not self._stopped.is_set():
            block = not self.engine.has_unfinished_requests()
            try:
                while True:
                    self._handle(self._commands.get(block=block, timeout=0.5 if block else None))
                    block = False
            except queue.Empty:
                pass
            if not self.engine.has_unfinished_requests():
                continue
            try:
                outputs = self.engine.step()
            except Exception as e:  # a bug, not bad input: fail the in-flight requests, keep serving
                log.exception("engine step failed")
                for request_id, stream in list(self._streams.items()):
                    self.engine.abort(request_id)
                    stream.put(RuntimeError(f"engine step failed: {e}"))
                self._streams.clear()
                continue
            for out in outputs:
                stream = self._streams.get(out.request_id)
                if stream is not None:
                    stream.put(out)
                    if out.finished:
                        del self._streams[out.request_id]
        for request_id, stream in self._streams.items():
            self.engine.abort(request_id)
            stream.put(RuntimeError("engine shut down"))

    def _handle(self, command: tuple) -> None:
        if command[0] == "add":
            _, request_id, prompt_ids, params, stream = command
            try:
                self.engine.add_request(prompt_ids, params, request_id)
            except ValueError as e:
                stream.put(e)
                return
            self._streams[request_id] = stream
        elif command[0] == "abort":
            self._streams.pop(command[1], None)
            self.engine.abort(command[1])
