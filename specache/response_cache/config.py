"""Configuration and request/result types of the response cache."""

from __future__ import annotations

import time
from collections.abc import Callable
from dataclasses import dataclass, field
from typing import Any, Literal

from specache.response_cache.errors import CacheConfigError, CacheRequestError

Mode = Literal["use", "bypass", "refresh"]
TimeSensitiveAction = Literal["bypass", "short_ttl"]


@dataclass
class CacheConfig:
    """Every knob of the response cache, validated at construction.

    store_url: None or "sqlite:///path/to/cache.db" (embedded) or "redis://host:port/db".
    threshold: minimum cosine similarity for a semantic hit; the default was calibrated on the
    held-out half of tests/data/cache_eval.jsonl with the guard on (see evaluate.py).
    """

    store_url: str | None = None
    semantic: bool = True
    threshold: float = 0.80
    guard: bool = True
    cache_sampled: bool = False
    default_ttl_s: float = 24 * 3600.0
    max_entries: int = 100_000
    max_bytes: int = 512 * 1024 * 1024
    never_cache_tags: frozenset[str] = frozenset({"finance", "realtime"})
    tag_ttl_s: dict[str, float] = field(default_factory=lambda: {"news": 300.0})
    time_sensitive: TimeSensitiveAction = "short_ttl"
    time_sensitive_ttl_s: float = 120.0
    pii_bypass: bool = True
    semantic_candidates: int = 5
    lock_timeout_s: float = 60.0
    redis_retry_s: float = 1.0
    namespace: str = "specache"
    clock: Callable[[], float] = time.time

    def __post_init__(self) -> None:
        if not -1.0 <= self.threshold <= 1.0:
            raise CacheConfigError(f"threshold must be a cosine in [-1, 1], got {self.threshold}")
        if self.default_ttl_s <= 0 or self.time_sensitive_ttl_s <= 0:
            raise CacheConfigError("TTLs must be positive seconds")
        if self.max_entries < 1 or self.max_bytes < 1:
            raise CacheConfigError("max_entries and max_bytes must be >= 1")
        if self.time_sensitive not in ("bypass", "short_ttl"):
            raise CacheConfigError("time_sensitive must be 'bypass' or 'short_ttl'")
        if self.semantic_candidates < 1:
            raise CacheConfigError("semantic_candidates must be >= 1")
        self.never_cache_tags = frozenset(t.lower() for t in self.never_cache_tags)
        self.tag_ttl_s = {k.lower(): float(v) for k, v in self.tag_ttl_s.items()}


@dataclass
class CacheRequest:
    """One chat request as the cache sees it."""

    tenant: str
    model: str
    messages: list[dict[str, Any]]
    params: dict[str, Any] = field(default_factory=dict)
    tags: list[str] = field(default_factory=list)
    mode: Mode = "use"
    ttl_s: float | None = None

    def __post_init__(self) -> None:
        if not isinstance(self.messages, list) or not self.messages:
            raise CacheRequestError("messages must be a non-empty list of {'role', 'content'} dicts")
        for m in self.messages:
            if not isinstance(m, dict) or "role" not in m:
                raise CacheRequestError(f"each message needs a 'role' key, got {m!r}")
        if self.mode not in ("use", "bypass", "refresh"):
            raise CacheRequestError(f"mode must be 'use', 'bypass' or 'refresh', got {self.mode!r}")
        if self.ttl_s is not None and self.ttl_s <= 0:
            raise CacheRequestError("ttl_s must be positive")


@dataclass
class CacheResult:
    """What lookup() found. `coalesced` marks a follower of a single-flight generation."""

    hit: bool
    kind: Literal["exact", "semantic"] | None = None
    response: dict[str, Any] | None = None
    bypass_reason: str | None = None
    similarity: float | None = None
    coalesced: bool = False
