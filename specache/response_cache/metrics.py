"""Plain counters, updated where the event happens; the server exports stats() to Prometheus."""

from __future__ import annotations

import threading
from collections import Counter
from dataclasses import dataclass, field
from typing import Any


@dataclass
class CacheStats:
    lookups: int = 0
    exact_hits: int = 0
    semantic_hits: int = 0
    misses: int = 0
    stores: int = 0
    coalesced: int = 0  # requests served by another request's in-flight generation
    generations: int = 0  # generate_fn calls made by get_or_generate
    store_errors: int = 0  # store unreachable (e.g. Redis down): counted, served as a miss
    below_threshold: int = 0
    guard_rejections: Counter[str] = field(default_factory=Counter)
    bypasses: Counter[str] = field(default_factory=Counter)
    _lock: threading.Lock = field(default_factory=threading.Lock, repr=False)

    def inc(self, name: str, n: int = 1) -> None:
        with self._lock:
            setattr(self, name, getattr(self, name) + n)

    def inc_reason(self, counter: str, reason: str) -> None:
        with self._lock:
            getattr(self, counter)[reason] += 1

    def as_dict(self) -> dict[str, Any]:
        with self._lock:
            hits = self.exact_hits + self.semantic_hits
            return {
                "lookups": self.lookups,
                "hits": hits,
                "exact_hits": self.exact_hits,
                "semantic_hits": self.semantic_hits,
                "misses": self.misses,
                "stores": self.stores,
                "coalesced": self.coalesced,
                "generations": self.generations,
                "store_errors": self.store_errors,
                "below_threshold": self.below_threshold,
                "guard_rejections": dict(self.guard_rejections),
                "guard_rejections_total": sum(self.guard_rejections.values()),
                "bypasses": dict(self.bypasses),
                "bypasses_total": sum(self.bypasses.values()),
            }
