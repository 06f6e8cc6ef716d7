"""In-process single-flight: concurrent identical misses share one generation.

Built on concurrent.futures.Future so one registry serves asyncio tasks (possibly on different
event loops) and plain threads alike. Cross-process coalescing uses the store's lock (Redis SET NX).
"""

from __future__ import annotations

import threading
from concurrent.futures import Future
from typing import Any


class SingleFlight:
    def __init__(self) -> None:
        self._lock = threading.Lock()
        self._inflight: dict[str, Future[Any]] = {}

    def claim(self, key: str) -> tuple[Future[Any], bool]:
        """(future, is_leader). The leader must call finish(); followers wait on the future."""
        with self._lock:
            fut = self._inflight.get(key)
            if fut is not None:
                return fut, False
            fut = Future()
            self._inflight[key] = fut
            return fut, True

    def finish(
        self, key: str, fut: Future[Any], result: Any = None, error: BaseException | None = None
    ) -> None:
        with self._lock:
            if self._inflight.get(key) is fut:
                del self._inflight[key]
        if error is not None:
            fut.set_exception(error)
        else:
            fut.set_result(result)

    def inflight(self) -> int:
        with self._lock:
            return len(self._inflight)
