"""Store factory: None / "sqlite:///path" -> embedded SQLite+usearch; "redis://..." -> Redis."""

from __future__ import annotations

from specache.response_cache.errors import CacheConfigError
from specache.response_cache.stores.base import Candidate, Entry, Store


def open_store(
    url: str | None, dim: int, max_entries: int, max_bytes: int, namespace: str = "specache"
) -> Store:
    """None, "sqlite://" and "sqlite:///:memory:" keep everything in memory (lost on exit)."""
    if url is None or url.startswith("sqlite:"):
        from specache.response_cache.stores.sqlite_store import SQLiteStore

        path = None
        if url is not None:
            # "sqlite:///tmp/c.db" -> /tmp/c.db (absolute), "sqlite://c.db" -> c.db (relative).
            path = url[len("sqlite://") :] or None
            if path in ("/:memory:", ":memory:"):
                path = None
        return SQLiteStore(path, dim, max_entries, max_bytes)
    if url.startswith(("redis://", "rediss://", "unix://")):
        from specache.response_cache.stores.redis_store import RedisStore

        return RedisStore(url, dim, max_entries, max_bytes, namespace=namespace)
    raise CacheConfigError(
        f"unknown response cache store URL {url!r}: use sqlite:///path/to/cache.db or redis://host:port"
    )


__all__ = ["Candidate", "Entry", "Store", "open_store"]
