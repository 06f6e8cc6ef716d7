"""The response cache as the server uses it: optional, tenant-scoped, and never able to break a request.

Everything here fails open: if the cache module is missing, its store is down or it raises, the
request is answered by the model and ``x-cache`` says ``bypass``. Generation errors (bad input,
timeouts, disconnects) are not cache errors and pass through unchanged.

A cached payload is ``{"text", "finish_reason", "choices": [{"index", "text", "finish_reason"}], "usage"}``
(``text`` is choice 0, which is what ``stream_chunks`` replays).
"""

from __future__ import annotations

import asyncio
import logging
from collections.abc import Awaitable, Callable
from typing import Any

from specache.errors import SpecacheError

log = logging.getLogger(__name__)
Payload = dict[str, Any]


def open_response_cache(store_url: str | None, semantic: bool) -> Any | None:
    """A ResponseCache, or None (with a warning) when the module or its store cannot be opened."""
    try:
        from specache.response_cache import CacheConfig, ResponseCache

        return ResponseCache(CacheConfig(store_url=store_url, semantic=semantic))
    except Exception as e:  # optional feature: the server must still start
        log.warning("response cache disabled: %s", e)
        return None


class ServerCache:
    def __init__(self, cache: Any | None) -> None:
        self.cache = cache

    @property
    def enabled(self) -> bool:
        return self.cache is not None

    def request(
        self, tenant: str, model: str, messages: list[dict], params: dict, tags: list[str], mode: str
    ) -> Any | None:
        """The CacheRequest for this call, or None when the cache is off or the request is uncachable."""
        if self.cache is None or params.get("n", 1) != 1:
            return None
        try:
            from specache.response_cache import CacheRequest

            return CacheRequest(
                tenant=tenant, model=model, messages=messages, params=params, tags=tags, mode=mode
            )
        except Exception as e:
            log.debug("request not cachable: %s", e)
            return None

    async def answer(
        self, creq: Any | None, generate: Callable[[], Awaitable[Payload]]
    ) -> tuple[Payload, str]:
        """(payload, x-cache) through single-flight get_or_generate; the model alone when the cache fails."""
        if creq is None:
            return await generate(), "bypass"
        state: dict[str, Any] = {}

        async def tracked() -> Payload:
            state["started"] = True
            state["payload"] = await generate()
            return state["payload"]

        try:
            result = await self.cache.get_or_generate(creq, tracked)
        except (SpecacheError, asyncio.CancelledError):
            raise
        except Exception:
            if "payload" in state:  # generated fine; only storing failed
                log.warning("response cache store failed; answer served uncached", exc_info=True)
                return state["payload"], "miss"
            if state.get("started"):
                raise  # the generation itself failed
            log.warning("response cache lookup failed; serving from the model", exc_info=True)
            return await generate(), "bypass"
        return result.response, _outcome(result)

    def lookup(self, creq: Any | None) -> tuple[Payload | None, str, bool]:
        """For streams: (cached payload or None, x-cache, whether to record and store this answer)."""
        if creq is None:
            return None, "bypass", False
        try:
            result = self.cache.lookup(creq)
        except Exception:
            log.warning("response cache lookup failed; serving from the model", exc_info=True)
            return None, "bypass", False
        outcome = _outcome(result)
        return (result.response if result.hit else None), outcome, outcome == "miss"

    def store(self, creq: Any, payload: Payload) -> None:
        try:
            self.cache.store(creq, payload)
        except Exception:
            log.warning("response cache store failed", exc_info=True)

    def stats(self) -> dict | None:
        if self.cache is None:
            return None
        try:
            return self.cache.stats()
        except Exception:
            log.warning("response cache stats failed", exc_info=True)
            return None

    def close(self) -> None:
        if self.cache is not None:
            try:
                self.cache.close()
            except Exception:
                log.warning("response cache close failed", exc_info=True)


def _outcome(result: Any) -> str:
    if result.hit:
        return "hit"
    if result.bypass_reason is not None and result.bypass_reason != "refresh":
        return "bypass"
    return "miss"  # includes refresh: generated and stored
