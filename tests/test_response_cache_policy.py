"""Policy, PII, TTL, tenants, LRU, guard, streaming and single-flight of the response cache."""

from __future__ import annotations

import asyncio
import random
import threading

import pytest

from specache.response_cache import (
    CacheConfig,
    CacheConfigError,
    CacheRequest,
    CacheRequestError,
    HashEmbedder,
    ResponseCache,
    stream_chunks,
)
from specache.response_cache.guard import Guard
from specache.response_cache.pii import find_pii, iban_ok, luhn_ok


class FakeClock:
    def __init__(self, t: float = 1_000.0):
        self.t = t

    def __call__(self) -> float:
        return self.t


def req(text: str, tenant: str = "t1", model: str = "m", temperature: float = 0.0, **kw) -> CacheRequest:
    return CacheRequest(
        tenant=tenant,
        model=model,
        messages=[{"role": "user", "content": text}],
        params={"temperature": temperature, "max_tokens": 64},
        **kw,
    )


ANSWER = {"text": "forty-two", "finish_reason": "stop", "usage": {"completion_tokens": 2}}


@pytest.fixture
def clock() -> FakeClock:
    return FakeClock()


@pytest.fixture
def cache(clock: FakeClock) -> ResponseCache:
    c = ResponseCache(CacheConfig(clock=clock, threshold=0.9), embedder=HashEmbedder())
    yield c
    c.close()


# ---------- exact cache and keys ----------
def test_exact_hit_ignores_whitespace_and_transport_params(cache: ResponseCache) -> None:
    cache.store(req("What is the meaning of life?"), ANSWER)
    r = CacheRequest(
        tenant="t1",
        model="m",
        messages=[{"role": "user", "content": "  What is the  meaning of life? "}],
        params={"temperature": 0.0, "max_tokens": 64, "stream": True, "user": "bob"},
    )
    res = cache.lookup(r)
    assert res.hit and res.kind == "exact" and res.response == ANSWER


def test_output_params_split_the_key(cache: ResponseCache) -> None:
    cache.store(req("Tell me a story about a fox"), ANSWER)
    other = CacheRequest(
        tenant="t1",
        model="m",
        messages=[{"role": "user", "content": "Tell me a story about a fox"}],
        params={"temperature": 0.0, "max_tokens": 512},
    )
    assert not cache.lookup(other).hit  # neither exact nor semantic: max_tokens is in the partition


def test_earlier_turns_partition_semantic_hits(cache: ResponseCache) -> None:
    def conv(first: str) -> CacheRequest:
        return CacheRequest(
            tenant="t1",
            model="m",
            params={"temperature": 0.0},
            messages=[
                {"role": "user", "content": first},
                {"role": "assistant", "content": "ok"},
                {"role": "user", "content": "and how do I say it in French?"},
            ],
        )

    cache.store(conv("Say hello"), ANSWER)
    assert cache.lookup(conv("Say hello")).hit
    assert not cache.lookup(conv("Say goodbye")).hit


def test_sampled_requests_bypass_by_default(clock: FakeClock) -> None:
    with ResponseCache(CacheConfig(clock=clock), embedder=HashEmbedder()) as c:
        assert not c.store(req("hi there", temperature=0.7), ANSWER)
        assert c.lookup(req("hi there", temperature=0.7)).bypass_reason == "sampled"
        missing_temp = CacheRequest(tenant="t", model="m", messages=[{"role": "user", "content": "x"}])
        assert c.lookup(missing_temp).bypass_reason == "sampled"  # OpenAI default temperature is 1
    with ResponseCache(CacheConfig(clock=clock, cache_sampled=True), embedder=HashEmbedder()) as c:
        assert c.store(req("hi there", temperature=0.7), ANSWER)
        assert c.lookup(req("hi there", temperature=0.7)).hit


def test_modes_bypass_and_refresh(cache: ResponseCache) -> None:
    cache.store(req("q one"), ANSWER)
    assert cache.lookup(req("q one", mode="bypass")).bypass_reason == "client"
    res = cache.lookup(req("q one", mode="refresh"))
    assert not res.hit and res.bypass_reason == "refresh"
    assert cache.store(req("q one", mode="refresh"), {"text": "new"})
    assert cache.lookup(req("q one")).response == {"text": "new"}


