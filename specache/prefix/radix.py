"""Radix tree over token ids whose edges map to KV blocks (RadixAttention-style prefix cache).

Tensor-free bookkeeping. Only full blocks are cached, so every edge holds a whole number of
blocks: a node's ``key`` is ``block_size * len(blocks)`` token ids and ``blocks[i]`` holds the
K/V of ``key[i*bs:(i+1)*bs]`` in the context of everything above it.

Ownership: the tree holds exactly one pool reference on every block it caches; each running
sequence holds its own reference on every block of its block table (the scheduler increfs the
blocks of a match and frees them when the sequence ends).

- A tenant salt (``cache_salt``) selects a separate root, so one tenant never matches, and so
  can never time, another tenant's prefix.
- ``match_prefix`` never covers the whole prompt: the last prompt token must be computed to get
  logits. A match that ends inside an edge splits that edge at the block boundary, so the
  returned ``last_node`` ends exactly where the match ends.
- A running sequence locks its ``last_node``: lock counts run up to the root and locked nodes
  are never evicted.
- ``evict`` frees least-recently-used unlocked leaves, trimming each from its deepest block
  (ancestors outlive descendants). A block also held by a running sequence would free nothing,
  so it is kept (and so is everything above it): eviction only drops blocks that really free.
- Recency is a monotonic counter, not wall time, so eviction order is deterministic.
"""

from __future__ import annotations

import heapq
from collections.abc import Callable, Hashable, Iterator, Sequence
from dataclasses import dataclass, field

from specache.kv.block_pool import BlockPool

# (salt, token ids from the root up to and including the block, block id), called before the
# tree drops its reference to an evicted block: the hook for a CPU/disk tier to copy the K/V out.
EvictHook = Callable[[Hashable, tuple[int, ...], int], None]


