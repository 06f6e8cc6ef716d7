"""A separate draft model with the same tokenizer ("draft:PATH"), with its own paged KV cache
(its layers differ from the target's, so it cannot read the target's K/V; self-drafters can,
see layer_skip.py).

Per sequence the drafter remembers how many tokens its cache holds; after verification it
rolls that back to the accepted prefix, so rejected drafts leave no trace.

Capacity. The draft cache has as many blocks as the target's, but the target shares prompt blocks
through its prefix cache and frees a preempted sequence's blocks, so the draft cache can run out
where the target does not: then a sequence simply got no drafts. So, with prefix caching on, the
drafter keeps a radix tree of its own over verified tokens (a request whose system prompt another
request drafted with catches up from the cached blocks instead of recomputing the prompt), and when
blocks run short it evicts the tree's least-recently-used leaves and then the caches of sequences
not drafting this step (waiting, preempted, or switched off), least recently drafted first: they
catch up from scratch if they draft again.
"""

from __future__ import annotations

import torch

from specache.engine.runner import BatchItem, ModelRunner
from specache.engine.sequence import Sequence
from specache.kv.block_pool import BlockPool
from specache.kv.cache import KVCache
from specache.models.llama import LlamaModel
from specache.prefix.radix import RadixCache
from specache.sampling import logits_to_probs, sample
from specache.spec.base import Draft, DraftRequest, Proposer


class _DraftSeq(Sequence):
    """The drafter's view of a sequence: only the token list and the block table matter."""

    # where this step's drafts begin in `tokens` (the target's length then); None once verified
    draft_start: int | None = None


