"""Prompt-lookup proposer: matches, no match, K cap, most recent occurrence, batches, incremental history."""

from __future__ import annotations

import numpy as np
import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from specache.config import MAX_SPEC_TOKENS
from specache.sampling import SamplingParams
from specache.spec.base import Draft, DraftRequest
from specache.spec.ngram import NgramProposer, lookup, lookup_with_length, replay_passes

P = SamplingParams(temperature=0)


def propose(tokens: list[int], k: int, proposer: NgramProposer | None = None, seq_id: int = 0) -> list[int]:
    proposer = proposer or NgramProposer(max_ngram=4, min_ngram=1, extend_periodic=False)
    [draft] = proposer.propose([DraftRequest(seq_id, tokens, k, P)])
    assert draft.probs is None  # deterministic proposer: one-hot q
    return draft.tokens


def test_known_sequence_proposes_the_continuation():
    #        0  1  2  3  4  5  6  7  8  9
    text = [5, 6, 7, 8, 9, 10, 1, 2, 5, 6]
    assert propose(text, 3) == [7, 8, 9]


def test_no_match_gives_empty_draft():
    assert propose([1, 2, 3, 4, 5], 4) == []
    assert propose([7], 4) == []
    assert propose([], 4) == []


def test_k_caps_the_draft_and_zero_asks_for_nothing():
    text = [1, 2, 3, 4, 5, 6, 7, 8, 1, 2]
    assert propose(text, 2) == [3, 4]
    assert propose(text, 0) == []


def test_continuation_stops_at_the_end_of_the_text_without_periodic_extension():
    assert propose([1, 2, 3, 1, 2], 8) == [3, 1, 2]


def test_most_recent_occurrence_wins_among_equal_lengths():
    text = [1, 2, 30, 31, 1, 2, 40, 41, 9, 1, 2]
    assert propose(text, 2) == [40, 41]


def test_longer_match_beats_more_recent_shorter_one():
    # suffix [8, 1, 2]: matched (3 tokens) at the start; [1, 2] alone more recently
    text = [8, 1, 2, 30, 31, 1, 2, 40, 41, 8, 1, 2]
    assert propose(text, 2) == [30, 31]


def test_max_ngram_caps_the_match_length_so_recency_decides():
    text = [8, 1, 2, 30, 31, 1, 2, 40, 41, 8, 1, 2]
    short = NgramProposer(max_ngram=2, min_ngram=1, extend_periodic=False)
    assert propose(text, 2, short) == [40, 41]


def test_min_ngram_rejects_short_matches():
    text = [1, 50, 51, 9, 1]  # only a 1-token match
    assert propose(text, 2) == [50, 51]
    assert propose(text, 2, NgramProposer(max_ngram=4, min_ngram=2)) == []


def test_periodic_extension_fills_k_on_loops():
    proposer = NgramProposer()  # extend_periodic on by default
    assert propose([5, 1, 2, 3, 1, 2, 3], 7, proposer) == [1, 2, 3, 1, 2, 3, 1]
    assert propose([4, 4, 4], 5, proposer) == [4, 4, 4, 4, 4]


def test_batch_of_mixed_requests_keeps_order():
    proposer = NgramProposer(extend_periodic=False)
    reqs = [
        DraftRequest(1, [1, 2, 3, 1, 2], 1, P),
        DraftRequest(2, [9, 8, 7], 3, P),  # no match
        DraftRequest(3, [4, 5, 6, 4, 5], 0, P),  # K = 0
        DraftRequest(4, [7, 1, 7, 2, 7], 3, P),  # most recent "7" is followed by 2, 7
    ]
    assert proposer.propose(reqs) == [Draft([3], None), Draft([], None), Draft([], None), Draft([2, 7], None)]


def test_incremental_history_follows_growth_and_rebuilds_on_a_new_text():
    proposer = NgramProposer(extend_periodic=False)
    text = [1, 2, 3, 4, 5]
    assert propose(text, 2, proposer, seq_id=7) == []
    text += [1, 2]
    assert propose(text, 2, proposer, seq_id=7) == [3, 4]
    text += [3, 9, 9]
    assert propose(text, 2, proposer, seq_id=7) == [9]
    # same seq id, unrelated text (e.g. the id was reused without release): no stale history
    assert propose([6, 6, 1, 2], 2, proposer, seq_id=7) == []
    proposer.release(7)
    assert 7 not in proposer._histories


@settings(max_examples=100, deadline=None)
@given(st.lists(st.integers(0, 3), min_size=1, max_size=60), st.lists(st.integers(1, 3), max_size=30))
def test_incremental_lookups_agree_with_fresh_ones_and_cut_drafts_only_when_asked(tokens, steps):
    """One token or several per step, as decoding and accepted drafts grow the text: the kept
    history, the match length asked every step and the draft cut on demand equal a fresh lookup."""
    proposer = NgramProposer(max_ngram=4)
    seen, ends = 1, set()
    for grow in [0, *steps]:
        seen = min(len(tokens), seen + grow)
        text = tokens[:seen]
        fresh, length = lookup_with_length(np.asarray(text, dtype=np.int32), MAX_SPEC_TOKENS, 4, 1)
        assert proposer.match_length(0, text) == length
        if seen not in ends:  # a new text: the length alone leaves the draft uncut
            assert proposer._matches[0][4] is None
        ends.add(seen)
        assert proposer.match(0, text) == (fresh, length)


