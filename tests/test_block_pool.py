"""Block placement: new sequences are spread so that interleaved growth stays contiguous."""

import pytest

from specache.engine.runner import _slots
from specache.kv.block_pool import BlockPool, OutOfBlocksError


def _contiguous(table: list[int]) -> bool:
    return table == list(range(table[0], table[0] + len(table)))


def test_interleaved_growth_keeps_each_block_table_contiguous():
    pool = BlockPool(num_blocks=100, block_size=4)
    tables = [pool.allocate(2, spread=True) for _ in range(4)]
    for _ in range(8):  # decode: every sequence grows one block per round, interleaved
        for t in tables:
            t += pool.allocate(1, after=t[-1])
    assert all(_contiguous(t) for t in tables), tables
    assert isinstance(_slots(tables[1], 40, 4), slice)  # attention reads a view, no gather


def test_first_sequence_starts_at_the_front_and_the_next_one_halves_the_free_run():
    pool = BlockPool(num_blocks=100, block_size=4)
    assert pool.allocate(2, spread=True) == [0, 1]
    assert pool.allocate(2, spread=True) == [51, 52]


def test_spread_falls_back_to_any_free_blocks_when_no_run_is_long_enough():
    pool = BlockPool(num_blocks=10, block_size=4)
    held = [pool.allocate(1) for _ in range(10)]
    for h in held[::2]:
        pool.free(h)  # free blocks 0, 2, 4, 6, 8: no two adjacent
    got = pool.allocate(3, spread=True)
    assert sorted(got) == [0, 2, 4] and pool.num_free == 2
    with pytest.raises(OutOfBlocksError):
        pool.allocate(3, spread=True)
    assert pool.num_free == 2  # a failed allocation takes nothing


def test_a_run_too_short_to_split_is_used_whole():
    pool = BlockPool(num_blocks=10, block_size=4)
    pool.allocate(10)
    pool.free([1, 5, 6, 7])  # runs 1..1 and 5..7, each after a used block
    assert pool.allocate(3, spread=True) == [5, 6, 7]  # not the lowest ids 1, 5, 6