class ModelProposer(Proposer):
    def __init__(self, model: LlamaModel, num_blocks: int, block_size: int, name: str = "draft",
                 prefix_sharing: bool = False) -> None:
        c = model.config
        self.name = name
        self.model = model
        self.pool = BlockPool(num_blocks, block_size)
        self.runner = ModelRunner(model, KVCache(c.num_layers, num_blocks, block_size, c.num_kv_heads,
                                                 c.head_dim, model.dtype, model.device))
        # Least recently drafted first: the order in which idle sequences' caches are evicted.
        self.seqs: dict[int, _DraftSeq] = {}
        self.vocab = c.vocab_size
        self.prefix = RadixCache(self.pool, block_size) if prefix_sharing else None
        self.evicted_seqs = 0  # idle sequences whose draft cache was given up for room
        self.computed_tokens = 0  # tokens the draft model ran over (catch-up and drafts)

    def _state(self, req: DraftRequest) -> _DraftSeq:
        st = self.seqs.pop(req.seq_id, None)
        if st is None:
            st = _DraftSeq(req.seq_id, "", 0, [], req.params, cache_salt=req.cache_salt)
        self.seqs[req.seq_id] = st  # now the most recently drafted
        # The target may have rewritten history (rejected drafts): keep only the common prefix.
        common = 0
        limit = min(st.num_computed, len(req.token_ids))
        while common < limit and st.tokens[common] == req.token_ids[common]:
            common += 1
        st.tokens = list(req.token_ids)
        self._rewind(st, common)
        st.draft_start = len(req.token_ids)
        if not st.block_table:
            self._match_prefix(st)
        return st

    def _rewind(self, st: _DraftSeq, num_tokens: int) -> None:
        """Keep the cache's first num_tokens tokens. A block the prefix tree (or another sequence)
        also holds is never written into: rewinding into one gives it up and recomputes its tokens
        in a block of this sequence's own."""
        bs = self.pool.block_size
        partial = num_tokens // bs
        if num_tokens % bs and partial < len(st.block_table) and self.pool.ref_count(st.block_table[partial]) > 1:
            num_tokens = partial * bs
        st.num_computed = min(st.num_computed, num_tokens)
        self.pool.trim(st.block_table, st.num_computed)

    def _match_prefix(self, st: _DraftSeq) -> None:
        """Start a sequence without cached tokens from the tree's longest match of its tokens."""
        if self.prefix is None:
            return
        self._drop_cache(st)
        self.prefix.adopt(st, self.prefix.match_prefix(st.tokens, st.cache_salt))

    def _cache_verified(self, st: _DraftSeq) -> None:
        """Hand the full blocks of the sequence's verified tokens to the tree."""
        verified = st.num_computed if st.draft_start is None else min(st.num_computed, st.draft_start)
        if self.prefix is not None and verified >= self.pool.block_size:
            self.prefix.insert(st.tokens[:verified], st.block_table, st.cache_salt)

    def _drop_cache(self, st: _DraftSeq) -> None:
        """Give back the sequence's blocks and its lock on the tree; it recomputes what it needs."""
        if st.block_table:
            self.pool.free(st.block_table)
        st.block_table = []
        st.num_computed = 0
        if st.prefix_node is not None:
            self.prefix.unlock(st.prefix_node)
            st.prefix_node = None

    def _ensure_blocks(self, st: _DraftSeq, num_tokens: int, drafting: set[int]) -> bool:
        need = self.pool.blocks_needed(num_tokens) - len(st.block_table)
        if need > self.pool.num_free:
            self._make_room(need, drafting)
        if need > self.pool.num_free:
            return False
        if need > 0:
            st.block_table += self.pool.allocate(need, after=st.block_table[-1] if st.block_table else None)
        return True

    def _make_room(self, blocks: int, drafting: set[int]) -> None:
        """Free up to `blocks` blocks: the tree's least recently used first, then the caches of the
        sequences not drafting this step, least recently drafted first."""
        if self.prefix is not None:
            self.prefix.evict(blocks - self.pool.num_free)
        for seq_id, st in self.seqs.items():
            if self.pool.num_free >= blocks:
                return
            if seq_id not in drafting and st.block_table:
                self._drop_cache(st)
                self.evicted_seqs += 1
                if self.prefix is not None:  # blocks it shared with the tree may now be evictable
                    self.prefix.evict(blocks - self.pool.num_free)

    @torch.inference_mode()
    def propose(self, requests: list[DraftRequest]) -> list[Draft]:
        active = [r for r in requests if r.num_tokens > 0]
        states = {r.seq_id: self._state(r) for r in active}
        drafting = set(states)
        active = [r for r in active
                  if self._ensure_blocks(states[r.seq_id], len(r.token_ids) + r.num_tokens, drafting)]
        tokens: dict[int, list[int]] = {r.seq_id: [] for r in requests}
        probs: dict[int, list[torch.Tensor]] = {r.seq_id: [] for r in requests}
        # Step 0 catches the draft cache up on everything it has not seen (cheap: usually 1-2 tokens).
        for step in range(max((r.num_tokens for r in active), default=0)):
            live = [r for r in active if r.num_tokens > step]
            if not live:
                break
            items = []
            for r in live:
                st = states[r.seq_id]
                new = st.tokens[st.num_computed:]
                items.append(BatchItem(st, new, st.num_computed, 1))
                self.computed_tokens += len(new)
            logits = torch.cat(self.runner.run(items))
            params = [r.params for r in live]
            p = logits_to_probs(logits, params, [r.token_ids for r in live], [tokens[r.seq_id] for r in live])
            picked = sample(p, params, [r.draft_uniform(step) for r in live])
            for r, tok, row in zip(live, picked, p, strict=True):
                st = states[r.seq_id]
                st.num_computed = st.num_tokens
                st.tokens.append(tok)
                tokens[r.seq_id].append(tok)
                probs[r.seq_id].append(row)
            if step == 0:  # a prompt caught up on: later requests with the same prefix may share it
                for item in items:
                    if len(item.token_ids) > self.pool.block_size:
                        self._cache_verified(item.seq)
        return [Draft(tokens[r.seq_id], torch.stack(probs[r.seq_id]) if probs[r.seq_id] else None)
                for r in requests]

    def on_verified(self, seq_id: int, num_accepted: int) -> None:
        """Roll the draft cache back to the verified prefix: the K/V of rejected drafts is dropped,
        and blocks that held only rejected drafts go back to the pool."""
        st = self.seqs.get(seq_id)
        if st is None or st.draft_start is None:
            return
        st.num_computed = min(st.num_computed, st.draft_start + num_accepted)
        st.draft_start = None
        self.pool.trim(st.block_table, st.num_computed)

    def release(self, seq_id: int) -> None:
        st = self.seqs.pop(seq_id, None)
        if st is not None:
            self._cache_verified(st)
            self._drop_cache(st)

    def stats(self) -> dict:
        out = {"draft_cache_evicted_seqs": self.evicted_seqs, "draft_model_tokens_computed": self.computed_tokens}
        if self.prefix is not None:
            out["draft_prefix_hit_tokens"] = self.prefix.stats()["hit_tokens"]
        return out
