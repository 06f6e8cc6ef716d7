"""Response cache: exact + semantic, with a false-hit guard, policy (TTL, tags, tenants, PII),
single-flight, an embedded SQLite+usearch store and a Redis store."""

from specache.response_cache.cache import ResponseCache
from specache.response_cache.config import CacheConfig, CacheRequest, CacheResult
from specache.response_cache.embed import Embedder, HashEmbedder, MiniLMEmbedder
from specache.response_cache.errors import (
    CacheConfigError,
    CacheRequestError,
    ResponseCacheError,
    StoreUnavailableError,
)
from specache.response_cache.guard import Guard
from specache.response_cache.streaming import StreamRecorder, stream_chunks

__all__ = [
    "CacheConfig",
    "CacheConfigError",
    "CacheRequest",
    "CacheRequestError",
    "CacheResult",
    "Embedder",
    "Guard",
    "HashEmbedder",
    "MiniLMEmbedder",
    "ResponseCache",
    "ResponseCacheError",
    "StoreUnavailableError",
    "StreamRecorder",
    "stream_chunks",
]
