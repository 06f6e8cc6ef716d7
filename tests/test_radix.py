"""Radix prefix cache: unit cases and property tests against a brute-force view of the tree."""

from __future__ import annotations

from collections import Counter

from hypothesis import given, settings
from hypothesis import strategies as st

from specache.kv.block_pool import BlockPool
from specache.prefix.radix import RadixCache

BS = 2


def _cache(blocks: int = 64) -> tuple[BlockPool, RadixCache]:
    pool = BlockPool(blocks, BS)
    return pool, RadixCache(pool, BS)


def _insert_fresh(pool: BlockPool, tree: RadixCache, tokens: list[int], salt=None) -> list[int]:
    blocks = pool.allocate(len(tokens) // BS)
    tree.insert(tokens, blocks, salt)
    pool.free(blocks)  # the sequence is done: only the tree's reference remains
    return blocks


def test_match_is_block_aligned_and_leaves_the_last_token():
    pool, tree = _cache()
    blocks = _insert_fresh(pool, tree, [1, 2, 3, 4, 5, 6])
    assert tree.match_prefix([1, 2, 3, 4, 5, 6]).num_tokens == 4  # last token must be computed
    assert tree.match_prefix([1, 2, 3, 4, 5, 6, 7]).block_ids == blocks
    assert tree.match_prefix([1, 2, 3, 9, 9]).num_tokens == 2  # mid-edge divergence splits the edge
    assert tree.match_prefix([9, 2, 3]).num_tokens == 0


def test_salts_are_isolated():
    pool, tree = _cache()
    _insert_fresh(pool, tree, [1, 2, 3, 4], salt="tenant-a")
    assert tree.match_prefix([1, 2, 3, 4, 5], "tenant-b").num_tokens == 0
    assert tree.match_prefix([1, 2, 3, 4, 5], None).num_tokens == 0
    assert tree.match_prefix([1, 2, 3, 4, 5], "tenant-a").num_tokens == 4


def test_eviction_is_lru_and_deepest_first_and_spares_locked_nodes():
    pool, tree = _cache(8)
    a = _insert_fresh(pool, tree, [1, 1, 2, 2])
    b = _insert_fresh(pool, tree, [3, 3, 4, 4])
    tree.match_prefix([1, 1, 2, 2, 0])  # a is now the most recently used
    assert tree.evict(1) == 1
    assert pool.ref_count(b[1]) == 0 and pool.ref_count(b[0]) == 1  # b's deepest block went first
    locked = tree.match_prefix([3, 3, 0])
    tree.lock(locked.last_node)
    assert tree.evict(10) == 2  # only a's blocks; the locked b[0] stays
    assert pool.ref_count(b[0]) == 1 and all(pool.ref_count(x) == 0 for x in a)
    tree.unlock(locked.last_node)
    assert tree.reset() == 1 and pool.all_free()


def test_blocks_in_use_by_a_sequence_are_not_evicted():
    pool, tree = _cache(8)
    blocks = pool.allocate(2)
    tree.insert([1, 2, 3, 4], blocks)  # the sequence still holds its own references
    assert tree.evict(2) == 0
    pool.free(blocks)
    assert tree.evict(2) == 2 and pool.all_free()


def test_duplicate_insert_takes_no_extra_reference():
    pool, tree = _cache()
    first = _insert_fresh(pool, tree, [1, 2, 3, 4])
    dup = pool.allocate(2)
    assert tree.insert([1, 2, 3, 4], dup) == 0
    pool.free(dup)
    assert [pool.ref_count(b) for b in first] == [1, 1] and pool.num_used == 2


def _brute_force_match(tree: RadixCache, tokens: list[int], salt) -> int:
    cached = set()
    for s, path, _ in tree.iter_entries():
        if s == salt:
            cached |= {path[:k] for k in range(BS, len(path) + 1, BS)}
    limit = (len(tokens) - 1) // BS * BS
    return max([k for k in range(BS, limit + 1, BS) if tuple(tokens[:k]) in cached], default=0)


def _check_refcounts(pool: BlockPool, tree: RadixCache, holders: list) -> None:
    expected = Counter(b for _, _, blocks in tree.iter_entries() for b in blocks)
    expected = Counter({b: 1 for b in expected})  # each cached block is held once by the tree
    for h in holders:
        expected.update(h["blocks"])
    for b in range(pool.num_blocks):
        assert pool.ref_count(b) == expected.get(b, 0) >= 0


def _tree_blocks(tree: RadixCache) -> set[int]:
    return {b for _, _, blocks in tree.iter_entries() for b in blocks}


ops = st.lists(st.tuples(st.sampled_from(["request", "finish", "evict"]),
                         st.lists(st.integers(0, 2), min_size=1, max_size=12),
                         st.sampled_from([None, "t1"]), st.integers(0, 6)), max_size=40)


@settings(max_examples=150, deadline=None)
@given(ops)
def test_tree_matches_brute_force_and_never_leaks(operations):
    pool, tree = _cache(24)
    holders: list[dict] = []
    for op, tokens, salt, n in operations:
        if op == "request":
            want = _brute_force_match(tree, tokens, salt)
            m = tree.match_prefix(tokens, salt)
            assert m.num_tokens == want
            need = len(tokens) // BS - len(m.block_ids)
            if need > pool.num_free:
                tree.evict(need - pool.num_free)
            if need > pool.num_free:
                continue
            pool.incref(m.block_ids)
            tree.lock(m.last_node)
            blocks = list(m.block_ids) + pool.allocate(max(need, 0))
            tree.insert(tokens, blocks, salt)
            assert _brute_force_match(tree, tokens + [0], salt) == len(tokens) // BS * BS
            holders.append({"blocks": blocks, "node": m.last_node})
        elif op == "finish" and holders:
            h = holders.pop(n % len(holders))
            tree.unlock(h["node"])
            pool.free(h["blocks"])
        elif op == "evict":
            in_use = {b for h in holders for b in h["blocks"]} & _tree_blocks(tree)
            before = pool.num_free
            freed = tree.evict(n)
            assert freed == pool.num_free - before <= max(n, 0)
            assert in_use <= _tree_blocks(tree)  # blocks of running sequences are never evicted
        _check_refcounts(pool, tree, holders)
        assert tree.cached_blocks() <= pool.num_blocks
    for h in holders:
        tree.unlock(h["node"])
        pool.free(h["blocks"])
    tree.reset()
    assert pool.all_free()
