"""`auto`: prompt lookup where the output is copying its context, the target's int8 self-draft
everywhere else (on a dense target: an int8 or hybrid target already decodes with the int8
weights, so there `auto` is prompt lookup alone, see build_proposer).

Prompt lookup is nearly free and accepted almost always while a model quotes, edits or repeats
its input, but has nothing to offer on open-ended text; the quantized self-draft costs a pass of
the int8 model per drafted token and is accepted ~95% of the time on any text (bench spec:
1.15-1.6x on every task, 3-4x for lookup on copy tasks). A lookup hit only counts when at least
`min_match` tokens match: single-token matches are guesses, and there the model drafts better.
The controller is told which source a sequence's next draft comes from (`drafts_free_for`), so it
sizes K for a free lookup draft or for a paid model draft; while a sequence's lookup hits are not
being accepted, it drafts with the model (`fall_back`) and the decoder keeps checking the lookup
hits in the shadow, so lookup comes back when the text turns into a copy.
"""

from __future__ import annotations

from collections.abc import Hashable

from specache.spec.base import Draft, DraftRequest, Proposer
from specache.spec.ngram import NgramProposer


class AutoProposer(Proposer):
    name = "auto"
    can_fall_back = True

    def __init__(self, model_drafter: Proposer, min_match: int = 3, max_ngram: int = 8) -> None:
        self.lookup = NgramProposer(max_ngram=max_ngram, min_ngram=min_match, name="auto-lookup")
        self.model_drafter = model_drafter
        # seq_id -> token count at which its lookup hits stopped paying: the model drafts it at
        # that length (the mark expires by itself once the sequence grows)
        self._model_at: dict[int, int] = {}
        self.lookup_drafts = 0  # drafts made by each source (reported in the decoder's stats)
        self.model_drafts = 0
        self.model_draft_tokens = 0  # tokens the model drafted: what its drafting cost scales with

    def _lookup(self, seq_id: int, token_ids: list[int]) -> list[int]:
        return self.lookup.match(seq_id, token_ids)[0]

    def drafts_free_for(self, seq_id: int, token_ids: list[int]) -> bool:
        return self._model_at.get(seq_id) != len(token_ids) and bool(self._lookup(seq_id, token_ids))

    def draft_kind(self, seq_id: int, token_ids: list[int]) -> Hashable:
        """A lookup hit's match length, or "model" for a model draft."""
        if self.drafts_free_for(seq_id, token_ids):
            return self.lookup.draft_kind(seq_id, token_ids)
        return "model"

    def fall_back(self, seq_id: int, token_ids: list[int]) -> bool:
        self._model_at[seq_id] = len(token_ids)
        return True

    def shadow_draft(self, request: DraftRequest) -> list[int]:
        return self._lookup(request.seq_id, request.token_ids)[: request.num_tokens]

    def propose(self, requests: list[DraftRequest]) -> list[Draft]:
        drafts: list[Draft | None] = [None] * len(requests)
        misses = []
        for i, r in enumerate(requests):
            free = r.num_tokens > 0 and self.drafts_free_for(r.seq_id, r.token_ids)
            hit = self._lookup(r.seq_id, r.token_ids)[: r.num_tokens] if free else []
            if hit or r.num_tokens <= 0:
                drafts[i] = Draft(hit, None)
                self.lookup_drafts += bool(hit)
            else:
                misses.append(i)
        if misses:
            for i, d in zip(misses, self.model_drafter.propose([requests[i] for i in misses]), strict=True):
                drafts[i] = d
                self.model_draft_tokens += len(d.tokens)
            self.model_drafts += len(misses)
        return drafts

    def on_verified(self, seq_id: int, num_accepted: int) -> None:
        self.model_drafter.on_verified(seq_id, num_accepted)

    def release(self, seq_id: int) -> None:
        self._model_at.pop(seq_id, None)
        self.lookup.release(seq_id)
        self.model_drafter.release(seq_id)
