"""Self-drafting by early exit: the target's first L layers + its final norm and LM head.

The drafter writes its K/V into the target's own cache (layers < L, at the draft positions
the scheduler reserved); the verification pass recomputes those positions through every
layer and overwrites them, so nothing needs rolling back.
"""

from __future__ import annotations

import torch

from specache.engine.runner import BatchItem, ModelRunner
from specache.engine.sequence import Sequence
from specache.sampling import logits_to_probs, sample
from specache.spec.base import Draft, DraftRequest, Proposer
from specache.spec.draft import _draft_generator


class LayerSkipProposer(Proposer):
    def __init__(self, runner: ModelRunner, num_layers: int, seqs: dict[int, Sequence]) -> None:
        if not 0 < num_layers < runner.model.num_layers:
            raise ValueError(f"layer-skip needs 0 < L < {runner.model.num_layers}, got {num_layers}")
        self.name = f"layer-skip:{num_layers}"
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
            for r, tok, row in zip(live, sample(p, params, [_draft_generator(r.params) for r in live]), p,
                                   strict=True):
                tokens[r.seq_id].append(tok)
                probs[r.seq_id].append(row)
        return [Draft(tokens[r.seq_id], torch.stack(probs[r.seq_id]) if probs[r.seq_id] else None)
                for r in requests]