@dataclass(eq=False, slots=True)
class Node:
    key: tuple[int, ...] = ()
    blocks: list[int] = field(default_factory=list)
    parent: Node | None = None
    salt: Hashable = None
    children: dict[tuple[int, ...], Node] = field(default_factory=dict)  # first block's tokens -> child
    lock_ref: int = 0
    last_access: int = 0

    @property
    def is_root(self) -> bool:
        return self.parent is None

    def path_tokens(self) -> tuple[int, ...]:
        """Token ids from the root to the end of this node."""
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
    def __init__(self, pool: BlockPool, block_size: int, on_evict: EvictHook | None = None) -> None:
        if block_size != pool.block_size:
            raise ValueError(f"block_size {block_size} differs from the pool's {pool.block_size}")
        self.pool = pool
        self.block_size = block_size
        self.on_evict = on_evict
        self.roots: dict[Hashable, Node] = {}
        self._clock = 0
        self._cached = 0
        self._stats = {"queries": 0, "query_tokens": 0, "hit_tokens": 0, "evictions": 0,
                       "inserted_blocks": 0}

    # ------------------------------------------------------------------ walking

    def _tick(self) -> int:
        self._clock += 1
        return self._clock

    def _matching_blocks(self, node: Node, toks: tuple[int, ...], pos: int, limit: int) -> int:
        """How many of node's blocks equal toks[pos:] within `limit` tokens (the first one always does)."""
        bs, key = self.block_size, node.key
        n = min(len(key), (limit - pos) // bs * bs)
        if toks[pos: pos + n] == key[:n]:
            return n // bs
        m = 1
        while toks[pos + m * bs: pos + (m + 1) * bs] == key[m * bs: (m + 1) * bs]:
            m += 1
        return m

    def _split(self, node: Node, m: int) -> Node:
        """Cut node after m blocks; the new upper part inherits its locks and recency. Returns it.

        The node object itself keeps the lower part, so whoever holds it (a locked sequence) still
        holds a node that ends where it did."""
        bs = self.block_size
        upper = Node(node.key[: m * bs], node.blocks[:m], node.parent, node.salt, {}, node.lock_ref,
                     node.last_access)
        node.parent.children[upper.key[:bs]] = upper
        node.key, node.blocks, node.parent = node.key[m * bs:], node.blocks[m:], upper
        upper.children[node.key[:bs]] = node
        return upper

    def _walk(self, toks: tuple[int, ...], root: Node, now: int) -> tuple[Node, int, list[int]]:
        """Follow toks down from root, splitting a partly matched edge; returns (node, tokens, blocks)."""
        bs, limit = self.block_size, len(toks)
        node, pos, blocks = root, 0, []
        root.last_access = now
        while pos + bs <= limit:
            child = node.children.get(toks[pos: pos + bs])
            if child is None:
                break
            m = self._matching_blocks(child, toks, pos, limit)
            partial = m < len(child.blocks)
            if partial:
                child = self._split(child, m)
            child.last_access = now
            blocks.extend(child.blocks)
            pos += m * bs
            node = child
            if partial:
                break
        return node, pos, blocks

    # ------------------------------------------------------------------ public API

    def match_prefix(self, token_ids: Sequence[int], salt: Hashable = None) -> MatchResult:
        """Longest cached block-aligned prefix, leaving at least the last token to compute."""
        n = len(token_ids)
        limit = (n - 1) // self.block_size * self.block_size if n else 0
        self._stats["queries"] += 1
        self._stats["query_tokens"] += n
        root = self.roots.get(salt)
        if root is None:  # an unseen tenant gets a detached root: nothing to match, nothing stored
            return MatchResult([], 0, Node(salt=salt))
        node, pos, blocks = self._walk(tuple(map(int, token_ids[:limit])), root, self._tick())
        self._stats["hit_tokens"] += pos
        return MatchResult(blocks, pos, node)

    def adopt(self, seq, match: MatchResult) -> None:
        """Start a sequence that holds no blocks yet from a match: it takes its own reference on
        each matched block (its block table), counts those tokens as computed, and locks the
        match's node until it ends (the caller unlocks `seq.prefix_node`)."""
        if not match.num_tokens:
            return
        self.pool.incref(match.block_ids)
        seq.block_table = list(match.block_ids)
        seq.num_computed = match.num_tokens
        seq.prefix_node = match.last_node
        self.lock(match.last_node)

    def lock(self, node: Node) -> None:
        """Protect node and its ancestors from eviction (one count per running sequence)."""
        while node is not None:
            node.lock_ref += 1
            node = node.parent

    def unlock(self, node: Node) -> None:
        cur = node
        while cur is not None:  # check first: a bad unlock must not leave half-decremented counts
            if cur.lock_ref <= 0:
                raise AssertionError("unlock of an unlocked radix node")
            cur = cur.parent
        while node is not None:
            node.lock_ref -= 1
            node = node.parent

    def insert(self, token_ids: Sequence[int], block_ids: Sequence[int], salt: Hashable = None) -> int:
        """Cache the full-block prefix of a sequence; returns the number of newly cached tokens.

        The tree takes its own pool reference on the blocks it did not cache yet. Where the tree
        already holds the prefix (a duplicate computed concurrently), the caller's blocks are left
        alone: the caller frees its own references as usual."""
        bs = self.block_size
        n_blocks = len(token_ids) // bs
        if len(block_ids) < n_blocks:
            raise ValueError(f"{len(token_ids)} tokens need {n_blocks} blocks, got {len(block_ids)}")
        if n_blocks == 0:
            return 0
        limit = n_blocks * bs
        toks = tuple(map(int, token_ids[:limit]))
        root = self.roots.get(salt)
        if root is None:
            root = self.roots[salt] = Node(salt=salt)
        now = self._tick()
        node, pos, _ = self._walk(toks, root, now)
        if pos == limit:
            return 0
        new = [int(b) for b in block_ids[pos // bs: n_blocks]]
        self.pool.incref(new)  # first: a freed block id raises before anything is cached
        leaf = Node(toks[pos:], new, node, salt, {}, 0, now)
        node.children[leaf.key[:bs]] = leaf
        self._cached += len(new)
        self._stats["inserted_blocks"] += len(new)
        return limit - pos

    def evict(self, num_blocks: int) -> int:
        """Free up to num_blocks pool blocks, least-recently-used leaves first and each from its
        deepest block; returns how many blocks actually became free."""
        if num_blocks <= 0:
            return 0
        heap = [(leaf.last_access, i, leaf) for i, leaf in enumerate(self._nodes())
                if not leaf.children and leaf.lock_ref == 0]
        heapq.heapify(heap)
        tie, freed = len(heap), 0
        while heap and freed < num_blocks:
            _, _, leaf = heapq.heappop(heap)
            k = self._droppable_tail(leaf, num_blocks - freed)
            if k == 0:
                continue
            edge = leaf.key[: self.block_size]
            freed += self._drop_tail(leaf, k)
            if leaf.blocks:
                continue  # trimmed only: enough freed, or the rest is still used by a sequence
            parent = self._detach(leaf, edge)
            if not parent.children and parent.lock_ref == 0 and not parent.is_root:
                tie += 1
                heapq.heappush(heap, (parent.last_access, tie, parent))
        return freed

    def reset(self) -> int:
        """Drop every unlocked node (the tree's references, even on blocks a sequence still uses);
        returns how many blocks became free. Locked paths stay."""
        before = self.pool.num_free
        for root in list(self.roots.values()):
            stack = [root]
            while stack:
                node = stack.pop()
                for edge, child in list(node.children.items()):
                    if child.lock_ref:
                        stack.append(child)
                    else:
                        self._drop_subtree(child, edge)
            if not root.children and not root.lock_ref:
                self._forget_root(root)
        return self.pool.num_free - before

    # ------------------------------------------------------------------ eviction helpers

    def _droppable_tail(self, leaf: Node, limit: int) -> int:
        """Tail blocks of an unlocked leaf held only by the tree, at most `limit`."""
        k, blocks, ref = 0, leaf.blocks, self.pool.ref_count
        while k < limit and k < len(blocks) and ref(blocks[-1 - k]) == 1:
            k += 1
        return k

    def _drop_tail(self, leaf: Node, k: int) -> int:
        cut = len(leaf.blocks) - k
        dropped = leaf.blocks[cut:]
        if self.on_evict is not None:
            path = leaf.path_tokens()
            start = len(path) - len(leaf.key)
            for i in range(len(dropped) - 1, -1, -1):  # deepest first, as evicted
                self.on_evict(leaf.salt, path[: start + (cut + i + 1) * self.block_size], dropped[i])
        del leaf.blocks[cut:]
        leaf.key = leaf.key[: cut * self.block_size]
        return self._release(dropped)

    def _release(self, blocks: list[int]) -> int:
        before = self.pool.num_free
        self.pool.free(blocks)
        self._cached -= len(blocks)
        self._stats["evictions"] += len(blocks)
        return self.pool.num_free - before

    def _detach(self, node: Node, edge: tuple[int, ...]) -> Node:
        """Unlink node (whose first block's tokens are `edge`) from its parent; forgets a root left empty."""
        parent = node.parent
        del parent.children[edge]
        if parent.is_root and not parent.children and not parent.lock_ref:
            self._forget_root(parent)
        return parent

    def _forget_root(self, root: Node) -> None:
        if self.roots.get(root.salt) is root:
            del self.roots[root.salt]

    def _drop_subtree(self, top: Node, edge: tuple[int, ...]) -> None:
        self._detach(top, edge)
        order, stack = [], [top]
        while stack:
            node = stack.pop()
            order.append(node)
            stack.extend(node.children.values())
        for node in reversed(order):  # children first: the evict hook still sees whole paths
            self._drop_tail(node, len(node.blocks))

    # ------------------------------------------------------------------ inspection

    def _nodes(self) -> Iterator[Node]:
        """Every non-root node, parents before children."""
        for root in list(self.roots.values()):
            stack = list(root.children.values())
            while stack:
                node = stack.pop()
                stack.extend(node.children.values())
                yield node

    def cached_blocks(self) -> int:
        return self._cached

    def evictable_blocks(self) -> int:
        """Blocks that ``evict`` could free now: unlocked, held only by the tree, and with nothing
        below them that has to stay (ancestors outlive descendants)."""
        order = list(self._nodes())
        whole: dict[int, bool] = {}  # id(node) -> the whole subtree can go
        total = 0
        for node in reversed(order):  # children before parents
            if not all(whole[id(c)] for c in node.children.values()):
                whole[id(node)] = False
                continue
            tail = self._droppable_tail(node, len(node.blocks)) if node.lock_ref == 0 else 0
            total += tail
            whole[id(node)] = tail == len(node.blocks)
        return total

    def iter_entries(self) -> Iterator[tuple[Hashable, tuple[int, ...], list[int]]]:
        """(salt, token ids from the root, block ids from the root) for every leaf. Inserting these
        (with blocks holding the same K/V) rebuilds the tree's contents. Do not modify the tree
        while iterating."""
        for salt, root in list(self.roots.items()):
            toks: list[int] = []
            blocks: list[int] = []
            stack: list[tuple[Node, int, int] | Node] = list(root.children.values())
            while stack:
                item = stack.pop()
                if isinstance(item, tuple):  # leaving a node: restore the path above it
                    _, nt, nb = item
                    del toks[nt:], blocks[nb:]
                    continue
                stack.append((item, len(toks), len(blocks)))
                toks.extend(item.key)
                blocks.extend(item.blocks)
                if not item.children:
                    yield salt, tuple(toks), list(blocks)
                stack.extend(item.children.values())

    def stats(self) -> dict:
        s = dict(self._stats)
        s["evicted_blocks"] = s["evictions"]  # the name earlier callers used
        s["hit_rate"] = s["hit_tokens"] / s["query_tokens"] if s["query_tokens"] else 0.0
        s["cached_blocks"] = self._cached
        return s