def brute_force(tokens: list[int], k: int, max_ngram: int, min_ngram: int) -> list[int]:
    """The definition, position by position: longest n first, then the latest occurrence."""
    length = len(tokens)
    for n in range(min(max_ngram, length - 1), min_ngram - 1, -1):
        suffix = tokens[length - n:]
        for start in range(length - n - 1, -1, -1):
            if tokens[start: start + n] == suffix:
                return tokens[start + n: start + n + k]
    return []


@settings(max_examples=300, deadline=None)
@given(st.lists(st.integers(0, 4), max_size=40), st.integers(0, 6), st.integers(1, 5), st.integers(1, 5))
def test_matches_brute_force(tokens, k, max_ngram, min_ngram):
    min_ngram = min(min_ngram, max_ngram)
    got = lookup(np.asarray(tokens, dtype=np.int32), k, max_ngram, min_ngram, extend_periodic=False)
    assert got == brute_force(tokens, k, max_ngram, min_ngram)


@settings(max_examples=200, deadline=None)
@given(st.lists(st.integers(0, 3), min_size=2, max_size=30), st.integers(1, 9))
def test_periodic_extension_extends_the_plain_draft_periodically(tokens, k):
    arr = np.asarray(tokens, dtype=np.int32)
    plain = lookup(arr, k, 4, 1, extend_periodic=False)
    extended = lookup(arr, k, 4, 1, extend_periodic=True)
    assert extended[: len(plain)] == plain
    if plain:
        assert len(extended) == k
        period = len(plain)
        assert all(extended[i] == extended[i - period] for i in range(period, k))


def test_replay_counts_the_passes_a_copying_output_needs():
    prompt = list(range(10, 40))
    # The prefill's token (10) then 11..26 drafted and accepted with 27 as the bonus; then 28..39.
    assert replay_passes(prompt, prompt, 16) == 2
    assert replay_passes(prompt, prompt, 0) == len(prompt) - 1  # no drafts: plain decoding
    assert replay_passes(prompt, list(range(100, 130)), 16) == 29  # nothing to copy: plain


@given(st.lists(st.integers(0, 5), min_size=1, max_size=40), st.lists(st.integers(0, 5), min_size=1, max_size=40),
       st.integers(0, 8))
@settings(max_examples=100, deadline=None)
def test_replay_passes_lie_between_the_full_draft_bound_and_plain(prompt, output, k):
    passes = replay_passes(prompt, output, k, max_ngram=4)
    assert -(-(len(output) - 1) // (k + 1)) <= passes <= len(output) - 1


def test_draft_kind_is_the_match_length_and_nothing_without_a_match():
    from specache.spec.base import NOTHING_TO_DRAFT

    proposer = NgramProposer(max_ngram=8)
    text = [1, 2, 3, 4, 5, 6, 9, 9, 2, 3, 4]  # suffix "2 3 4" matched at positions 1-3
    assert proposer.draft_kind(0, text) == 3
    assert propose(text, 2, proposer) == [5, 6]  # the same lookup drafts
    assert proposer.draft_kind(1, [1, 2, 3]) == NOTHING_TO_DRAFT
    assert proposer.draft_kind(2, [7, 8, 7]) == 1


def test_the_controller_keeps_an_acceptance_rate_per_kind():
    """Long matches accepted, one-token matches not: a sequence then drafts after the one and not
    after the other, and a new sequence starts from each kind's global rate."""
    from specache.spec.controller import SpecController

    c = SpecController(max_k=16)
    c.calibrate({1: 0.020, 2: 0.030, 17: 0.060})  # a second row costs half a step, 17 rows 3 steps
    for seq in range(6):
        c.record(seq, 16, 16, kind=8)
        c.record(seq, 4, 0, kind=1)
    assert c.alpha(99, kind=8) > 0.9 and c.alpha(99, kind=1) < 0.3
    assert c.choose_k(99, 1, free_draft=True, kind=8) >= 8
    assert c.choose_k(99, 1, free_draft=True, kind=1) == 0


def test_native_match_agrees_with_the_numpy_search():
    """The kernels' backward scan and the vectorised search find the same (end, length) on texts
    with many repeats (small vocabularies), for every n range."""
    from specache import kernels
    from specache.spec.ngram import find_match_numpy

    native = kernels.load()
    if native is None:
        pytest.skip("native kernels unavailable")
    rng = np.random.default_rng(0)
    for _ in range(3000):
        text = rng.integers(0, int(rng.integers(2, 6)), size=int(rng.integers(0, 60)), dtype=np.int32)
        max_ngram = int(rng.integers(1, 9))
        min_ngram = int(rng.integers(1, max_ngram + 1))
        assert native.ngram_match(text, max_ngram, min_ngram) == find_match_numpy(text, max_ngram, min_ngram)
