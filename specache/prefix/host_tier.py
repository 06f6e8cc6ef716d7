"""CPU tier (L2) of the prefix cache: KV blocks evicted from the device pool are kept in a
bounded host-memory pool and copied back on a hit instead of recomputed.

- Keys are ``(salt, digest)``: the tenant salt itself (so one tenant can never hit another's
  entries) and a chained BLAKE2b digest of the whole token path from the root to the end of the
  block. A block's K/V depend on every token before it, so the path, not the block's own tokens,
  names it; chaining (digest_i = H(digest_{i-1} + block_i tokens)) makes the keys of all blocks
  of a prompt cost one pass over it.
- Only what the radix tree evicts is stored, and the tree only ever holds full blocks of
  computed, verified tokens: rejected speculative drafts never reach this tier.
- Inclusive: a hit copies the block back and the entry stays, so evicting that block again from
  the device costs no copy (the key is already held; it is only refreshed in the LRU).
- Bookkeeping (``HostTierIndex``: slots, LRU, byte accounting, counters) is tensor-free and
  tested on its own; ``HostKVTier`` adds the preallocated tensors and the copies. On a CPU-only
  machine the device pool is host memory too, but the tier keeps its own budget and tensors so
  the same code runs unchanged on CUDA, where the buffers are pinned for asynchronous copies.
"""

from __future__ import annotations

import hashlib
from array import array
from collections import OrderedDict
from collections.abc import Hashable, Sequence

import torch

from specache.errors import ConfigError
from specache.kv.cache import KVCache

BlockKey = tuple[Hashable, bytes]  # (tenant salt, chained digest of the token path to the block's end)
DIGEST_BYTES = 16  # 128 bits: a collision (wrong K/V served) is out of reach at any cache size


def chain_digests(tokens: Sequence[int], block_size: int, num_blocks: int) -> list[bytes]:
    """Digest of the token path up to the end of each of the first num_blocks blocks."""
    out: list[bytes] = []
    prev = b""
    for i in range(num_blocks):
        h = hashlib.blake2b(prev, digest_size=DIGEST_BYTES)
        h.update(array("q", tokens[i * block_size: (i + 1) * block_size]).tobytes())
        prev = h.digest()
        out.append(prev)
    return out


class HostTierIndex:
    """Tensor-free: which slot holds which block key, in LRU order, within a fixed slot count."""

    def __init__(self, capacity_blocks: int, block_bytes: int) -> None:
        if capacity_blocks < 0 or block_bytes <= 0:
            raise ValueError("capacity_blocks must be >= 0 and block_bytes positive")
        self.capacity = capacity_blocks
        self.block_bytes = block_bytes
        self._slots: OrderedDict[BlockKey, int] = OrderedDict()  # least recently used first
        self._free = list(range(capacity_blocks - 1, -1, -1))  # pop() hands out slot 0 first
        self._stats = {"stores": 0, "refreshes": 0, "evictions": 0, "hit_blocks": 0, "lookups": 0}

    def __len__(self) -> int:
        return len(self._slots)

    def __contains__(self, key: BlockKey) -> bool:
        return key in self._slots

    @property
    def nbytes(self) -> int:
        return len(self._slots) * self.block_bytes

    def reserve(self, key: BlockKey) -> int | None:
        """Slot to copy a newly evicted block into, evicting the LRU entry when full; None when
        nothing must be copied (the key is already held, or the tier has no room at all)."""
        if key in self._slots:
            self._slots.move_to_end(key)
            self._stats["refreshes"] += 1
            return None
        if self.capacity == 0:
            return None
        if self._free:
            slot = self._free.pop()
        else:
            _, slot = self._slots.popitem(last=False)
            self._stats["evictions"] += 1
        self._slots[key] = slot
        self._stats["stores"] += 1
        return slot

    def lookup(self, key: BlockKey) -> int | None:
        """Slot of a held key (now most recently used) or None; counts the hit."""
        slot = self._slots.get(key)
        if slot is not None:
            self._slots.move_to_end(key)
            self._stats["hit_blocks"] += 1
        return slot

    def count_lookup(self) -> None:
        """One prefix query that went on to this tier (the denominator of its hit rate per query)."""
        self._stats["lookups"] += 1

    def clear(self) -> None:
        self._slots.clear()
        self._free = list(range(self.capacity - 1, -1, -1))

    def stats(self) -> dict:
        s = dict(self._stats)
        s.update(blocks=len(self._slots), bytes=self.nbytes, capacity_blocks=self.capacity,
                 capacity_bytes=self.capacity * self.block_bytes)
        return s


