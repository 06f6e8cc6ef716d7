"""Continuous batching: which sequences run this step and how many tokens each computes.

Tensor-free. Each step spends one token budget (``max_num_batched_tokens``): running
sequences first (a decode token each, or the next chunk of a chunked prefill), then waiting
sequences in (priority, arrival) order. When blocks run out, the prefix cache gives back
unused blocks first, then the least urgent running sequence is preempted: its blocks are
freed and it is recomputed later. Nothing ever crashes for lack of blocks.
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass, field

from specache.engine.sequence import Sequence, Status
from specache.kv.block_pool import BlockPool


@dataclass
class SchedulerConfig:
    max_num_seqs: int = 32
    max_num_batched_tokens: int = 2048
    max_model_len: int = 8192


@dataclass
class ScheduledSeq:
    seq: Sequence
    num_new_tokens: int  # tokens computed this step, from position seq.num_computed
    num_spec_slots: int = 0  # extra KV slots reserved for draft tokens verified this step


@dataclass
class SchedulerOutput:
    scheduled: list[ScheduledSeq] = field(default_factory=list)
    preempted: list[Sequence] = field(default_factory=list)

    @property
    def num_tokens(self) -> int:
        return sum(s.num_new_tokens + s.num_spec_slots for s in self.scheduled)


def _urgency(seq: Sequence) -> tuple[int, float]:
    return (seq.priority, seq.arrival)


class Scheduler:
    def __init__(self, config: SchedulerConfig, pool: BlockPool, prefix_cache=None, host_tier=None) -> None:
        self.config = config
        self.pool = pool
        self.prefix_cache = prefix_cache
        self.host_tier = host_tier  # CPU tier of the prefix cache: continues a match past the tree
        self.waiting: list[Sequence] = []
        self.running: list[Sequence] = []
        self.num_preemptions = 0

    # -------------------------------------------------------------- queue management

    def add(self, seq: Sequence) -> None:
        seq.status = Status.WAITING
        self.waiting.append(seq)

    def has_unfinished(self) -> bool:
        return bool(self.waiting or self.running)

    def finish(self, seq: Sequence, reason: str) -> None:
        """Mark finished, hand full blocks to the prefix cache, free the sequence's blocks."""
        seq.status = Status.FINISHED
        seq.finish_reason = reason
        if seq in self.running:
            self.running.remove(seq)
        if seq in self.waiting:
            self.waiting.remove(seq)
        self.cache_prefix(seq)
        self._release(seq)

    def cache_prefix(self, seq: Sequence) -> None:
        if self.prefix_cache is not None and seq.num_computed >= self.pool.block_size:
            self.prefix_cache.insert(seq.tokens[: seq.num_computed], seq.block_table, seq.cache_salt)

    def _release(self, seq: Sequence) -> None:
        if seq.block_table:
            self.pool.free(seq.block_table)
        seq.block_table = []
        if seq.prefix_node is not None:
            self.prefix_cache.unlock(seq.prefix_node)
            seq.prefix_node = None

    def _preempt(self, seq: Sequence, out: SchedulerOutput) -> None:
        self.running.remove(seq)
        self._release(seq)
        seq.num_computed = 0
        seq.status = Status.WAITING
        seq.num_preemptions += 1
        self.num_preemptions += 1
        self.waiting.append(seq)
        out.preempted.append(seq)

    def trim_blocks(self, seq: Sequence, num_tokens: int) -> None:
        """Free blocks past what ``num_tokens`` cached tokens need (speculative rollback)."""
        self.pool.trim(seq.block_table, num_tokens)

    # -------------------------------------------------------------- block allocation

    def _make_room(self, blocks: int) -> bool:
        if self.pool.num_free < blocks and self.prefix_cache is not None:
            self.prefix_cache.evict(blocks - self.pool.num_free)
        return self.pool.num_free >= blocks

    def _grow(self, seq: Sequence, num_tokens: int) -> bool:
        """Make seq's block table cover ``num_tokens`` positions."""
        need = self.pool.blocks_needed(num_tokens) - len(seq.block_table)
        if need <= 0:
            return True
        if not self._make_room(need):
            return False
        tail = seq.block_table[-1] if seq.block_table else None
        seq.block_table.extend(self.pool.allocate(need, after=tail, spread=tail is None))
        return True

    # -------------------------------------------------------------- the step

    def schedule(self, spec_slots: Callable[[Sequence], int] | None = None) -> SchedulerOutput:
        out = SchedulerOutput()
        budget = self.config.max_num_batched_tokens
        self.running.sort(key=_urgency)
        self.waiting.sort(key=_urgency)
        budget = self._schedule_running(out, budget, spec_slots)
        if out.preempted:  # victims rejoin the queue in urgency order, ahead of less urgent arrivals
            self.waiting.sort(key=_urgency)
        budget += self._preempt_for_urgent_waiting(out)
        self._schedule_waiting(out, budget)
        return out

    def _schedule_running(self, out: SchedulerOutput, budget: int, spec_slots) -> int:
        i = 0
        while i < len(self.running) and budget > 0:
            seq = self.running[i]
            remaining = seq.num_tokens - seq.num_computed
            n = min(remaining, budget)
            k = 0
            if remaining == 1 and spec_slots is not None:
                # verifying k drafts yields up to k + 1 tokens: none past max_tokens or the context
                left = seq.params.max_tokens - len(seq.output_ids)
                k = max(min(spec_slots(seq), budget - 1, self.config.max_model_len - seq.num_tokens, left - 1), 0)
            while not self._grow(seq, seq.num_computed + n + k):
                if k:  # drafts are optional: drop them before preempting anyone for their slots
                    k = 0
                    continue
                victim = self.running[-1]
                self._preempt(victim, out)
                if victim is seq:
                    break
            if seq.status is not Status.RUNNING:
                continue  # preempted itself; running[i] is now the next sequence
            out.scheduled.append(ScheduledSeq(seq, n, k))
            budget -= n + k
            i += 1
        return budget

    def _preempt_for_urgent_waiting(self, out: SchedulerOutput) -> int:
        """A full batch yields its least urgent member to a strictly more urgent arrival.

        Returns the token budget the victim had been given this step (now the arrival's)."""
        if not self.waiting or len(self.running) < self.config.max_num_seqs:
            return 0
        head, worst = self.waiting[0], self.running[-1]
        if head.priority >= worst.priority:
            return 0
        freed = sum(s.num_new_tokens + s.num_spec_slots for s in out.scheduled if s.seq is worst)
        out.scheduled = [s for s in out.scheduled if s.seq is not worst]
        self._preempt(worst, out)
        self.waiting.sort(key=_urgency)
        return freed

    def _admit_prefix(self, seq: Sequence) -> None:
        if self.prefix_cache is None or seq.num_computed or seq.block_table:
            return
        match = self.prefix_cache.match_prefix(seq.tokens, seq.cache_salt)
        self.prefix_cache.adopt(seq, match)
        restored = self._restore_from_host(seq)
        cached = match.num_tokens + restored
        if not seq.num_preemptions or cached >= seq.num_cached_prefix:
            seq.num_cached_prefix, seq.num_host_cached = cached, restored

    def _restore_from_host(self, seq: Sequence) -> int:
        """Continue the tree's match block by block from the CPU tier: each hit gets a device block
        with its K/V copied back, and the run is inserted into the tree so later requests share it.
        Returns the tokens restored. Stops at the first miss (a block's K/V need all before it)."""
        tier, bs = self.host_tier, self.pool.block_size
        if tier is None or not len(tier):
            return 0
        first, limit = seq.num_computed // bs, (seq.num_tokens - 1) // bs  # match_prefix's limit
        if first >= limit:
            return 0
        tier.count_lookup()
        new: list[int] = []
        for key in tier.block_keys(seq.tokens, seq.cache_salt, limit)[first:]:
            # Checked before making room: evicting a device block for nothing would be a loss.
            if key not in tier or not self._make_room(1):
                break
            tail = new[-1] if new else (seq.block_table[-1] if seq.block_table else None)
            block = self.pool.allocate(1, after=tail)[0]  # contiguous with the match where free
            if not tier.load(key, block):  # the block just evicted to make room pushed it out
                self.pool.free([block])
                break
            new.append(block)
        if new:
            seq.block_table.extend(new)
            seq.num_computed = len(seq.block_table) * bs
            self.prefix_cache.insert(seq.tokens[: seq.num_computed], seq.block_table, seq.cache_salt)
        return len(new) * bs

    def _schedule_waiting(self, out: SchedulerOutput, budget: int) -> None:
        while self.waiting and budget > 0 and len(self.running) < self.config.max_num_seqs:
            seq = self.waiting[0]
            self._admit_prefix(seq)
            n = min(seq.num_tokens - seq.num_computed, budget)
            if not self._grow(seq, seq.num_computed + n):
                self._release(seq)  # give back the prefix blocks; retry when memory frees up
                seq.num_computed = 0
                break
            self.waiting.pop(0)
            seq.status = Status.RUNNING
            self.running.append(seq)
            out.scheduled.append(ScheduledSeq(seq, n))
            budget -= n
