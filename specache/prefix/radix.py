"""Radix tree over token ids whose edges map to KV blocks (RadixAttention-style prefix cache).

Tensor-free. Only full blocks are cached, so every edge is a whole number of blocks. A tenant
salt selects a separate root: one tenant never matches, and so can never time, another's
prefix. The tree holds one pool reference on every block it caches; nodes on the path of a
running sequence are locked and never evicted. Eviction takes least-recently-used unlocked
leaves, trimming each from its deepest block, so ancestors outlive descendants.
"""

from __future__ import annotations

import heapq
import itertools
from collections.abc import Callable, Hashable, Iterator, Sequence
from dataclasses import dataclass, field

from specache.kv.block_pool import BlockPool


@dataclass(eq=False)
class Node:
    key: tuple[int, ...] = ()
    blocks: list[int] = field(default_factory=list)
    parent: Node | None = None
    children: dict[tuple[int, ...], Node] = field(default_factory=dict)
    lock_ref: int = 0
    last_access: int = 0
    salt: Hashable = None

    def path_tokens(self) -> tuple[int, ...]:
        parts, node = [], self
        while node is not None:
            parts.append(node.key)
            node = node.parent
        return tuple(t for part in reversed(parts) for t in part)


@dataclass
class MatchResult:
    block_ids: list[int]
    num_tokens: int
    last_node: Node