class HostKVTier:
    """The host-memory block store: preallocated K/V for ``capacity`` blocks plus its index."""

    def __init__(self, cache: KVCache, budget_bytes: int) -> None:
        self.cache = cache
        self.block_size = cache.block_size
        block_shape = (cache.k.shape[0], *cache.k.shape[2:])  # [layers, block_size, kv_heads, head_dim]
        block_bytes = 2 * cache.k[:, 0].numel() * cache.k.element_size()
        capacity = budget_bytes // block_bytes
        if capacity < 1:
            raise ConfigError(f"prefix_cpu_cache_memory={budget_bytes} bytes holds no KV block of this model "
                              f"(one block is {block_bytes} bytes); raise it, or set 0 to turn the CPU tier off")
        # Pinned on CUDA so copies overlap with compute; empty (not zeros) so the budget costs
        # no RAM until blocks are stored.
        pin = cache.k.device.type == "cuda"
        self.k = torch.empty((capacity, *block_shape), dtype=cache.k.dtype, pin_memory=pin)
        self.v = torch.empty((capacity, *block_shape), dtype=cache.v.dtype, pin_memory=pin)
        self.index = HostTierIndex(capacity, block_bytes)
        self._memo: tuple[tuple[int, ...], list[bytes]] | None = None

    def __len__(self) -> int:
        return len(self.index)

    def __contains__(self, key: BlockKey) -> bool:
        return key in self.index

    # ------------------------------------------------------------------ keys

    def block_keys(self, tokens: Sequence[int], salt: Hashable, num_blocks: int) -> list[BlockKey]:
        """Keys of the first num_blocks full blocks of a token sequence."""
        return [(salt, d) for d in chain_digests(tokens, self.block_size, num_blocks)]

    def _path_key(self, salt: Hashable, path: tuple[int, ...]) -> BlockKey:
        """Key of the block ending a path. The tree evicts a leaf deepest block first and children
        before parents, so each path is usually a prefix of the previous one: reuse its digests."""
        n = len(path) // self.block_size
        memo = self._memo
        if memo is None or len(memo[0]) < len(path) or memo[0][: len(path)] != path:
            memo = self._memo = (path, chain_digests(path, self.block_size, n))
        return salt, memo[1][n - 1]

    # ------------------------------------------------------------------ copies

    def store(self, salt: Hashable, path: tuple[int, ...], block_id: int) -> None:
        """The radix tree's on_evict hook: copy a block about to be freed into the tier."""
        slot = self.index.reserve(self._path_key(salt, path))
        if slot is not None:
            self.cache.copy_block_out(block_id, self.k[slot], self.v[slot])

    def load(self, key: BlockKey, block_id: int) -> bool:
        """Copy a held block into device block block_id; False (nothing copied) on a miss."""
        slot = self.index.lookup(key)
        if slot is None:
            return False
        self.cache.copy_block_in(block_id, self.k[slot], self.v[slot])
        return True

    def count_lookup(self) -> None:
        self.index.count_lookup()

    def clear(self) -> None:
        self.index.clear()
        self._memo = None

    def stats(self) -> dict:
        s = self.index.stats()
        s["hit_tokens"] = s["hit_blocks"] * self.block_size
        return s
