"""Self-drafting inside the target's own KV cache: early exit ("layer-skip:L", the target's first
L layers + its final norm and LM head) or, with the same machinery, the whole target with int8
weights ("quantized").

The drafter reads the target's K/V for every verified position, so it needs no cache of its own
and never catches up on a prompt (a separate cache made the first draft of each request cost a
full prefill). It writes its own K/V only at the draft positions the scheduler reserved; the
verification pass recomputes those positions through every layer and overwrites them, so nothing
needs rolling back.
"""

from __future__ import annotations

import torch

from specache.engine.runner import BatchItem, ModelRunner
from specache.engine.sequence import Sequence
from specache.sampling import logits_to_probs, sample
from specache.spec.base import Draft, DraftRequest, Proposer


class SelfDraftProposer(Proposer):
    def __init__(self, runner: ModelRunner, seqs: dict[int, Sequence], num_layers: int | None = None,
                 name: str | None = None) -> None:
        """runner: the target's cache with the drafting model (the target itself, or a copy with
        other weights); num_layers: exit after that many layers (None: all)."""
        total = runner.model.num_layers
        if num_layers is not None and not 0 < num_layers < total:
            raise ValueError(f"layer-skip needs 0 < L < {total}, got {num_layers}")
        self.name = name or (f"layer-skip:{num_layers}" if num_layers else "self-draft")
        self.runner = runner
        self.num_layers = num_layers
        self.seqs = seqs  # the engine's live sequences by id (for block tables)

    @torch.inference_mode()
    def propose(self, requests: list[DraftRequest]) -> list[Draft]:
        tokens: dict[int, list[int]] = {r.seq_id: [] for r in requests}
        probs: dict[int, list[torch.Tensor]] = {r.seq_id: [] for r in requests}
        for step in range(max((r.num_tokens for r in requests), default=0)):
            live = [r for r in requests if r.num_tokens > step]
            items = [BatchItem(self.seqs[r.seq_id], [(r.token_ids + tokens[r.seq_id])[-1]],
                               len(r.token_ids) - 1 + step, 1) for r in live]
            logits = torch.cat(self.runner.run(items, num_layers=self.num_layers))
            params = [r.params for r in live]
            p = logits_to_probs(logits, params, [r.token_ids for r in live], [tokens[r.seq_id] for r in live])
            for r, tok, row in zip(live, sample(p, params, [r.draft_uniform(step) for r in live]), p,
                                   strict=True):
                tokens[r.seq_id].append(tok)
                probs[r.seq_id].append(row)
        return [Draft(tokens[r.seq_id], torch.stack(probs[r.seq_id]) if probs[r.seq_id] else None)
                for r in requests]
