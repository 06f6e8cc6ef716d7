"""Prompt lookup: propose the tokens that followed the most recent earlier occurrence of the last
n tokens (n from max_ngram down to min_ngram) anywhere in prompt + output. No model, no training;
it pays on input-grounded work (editing code, quoting, extraction, repeating earlier answers).

Cost: one backward scan over the history in the native kernels (`ngram_match`: ~1 us for 500
tokens, stopping at the first full-length match), or where they are not built one vectorised
comparison of the last token against the whole history that finds every candidate, then filtered
backwards one position at a time (~20-50 us). The token history is kept per sequence as a numpy
buffer that only grows by the newly generated tokens, because converting an 8k-token Python list
every step would cost more than the search itself.

When the chosen occurrence overlaps the end of the text (a loop such as "a b a b"), the tokens that
followed it run out before K; the continuation is then periodic with period (end - occurrence),
so it is extended by repetition (`extend_periodic`), which is what the same lookup would propose
again after each accepted token.

How many tokens matched also predicts whether the draft will be accepted: on bench spec's tasks
the first drafted token was accepted after 8+ matched tokens ~97% of the time (with ~11 of 16
drafted tokens accepted on average), after a single matched token 8-35% (by task). So the match length is
the draft's kind (`draft_kind`): the controller learns an acceptance rate per length and drafts
up to K = 16 tokens while the output is copying, a few or none after a short match.
"""

from __future__ import annotations

from collections.abc import Hashable

import numpy as np

from specache import kernels
from specache.config import MAX_SPEC_TOKENS
from specache.spec.base import NOTHING_TO_DRAFT, Draft, DraftRequest, Proposer
from specache.spec.verify import verify_greedy_targets

# The proposer's match lengths (NgramProposer's defaults; replay_passes replays the same lookup)
MAX_NGRAM, MIN_NGRAM = 8, 1


def find_match(tokens: np.ndarray, max_ngram: int = 4, min_ngram: int = 1) -> tuple[int, int]:
    """(end, n): the latest earlier occurrence of the longest suffix of n tokens (max_ngram >= n >=
    min_ngram) that something follows; end is the index of its last token. (-1, 0) when none.
    The native scan where the kernels are built (~1 us against ~20-50 us here, for every decoding
    sequence every step), else numpy."""
    native = kernels.load()
    if native is not None and tokens.dtype == np.int32:
        return native.ngram_match(tokens, max_ngram, min_ngram)
    return find_match_numpy(tokens, max_ngram, min_ngram)


def find_match_numpy(tokens: np.ndarray, max_ngram: int = 4, min_ngram: int = 1) -> tuple[int, int]:
    """find_match in vector operations: every 1-token match at once, then filtered backwards."""
    length = len(tokens)
    if length < min_ngram + 1:
        return -1, 0
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
        return -1, 0
    return int(ends[-1]), n


def continuation(tokens: np.ndarray, end: int, k: int, extend_periodic: bool = True) -> list[int]:
    """Up to k tokens that followed tokens[end]."""
    cont = tokens[end + 1: end + 1 + k]
    if extend_periodic and len(cont) < k:
        cont = np.resize(cont, k)  # cont runs to the end of the text: its period is len(cont)
    return cont.tolist()


def lookup(tokens: np.ndarray, k: int, max_ngram: int = 4, min_ngram: int = 1,
           extend_periodic: bool = True) -> list[int]:
    """Up to k tokens that followed the latest earlier match of the longest matching suffix."""
    return lookup_with_length(tokens, k, max_ngram, min_ngram, extend_periodic)[0]


def lookup_with_length(tokens: np.ndarray, k: int, max_ngram: int = 4, min_ngram: int = 1,
                       extend_periodic: bool = True) -> tuple[list[int], int]:
    """`lookup`'s draft and how many tokens matched (0: no match, no draft)."""
    end, n = find_match(tokens, max_ngram, min_ngram) if k > 0 else (-1, 0)
    return (continuation(tokens, end, k, extend_periodic) if n else []), n


def replay_passes(prompt: list[int], output: list[int], k: int, max_ngram: int = MAX_NGRAM,
                  min_ngram: int = MIN_NGRAM) -> int:
    """Target passes that greedy prompt lookup needs to decode `output` after `prompt` when every
    step drafts k tokens and verification keeps the draft's prefix that equals `output`, plus one
    token: the lookup's ceiling on this text, model-free. The first output token comes from the
    prompt's pass (never drafted), so plain decoding needs len(output) - 1 passes after it; the
    ratio of the two is the speedup the lookup would give if verifying k + 1 tokens cost what
    decoding one does."""
    tokens = np.asarray(list(prompt) + list(output), dtype=np.int32)
    done, passes = len(prompt) + 1, 0
    while done < len(tokens):
        # no drafts past the text's end, as the scheduler drafts none past max_tokens
        draft = lookup(tokens[:done], min(k, len(tokens) - done - 1), max_ngram, min_ngram)
        done += len(verify_greedy_targets(draft, tokens[done: done + len(draft) + 1].tolist()).tokens)
        passes += 1
    return passes


