"""ResponseCache: exact + semantic lookup in front of the engine.

lookup(): policy -> exact key -> (semantic) nearest entries of the same tenant/model/partition
above the threshold -> false-hit guard. store(): policy -> entry with TTL -> store (LRU bound).
Store failures fail open: the request goes to the model, the error is counted and logged once.
"""

from __future__ import annotations

import asyncio
import logging
import threading
import time
import uuid
from collections import OrderedDict
from collections.abc import Awaitable, Callable
from typing import Any, TypeVar

import numpy as np

from specache.response_cache.config import CacheConfig, CacheRequest, CacheResult
from specache.response_cache.embed import Embedder, default_embedder
from specache.response_cache.errors import StoreUnavailableError
from specache.response_cache.guard import Guard
from specache.response_cache.keys import exact_key, partition_key, semantic_text
from specache.response_cache.metrics import CacheStats
from specache.response_cache.policy import decide
from specache.response_cache.singleflight import SingleFlight
from specache.response_cache.stores import Entry, Store, open_store
from specache.response_cache.streaming import StreamRecorder

log = logging.getLogger(__name__)
T = TypeVar("T")
_EMBED_MEMO = 256  # lookup then store of the same miss embeds the same text: remember it


class ResponseCache:
    def __init__(
        self,
        config: CacheConfig | None = None,
        embedder: Embedder | None = None,
        store: Store | None = None,
        guard: Guard | None = None,
    ):
        self.config = config or CacheConfig()
        self.clock = self.config.clock
        if self.config.semantic and embedder is None:
            embedder = default_embedder()
        self.embedder = embedder
        dim = embedder.dim if embedder is not None else 384
        self.backend = store or open_store(
            self.config.store_url, dim, self.config.max_entries, self.config.max_bytes, self.config.namespace
        )
        self.guard = guard or Guard(embedder=embedder)
        self._stats = CacheStats()
        self._flight = SingleFlight()
        self._memo: OrderedDict[str, np.ndarray] = OrderedDict()
        self._memo_lock = threading.Lock()
        self._down = False
        self._last_fail = 0.0
        self._owner = uuid.uuid4().hex

    # ---------- public API ----------
    def lookup(self, req: CacheRequest) -> CacheResult:
        self._stats.inc("lookups")
        decision = decide(self.config, req)
        if not decision.lookup:
            self._stats.inc_reason("bypasses", decision.bypass_reason or "unknown")
            return CacheResult(hit=False, bypass_reason=decision.bypass_reason)
        now = self.clock()
        entry = self._safe(
            lambda: self.backend.get(exact_key(req.tenant, req.model, req.messages, req.params), now)
        )
        if entry is not None:
            self._stats.inc("exact_hits")
            return CacheResult(hit=True, kind="exact", response=entry.response, similarity=1.0)
        if self.config.semantic and self.embedder is not None:
            result = self._semantic_lookup(req, now)
            if result is not None:
                self._stats.inc("semantic_hits")
                return result
        self._stats.inc("misses")
        return CacheResult(hit=False)

    def store(self, req: CacheRequest, response: dict[str, Any]) -> bool:
        """Store a complete answer; returns False when policy forbids it or the store is down."""
        decision = decide(self.config, req)
        if not decision.store or response is None:
            return False
        now = self.clock()
        text = semantic_text(req.messages)
        vector = self._embed(text) if self.config.semantic and self.embedder is not None and text else None
        entry = Entry(
            key=exact_key(req.tenant, req.model, req.messages, req.params),
            tenant=req.tenant,
            model=req.model,
            partition=partition_key(req.tenant, req.model, req.messages, req.params),
            prompt=text,
            response=dict(response),
            expires_at=now + decision.ttl_s,
            created_at=now,
            vector=vector,
            tags=list(req.tags),
        )
        stored = self._safe(lambda: (self.backend.put(entry, now), True)[1], default=False)
        if stored:
            self._stats.inc("stores")
        return bool(stored)

    def begin_store(self, req: CacheRequest) -> StreamRecorder:
        """For streamed misses: append deltas, then complete() stores the whole answer."""
        return StreamRecorder(lambda payload: self.store(req, payload))

    async def get_or_generate(
        self, req: CacheRequest, generate: Callable[[], Awaitable[dict[str, Any]]]
    ) -> CacheResult:
        """Lookup; on a miss run `generate` once per identical key, however many callers wait."""
        result = self.lookup(req)
        if result.hit:
            return result
        if result.bypass_reason is not None and result.bypass_reason != "refresh":
            self._stats.inc("generations")
            return CacheResult(hit=False, response=await generate(), bypass_reason=result.bypass_reason)
        key = exact_key(req.tenant, req.model, req.messages, req.params)
        fut, leader = self._flight.claim(key)
        if not leader:
            self._stats.inc("coalesced")
            response = await asyncio.wrap_future(fut)
            return CacheResult(hit=True, kind="exact", response=response, coalesced=True)
        try:
            response, shared = await self._lead(req, key, generate, refresh=result.bypass_reason == "refresh")
        except BaseException as exc:
            self._flight.finish(key, fut, error=exc)
            raise
        self._flight.finish(key, fut, result=response)
        if shared:
            return CacheResult(hit=True, kind="exact", response=response, coalesced=True)
        return CacheResult(hit=False, response=response, bypass_reason=result.bypass_reason)

    def stats(self) -> dict[str, Any]:
        out = self._stats.as_dict()
        out["store_up"] = not self._down
        return out

    def close(self) -> None:
        self.backend.close()

    def __enter__(self) -> ResponseCache:
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()

    # ---------- internals ----------
    def _semantic_lookup(self, req: CacheRequest, now: float) -> CacheResult | None:
        text = semantic_text(req.messages)
        if not text:
            return None
        vector = self._embed(text)
        part = partition_key(req.tenant, req.model, req.messages, req.params)
        cands = self._safe(
            lambda: self.backend.search(
                vector, req.tenant, req.model, part, self.config.semantic_candidates, now
            ),
            default=[],
        )
        for cand in cands:
            e = cand.entry
            # Hard filter again: isolation must not depend on a store's query syntax being right.
            if e.tenant != req.tenant or e.model != req.model or e.partition != part:
                continue
            if cand.similarity < self.config.threshold:
                self._stats.inc("below_threshold")
                break
            if self.config.guard:
                verdict = self.guard.verify(e.prompt, text)
                if not verdict.ok:
                    self._stats.inc_reason("guard_rejections", verdict.reason or "guard")
                    continue
            return CacheResult(hit=True, kind="semantic", response=e.response, similarity=cand.similarity)
        return None

    async def _lead(
        self, req: CacheRequest, key: str, generate: Callable[[], Awaitable[dict[str, Any]]], refresh: bool
    ) -> tuple[dict[str, Any], bool]:
        """Leader path: re-check, take the cross-process lock (or wait for its holder), generate, store."""
        deadline = time.monotonic() + self.config.lock_timeout_s
        while True:
            if not refresh:
                entry = self._safe(lambda: self.backend.get(key, self.clock()))
                if entry is not None:
                    return entry.response, True
            got = self._safe(
                lambda: self.backend.try_lock(key, self._owner, self.config.lock_timeout_s, self.clock()),
                default=True,
            )
            if got or time.monotonic() >= deadline:
                break
            await asyncio.sleep(0.05)  # another process generates this key; poll for its answer
        try:
            self._stats.inc("generations")
            response = await generate()
            self.store(req, response)
            return response, False
        finally:
            if got:
                self._safe(lambda: self.backend.unlock(key, self._owner))

    def _embed(self, text: str) -> np.ndarray:
        with self._memo_lock:
            vec = self._memo.get(text)
            if vec is not None:
                self._memo.move_to_end(text)
                return vec
        assert self.embedder is not None
        vec = np.asarray(self.embedder.embed([text])[0], dtype=np.float32)
        with self._memo_lock:
            self._memo[text] = vec
            while len(self._memo) > _EMBED_MEMO:
                self._memo.popitem(last=False)
        return vec

    def _safe(self, fn: Callable[[], T], default: Any = None) -> T | Any:
        """Fail open on an unreachable store; back off for redis_retry_s between attempts."""
        if self._down and time.monotonic() - self._last_fail < self.config.redis_retry_s:
            self._stats.inc("store_errors")
            return default
        try:
            value = fn()
        except StoreUnavailableError as exc:
            self._stats.inc("store_errors")
            self._last_fail = time.monotonic()
            if not self._down:
                log.warning("response cache store unavailable, serving from the model: %s", exc)
                self._down = True
            return default
        if self._down:
            log.warning("response cache store is back")
            self._down = False
        return value
