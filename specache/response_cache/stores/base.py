"""The contract every response-cache store implements (embedded SQLite+usearch, Redis).

Stores are dumb: they keep entries, expire them, bound their size with LRU eviction and answer
filtered nearest-neighbour queries. Policy, guard and metrics live in ResponseCache.
Tenant/model/partition filtering is a hard filter inside the store query, never a score.
"""

from __future__ import annotations

import json
from abc import ABC, abstractmethod
from dataclasses import dataclass, field
from typing import Any

import numpy as np


@dataclass
class Entry:
    key: str  # exact key (keys.exact_key); also the entry id
    tenant: str
    model: str
    partition: str  # keys.partition_key: earlier turns + output params
    prompt: str  # the embedded text (last user message)
    response: dict[str, Any]
    expires_at: float
    created_at: float
    vector: np.ndarray | None = None
    tags: list[str] = field(default_factory=list)
    last_access: float = 0.0

    def payload_json(self) -> str:
        return json.dumps(self.response, ensure_ascii=False, separators=(",", ":"))

    @property
    def size_bytes(self) -> int:
        """Approximate footprint used for the max_bytes bound: payload + prompt + vector."""
        vec = 0 if self.vector is None else int(self.vector.nbytes)
        return len(self.payload_json().encode()) + len(self.prompt.encode()) + vec


@dataclass
class Candidate:
    entry: Entry
    similarity: float  # cosine similarity in [-1, 1]


class Store(ABC):
    """One contract, tested by tests/test_response_cache_stores.py against every implementation."""

    dim: int

    @abstractmethod
    def get(self, key: str, now: float) -> Entry | None:
        """The live (unexpired) entry for an exact key, marking it recently used."""

    @abstractmethod
    def put(self, entry: Entry, now: float) -> None:
        """Insert or replace; then evict least-recently-used entries beyond the bounds."""

    def put_many(self, entries: list[Entry], now: float) -> None:
        """Bulk insert (benchmarks); stores may override with a faster path."""
        for e in entries:
            self.put(e, now)

    @abstractmethod
    def search(
        self, vector: np.ndarray, tenant: str, model: str, partition: str, k: int, now: float
    ) -> list[Candidate]:
        """Up to k live entries of exactly this tenant/model/partition, most similar first."""

    @abstractmethod
    def delete(self, key: str) -> None: ...

    @abstractmethod
    def count(self) -> int:
        """Number of stored entries (expired ones not yet purged may be included)."""

    @abstractmethod
    def clear(self) -> None: ...

    @abstractmethod
    def try_lock(self, name: str, owner: str, ttl_s: float, now: float) -> bool:
        """Acquire a named lock for single-flight across processes; expires after ttl_s."""

    @abstractmethod
    def unlock(self, name: str, owner: str) -> None:
        """Release the lock if `owner` still holds it."""

    @abstractmethod
    def close(self) -> None: ...
