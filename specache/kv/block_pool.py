"""Tensor-free bookkeeping of fixed-size KV blocks: a free list and reference counts.

A block is owned by whoever holds a reference: each running sequence holds one on every
block of its block table, and the prefix cache (radix tree) holds one on every block it
caches. A block returns to the free list when its last reference is dropped.
"""

from __future__ import annotations

import heapq

import numpy as np


class OutOfBlocksError(RuntimeError):
    """Internal: the pool cannot satisfy an allocation (the scheduler preempts or waits)."""


class BlockPool:
    def __init__(self, num_blocks: int, block_size: int) -> None:
        if num_blocks <= 0 or block_size <= 0:
            raise ValueError("num_blocks and block_size must be positive")
        self.num_blocks = num_blocks
        self.block_size = block_size
        # Free ids in a min-heap (lazy deletion) plus a mask: fresh allocations come out in
        # ascending order, a growing sequence can ask for the block right after its last one, and
        # a new sequence is placed by scanning the mask for free runs, so most block tables are
        # contiguous runs that attention can read without a gather.
        self._heap: list[int] = list(range(num_blocks))
        self._free_mask = np.ones(num_blocks, dtype=bool)
        self._num_free = num_blocks
        self._ref = [0] * num_blocks

    @property
    def num_free(self) -> int:
        return self._num_free

    @property
    def num_used(self) -> int:
        return self.num_blocks - self._num_free

    def all_free(self) -> bool:
        return self._num_free == self.num_blocks and not any(self._ref)

    def ref_count(self, block_id: int) -> int:
        return self._ref[block_id]

    def blocks_needed(self, num_tokens: int) -> int:
        return -(-num_tokens // self.block_size)

    def trim(self, block_table: list[int], num_tokens: int) -> None:
        """Free the table's blocks past what ``num_tokens`` tokens need, in place (a speculative
        rollback: blocks that held only rejected drafts)."""
        keep = self.blocks_needed(num_tokens)
        if len(block_table) > keep:
            self.free(block_table[keep:])
            del block_table[keep:]

    def allocate(self, n: int, after: int | None = None, spread: bool = False) -> list[int]:
        """Take ``n`` free blocks with reference count 1, or raise without taking any.

        With ``after``, blocks after+1, after+2, ... are preferred while they are free. With
        ``spread`` (a new sequence), the blocks are placed where the sequence has the most room to
        grow contiguously (see _roomiest_start); otherwise the lowest free ids come first.
        """
        if n > self._num_free:
            raise OutOfBlocksError(f"need {n} blocks, {self._num_free} free")
        ids: list[int] = []
        nxt = after + 1 if after is not None else None
        if nxt is None and spread:
            nxt = self._roomiest_start(n)
        while nxt is not None and len(ids) < n and nxt < self.num_blocks and self._free_mask[nxt]:
            self._free_mask[nxt] = False
            ids.append(nxt)
            nxt += 1
        while len(ids) < n:
            b = heapq.heappop(self._heap)
            if self._free_mask[b]:  # skip ids taken through `after` (lazy deletion)
                self._free_mask[b] = False
                ids.append(b)
        for b in ids:
            self._ref[b] = 1
        self._num_free -= n
        return ids

    def _roomiest_start(self, n: int) -> int | None:
        """Where a new sequence of ``n`` blocks has the most free blocks after it to grow into.

        Sequences grow one block at a time, interleaved; packing new ones back to back would make
        every block table fragmented after its first decode block, and attention would have to
        gather. A free run at the start of the pool is used from its beginning; a run that follows
        a used block is split in the middle, so the sequence before it keeps half to grow into."""
        edges = np.flatnonzero(np.diff(np.concatenate(([False], self._free_mask, [False])).astype(np.int8)))
        starts, ends = edges[0::2], edges[1::2]
        if starts.size == 0:
            return None
        place = np.where(starts == 0, starts, starts + (ends - starts) // 2)
        room = ends - place
        best = int(np.argmax(room))
        if room[best] >= n:
            return int(place[best])
        longest = int(np.argmax(ends - starts))  # no half-run fits: a whole run still keeps it contiguous
        return int(starts[longest]) if ends[longest] - starts[longest] >= n else None

    def incref(self, block_ids: list[int]) -> None:
        for b in block_ids:
            if self._ref[b] <= 0:
                raise AssertionError(f"incref of free block {b}")
            self._ref[b] += 1

    def free(self, block_ids: list[int]) -> None:
        """Drop one reference to each block; blocks whose count reaches 0 become free."""
        for b in block_ids:
            if self._ref[b] <= 0:
                raise AssertionError(f"double free of block {b}")
            self._ref[b] -= 1
            if self._ref[b] == 0:
                self._free_mask[b] = True
                self._num_free += 1
                heapq.heappush(self._heap, b)