# ---------- tags, freshness, TTL ----------
@pytest.mark.parametrize("tag", ["finance", "realtime", "FINANCE"])
def test_never_cache_tags(cache: ResponseCache, tag: str) -> None:
    assert not cache.store(req("stock tips", tags=[tag]), ANSWER)
    assert cache.lookup(req("stock tips", tags=[tag])).bypass_reason == f"tag:{tag.lower()}"


def test_news_tag_gets_short_ttl(cache: ResponseCache, clock: FakeClock) -> None:
    cache.store(req("election summary", tags=["news"]), ANSWER)
    clock.t += 299
    assert cache.lookup(req("election summary", tags=["news"])).hit
    clock.t += 2
    assert not cache.lookup(req("election summary", tags=["news"])).hit


def test_default_and_per_request_ttl(cache: ResponseCache, clock: FakeClock) -> None:
    cache.store(req("a timeless question"), ANSWER)
    cache.store(req("a short lived question", ttl_s=10), ANSWER)
    clock.t += 11
    assert not cache.lookup(req("a short lived question", ttl_s=10)).hit
    assert cache.lookup(req("a timeless question")).hit
    clock.t += 24 * 3600
    assert not cache.lookup(req("a timeless question")).hit


@pytest.mark.parametrize(
    "text",
    [
        "What is the weather today?",
        "current price of gold",
        "latest iPhone model",
        "Who is the current CEO of Twitter",
    ],
)
def test_time_sensitive_short_ttl_or_bypass(clock: FakeClock, text: str) -> None:
    with ResponseCache(CacheConfig(clock=clock), embedder=HashEmbedder()) as c:
        assert c.store(req(text), ANSWER)
        clock.t += 121
        assert not c.lookup(req(text)).hit
    with ResponseCache(CacheConfig(clock=clock, time_sensitive="bypass"), embedder=HashEmbedder()) as c:
        assert c.lookup(req(text)).bypass_reason == "time_sensitive"
        assert not c.store(req(text), ANSWER)


# ---------- PII ----------
PII_POSITIVE = [
    ("email", "please email me at jane.doe@example.co.uk"),
    ("card", "my card is 4111 1111 1111 1111"),
    ("card", "charge 5500-0000-0000-0004 please"),
    ("iban", "IBAN GB82 WEST 1234 5698 7654 32"),
    ("iban", "send to DE89370400440532013000"),
    ("ssn", "my SSN is 123-45-6789"),
    ("uk_ni", "NI number AB 12 34 56 C"),
    ("ip", "my server is at 203.0.113.7"),
    ("ip", "ping 2001:db8::8a2e:370:7334"),
    ("phone", "call me on +44 20 7946 0958"),
    ("phone", "my number is (555) 123-4567"),
    ("secret", "api key sk-proj-abcdefghijklmnopqrstuvwxyz123456"),
    ("secret", "AKIAIOSFODNN7EXAMPLE is my key"),
    ("secret", "token ghp_" + "A1b2C3d4E5" * 4),
]
PII_NEGATIVE = [
    "my card is 4111 1111 1111 1112",  # fails Luhn
    "IBAN GB82 WEST 1234 5698 7654 33",  # fails mod-97
    "what is 2+2?",
    "python 3.11.4 release notes",
    "order number 12345",
    "population 1,234,567",
    "ISBN 978-3-16-148410-0",
    "the years 1999-2005",
    "localhost is 127.0.0.1",
    "the price is 1299.99",
    "sk-learn is not a key",
    "my email address is private",
    "area code 020",
]


@pytest.mark.parametrize("kind,text", PII_POSITIVE)
def test_pii_positive_bypasses_lookup_and_store(cache: ResponseCache, kind: str, text: str) -> None:
    assert find_pii(text) == kind
    assert not cache.store(req(text), ANSWER)
    assert cache.lookup(req(text)).bypass_reason == f"pii:{kind}"


@pytest.mark.parametrize("text", PII_NEGATIVE)
def test_pii_negative(text: str) -> None:
    assert find_pii(text) is None


def test_checksums() -> None:
    assert luhn_ok("4111111111111111") and not luhn_ok("4111111111111112")
    assert iban_ok("GB82WEST12345698765432") and not iban_ok("GB82WEST12345698765433")


