"""Prometheus metrics of the server: counters and histograms updated where the event happens,
gauges filled from one engine snapshot (taken on the engine thread) at scrape time."""

from __future__ import annotations

from typing import Any

from prometheus_client import CollectorRegistry, Counter, Gauge, Histogram, generate_latest

LATENCY_BUCKETS = (0.001, 0.0025, 0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1, 2.5, 5, 10, 30, 60)
ENDPOINTS = frozenset(
    {"/v1/chat/completions", "/v1/completions", "/v1/models", "/health", "/metrics", "/debug/engine"}
)


def engine_snapshot(engine: Any) -> dict[str, float]:
    """Run on the engine thread (EngineLoop.call): every number from one consistent moment."""
    pool, prefix, sched = engine.pool, engine.prefix_cache, engine.scheduler
    refs = sum(pool.ref_count(b) for b in range(pool.num_blocks))
    cached = prefix.cached_blocks() if prefix is not None else 0
    snap = {
        "kv_blocks_used": pool.num_used,
        "kv_blocks_total": pool.num_blocks,
        "kv_blocks_cached": cached,
        # References held by requests (everything but the radix tree's one per cached block): 0 when idle.
        "kv_block_refs_held_by_requests": refs - cached,
        "kv_all_free": float(pool.all_free()),
        "engine_requests": len(engine.requests),
        "engine_waiting": len(sched.waiting),
        "engine_running": len(sched.running),
        "prompt_tokens": engine.stats.get("prompt_tokens", 0),
        "generation_tokens": engine.stats.get("generation_tokens", 0),
        "engine_steps": engine.stats.get("steps", 0),
    }
    if prefix is not None:
        pstats = prefix.stats()
        snap["prefix_cache_hit_rate"] = float(pstats.get("hit_rate", 0.0))
        snap["prefix_cache_hit_tokens"] = float(pstats.get("hit_tokens", 0))
        snap["prefix_cache_query_tokens"] = float(pstats.get("query_tokens", 0))
        snap["prefix_cache_evicted_blocks"] = float(pstats.get("evictions", 0))
    host = getattr(engine, "host_tier", None)
    if prefix is not None and host is not None:
        # The radix tree's numbers above are the device tier (L1); these are the CPU tier (L2).
        hstats, queried = host.stats(), pstats.get("query_tokens", 0)
        snap["prefix_cache_host_hit_tokens"] = float(hstats["hit_tokens"])
        snap["prefix_cache_host_hit_rate"] = hstats["hit_tokens"] / queried if queried else 0.0
        for key in ("blocks", "bytes", "capacity_bytes", "stores", "evictions"):
            snap[f"prefix_cache_host_{key}"] = float(hstats[key])
    return snap


class ServerMetrics:
    def __init__(self) -> None:
        # A registry per app: several apps in one process (tests) must not collide.
        self.registry = r = CollectorRegistry()
        self.requests = Counter(
            "specache_requests", "HTTP requests by endpoint and status", ["endpoint", "status"], registry=r
        )
        self.ttft = Histogram(
            "specache_time_to_first_token_seconds",
            "arrival to first token",
            buckets=LATENCY_BUCKETS,
            registry=r,
        )
        self.itl = Histogram(
            "specache_inter_token_latency_seconds",
            "time per generated token between steps",
            buckets=LATENCY_BUCKETS,
            registry=r,
        )
        self.response_cache = Counter(
            "specache_response_cache_requests", "x-cache outcome per request", ["result"], registry=r
        )
        self.spec_drafted = Counter("specache_spec_draft_tokens", "speculative tokens drafted", registry=r)
        self.spec_accepted = Counter(
            "specache_spec_accepted_tokens", "speculative tokens accepted", registry=r
        )
        self.spec_acceptance = Gauge(
            "specache_spec_acceptance_rate", "accepted / drafted, since start", registry=r
        )
        self.queue_depth = Gauge(
            "specache_queue_depth", "requests queued or running (429 beyond --max-queue)", registry=r
        )
        self._gauges: dict[str, Gauge] = {}
        self._drafted = self._accepted = 0

    def count_request(self, path: str, status: int) -> None:
        self.requests.labels(path if path in ENDPOINTS else "other", str(status)).inc()

    def observe_finished(self, metrics: dict) -> None:
        """Per-request engine metrics of a finished request."""
        if metrics.get("ttft_s") is not None:
            self.ttft.observe(metrics["ttft_s"])
        drafted, accepted = metrics.get("spec_draft_tokens") or 0, metrics.get("spec_accepted_tokens") or 0
        if drafted:
            self.spec_drafted.inc(drafted)
            self.spec_accepted.inc(accepted)
            self._drafted += drafted
            self._accepted += accepted
            self.spec_acceptance.set(self._accepted / self._drafted)

    def render(self, snapshot: dict[str, float], pending: int, cache_stats: dict | None) -> bytes:
        self.queue_depth.set(pending)
        for name, value in snapshot.items():
            self._gauge(f"specache_{name}", name.replace("_", " ")).set(value)
        for name, value in _flat_cache_stats(cache_stats or {}).items():
            self._gauge(f"specache_response_cache_{name}", f"response cache {name.replace('_', ' ')}").set(
                value
            )
        return generate_latest(self.registry)

    def _gauge(self, name: str, doc: str) -> Gauge:
        if name not in self._gauges:
            self._gauges[name] = Gauge(name, doc, registry=self.registry)
        return self._gauges[name]


def _flat_cache_stats(stats: dict) -> dict[str, float]:
    """Numbers of ResponseCache.stats() (nested reason counters dropped: they are unbounded label sets)."""
    out: dict[str, float] = {}
    for key, value in stats.items():
        if isinstance(value, bool):
            out[key] = float(value)
        elif isinstance(value, int | float):
            out[key] = float(value)
    if "hits" in out and "lookups" in out:
        out["hit_rate"] = out["hits"] / out["lookups"] if out["lookups"] else 0.0
    return out
