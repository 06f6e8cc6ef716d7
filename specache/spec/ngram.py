"""Prompt lookup: propose the tokens that followed the most recent earlier occurrence of the last
n tokens (n from max_ngram down to min_ngram) anywhere in prompt + output. No model, no training;
it pays on input-grounded work (editing code, quoting, extraction, repeating earlier answers).

Cost: one vectorised comparison of the last token against the whole history finds every
candidate; the candidates are then filtered backwards one position at a time (at most max_ngram
steps, each over the surviving candidates only). The token history is kept per sequence as a
numpy buffer that only grows by the newly generated tokens, because converting an 8k-token Python
list every step would cost more than the search itself.

When the chosen occurrence overlaps the end of the text (a loop such as "a b a b"), the tokens that
followed it run out before K; the continuation is then periodic with period (end - occurrence),
so it is extended by repetition (`extend_periodic`), which is what the same lookup would propose
again after each accepted token.
"""

from __future__ import annotations

import numpy as np

from specache.spec.base import Draft, DraftRequest, Proposer


def lookup(tokens: np.ndarray, k: int, max_ngram: int = 4, min_ngram: int = 1,
           extend_periodic: bool = True) -> list[int]:
    """Up to k tokens that followed the latest earlier match of the longest matching suffix."""
    length = len(tokens)
    if k <= 0 or length < min_ngram + 1:
        return []
    # Ends j < length - 1 (something must follow) of 1-token matches, ascending.
    ends = np.flatnonzero(tokens[:-1] == tokens[-1])
    n = 1
    # Grow the match one token back at a time, keeping only the ends that still match; the last
    # non-empty set holds the longest matches and its largest element is the most recent one.
    while ends.size and n < max_ngram:
        longer = ends[ends >= n]
        longer = longer[tokens[longer - n] == tokens[length - 1 - n]] if longer.size else longer
        if not longer.size:
            break
        ends, n = longer, n + 1
    if not ends.size or n < min_ngram:
        return []
    end = int(ends[-1])
    cont = tokens[end + 1: end + 1 + k]
    if extend_periodic and len(cont) < k:
        cont = np.resize(cont, k)  # cont runs to the end of the text: its period is len(cont)
    return cont.tolist()


class _History:
    """A growing int32 copy of one sequence's token ids (amortised O(new tokens) per step)."""

    def __init__(self) -> None:
        self.buf = np.empty(256, dtype=np.int32)
        self.n = 0

    def sync(self, token_ids: list[int]) -> np.ndarray:
        n = self.n
        # Cheap identity check: same length-so-far and same last/first tokens, else rebuild.
        if n == 0 or len(token_ids) < n or token_ids[n - 1] != self.buf[n - 1] or token_ids[0] != self.buf[0]:
            n = 0
        new = token_ids[n:]
        need = n + len(new)
        if need > len(self.buf):
            grown = np.empty(max(need, 2 * len(self.buf)), dtype=np.int32)
            grown[:n] = self.buf[:n]
            self.buf = grown
        self.buf[n:need] = new
        self.n = need
        return self.buf[:need]


class NgramProposer(Proposer):
    free_to_draft = True

    def __init__(self, max_ngram: int = 4, min_ngram: int = 1, name: str = "ngram",
                 extend_periodic: bool = True) -> None:
        if not 1 <= min_ngram <= max_ngram:
            raise ValueError(f"need 1 <= min_ngram <= max_ngram, got {min_ngram}, {max_ngram}")
        self.name = name
        self.max_ngram = max_ngram
        self.min_ngram = min_ngram
        self.extend_periodic = extend_periodic
        self._histories: dict[int, _History] = {}

    def propose(self, requests: list[DraftRequest]) -> list[Draft]:
        drafts = []
        for r in requests:
            if r.num_tokens <= 0 or not r.token_ids:
                drafts.append(Draft([], None))
                continue
            tokens = self._histories.setdefault(r.seq_id, _History()).sync(r.token_ids)
            drafts.append(Draft(lookup(tokens, r.num_tokens, self.max_ngram, self.min_ngram,
                                       self.extend_periodic), None))
        return drafts

    def release(self, seq_id: int) -> None:
        self._histories.pop(seq_id, None)