# ---------- tenants and LRU ----------
def test_tenant_isolation_randomised(clock: FakeClock) -> None:
    rng = random.Random(0)
    words = "alpha beta gamma delta river stone cloud ember frost maple".split()
    with ResponseCache(CacheConfig(clock=clock, threshold=0.0, guard=False), embedder=HashEmbedder()) as c:
        stored = []
        for i in range(60):
            tenant = f"tenant-{rng.randrange(5)}"
            text = " ".join(rng.choices(words, k=4))
            c.store(req(text, tenant=tenant), {"text": tenant, "i": i})
            stored.append((tenant, text))
        for _ in range(200):
            tenant = f"tenant-{rng.randrange(7)}"
            res = c.lookup(req(" ".join(rng.choices(words, k=4)), tenant=tenant))
            if res.hit:
                assert (
                    res.response["text"] == tenant
                )  # threshold 0: anything same-tenant may hit, nothing else


def test_tenant_names_cannot_inject_filters(cache: ResponseCache) -> None:
    cache.store(req("shared question", tenant="a"), ANSWER)
    assert not cache.lookup(req("shared question", tenant="a | b")).hit
    assert not cache.lookup(req("shared question", tenant="*")).hit


def test_lru_bound_by_entries(clock: FakeClock) -> None:
    with ResponseCache(CacheConfig(clock=clock, max_entries=3, semantic=False)) as c:
        for i in range(3):
            clock.t += 1
            c.store(req(f"question {i}"), ANSWER)
        clock.t += 1
        assert c.lookup(req("question 0")).hit  # touch 0: now 1 is the least recently used
        clock.t += 1
        c.store(req("question 3"), ANSWER)
        assert c.backend.count() == 3
        assert not c.lookup(req("question 1")).hit
        assert all(c.lookup(req(f"question {i}")).hit for i in (0, 2, 3))


def test_lru_bound_by_bytes(clock: FakeClock) -> None:
    with ResponseCache(CacheConfig(clock=clock, max_bytes=2000, semantic=False)) as c:
        for i in range(20):
            clock.t += 1
            c.store(req(f"question {i}"), {"text": "x" * 300})
        assert 1 <= c.backend.count() <= 6
        assert c.lookup(req("question 19")).hit and not c.lookup(req("question 0")).hit


# ---------- validation ----------
def test_named_errors() -> None:
    with pytest.raises(CacheConfigError):
        CacheConfig(threshold=2.0)
    with pytest.raises(CacheConfigError):
        CacheConfig(store_url="mongodb://x").store_url and ResponseCache(
            CacheConfig(store_url="mongodb://x"), embedder=HashEmbedder()
        )
    with pytest.raises(CacheRequestError):
        CacheRequest(tenant="t", model="m", messages=[])
    with pytest.raises(CacheRequestError):
        CacheRequest(tenant="t", model="m", messages=[{"role": "user", "content": "x"}], mode="sometimes")


# ---------- guard ----------
@pytest.mark.parametrize(
    "cached,query",
    [
        ("transfer from savings to current", "transfer from current to savings"),
        ("laptops under £50", "laptops over £50"),
        ("Is it safe to eat raw eggs?", "Is it unsafe to eat raw eggs?"),
        ("Why does my code compile?", "Why doesn't my code compile?"),
        ("Delete all rows from the table", "Delete some rows from the table"),
        ("Events in Berlin in March", "Events in Berlin in October"),
        ("What is the cheapest way to fly to Rome?", "What is the most expensive way to fly to Rome?"),
        ("Is Rust faster than Go?", "Is Go faster than Rust?"),
        ("Convert 5 miles to kilometres", "Convert 15 miles to kilometres"),
        ("List files except hidden ones", "List files including hidden ones"),
    ],
)
def test_guard_rejects_near_misses(cached: str, query: str) -> None:
    assert not Guard().verify(cached, query).ok


@pytest.mark.parametrize(
    "cached,query",
    [
        ("How do I reverse a list in Python?", "What's the way to reverse a Python list?"),
        ("Explain the difference between TCP and UDP.", "What distinguishes UDP from TCP?"),
        ("What is the capital of Australia?", "Which city is Australia's capital?"),
        (
            "How do I transfer money from my savings account to my current account?",
            "Moving money to my current account from my savings account",
        ),
    ],
)
def test_guard_accepts_paraphrases(cached: str, query: str) -> None:
    assert Guard().verify(cached, query).ok


