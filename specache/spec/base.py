"""The one proposer interface every speculative method implements.

A proposer only guesses; it never decides. The engine asks it for up to K tokens per sequence,
runs the target once over [last token, drafts...], and `spec.verify.verify` decides what is kept.
Proposers that sample their guesses return the distribution q they sampled from, so sampled
requests stay lossless; deterministic proposers (n-gram lookup, greedy drafters) return None.
"""

from __future__ import annotations

from abc import ABC, abstractmethod
from collections.abc import Hashable
from dataclasses import dataclass, field

import torch

from specache.sampling import SamplingParams, TokenRandom

# A proposer's draft_kind when it has nothing to propose for the sequence this step (no slots).
NOTHING_TO_DRAFT = "nothing to draft"


@dataclass
class DraftRequest:
    seq_id: int
    token_ids: list[int]  # prompt + generated so far (the last one is not yet in the KV cache)
    num_tokens: int  # K wanted for this sequence (0 = none)
    params: SamplingParams
    # the sequence's random numbers: a model drafter samples its token for position i with
    # uniform(i, DRAFT), so its drafts depend on nothing else in the batch
    random: TokenRandom = field(default_factory=TokenRandom)
    cache_salt: Hashable = None  # the request's tenant: a drafter's prefix cache shares only within it

    def draft_uniform(self, step: int) -> float:
        """The uniform a model drafter samples its `step`-th draft token with (0: the first)."""
        return self.random.uniform(len(self.token_ids) + step, TokenRandom.DRAFT)


@dataclass
class Draft:
    tokens: list[int]  # len <= num_tokens; may be empty (no proposal)
    # [len(tokens), V]: the distribution q each token was drawn from; None = deterministic (one-hot q).
    probs: torch.Tensor | None = None


class Proposer(ABC):
    name: str = "proposer"
    # Drafting costs nothing next to a decode step (a lookup, no model): the decoder may then draft
    # in the shadow for sequences that are switched off, to learn when drafting would pay again.
    free_to_draft: bool = False
    # Has a paid source to draft with when its free drafts are not paying (see fall_back).
    can_fall_back: bool = False

    @abstractmethod
    def propose(self, requests: list[DraftRequest]) -> list[Draft]:
        """One draft per request, in request order."""

    def drafts_free_for(self, seq_id: int, token_ids: list[int]) -> bool:
        """Whether this sequence's next draft will cost nothing next to a target pass (the controller
        then leaves drafting out of the step's cost, and the decoder does not time it)."""
        return self.free_to_draft

    def draft_kind(self, seq_id: int, token_ids: list[int]) -> Hashable:
        """A label for the sequence's next draft that predicts its acceptance (prompt lookup: how
        many tokens matched); the controller keeps an acceptance rate per kind. NOTHING_TO_DRAFT
        when there will be no draft this step."""
        return None

    def shadow_draft(self, request: DraftRequest) -> list[int]:
        """A free draft to compare with what decoding then produces (only asked of proposers that
        have free drafts: prompt lookup, or the lookup side of `auto`)."""
        return self.propose([request])[0].tokens if self.free_to_draft else []

    def fall_back(self, seq_id: int, token_ids: list[int]) -> bool:
        """Asked when the sequence's free drafts are not paying: draft it this step with a paid
        source instead if there is one (returns True), else False."""
        return False

    def on_verified(self, seq_id: int, num_accepted: int) -> None:  # noqa: B027 - optional hook
        """Called after verification; model drafters roll their KV back to the accepted prefix."""

    def release(self, seq_id: int) -> None:  # noqa: B027 - optional hook
        """The sequence finished (or was aborted): drop whatever state is kept for it."""

    def stats(self) -> dict:
        """The proposer's own figures for the engine's spec stats (a draft model's cache)."""
        return {}
