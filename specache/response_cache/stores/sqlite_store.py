"""Embedded store: SQLite holds payload, metadata, expiry and the vectors; a usearch HNSW index
persisted beside it (`<db>.usearch`) answers nearest-neighbour queries.

SQLite is the source of truth: the index is a derived structure. If the index file is missing,
unreadable or disagrees with the table (e.g. the process died between a write and a save), it is
rebuilt from the stored vectors. A corrupt database file is moved aside and the cache starts
empty with a warning: a cache must never take the server down.
"""

from __future__ import annotations

import json
import logging
import os
import sqlite3
import threading
from collections import Counter

import numpy as np
from usearch.index import Index

from specache.response_cache.stores.base import Candidate, Entry, Store

log = logging.getLogger(__name__)

_SCHEMA = """
CREATE TABLE IF NOT EXISTS entries (
    id INTEGER PRIMARY KEY AUTOINCREMENT,
    key TEXT UNIQUE NOT NULL,
    tenant TEXT NOT NULL, model TEXT NOT NULL, partition TEXT NOT NULL,
    prompt TEXT NOT NULL, response TEXT NOT NULL, vector BLOB, tags TEXT NOT NULL,
    created_at REAL NOT NULL, expires_at REAL NOT NULL, last_access REAL NOT NULL, size INTEGER NOT NULL
);
CREATE INDEX IF NOT EXISTS entries_part ON entries(partition, tenant, model);
CREATE INDEX IF NOT EXISTS entries_lru ON entries(last_access);
CREATE INDEX IF NOT EXISTS entries_exp ON entries(expires_at);
CREATE TABLE IF NOT EXISTS meta (k TEXT PRIMARY KEY, v TEXT NOT NULL);
CREATE TABLE IF NOT EXISTS locks (name TEXT PRIMARY KEY, owner TEXT NOT NULL, expires_at REAL NOT NULL);
"""
_COLS = "id, key, tenant, model, partition, prompt, response, vector, tags, created_at, expires_at, last_access"
# Below this many entries in a partition, an exact scan beats HNSW-with-post-filtering and
# cannot miss entries of a small tenant hidden behind a big one's neighbours.
_EXACT_SCAN_MAX = 2048