def test_guard_rejection_is_counted(clock: FakeClock) -> None:
    with ResponseCache(CacheConfig(clock=clock, threshold=0.5), embedder=HashEmbedder()) as c:
        c.store(req("transfer from savings to current"), ANSWER)
        assert not c.lookup(req("transfer from current to savings")).hit
        assert c.stats()["guard_rejections"] == {"role_swap": 1}
        c.config.guard = False
        res = c.lookup(req("transfer from current to savings"))
        assert res.hit and res.kind == "semantic"


# ---------- streaming ----------
def test_stream_chunks_roundtrip() -> None:
    text = "The quick brown fox jumps over the lazy dog. " * 5
    chunks = list(stream_chunks({"text": text}, max_chars=16))
    assert "".join(chunks) == text and len(chunks) > 5


def test_streamed_miss_stored_only_when_complete(cache: ResponseCache) -> None:
    rec = cache.begin_store(req("stream me"))
    for piece in ("Hello", ", ", "world"):
        rec.append(piece)
    assert not cache.lookup(req("stream me")).hit
    assert rec.complete("stop", usage={"completion_tokens": 3})
    assert cache.lookup(req("stream me")).response["text"] == "Hello, world"
    aborted = cache.begin_store(req("stream aborted"))
    aborted.append("partial")
    aborted.abort()
    assert not aborted.complete()
    assert not cache.lookup(req("stream aborted")).hit


# ---------- single-flight ----------
def test_single_flight_50_concurrent_asyncio(cache: ResponseCache) -> None:
    calls = 0

    async def generate() -> dict:
        nonlocal calls
        calls += 1
        await asyncio.sleep(0.05)
        return ANSWER

    async def main() -> list:
        return await asyncio.gather(
            *[cache.get_or_generate(req("popular question"), generate) for _ in range(50)]
        )

    results = asyncio.run(main())
    assert calls == 1
    assert all(r.response == ANSWER for r in results)
    assert sum(not r.hit for r in results) == 1
    assert cache.stats()["coalesced"] + cache.stats()["exact_hits"] == 49


def test_single_flight_threads_each_with_own_loop(cache: ResponseCache) -> None:
    calls = 0
    lock = threading.Lock()
    barrier = threading.Barrier(8)

    async def generate() -> dict:
        nonlocal calls
        with lock:
            calls += 1
        await asyncio.sleep(0.1)
        return ANSWER

    results: list = []

    def worker() -> None:
        barrier.wait()
        results.append(asyncio.run(cache.get_or_generate(req("threaded question"), generate)))

    threads = [threading.Thread(target=worker) for _ in range(8)]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    assert calls == 1 and len(results) == 8 and all(r.response == ANSWER for r in results)


def test_single_flight_error_propagates_and_is_not_cached(cache: ResponseCache) -> None:
    async def boom() -> dict:
        await asyncio.sleep(0.01)
        raise RuntimeError("engine failed")

    async def main() -> list:
        return await asyncio.gather(
            *[cache.get_or_generate(req("failing"), boom) for _ in range(5)], return_exceptions=True
        )

    assert all(isinstance(r, RuntimeError) for r in asyncio.run(main()))
    assert not cache.lookup(req("failing")).hit


def test_sampled_requests_do_not_coalesce(clock: FakeClock) -> None:
    calls = 0

    async def generate() -> dict:
        nonlocal calls
        calls += 1
        return ANSWER

    with ResponseCache(CacheConfig(clock=clock), embedder=HashEmbedder()) as c:

        async def main() -> None:
            await asyncio.gather(
                *[c.get_or_generate(req("creative", temperature=1.0), generate) for _ in range(5)]
            )

        asyncio.run(main())
    assert calls == 5


def test_stats_counters(cache: ResponseCache) -> None:
    cache.store(req("counted"), ANSWER)
    cache.lookup(req("counted"))
    cache.lookup(req("never seen before at all"))
    cache.lookup(req("x", tags=["finance"]))
    s = cache.stats()
    assert s["lookups"] == 3 and s["exact_hits"] == 1 and s["misses"] == 1
    assert s["bypasses"] == {"tag:finance": 1} and s["stores"] == 1
