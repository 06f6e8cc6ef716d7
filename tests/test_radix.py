"""Radix prefix cache: unit cases, and property tests against a brute-force model of the same cache."""

from __future__ import annotations

import time
from collections import Counter

import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from specache.kv.block_pool import BlockPool
from specache.prefix.radix import RadixCache

BS = 2


def _cache(blocks: int = 64, bs: int = BS, **kw) -> tuple[BlockPool, RadixCache]:
    pool = BlockPool(blocks, bs)
    return pool, RadixCache(pool, bs, **kw)


def _insert_fresh(pool: BlockPool, tree: RadixCache, tokens: list[int], salt=None) -> list[int]:
    """A sequence computes `tokens` in fresh blocks, publishes them, and finishes."""
    blocks = pool.allocate(len(tokens) // pool.block_size)
    tree.insert(tokens, blocks, salt)
    pool.free(blocks)  # only the tree's reference remains
    return blocks


def _num_nodes(tree: RadixCache) -> int:
    return sum(1 for _ in tree._nodes())


# ---------------------------------------------------------------------------- match / insert / split


def test_match_is_block_aligned_and_leaves_the_last_token():
    pool, tree = _cache()
    blocks = _insert_fresh(pool, tree, [1, 2, 3, 4, 5, 6])
    assert tree.match_prefix([1, 2, 3, 4, 5, 6]).num_tokens == 4  # the last token must be computed
    m = tree.match_prefix([1, 2, 3, 4, 5, 6, 7])
    assert (m.num_tokens, m.block_ids) == (6, blocks)
    assert tree.match_prefix([1, 2, 3, 4, 5]).block_ids == blocks[:2]
    assert tree.match_prefix([1, 2, 3]).num_tokens == 2
    assert tree.match_prefix([1, 2]).num_tokens == 0
    assert tree.match_prefix([1]).num_tokens == 0
    assert tree.match_prefix([]).num_tokens == 0
    assert tree.match_prefix([9, 2, 3]).num_tokens == 0
    assert tree.match_prefix([1, 2, 3, 9, 9]).num_tokens == 2  # diverges inside the second block


def test_mid_edge_match_splits_at_a_block_boundary_and_keeps_contents():
    pool, tree = _cache()
    blocks = _insert_fresh(pool, tree, [1, 2, 3, 4, 5, 6, 7, 8])
    assert _num_nodes(tree) == 1
    m = tree.match_prefix([1, 2, 3, 4, 9, 9, 9])
    assert (m.num_tokens, m.block_ids) == (4, blocks[:2])
    assert _num_nodes(tree) == 2 and m.last_node.key == (1, 2, 3, 4) and m.last_node.blocks == blocks[:2]
    (child,) = m.last_node.children.values()
    assert child.key == (5, 6, 7, 8) and child.blocks == blocks[2:] and child.parent is m.last_node
    assert list(tree.iter_entries()) == [(None, (1, 2, 3, 4, 5, 6, 7, 8), blocks)]
    # Inserting a diverging sequence adds a sibling under the split point.
    other = pool.allocate(3)
    assert tree.insert([1, 2, 3, 4, 7, 7, 0], other) == 2
    assert pool.ref_count(other[2]) == 2 and pool.ref_count(other[0]) == 1  # only the new block
    pool.free(other)
    assert sorted(tree.iter_entries()) == [(None, (1, 2, 3, 4, 5, 6, 7, 8), blocks),
                                           (None, (1, 2, 3, 4, 7, 7), blocks[:2] + [other[2]])]
    assert tree.cached_blocks() == 5 == pool.num_used


def test_split_keeps_locks_on_the_upper_part():
    pool, tree = _cache()
    _insert_fresh(pool, tree, [1, 2, 3, 4, 5, 6])
    full = tree.match_prefix([1, 2, 3, 4, 5, 6, 0])
    tree.lock(full.last_node)
    half = tree.match_prefix([1, 2, 3, 4, 0])  # splits the locked node
    assert half.last_node.lock_ref == 1 and full.last_node.parent is half.last_node
    assert full.last_node.key == (5, 6)  # the locked node still ends where its match ended
    assert tree.evict(10) == 0
    tree.unlock(full.last_node)
    assert half.last_node.lock_ref == 0 and tree.evict(10) == 3 and pool.all_free()


def test_insert_counts_new_tokens_and_references_only_new_blocks():
    pool, tree = _cache()
    seq = pool.allocate(3)
    assert tree.insert([1, 2, 3, 4, 5], seq) == 4  # the partial last block is not cached
    assert [pool.ref_count(b) for b in seq] == [2, 2, 1]
    assert tree.insert([1, 2, 3, 4, 5, 6], seq) == 2  # grows under the existing node
    assert [pool.ref_count(b) for b in seq] == [2, 2, 2]
    assert tree.insert([1, 2, 3, 4], seq) == 0
    assert tree.insert([1], []) == 0 and tree.insert([], []) == 0
    with pytest.raises(ValueError):
        tree.insert([1, 2, 3, 4], seq[:1])
    pool.free(seq)
    assert tree.cached_blocks() == 3 and tree.stats()["inserted_blocks"] == 3


def test_duplicate_insert_takes_no_extra_reference():
    pool, tree = _cache()
    first = _insert_fresh(pool, tree, [1, 2, 3, 4])
    dup = pool.allocate(3)
    assert tree.insert([1, 2, 3, 4, 5, 6], dup) == 2  # only the new third block is taken
    assert [pool.ref_count(b) for b in dup] == [1, 1, 2]
    pool.free(dup)
    assert [pool.ref_count(b) for b in first] == [1, 1] and pool.num_used == 3
    assert tree.match_prefix([1, 2, 3, 4, 5, 6, 0]).block_ids == first + [dup[2]]


def test_salts_are_isolated():
    pool, tree = _cache()
    _insert_fresh(pool, tree, [1, 2, 3, 4], salt="tenant-a")
    assert tree.match_prefix([1, 2, 3, 4, 5], "tenant-b").num_tokens == 0
    assert tree.match_prefix([1, 2, 3, 4, 5], None).num_tokens == 0
    assert tree.match_prefix([1, 2, 3, 4, 5], "").num_tokens == 0
    assert tree.match_prefix([1, 2, 3, 4, 5], "tenant-a").num_tokens == 4
    assert set(tree.roots) == {"tenant-a"}  # queries of unseen tenants store nothing
    b = _insert_fresh(pool, tree, [1, 2, 3, 4], salt=("org", 7))
    assert tree.match_prefix([1, 2, 3, 4, 5], ("org", 7)).block_ids == b
    assert {s for s, _, _ in tree.iter_entries()} == {"tenant-a", ("org", 7)}
    tree.reset()
    assert not tree.roots and pool.all_free()


# ---------------------------------------------------------------------------- lock / evict / reset


def test_lock_counts_run_to_the_root_and_unlock_checks():
    pool, tree = _cache()
    _insert_fresh(pool, tree, [1, 2, 3, 4])
    _insert_fresh(pool, tree, [1, 2, 3, 4, 5, 6])
    m = tree.match_prefix([1, 2, 3, 4, 5, 6, 0])
    tree.lock(m.last_node)
    tree.lock(m.last_node)
    node, counts = m.last_node, []
    while node is not None:
        counts.append(node.lock_ref)
        node = node.parent
    assert counts == [2, 2, 2]  # leaf, its parent, the root
    tree.unlock(m.last_node)
    tree.unlock(m.last_node)
    with pytest.raises(AssertionError):
        tree.unlock(m.last_node)
    assert m.last_node.lock_ref == 0 and tree.evictable_blocks() == 3


def test_eviction_is_lru_and_deepest_first_and_spares_locked_nodes():
    pool, tree = _cache(8)
    a = _insert_fresh(pool, tree, [1, 1, 2, 2])
    b = _insert_fresh(pool, tree, [3, 3, 4, 4])
    tree.match_prefix([1, 1, 2, 2, 0])  # a is now the most recently used
    assert tree.evict(1) == 1
    assert pool.ref_count(b[1]) == 0 and pool.ref_count(b[0]) == 1  # b's deepest block went first
    locked = tree.match_prefix([3, 3, 0])
    tree.lock(locked.last_node)
    assert tree.evictable_blocks() == 2
    assert tree.evict(10) == 2  # only a's blocks; the locked b[0] stays
    assert pool.ref_count(b[0]) == 1 and all(pool.ref_count(x) == 0 for x in a)
    assert tree.reset() == 0 and tree.cached_blocks() == 1  # reset spares locked paths too
    tree.unlock(locked.last_node)
    assert tree.reset() == 1 and pool.all_free() and tree.cached_blocks() == 0
    assert tree.stats()["evictions"] == 4


def test_a_parent_left_childless_becomes_an_eviction_candidate():
    pool, tree = _cache(16)
    shared = _insert_fresh(pool, tree, [1, 1, 2, 2])
    left = _insert_fresh(pool, tree, [1, 1, 2, 2, 3, 3])
    right = _insert_fresh(pool, tree, [1, 1, 2, 2, 4, 4])
    other = _insert_fresh(pool, tree, [7, 7])
    tree.match_prefix([7, 7, 0])  # `other` is the newest; left is the oldest leaf
    assert (None, (1, 1, 2, 2, 3, 3), shared + left[2:]) in tree.iter_entries()  # duplicates not taken
    order = []
    for _ in range(5):
        before = {b for _, _, bl in tree.iter_entries() for b in bl}
        assert tree.evict(1) == 1
        order.append((before - {b for _, _, bl in tree.iter_entries() for b in bl}).pop())
    assert order == [left[2], right[2], shared[1], shared[0], other[0]]
    assert pool.all_free() and not tree.roots


def test_blocks_in_use_by_a_sequence_are_not_evicted():
    pool, tree = _cache(8)
    blocks = pool.allocate(2)
    tree.insert([1, 2, 3, 4], blocks)  # the sequence still holds its own references
    assert tree.evictable_blocks() == 0 and tree.evict(2) == 0 and tree.cached_blocks() == 2
    pool.free(blocks[1:])
    assert tree.evictable_blocks() == 1 and tree.evict(2) == 1  # the tail frees, the head is in use
    pool.free(blocks[:1])
    assert tree.evict(2) == 1 and pool.all_free()


def test_an_in_use_descendant_keeps_its_ancestors():
    pool, tree = _cache(8)
    _insert_fresh(pool, tree, [1, 1])
    seq = pool.allocate(2)  # a sequence computed [1, 1] itself (a duplicate) and then [2, 2]
    tree.insert([1, 1, 2, 2], seq)
    assert pool.ref_count(seq[0]) == 1 and pool.ref_count(seq[1]) == 2
    assert tree.evictable_blocks() == 0 and tree.evict(4) == 0
    pool.free(seq)
    assert tree.evictable_blocks() == 2 and tree.evict(4) == 2 and pool.all_free()


def test_reset_drops_the_trees_references_even_on_blocks_in_use():
    pool, tree = _cache(8)
    seq = pool.allocate(2)
    tree.insert([1, 2, 3, 4], seq)
    assert tree.reset() == 0 and tree.cached_blocks() == 0  # nothing freed: the sequence holds them
    assert [pool.ref_count(b) for b in seq] == [1, 1]
    pool.free(seq)
    assert pool.all_free()


def test_evict_zero_and_empty_tree():
    pool, tree = _cache(4)
    assert tree.evict(0) == 0 and tree.evict(5) == 0 and tree.reset() == 0
    _insert_fresh(pool, tree, [1, 2])
    assert tree.evict(0) == 0 and tree.evict(-3) == 0 and tree.cached_blocks() == 1


def test_evict_hook_sees_each_block_with_its_path_before_it_is_freed():
    seen = []
    pool, tree = _cache(8, on_evict=lambda salt, toks, b: seen.append((salt, toks, b, pool.ref_count(b))))
    blocks = _insert_fresh(pool, tree, [1, 2, 3, 4, 5, 6], salt="t")
    assert tree.evict(2) == 2
    assert seen == [("t", (1, 2, 3, 4, 5, 6), blocks[2], 1), ("t", (1, 2, 3, 4), blocks[1], 1)]
    tree.reset()
    assert seen[-1] == ("t", (1, 2), blocks[0], 1)


def test_stats_count_queries_hits_insertions_and_evictions():
    pool, tree = _cache()
    _insert_fresh(pool, tree, [1, 2, 3, 4])
    tree.match_prefix([1, 2, 3, 4, 5])
    tree.match_prefix([9, 9, 9])
    tree.evict(1)
    s = tree.stats()
    assert {k: s[k] for k in ("queries", "query_tokens", "hit_tokens", "inserted_blocks", "evictions")} == \
        {"queries": 2, "query_tokens": 8, "hit_tokens": 4, "inserted_blocks": 2, "evictions": 1}
    assert s["hit_rate"] == 0.5 and s["cached_blocks"] == 1 and s["evicted_blocks"] == 1


def test_iter_entries_rebuilds_the_same_tree():
    pool, tree = _cache(32)
    for toks, salt in [([1, 2, 3, 4, 5, 6], None), ([1, 2, 3, 4, 7, 8], None), ([1, 2], None),
                       ([1, 2, 9, 9], "t"), ([5, 5, 5, 5, 5, 5, 5, 5], None)]:
        _insert_fresh(pool, tree, toks, salt)
    entries = sorted(tree.iter_entries(), key=repr)
    pool2, tree2 = _cache(32)
    held = pool2.allocate(32)  # same block ids in the new pool, as a loader would arrange
    for salt, toks, blocks in entries:
        assert len(toks) == len(blocks) * BS
        tree2.insert(toks, blocks, salt)
    pool2.free(held)
    assert sorted(tree2.iter_entries(), key=repr) == entries
    assert [pool2.ref_count(b) for b in range(32)] == [pool.ref_count(b) for b in range(32)]


def test_long_prompts_and_deep_trees_are_fast_and_iterative():
    bs = 16
    pool, tree = _cache(4096, bs)
    system = list(range(10_000))
    t0 = time.perf_counter()
    for i in range(100):
        prompt = system + [20_000 + i] * 500
        m = tree.match_prefix(prompt)
        pool.incref(m.block_ids)
        blocks = m.block_ids + pool.allocate(len(prompt) // bs - len(m.block_ids))
        tree.insert(prompt, blocks)
        pool.free(blocks)
        if i:
            assert m.num_tokens == 10_000 // bs * bs
    assert time.perf_counter() - t0 < 5.0
    # A chain deeper than Python's recursion limit (each request one block longer): nothing recurses.
    pool2, chain = _cache(1100, 1)
    for n in range(1, 1101):
        seq = pool2.allocate(1)
        chain.insert(list(range(n)), chain.match_prefix(list(range(n)) + [0]).block_ids + seq)
        pool2.free(seq)
    assert _num_nodes(chain) == 1100 and chain.evictable_blocks() == 1100
    assert [len(t) for _, t, _ in chain.iter_entries()] == [1100]
    assert chain.evict(600) == 600 and chain.reset() == 500 and pool2.all_free()
    assert tree.reset() == tree.stats()["inserted_blocks"] and pool.all_free()


# ---------------------------------------------------------------------------- property tests


class Model:
    """Brute force: every cached block-aligned prefix -> [block id, last use], plus lock counts."""

    def __init__(self, bs: int) -> None:
        self.bs = bs
        self.cached: dict[tuple, list[int]] = {}  # (salt, tokens) -> [block, last use]
        self.locks: Counter = Counter()  # (salt, tokens) of a locked match end -> count
        self.clock = 0

    def tick(self) -> int:
        self.clock += 1
        return self.clock

    def match(self, tokens: list[int], salt) -> list[int]:
        limit = (len(tokens) - 1) // self.bs * self.bs if tokens else 0
        now, blocks = self.tick(), []
        for k in range(self.bs, limit + 1, self.bs):
            entry = self.cached.get((salt, tuple(tokens[:k])))
            if entry is None:
                break
            entry[1] = now
            blocks.append(entry[0])
        return blocks

    def insert(self, tokens: list[int], blocks: list[int], salt) -> int:
        now, new = self.tick(), 0
        for j in range(len(tokens) // self.bs):
            key = (salt, tuple(tokens[: (j + 1) * self.bs]))
            if key not in self.cached:
                self.cached[key] = [blocks[j], now]
                new += self.bs
            self.cached[key][1] = now
        return new

    def locked(self, key: tuple) -> bool:
        salt, toks = key
        return any(s == salt and t[: len(toks)] == toks and len(t) >= len(toks) for s, t in self.locks)

    def is_leaf(self, key: tuple) -> bool:
        salt, toks = key
        return not any((salt, toks + c) in self.cached for c in self._next_blocks(key))

    def _next_blocks(self, key: tuple) -> set[tuple]:
        salt, toks = key
        n = len(toks)
        return {t[n: n + self.bs] for s, t in self.cached if s == salt and len(t) > n and t[:n] == toks}

    def evict(self, n: int, pool: BlockPool) -> list[int]:
        """The blocks an exact LRU, deepest-first, in-use-sparing eviction drops, in order."""
        dropped = []
        while len(dropped) < n:
            cands = [(e[1], key) for key, e in self.cached.items()
                     if pool.ref_count(e[0]) == 1 and not self.locked(key)
                     and self.is_leaf(key)]
            if not cands:
                break
            times = sorted(t for t, _ in cands)
            assert len(times) < 2 or times[0] < times[1], "two evictable leaves share a last-use time"
            key = min(cands)[1]
            dropped.append(self.cached.pop(key)[0])
        return dropped

    def evictable(self, pool: BlockPool) -> int:
        def free_alone(key):
            return pool.ref_count(self.cached[key][0]) == 1 and not self.locked(key)
        return sum(1 for key in self.cached if free_alone(key) and all(
            free_alone(k) for k in self.cached if k[0] == key[0] and k[1][: len(key[1])] == key[1]))

    def reset(self) -> None:
        self.cached = {k: e for k, e in self.cached.items() if self.locked(k)}


def _check(pool: BlockPool, tree: RadixCache, model: Model, seqs: list[dict]) -> None:
    tree_prefixes = {}
    for salt, toks, blocks in tree.iter_entries():
        assert len(toks) == len(blocks) * model.bs
        for j, b in enumerate(blocks):
            tree_prefixes[(salt, toks[: (j + 1) * model.bs])] = b
    assert tree_prefixes == {k: e[0] for k, e in model.cached.items()}
    assert tree.cached_blocks() == len(model.cached) <= pool.num_blocks
    expected = Counter(tree_prefixes.values())
    assert all(c == 1 for c in expected.values()), "the tree holds a block twice"
    for s in seqs:
        expected.update(s["blocks"])
    for b in range(pool.num_blocks):
        assert pool.ref_count(b) == expected[b] >= 0
    for salt, toks in model.locks:  # locked paths are still cached
        assert all((salt, toks[:k]) in model.cached for k in range(model.bs, len(toks) + 1, model.bs))
    for node in tree._nodes():
        path = node.path_tokens()
        want = sum(c for (s, t), c in model.locks.items() if s == node.salt and t[: len(path)] == path
                   and len(t) >= len(path))
        assert node.lock_ref == want
    assert tree.evictable_blocks() == model.evictable(pool)


# Prompts share a few "system prompts" so that hits, splits and duplicates are common.
BASES = [(0, 1, 0, 1, 2, 2, 1, 0), (0, 1, 0, 1), (0, 1, 2), (2, 2, 2, 2, 2, 2), ()]
tokens_st = st.builds(lambda base, tail: list(base) + tail, st.sampled_from(BASES),
                      st.lists(st.integers(0, 2), max_size=6))
salt_st = st.sampled_from([None, None, None, "a", ("t", 1)])
start_st = st.tuples(st.just("start"), tokens_st, salt_st, st.booleans())
op_st = st.one_of(
    start_st, start_st, start_st, start_st, start_st,
    st.tuples(st.just("match"), tokens_st, salt_st, st.just(False)),
    st.tuples(st.just("publish"), st.integers(0, 9), st.integers(0, 4), st.just(False)),
    st.tuples(st.just("finish"), st.integers(0, 9), st.integers(0, 4), st.just(False)),
    st.tuples(st.just("evict"), st.integers(0, 8), st.none(), st.just(False)),
    st.tuples(st.just("reset"), st.none(), st.none(), st.just(False)),
)


class Sim:
    """Drives the tree and the model side by side the way the scheduler uses the cache."""

    MAX_RUNNING = 4

    def __init__(self, bs: int, num_blocks: int) -> None:
        self.bs = bs
        self.pool, self.tree = _cache(num_blocks, bs)
        self.model = Model(bs)
        self.seqs: list[dict] = []  # running: tokens, salt, blocks (own pool refs), locked node
        self.queries = self.hit = 0

    def match(self, tokens: list[int], salt):
        want = self.model.match(tokens, salt)
        m = self.tree.match_prefix(tokens, salt)
        self.queries, self.hit = self.queries + 1, self.hit + m.num_tokens
        assert (m.block_ids, m.num_tokens) == (want, len(want) * self.bs)
        return m

    def start(self, tokens: list[int], salt, lock: bool) -> None:
        if len(self.seqs) >= self.MAX_RUNNING:
            self.finish(0, 0)
        pool, m = self.pool, self.match(tokens, salt)
        pool.incref(m.block_ids)  # before evicting, as the scheduler does: the match is ours now
        seq = {"tokens": list(tokens), "salt": salt, "blocks": list(m.block_ids), "node": None,
               "lock": (salt, tuple(tokens[: m.num_tokens]))}
        if lock:
            seq["node"] = m.last_node
            self.tree.lock(m.last_node)
            self.model.locks[seq["lock"]] += 1
        self.seqs.append(seq)
        need = pool.blocks_needed(len(tokens)) - len(m.block_ids)
        if need > pool.num_free:
            self.evict(need - pool.num_free)
        if need <= pool.num_free:
            seq["blocks"] += pool.allocate(need)
        else:  # no room: the sequence waits, holding only its match
            seq["tokens"] = seq["tokens"][: m.num_tokens]

    def publish(self, i: int, uncomputed: int) -> dict | None:
        if not self.seqs:
            return None
        seq = self.seqs[i % len(self.seqs)]
        toks = seq["tokens"][: max(len(seq["tokens"]) - uncomputed, 0)]  # maybe not all computed yet
        new = self.model.insert(toks, seq["blocks"], seq["salt"])
        assert self.tree.insert(toks, seq["blocks"], seq["salt"]) == new
        return seq

    def finish(self, i: int, uncomputed: int) -> None:
        seq = self.publish(i, uncomputed)
        if seq is None:
            return
        self.seqs.remove(seq)
        if seq["node"] is not None:
            self.tree.unlock(seq["node"])
            self.model.locks -= Counter([seq["lock"]])
        self.pool.free(seq["blocks"])

    def evict(self, n: int) -> None:
        before = self.pool.num_free
        want = self.model.evict(n, self.pool)
        assert self.tree.evict(n) == len(want) == self.pool.num_free - before
        assert all(self.pool.ref_count(x) == 0 for x in want)

    def reset(self) -> None:
        self.model.reset()
        self.tree.reset()


@settings(max_examples=250, deadline=None, suppress_health_check=[HealthCheck.too_slow])
@given(st.integers(1, 3), st.integers(8, 32), st.lists(op_st, min_size=10, max_size=40))
def test_tree_agrees_with_a_brute_force_model(bs, num_blocks, operations):
    sim = Sim(bs, num_blocks)
    for op, a, b, flag in operations:
        if op == "start":
            sim.start(a, b, flag)
        elif op == "match":
            sim.match(a, b)
        elif op == "publish":
            sim.publish(a, b)
        elif op == "finish":
            sim.finish(a, b)
        elif op == "evict":
            sim.evict(a)
        else:
            sim.reset()
        _check(sim.pool, sim.tree, sim.model, sim.seqs)
    s = sim.tree.stats()
    assert (s["queries"], s["hit_tokens"]) == (sim.queries, sim.hit)
    for seq in sim.seqs:  # everything finishes: unlocked and reset, the pool is all free
        if seq["node"] is not None:
            sim.tree.unlock(seq["node"])
        sim.pool.free(seq["blocks"])
    sim.tree.reset()
    assert sim.pool.all_free() and sim.tree.cached_blocks() == 0 and not sim.tree.roots
