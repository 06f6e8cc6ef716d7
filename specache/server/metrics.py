"""Prometheus metrics: counters updated where events happen, gauges read at scrape time."""

from __future__ import annotations

from prometheus_client import CollectorRegistry, Counter, Gauge, Histogram

LATENCY_BUCKETS = (0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1, 2.5, 5, 10, 30, 60)


class ServerMetrics:
    def __init__(self) -> None:
        self.registry = r = CollectorRegistry()
        self.requests = Counter("specache_requests", "HTTP requests", ["endpoint", "status"], registry=r)
        self.ttft = Histogram("specache_time_to_first_token_seconds", "TTFT", buckets=LATENCY_BUCKETS, registry=r)
        self.itl = Histogram("specache_inter_token_latency_seconds", "time between streamed chunks",
                             buckets=LATENCY_BUCKETS, registry=r)
        self.tokens = Counter("specache_generated_tokens", "generated tokens", registry=r)
        self.response_cache = Counter("specache_response_cache", "response cache outcomes", ["result"], registry=r)
        self.queue_depth = Gauge("specache_requests_in_flight", "requests queued or running", registry=r)
        self.kv_used = Gauge("specache_kv_blocks_used", "KV blocks in use", registry=r)
        self.kv_total = Gauge("specache_kv_blocks_total", "KV blocks in the pool", registry=r)
        self.prefix_hit_rate = Gauge("specache_prefix_cache_hit_rate", "prefix cache hit tokens / query tokens",
                                     registry=r)
        self.spec_acceptance = Gauge("specache_spec_acceptance_rate", "accepted / drafted tokens", registry=r)

    def refresh(self, engine, loop) -> None:
        self.queue_depth.set(loop.in_flight)
        self.kv_used.set(engine.pool.num_used)
        self.kv_total.set(engine.pool.num_blocks)
        if engine.prefix_cache is not None:
            self.prefix_hit_rate.set(engine.prefix_cache.stats()["hit_rate"])
        if engine.spec is not None:
            self.spec_acceptance.set(engine.spec.stats().get("acceptance_rate", 0.0))
