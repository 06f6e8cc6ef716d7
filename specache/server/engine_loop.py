"""The engine runs in one background thread; asyncio handlers talk to it through queues.

Many HTTP clients share one continuous batch. Each request gets an asyncio.Queue that the
engine thread feeds with RequestOutputs (via call_soon_threadsafe). Submissions beyond
`max_queue` in flight are refused (the server answers 429). Aborts (client disconnects,
timeouts) are applied by the engine thread between steps, freeing KV blocks at once.
"""

from __future__ import annotations

import asyncio
import logging
import queue
import threading
import uuid
from dataclasses import dataclass

from specache.engine.engine import Engine
from specache.errors import SpecacheError
from specache.sampling import SamplingParams

log = logging.getLogger(__name__)


class QueueFullError(SpecacheError):
    status_code = 429
    error_type = "rate_limit_exceeded"


class EngineStoppedError(SpecacheError):
    status_code = 503
    error_type = "server_shutting_down"


@dataclass
class _Submission:
    request_id: str
    prompt: str | list[int]
    params: SamplingParams
    priority: int
    cache_salt: object
    out: asyncio.Queue
    loop: asyncio.AbstractEventLoop
    accepted: asyncio.Future


class EngineLoop:
    def __init__(self, engine: Engine, max_queue: int = 256) -> None:
        self.engine = engine
        self.max_queue = max_queue
        self._inbox: queue.SimpleQueue = queue.SimpleQueue()
        self._aborts: queue.SimpleQueue = queue.SimpleQueue()
        self._live: dict[str, _Submission] = {}
        self._lock = threading.Lock()
        self._stopping = threading.Event()
        self._wake = threading.Event()
        self._thread = threading.Thread(target=self._run, name="specache-engine", daemon=True)
        self.in_flight = 0

    def start(self) -> None:
        self._thread.start()

    async def submit(self, prompt: str | list[int], params: SamplingParams, priority: int = 0,
                     cache_salt=None) -> tuple[str, asyncio.Queue]:
        """Hand a request to the engine thread; raises its validation error (or 429 / 503) here."""
        if self._stopping.is_set():
            raise EngineStoppedError("the server is shutting down; retry on another replica")
        with self._lock:
            if self.in_flight >= self.max_queue:
                raise QueueFullError(f"{self.in_flight} requests in flight (limit {self.max_queue}); retry later")
            self.in_flight += 1
        loop = asyncio.get_running_loop()
        sub = _Submission(uuid.uuid4().hex, prompt, params, priority, cache_salt, asyncio.Queue(), loop,
                          loop.create_future())
        self._inbox.put(sub)
        self._wake.set()
        try:
            await sub.accepted  # raises the engine's validation error, if any
        except BaseException:
            self._done(sub.request_id, count_only=True)
            raise
        return sub.request_id, sub.out

    def abort(self, request_id: str) -> None:
        self._aborts.put(request_id)
        self._wake.set()

    def stop(self) -> None:
        self._stopping.set()
        self._wake.set()
        self._thread.join(timeout=30)

    # ------------------------------------------------------------------ engine thread

    def _done(self, request_id: str, count_only: bool = False) -> None:
        with self._lock:
            self.in_flight -= 1
        if not count_only:
            self._live.pop(request_id, None)

    def _run(self) -> None:
        while not self._stopping.is_set():
            self._admit()
            self._apply_aborts()
            if not self.engine.has_unfinished():
                self._wake.wait(timeout=0.05)
                self._wake.clear()
                continue
            try:
                outputs = self.engine.step()
            except Exception:  # never let one bad step kill the server: fail the batch, keep serving
                log.exception("engine step failed; aborting the running requests")
                self._fail_all(RuntimeError("internal engine error"))
                continue
            for out in outputs:
                sub = self._live.get(out.request_id)
                if sub is not None:
                    sub.loop.call_soon_threadsafe(sub.out.put_nowait, out)
                    if out.finished:
                        self._done(out.request_id)
        self._fail_all(EngineStoppedError("the server shut down before this request finished"))

    def _admit(self) -> None:
        while True:
            try:
                sub = self._inbox.get_nowait()
            except queue.Empty:
                return
            try:
                self.engine.add_request(sub.prompt, sub.params, request_id=sub.request_id, priority=sub.priority,
                                        cache_salt=sub.cache_salt)
            except Exception as e:
                sub.loop.call_soon_threadsafe(_set_exception, sub.accepted, e)
                continue
            self._live[sub.request_id] = sub
            sub.loop.call_soon_threadsafe(_set_result, sub.accepted, None)

    def _apply_aborts(self) -> None:
        while True:
            try:
                rid = self._aborts.get_nowait()
            except queue.Empty:
                return
            if rid in self._live:
                self.engine.abort(rid)
                self._done(rid)

    def _fail_all(self, error: Exception) -> None:
        for rid, sub in list(self._live.items()):
            self.engine.abort(rid)
            sub.loop.call_soon_threadsafe(sub.out.put_nowait, error)
            self._done(rid)


def _set_result(fut: asyncio.Future, value) -> None:
    if not fut.done():
        fut.set_result(value)


def _set_exception(fut: asyncio.Future, exc: BaseException) -> None:
    if not fut.done():
        fut.set_exception(exc)
