"""The engine runs in ONE background thread; asyncio handlers talk to it through queues.

Why one thread: the engine (scheduler, block pool, radix tree, KV tensors) is not thread-safe,
and one continuous batch shared by every client is the whole point. Handlers put commands on a
thread-safe inbox; the thread applies them between steps and feeds each request's asyncio.Queue
with ``loop.call_soon_threadsafe``. Aborts (disconnects, timeouts) are applied before the next
step, so a dropped client's KV blocks return to the pool within one step.

Backpressure: at most ``max_pending`` requests may be queued or running; beyond that ``submit``
raises QueueFullError (HTTP 429) at once instead of letting latency grow without bound.
"""

from __future__ import annotations

import asyncio
import logging
import queue
import threading
import time
import uuid
from collections.abc import Callable
from dataclasses import dataclass, field
from typing import Any

from specache.engine.outputs import RequestOutput
from specache.sampling import SamplingParams
from specache.server.errors import APIError, QueueFullError, RequestTimeoutError, ShuttingDownError

log = logging.getLogger(__name__)
_IDLE_WAIT_S = 0.5  # how long the idle thread blocks on its inbox before re-checking for stop


class ClientGoneError(APIError):
    def __init__(self) -> None:
        super().__init__("the client closed the connection", 499, "invalid_request_error", "client_closed")


@dataclass
class _Sink:
    """Where the engine thread delivers one request's outputs (on the handler's event loop)."""

    loop: asyncio.AbstractEventLoop
    queue: asyncio.Queue = field(default_factory=asyncio.Queue)

    def put(self, item: RequestOutput | BaseException) -> None:
        self.loop.call_soon_threadsafe(self.queue.put_nowait, item)


@dataclass
class _Add:
    request_id: str
    prompt: str | list[int]
    params: SamplingParams
    priority: int
    cache_salt: Any
    sink: _Sink
    accepted: asyncio.Future


@dataclass
class _Call:
    fn: Callable[[Any], Any]
    loop: asyncio.AbstractEventLoop
    result: asyncio.Future


class RequestStream:
    """Handler side of one engine request: ``await next()`` outputs until ``finished``; ``close()`` aborts."""

    def __init__(self, engine_loop: EngineLoop, request_id: str, sink: _Sink, timeout_s: float) -> None:
        self.engine_loop, self.request_id, self._sink = engine_loop, request_id, sink
        self.deadline = time.monotonic() + timeout_s
        self.timeout_s = timeout_s
        self.finished = False

    async def next(self) -> RequestOutput:
        remaining = self.deadline - time.monotonic()
        try:
            item = await asyncio.wait_for(self._sink.queue.get(), timeout=max(remaining, 0.001))
        except TimeoutError:
            self.close()
            raise RequestTimeoutError(self.timeout_s) from None
        if isinstance(item, BaseException):
            self.finished = True  # the engine thread already dropped it
            raise item
        self.finished = item.finished
        return item

    def close(self, wake: bool = False) -> None:
        """Idempotent. Aborts in the engine (freeing its KV blocks) unless the request finished.
        ``wake``: also end a pending ``next()`` (the engine sends nothing more after an abort)."""
        if not self.finished:
            self.finished = True
            self.engine_loop.abort(self.request_id)
            if wake:
                self._sink.queue.put_nowait(ClientGoneError())


