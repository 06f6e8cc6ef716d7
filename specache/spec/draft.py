"""A separate draft model with the same tokenizer ("draft:PATH"), with its own paged KV cache
(its layers differ from the target's, so it cannot read the target's K/V; self-drafters can,
see layer_skip.py).

Per sequence the drafter remembers how many tokens its cache holds; after verification it
rolls that back to the accepted prefix, so rejected drafts leave no trace.
"""

from __future__ import annotations

import torch

from specache.engine.runner import BatchItem, ModelRunner
from specache.engine.sequence import Sequence
from specache.kv.block_pool import BlockPool
from specache.kv.cache import KVCache
from specache.models.llama import LlamaModel
from specache.sampling import logits_to_probs, make_generator, sample
from specache.spec.base import Draft, DraftRequest, Proposer


class _DraftSeq(Sequence):
    """The drafter's view of a sequence: only the token list and the block table matter."""

    # where this step's drafts begin in `tokens` (the target's length then); None once verified
    draft_start: int | None = None


class ModelProposer(Proposer):
    def __init__(self, model: LlamaModel, num_blocks: int, block_size: int, name: str = "draft") -> None:
        c = model.config
        self.name = name
        self.model = model
        self.pool = BlockPool(num_blocks, block_size)
        self.runner = ModelRunner(model, KVCache(c.num_layers, num_blocks, block_size, c.num_kv_heads,
                                                 c.head_dim, model.dtype, model.device))
        self.seqs: dict[int, _DraftSeq] = {}
        self.vocab = c.vocab_size
        self.generators = DraftGenerators()

    def _state(self, req: DraftRequest) -> _DraftSeq:
        st = self.seqs.get(req.seq_id)
        if st is None:
            st = self.seqs[req.seq_id] = _DraftSeq(req.seq_id, "", 0, [], req.params)
        # The target may have rewritten history (rejected drafts): keep only the common prefix.
        common = 0
        limit = min(st.num_computed, len(req.token_ids))
        while common < limit and st.tokens[common] == req.token_ids[common]:
            common += 1
        st.tokens = list(req.token_ids)
        st.num_computed = common
        st.draft_start = len(req.token_ids)
        return st

    def _ensure_blocks(self, st: _DraftSeq, num_tokens: int) -> bool:
        need = self.pool.blocks_needed(num_tokens) - len(st.block_table)
        if need > self.pool.num_free:
            return False
        if need > 0:
            st.block_table += self.pool.allocate(need, after=st.block_table[-1] if st.block_table else None)
        return True

    @torch.inference_mode()
    def propose(self, requests: list[DraftRequest]) -> list[Draft]:
        active = [r for r in requests if r.num_tokens > 0]
        states = {r.seq_id: self._state(r) for r in active}
        active = [r for r in active if self._ensure_blocks(states[r.seq_id], len(r.token_ids) + r.num_tokens)]
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
            logits = torch.cat(self.runner.run(items))
            params = [r.params for r in live]
            p = logits_to_probs(logits, params, [r.token_ids for r in live], [tokens[r.seq_id] for r in live])
            picked = sample(p, params, [self.generators.get(r) for r in live])
            for r, tok, row in zip(live, picked, p, strict=True):
                st = states[r.seq_id]
                st.num_computed = st.num_tokens
                st.tokens.append(tok)
                tokens[r.seq_id].append(tok)
                probs[r.seq_id].append(row)
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
        self.generators.release(seq_id)
        st = self.seqs.pop(seq_id, None)
        if st is not None and st.block_table:
            self.pool.free(st.block_table)


class DraftGenerators:
    """Each sequence's own generator for the tokens a model drafts. One generator shared by every
    request made a seeded request's drafts, and so its text, depend on every request before it and
    beside it. Seeded from the sequence's sampling seed, never its generator itself: those draws
    belong to verification (losslessness only needs q to be the distribution a draft came from)."""

    def __init__(self) -> None:
        self._generators: dict[int, torch.Generator] = {}

    def get(self, request: DraftRequest) -> torch.Generator:
        g = self._generators.get(request.seq_id)
        if g is None:
            seed = None if request.seed is None else (request.seed * _LCG_MULTIPLIER + _LCG_INCREMENT) % (1 << 63)
            g = self._generators[request.seq_id] = make_generator(seed)
        return g

    def release(self, seq_id: int) -> None:
        self._generators.pop(seq_id, None)


# A fixed map from the request's seed to its drafts' seed (Knuth's MMIX LCG step), so the two
# streams differ for the same seed.
_LCG_MULTIPLIER, _LCG_INCREMENT = 6364136223846793005, 1442695040888963407