class SQLiteStore(Store):
    def __init__(self, path: str | None, dim: int, max_entries: int, max_bytes: int, save_every: int = 5000):
        self.path = path if path and path != ":memory:" else None
        self.dim = dim
        self.max_entries = max_entries
        self.max_bytes = max_bytes
        self._save_every = save_every
        self._dirty = 0
        self._lock = threading.RLock()
        self._db = self._open_db()
        self._index = self._open_index()
        self._load_counters()

    # ---------- opening / recovery ----------
    def _connect(self) -> sqlite3.Connection:
        db = sqlite3.connect(self.path or ":memory:", check_same_thread=False, isolation_level=None)
        db.execute("PRAGMA journal_mode=WAL" if self.path else "PRAGMA journal_mode=MEMORY")
        db.execute("PRAGMA synchronous=NORMAL")
        db.executescript(_SCHEMA)
        if db.execute("PRAGMA quick_check").fetchone()[0] != "ok":
            raise sqlite3.DatabaseError("quick_check failed")
        return db

    def _open_db(self) -> sqlite3.Connection:
        try:
            return self._connect()
        except sqlite3.DatabaseError as exc:
            if not self.path:
                raise
            aside = f"{self.path}.corrupt"
            log.warning(
                "response cache: %s is not a usable SQLite database (%s); moved to %s, starting empty",
                self.path,
                exc,
                aside,
            )
            for suffix in ("", "-wal", "-shm"):
                if os.path.exists(self.path + suffix):
                    os.replace(self.path + suffix, aside + suffix)
            self._remove_index_file()
            return self._connect()

    @property
    def index_path(self) -> str | None:
        return f"{self.path}.usearch" if self.path else None

    def _new_index(self) -> Index:
        return Index(ndim=self.dim, metric="cos", dtype="f32", connectivity=16, expansion_add=128, expansion_search=64)

    def _remove_index_file(self) -> None:
        if self.index_path and os.path.exists(self.index_path):
            os.remove(self.index_path)

    def _open_index(self) -> Index:
        index = self._new_index()
        if self.index_path and os.path.exists(self.index_path):
            try:
                index.load(self.index_path)
                if self._index_consistent(index):
                    return index
                log.warning("response cache: index %s disagrees with the database; rebuilding", self.index_path)
            except Exception as exc:  # usearch raises plain RuntimeError/ValueError on bad files
                log.warning("response cache: index %s unreadable (%s); rebuilding", self.index_path, exc)
            index = self._new_index()
        self._rebuild_into(index)
        return index

    def _index_consistent(self, index: Index) -> bool:
        if index.ndim != self.dim:
            return False
        n, max_id = self._db.execute(
            "SELECT COUNT(*), COALESCE(MAX(id), -1) FROM entries WHERE vector IS NOT NULL"
        ).fetchone()
        if len(index) != n:
            return False
        return n == 0 or bool(index.contains(int(max_id)))

    def _rebuild_into(self, index: Index) -> None:
        rows = self._db.execute("SELECT id, vector FROM entries WHERE vector IS NOT NULL").fetchall()
        if rows:
            keys = np.array([r[0] for r in rows], dtype=np.uint64)
            vecs = np.stack([np.frombuffer(r[1], dtype=np.float32) for r in rows])
            index.add(keys, vecs)
            log.info("response cache: rebuilt vector index with %d entries", len(rows))

    def _load_counters(self) -> None:
        self._count, self._bytes = self._db.execute("SELECT COUNT(*), COALESCE(SUM(size), 0) FROM entries").fetchone()
        self._parts: Counter[tuple[str, str, str]] = Counter()
        for part, tenant, model, n in self._db.execute(
            "SELECT partition, tenant, model, COUNT(*) FROM entries GROUP BY partition, tenant, model"
        ):
            self._parts[(part, tenant, model)] = n

    # ---------- contract ----------
    def get(self, key: str, now: float) -> Entry | None:
        with self._lock:
            row = self._db.execute(f"SELECT {_COLS} FROM entries WHERE key=? AND expires_at>?", (key, now)).fetchone()
            if row is None:
                return None
            self._db.execute("UPDATE entries SET last_access=? WHERE id=?", (now, row[0]))
            return self._entry(row)

    def put(self, entry: Entry, now: float) -> None:
        self.put_many([entry], now)

    def put_many(self, entries: list[Entry], now: float) -> None:
        with self._lock:
            self._db.execute("BEGIN")
            try:
                added = [self._insert(e, now) for e in entries]
                self._db.execute("COMMIT")
            except BaseException:
                self._db.execute("ROLLBACK")
                self._load_counters()
                raise
            with_vec = [(i, e.vector) for i, e in zip(added, entries, strict=True) if e.vector is not None]
            if with_vec:
                keys = np.array([i for i, _ in with_vec], dtype=np.uint64)
                self._index.add(keys, np.stack([np.asarray(v, dtype=np.float32) for _, v in with_vec]))
            self._evict(now)
            self._maybe_save(len(entries))

    def _insert(self, e: Entry, now: float) -> int:
        old = self._db.execute("SELECT id FROM entries WHERE key=?", (e.key,)).fetchone()
        if old is not None:
            self._delete_ids([old[0]])
        blob = None if e.vector is None else np.asarray(e.vector, dtype=np.float32).tobytes()
        size = e.size_bytes
        cur = self._db.execute(
            "INSERT INTO entries (key, tenant, model, partition, prompt, response, vector, tags, created_at, "
            "expires_at, last_access, size) VALUES (?,?,?,?,?,?,?,?,?,?,?,?)",
            (
                e.key,
                e.tenant,
                e.model,
                e.partition,
                e.prompt,
                e.payload_json(),
                blob,
                json.dumps(e.tags),
                e.created_at,
                e.expires_at,
                now,
                size,
            ),
        )
        self._count += 1
        self._bytes += size
        self._parts[(e.partition, e.tenant, e.model)] += 1
        return int(cur.lastrowid)

    def search(
        self, vector: np.ndarray, tenant: str, model: str, partition: str, k: int, now: float
    ) -> list[Candidate]:
        with self._lock:
            n_part = self._parts.get((partition, tenant, model), 0)
            if n_part == 0:
                return []
            vector = np.asarray(vector, dtype=np.float32)
            if n_part <= _EXACT_SCAN_MAX:
                return self._exact_scan(vector, tenant, model, partition, k, now)
            return self._hnsw_search(vector, tenant, model, partition, k, now)

    def _exact_scan(
        self, vector: np.ndarray, tenant: str, model: str, partition: str, k: int, now: float
    ) -> list[Candidate]:
        rows = self._db.execute(
            f"SELECT {_COLS} FROM entries WHERE partition=? AND tenant=? AND model=? AND expires_at>? "
            "AND vector IS NOT NULL",
            (partition, tenant, model, now),
        ).fetchall()
        if not rows:
            return []
        mat = np.stack([np.frombuffer(r[7], dtype=np.float32) for r in rows])
        sims = mat @ vector
        order = np.argsort(-sims)[:k]
        return [Candidate(self._entry(rows[i]), float(sims[i])) for i in order]

    def _hnsw_search(
        self, vector: np.ndarray, tenant: str, model: str, partition: str, k: int, now: float
    ) -> list[Candidate]:
        # Oversample, filter ids in SQL (cheap: no payloads), widen if the filter left too few.
        count, total = max(2 * k, 16), len(self._index)
        while True:
            matches = self._index.search(vector, min(count, total), threads=1)
            sims = {int(key): 1.0 - float(d) for key, d in zip(matches.keys, matches.distances, strict=True)}
            marks = ",".join("?" * len(sims))
            ids = [
                r[0]
                for r in self._db.execute(
                    f"SELECT id FROM entries WHERE id IN ({marks}) AND partition=? AND tenant=? AND model=? "
                    "AND expires_at>?",
                    (*sims, partition, tenant, model, now),
                )
            ]
            if len(ids) >= k or count >= total or count >= 16 * _EXACT_SCAN_MAX:
                break
            count *= 8
        best = sorted(ids, key=lambda i: -sims[i])[:k]
        if not best:
            return []
        # Payloads only for the few returned candidates.
        rows = self._db.execute(
            f"SELECT {_COLS} FROM entries WHERE id IN ({','.join('?' * len(best))})", best
        ).fetchall()
        cands = [Candidate(self._entry(r), sims[r[0]]) for r in rows]
        cands.sort(key=lambda c: -c.similarity)
        return cands

    def delete(self, key: str) -> None:
        with self._lock:
            row = self._db.execute("SELECT id FROM entries WHERE key=?", (key,)).fetchone()
            if row is not None:
                self._delete_ids([row[0]])

    def count(self) -> int:
        with self._lock:
            return int(self._count)

    def clear(self) -> None:
        with self._lock:
            self._db.execute("DELETE FROM entries")
            self._index = self._new_index()
            self._load_counters()
            self._save_index()

    def try_lock(self, name: str, owner: str, ttl_s: float, now: float) -> bool:
        with self._lock:
            self._db.execute("DELETE FROM locks WHERE name=? AND expires_at<=?", (name, now))
            cur = self._db.execute(
                "INSERT OR IGNORE INTO locks (name, owner, expires_at) VALUES (?,?,?)",
                (name, owner, now + ttl_s),
            )
            return cur.rowcount == 1

    def unlock(self, name: str, owner: str) -> None:
        with self._lock:
            self._db.execute("DELETE FROM locks WHERE name=? AND owner=?", (name, owner))

    def close(self) -> None:
        with self._lock:
            if self._db is None:
                return
            self._save_index()
            self._db.close()
            self._db = None  # type: ignore[assignment]

    # ---------- helpers ----------
    def _delete_ids(self, ids: list[int]) -> None:
        if not ids:
            return
        marks = ",".join("?" * len(ids))
        rows = self._db.execute(
            f"SELECT id, partition, tenant, model, size, vector IS NOT NULL FROM entries WHERE id IN ({marks})",
            ids,
        ).fetchall()
        self._db.execute(f"DELETE FROM entries WHERE id IN ({marks})", ids)
        for rid, part, tenant, model, size, has_vec in rows:
            self._count -= 1
            self._bytes -= size
            self._parts[(part, tenant, model)] -= 1
            if self._parts[(part, tenant, model)] <= 0:
                del self._parts[(part, tenant, model)]
            if has_vec:
                self._index.remove(int(rid))
        self._dirty += len(rows)

    def _evict(self, now: float) -> None:
        if self._count <= self.max_entries and self._bytes <= self.max_bytes:
            return
        # Expired entries go first: dropping them loses nothing.
        self._delete_ids([r[0] for r in self._db.execute("SELECT id FROM entries WHERE expires_at<=?", (now,))])
        while self._count > self.max_entries or self._bytes > self.max_bytes:
            over = max(self._count - self.max_entries, 1)
            victims = [
                r[0]
                for r in self._db.execute("SELECT id FROM entries ORDER BY last_access ASC, id ASC LIMIT ?", (over,))
            ]
            if not victims:
                break
            self._delete_ids(victims)

    def _maybe_save(self, n: int) -> None:
        self._dirty += n
        if self.index_path and self._dirty >= self._save_every:
            self._save_index()

    def _save_index(self) -> None:
        if self.index_path:
            tmp = self.index_path + ".tmp"
            self._index.save(tmp)
            os.replace(tmp, self.index_path)  # atomic: a crash never leaves a half-written index
        self._dirty = 0

    @staticmethod
    def _entry(row: tuple) -> Entry:
        _id, key, tenant, model, part, prompt, response, vec, tags, created, expires, last = row
        return Entry(
            key=key,
            tenant=tenant,
            model=model,
            partition=part,
            prompt=prompt,
            response=json.loads(response),
            expires_at=expires,
            created_at=created,
            vector=None if vec is None else np.frombuffer(vec, dtype=np.float32).copy(),
            tags=json.loads(tags),
            last_access=last,
        )