class EngineLoop:
    def __init__(self, engine: Any, max_pending: int = 256, request_timeout_s: float = 600.0) -> None:
        self.engine = engine
        self.max_pending = max_pending
        self.request_timeout_s = request_timeout_s
        self._inbox: queue.SimpleQueue = queue.SimpleQueue()
        self._sinks: dict[str, _Sink] = {}  # engine thread only
        self._lock = threading.Lock()
        self._pending = 0  # queued + running requests; incremented by submit, decremented by the thread
        self._accepting = True
        self._thread = threading.Thread(target=self._run, name="specache-engine", daemon=True)

    # ------------------------------------------------------------------ handler side (event loop)

    @property
    def pending(self) -> int:
        return self._pending

    @property
    def alive(self) -> bool:
        return self._thread.is_alive() and self._accepting

    def start(self) -> None:
        self._thread.start()

    async def submit(
        self,
        prompt: str | list[int],
        params: SamplingParams,
        priority: int = 0,
        cache_salt: Any = None,
        request_id: str | None = None,
    ) -> RequestStream:
        """Queue a request; raises the engine's validation error (400), QueueFullError or ShuttingDown."""
        with self._lock:
            if not self.alive:
                raise ShuttingDownError()
            if self._pending >= self.max_pending:
                raise QueueFullError(self._pending, self.max_pending)
            self._pending += 1
        loop = asyncio.get_running_loop()
        sink = _Sink(loop)
        add = _Add(
            request_id or uuid.uuid4().hex, prompt, params, priority, cache_salt, sink, loop.create_future()
        )
        self._inbox.put(add)
        try:
            await add.accepted
        except asyncio.CancelledError:
            self.abort(add.request_id)  # client left while queued; the thread may have admitted it already
            raise
        return RequestStream(self, add.request_id, sink, self.request_timeout_s)

    def abort(self, request_id: str) -> None:
        self._inbox.put(("abort", request_id))

    async def call(self, fn: Callable[[Any], Any]) -> Any:
        """Run ``fn(engine)`` on the engine thread between steps (consistent snapshots for metrics)."""
        loop = asyncio.get_running_loop()
        if not self._thread.is_alive():
            return fn(self.engine)  # stopped: nothing else touches the engine any more
        call = _Call(fn, loop, loop.create_future())
        self._inbox.put(call)
        return await call.result

    def stop(self, timeout_s: float = 30.0) -> None:
        """Stop accepting, abort what is queued or running, shut the engine down, join the thread."""
        with self._lock:
            self._accepting = False
        self._inbox.put(("stop", None))
        if self._thread.is_alive():
            self._thread.join(timeout=timeout_s)

    # ------------------------------------------------------------------ engine thread

    def _run(self) -> None:
        try:
            while self._drain(block=not self.engine.has_unfinished()):
                if self.engine.has_unfinished():
                    self._step()
        finally:
            self._shutdown_engine()

    def _drain(self, block: bool) -> bool:
        """Apply every queued command; False once told to stop."""
        try:
            item = self._inbox.get(timeout=_IDLE_WAIT_S) if block else self._inbox.get_nowait()
        except queue.Empty:
            return True
        while True:
            if isinstance(item, tuple) and item[0] == "stop":
                return False
            self._apply(item)
            try:
                item = self._inbox.get_nowait()
            except queue.Empty:
                return True

    def _apply(self, item: Any) -> None:
        if isinstance(item, _Add):
            self._admit(item)
        elif isinstance(item, _Call):
            _settle(item.loop, item.result, item.fn, self.engine)
        else:
            self._abort(item[1])

    def _admit(self, add: _Add) -> None:
        try:
            self.engine.add_request(
                add.prompt,
                add.params,
                request_id=add.request_id,
                priority=add.priority,
                cache_salt=add.cache_salt,
            )
        except Exception as e:  # bad input: the handler re-raises it as a 400
            self._release()
            add.sink.loop.call_soon_threadsafe(_set_exception, add.accepted, e)
            return
        self._sinks[add.request_id] = add.sink
        add.sink.loop.call_soon_threadsafe(_set_result, add.accepted, None)

    def _abort(self, request_id: str) -> None:
        if self._sinks.pop(request_id, None) is not None:
            self.engine.abort(request_id)
            self._release()

    def _step(self) -> None:
        try:
            outputs = self.engine.step()
        except Exception:  # one bad step must not kill the server: fail the batch, keep serving
            log.exception("engine step failed; failing the requests in flight")
            self._fail_all(RuntimeError("internal engine error; see the server log"))
            return
        for out in outputs:
            sink = self._sinks.get(out.request_id)
            if sink is None:
                continue
            sink.put(out)
            if out.finished:
                del self._sinks[out.request_id]
                self._release()

    def _release(self) -> None:
        with self._lock:
            self._pending -= 1

    def _fail_all(self, error: BaseException) -> None:
        for rid in list(self._sinks):
            sink = self._sinks.pop(rid)
            try:
                self.engine.abort(rid)
            except Exception:
                log.exception("abort of %s failed", rid)
            sink.put(error)
            self._release()

    def _shutdown_engine(self) -> None:
        """Refuse what is still queued, abort what runs, persist the prefix cache if configured."""
        with self._lock:
            self._accepting = False
        while True:
            try:
                item = self._inbox.get_nowait()
            except queue.Empty:
                break
            if isinstance(item, _Add):
                self._release()
                item.sink.loop.call_soon_threadsafe(_set_exception, item.accepted, ShuttingDownError())
            elif isinstance(item, _Call):
                _settle(item.loop, item.result, item.fn, self.engine)
        self._fail_all(ShuttingDownError("the server shut down before this request finished"))
        try:
            if hasattr(self.engine, "shutdown"):
                self.engine.shutdown()  # aborts leftovers; saves the prefix cache if prefix_cache_dir is set
            elif self.engine.prefix_cache is not None and hasattr(self.engine.prefix_cache, "save"):
                self.engine.prefix_cache.save()
        except Exception:
            log.exception("engine shutdown failed (prefix cache not saved)")


def _settle(loop: asyncio.AbstractEventLoop, fut: asyncio.Future, fn: Callable, arg: Any) -> None:
    try:
        value = fn(arg)
    except Exception as e:
        loop.call_soon_threadsafe(_set_exception, fut, e)
    else:
        loop.call_soon_threadsafe(_set_result, fut, value)


def _set_result(fut: asyncio.Future, value: Any) -> None:
    if not fut.done():
        fut.set_result(value)


def _set_exception(fut: asyncio.Future, exc: BaseException) -> None:
    if not fut.done():
        fut.set_exception(exc)