class RadixCache:
    def __init__(self, pool: BlockPool, block_size: int,
                 on_evict: Callable[[Hashable, tuple[int, ...], int], None] | None = None) -> None:
        self.pool = pool
        self.block_size = block_size
        self.on_evict = on_evict  # (salt, tokens up to and including the block, block id): the CPU tier
        self.roots: dict[Hashable, Node] = {}
        self._clock = itertools.count(1)
        self._stats = {"queries": 0, "query_tokens": 0, "hit_tokens": 0, "evicted_blocks": 0,
                       "inserted_blocks": 0}

    # ------------------------------------------------------------------ walking

    def _root(self, salt: Hashable) -> Node:
        root = self.roots.get(salt)
        if root is None:
            root = self.roots[salt] = Node(salt=salt)
        return root

    def _blocks_matching(self, node: Node, tokens: Sequence[int], start: int, limit: int) -> int:
        """How many of node's blocks equal tokens[start:], without passing `limit` tokens."""
        bs, m = self.block_size, 0
        while m < len(node.blocks) and start + (m + 1) * bs <= limit and \
                tuple(tokens[start + m * bs: start + (m + 1) * bs]) == node.key[m * bs: (m + 1) * bs]:
            m += 1
        return m

    def _split(self, node: Node, m: int) -> Node:
        """Cut node after m blocks; returns the new upper part (which inherits locks and recency)."""
        bs = self.block_size
        upper = Node(node.key[: m * bs], node.blocks[:m], node.parent, {}, node.lock_ref, node.last_access,
                     node.salt)
        node.parent.children[upper.key[:bs]] = upper
        node.key, node.blocks = node.key[m * bs:], node.blocks[m:]
        node.parent = upper
        upper.children[node.key[:bs]] = node
        return upper

    def _walk(self, tokens: Sequence[int], salt: Hashable, limit: int) -> tuple[Node, int, list[int]]:
        """Follow tokens down the tree (splitting a partly matched edge); returns (node, tokens, blocks)."""
        bs = self.block_size
        node, pos, blocks = self._root(salt), 0, []
        now = next(self._clock)
        node.last_access = now
        while pos + bs <= limit:
            child = node.children.get(tuple(tokens[pos: pos + bs]))
            if child is None:
                break
            m = self._blocks_matching(child, tokens, pos, limit)
            if m < len(child.blocks):
                child = self._split(child, m)
            child.last_access = now
            blocks.extend(child.blocks)
            pos += m * bs
            node = child
            if m == 0:
                break
        return node, pos, blocks

    # ------------------------------------------------------------------ public API

    def match_prefix(self, token_ids: Sequence[int], salt: Hashable = None) -> MatchResult:
        """Longest cached block-aligned prefix, leaving at least the last token to compute."""
        limit = (max(len(token_ids) - 1, 0) // self.block_size) * self.block_size
        node, n, blocks = self._walk(token_ids, salt, limit)
        self._stats["queries"] += 1
        self._stats["query_tokens"] += len(token_ids)
        self._stats["hit_tokens"] += n
        return MatchResult(blocks, n, node)

    def lock(self, node: Node) -> None:
        while node is not None:
            node.lock_ref += 1
            node = node.parent

    def unlock(self, node: Node) -> None:
        while node is not None:
            if node.lock_ref <= 0:
                raise AssertionError("unlock of an unlocked radix node")
            node.lock_ref -= 1
            node = node.parent

    def insert(self, token_ids: Sequence[int], block_ids: Sequence[int], salt: Hashable = None) -> int:
        """Cache the full-block prefix of a sequence; returns the number of newly cached tokens."""
        bs = self.block_size
        n_blocks = min(len(token_ids) // bs, len(block_ids))
        limit = n_blocks * bs
        node, pos, _ = self._walk(token_ids, salt, limit)
        if pos >= limit:
            return 0
        new_blocks = list(block_ids[pos // bs: n_blocks])
        leaf = Node(tuple(token_ids[pos:limit]), new_blocks, node, {}, 0, next(self._clock), salt)
        node.children[leaf.key[:bs]] = leaf
        self.pool.incref(new_blocks)
        self._stats["inserted_blocks"] += len(new_blocks)
        return limit - pos

    def _evictable_leaves(self) -> list[tuple[int, int, Node]]:
        heap, tie = [], itertools.count()
        for root in self.roots.values():
            stack = list(root.children.values())
            while stack:
                node = stack.pop()
                if node.children:
                    stack.extend(node.children.values())
                elif self._evictable(node):
                    heap.append((node.last_access, next(tie), node))
        heapq.heapify(heap)
        return heap

    def _evictable(self, node: Node) -> bool:
        # A tail block still referenced by a running sequence frees nothing: keep that leaf.
        return node.lock_ref == 0 and bool(node.blocks) and self.pool.ref_count(node.blocks[-1]) == 1

    def evict(self, num_blocks: int) -> int:
        """Free up to num_blocks pool blocks from LRU unlocked leaves; returns blocks actually freed."""
        heap, tie = self._evictable_leaves(), itertools.count(1 << 40)
        freed = 0
        while heap and freed < num_blocks:
            _, _, leaf = heapq.heappop(heap)
            edge = leaf.key[: self.block_size]
            while leaf.blocks and freed < num_blocks and self._evictable(leaf):
                freed += self._drop_tail_block(leaf)
            if leaf.blocks:
                continue
            parent = leaf.parent
            del parent.children[edge]
            if parent.parent is not None and not parent.children and self._evictable(parent):
                heapq.heappush(heap, (parent.last_access, next(tie), parent))
        return freed

    def _drop_tail_block(self, leaf: Node) -> int:
        block = leaf.blocks[-1]
        if self.on_evict is not None:
            self.on_evict(leaf.salt, leaf.path_tokens(), block)
        leaf.blocks.pop()
        leaf.key = leaf.key[: len(leaf.blocks) * self.block_size]
        before = self.pool.num_free
        self.pool.free([block])
        self._stats["evicted_blocks"] += 1
        return self.pool.num_free - before

    def reset(self) -> int:
        """Drop everything evictable (used by tests and on shutdown)."""
        return self.evict(self.pool.num_blocks)

    # ------------------------------------------------------------------ inspection

    def _nodes(self) -> Iterator[Node]:
        for root in self.roots.values():
            stack = list(root.children.values())
            while stack:
                node = stack.pop()
                stack.extend(node.children.values())
                yield node

    def cached_blocks(self) -> int:
        return sum(len(n.blocks) for n in self._nodes())

    def evictable_blocks(self) -> int:
        return sum(1 for n in self._nodes() if n.lock_ref == 0 for b in n.blocks if self.pool.ref_count(b) == 1)

    def iter_entries(self) -> Iterator[tuple[Hashable, tuple[int, ...], list[int]]]:
        """(salt, tokens from the root, blocks from the root) for every leaf: enough to rebuild the tree."""
        for node in self._nodes():
            if not node.children and node.blocks:
                path, blocks, cur = node.path_tokens(), [], node
                while cur is not None:
                    blocks[:0] = cur.blocks
                    cur = cur.parent
                yield node.salt, path, blocks

    def stats(self) -> dict:
        s = dict(self._stats)
        s["hit_rate"] = s["hit_tokens"] / s["query_tokens"] if s["query_tokens"] else 0.0
        s["cached_blocks"] = self.cached_blocks()
        return s