class _History:
    """A growing int32 copy of one sequence's token ids (amortised O(new tokens) per step)."""

    def __init__(self) -> None:
        self.buf = np.empty(256, dtype=np.int32)
        self.n = 0
        self.first = self.last = -1  # tokens[0] and tokens[n - 1] as Python ints: cheap to compare

    def sync(self, token_ids: list[int]) -> np.ndarray:
        n = self.n
        # Cheap identity check: same length-so-far and same last/first tokens, else rebuild.
        if n == 0 or len(token_ids) < n or token_ids[n - 1] != self.last or token_ids[0] != self.first:
            n = 0
        need = len(token_ids)
        if need > len(self.buf):
            grown = np.empty(max(need, 2 * len(self.buf)), dtype=np.int32)
            grown[:n] = self.buf[:n]
            self.buf = grown
        if need == n + 1:  # the usual step: one new token (a slice from a list converts a list)
            self.buf[n] = token_ids[n]
        else:
            self.buf[n:need] = token_ids[n:]
        self.n = need
        self.first, self.last = (token_ids[0], token_ids[-1]) if need else (-1, -1)
        return self.buf[:need]


class NgramProposer(Proposer):
    free_to_draft = True

    def __init__(self, max_ngram: int = MAX_NGRAM, min_ngram: int = MIN_NGRAM, name: str = "ngram",
                 extend_periodic: bool = True) -> None:
        if not 1 <= min_ngram <= max_ngram:
            raise ValueError(f"need 1 <= min_ngram <= max_ngram, got {min_ngram}, {max_ngram}")
        self.name = name
        self.max_ngram = max_ngram
        self.min_ngram = min_ngram
        self.extend_periodic = extend_periodic
        self._histories: dict[int, _History] = {}
        # seq_id -> [token count, last token, match end, match length, the draft or None until
        # asked for]: scheduling asks for the match length (the draft's kind) every step, drafting
        # then reuses the same lookup; most steps of open-ended text draft nothing, so the draft
        # itself is only cut from the history when one is wanted
        self._matches: dict[int, list] = {}

    def _lookup(self, seq_id: int, token_ids: list[int]) -> list:
        cached = self._matches.get(seq_id)
        if cached is None or cached[0] != len(token_ids) or cached[1] != token_ids[-1]:
            history = self._histories.get(seq_id)
            if history is None:
                history = self._histories[seq_id] = _History()
            tokens = history.sync(token_ids)
            end, n = find_match(tokens, self.max_ngram, self.min_ngram)
            cached = self._matches[seq_id] = [len(token_ids), token_ids[-1], end, n, None]
        return cached

    def match_length(self, seq_id: int, token_ids: list[int]) -> int:
        """How many of the text's last tokens matched an earlier occurrence (0: none, no draft)."""
        return self._lookup(seq_id, token_ids)[3] if token_ids else 0

    def match(self, seq_id: int, token_ids: list[int]) -> tuple[list[int], int]:
        """The sequence's draft (up to MAX_SPEC_TOKENS tokens) and how many tokens matched (0: none)."""
        if not token_ids:
            return [], 0
        cached = self._lookup(seq_id, token_ids)
        if cached[4] is None:
            cached[4] = continuation(self._histories[seq_id].buf[: cached[0]], cached[2], MAX_SPEC_TOKENS,
                                     self.extend_periodic) if cached[3] else []
        return cached[4], cached[3]

    def draft_kind(self, seq_id: int, token_ids: list[int]) -> Hashable:
        """The match length: drafts after an 8-token match are accepted ~97% of the time on copy
        tasks, after a 1-token match ~40% (bench spec's tasks), so each length learns its own rate."""
        return self.match_length(seq_id, token_ids) or NOTHING_TO_DRAFT

    def propose(self, requests: list[DraftRequest]) -> list[Draft]:
        return [Draft(self.match(r.seq_id, r.token_ids)[0][: r.num_tokens] if r.num_tokens > 0 else [], None)
                for r in requests]

    def release(self, seq_id: int) -> None:
        self._histories.pop(seq_id, None)
        self._matches.pop(seq_id, None)
