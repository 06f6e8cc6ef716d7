"""Verification: greedy prefix matching by hand, and lossless rejection sampling checked statistically.

The statistical test runs a toy trigram "model" (a fixed random logits table over 8 tokens) as the
target and a deliberately different table as the drafter, generates the first 3 tokens many times
with plain sampling and with speculative sampling, and compares the joint distributions of the
3-token prefixes (two-sample chi-square, and goodness of fit against the exact distribution).
Two deliberately broken verifiers must fail the same test, so the test is known to have teeth.
"""

from __future__ import annotations

import functools
import itertools

import pytest
import torch

import specache.spec.verify as verify_mod
from specache.sampling import SamplingParams, TokenRandom, draw_rows, logits_to_probs, sample
from specache.spec.verify import VerifyResult, verify

V = 8
PROMPT = (1, 2)
N_SAMPLES = 20_000
GREEDY = SamplingParams(temperature=0)


def one_hot_rows(tokens: list[int], vocab: int = V) -> torch.Tensor:
    return torch.nn.functional.one_hot(torch.tensor(tokens), vocab).float()


def rnd(seed: int = 0) -> TokenRandom:
    return TokenRandom(seed)


# --------------------------------------------------------------------------- greedy


@pytest.mark.parametrize(
    "draft, target, expected, n_acc",
    [
        ([3, 4, 5], [3, 4, 5, 6], [3, 4, 5, 6], 3),  # all accepted + bonus
        ([3, 4, 5], [7, 4, 5, 6], [7], 0),  # first rejected: the correction only
        ([3, 4, 5], [3, 4, 1, 6], [3, 4, 1], 2),  # partial
        ([3, 4, 5], [3, 0, 5, 6], [3, 0], 1),  # a later match after a mismatch does not count
        ([], [6], [6], 0),  # no draft: plain greedy step
    ],
)
def test_greedy_cases(draft, target, expected, n_acc):
    res = verify([draft], [None], [one_hot_rows(target)], [GREEDY], [rnd()], [0])
    assert res == [VerifyResult(expected, n_acc)]


def test_greedy_batch_mixes_every_acceptance_count():
    k = 4
    drafts, targets, want = [], [], []
    for n_acc in range(k + 1):
        draft = [1, 2, 3, 4]
        target = draft[:n_acc] + [7] + [5] * (k - n_acc)  # mismatch (7) at position n_acc
        drafts.append(draft)
        targets.append(one_hot_rows(target))
        want.append(VerifyResult(draft[:n_acc] + [7], n_acc))
    drafts.append([])
    targets.append(one_hot_rows([0]))
    want.append(VerifyResult([0], 0))
    n = len(drafts)
    assert verify(drafts, [None] * n, targets, [GREEDY] * n, [rnd()] * n, [0] * n) == want


def test_greedy_uses_argmax_of_soft_rows_and_ignores_q():
    p = torch.tensor([[0.1, 0.6, 0.3], [0.5, 0.2, 0.3], [0.2, 0.2, 0.6]])
    q = torch.tensor([[0.0, 1.0, 0.0], [0.0, 1.0, 0.0]])
    assert verify([[1, 1]], [q], [p], [GREEDY], [rnd(5)], [0]) == [VerifyResult([1, 0], 1)]


def test_greedy_speculation_equals_plain_greedy_on_toy_model():
    """Draft with the (different) draft table greedily, verify: the text equals plain greedy."""
    target, draft_table = tables()
    hist = list(PROMPT)
    plain = list(PROMPT)
    for _ in range(12):
        plain.append(int(target[plain[-2], plain[-1]].argmax()))
    while len(hist) < len(plain):
        drafted = list(hist)
        for _ in range(3):
            drafted.append(int(draft_table[drafted[-2], drafted[-1]].argmax()))
        p = logits_to_probs(torch.stack([target[drafted[i - 2], drafted[i - 1]]
                                         for i in range(len(hist), len(hist) + 4)]), [GREEDY] * 4)
        hist += verify([drafted[len(hist):]], [None], [p], [GREEDY], [rnd()], [len(hist)])[0].tokens
    assert hist[: len(plain)] == plain


# --------------------------------------------------------------------------- sampled edge cases

SAMPLED = SamplingParams(temperature=1.0)


def test_empty_draft_samples_from_p_and_respects_zero_probability():
    p = torch.tensor([[0.0, 0.25, 0.0, 0.75]])
    g = rnd(1)
    toks = [verify([[]], [None], [p], [SAMPLED], [g], [i])[0] for i in range(4000)]
    assert all(r.num_accepted == 0 and len(r.tokens) == 1 for r in toks)
    counts = torch.bincount(torch.tensor([r.tokens[0] for r in toks]), minlength=4)
    assert counts[0] == 0 and counts[2] == 0
    assert abs(counts[3].item() / 4000 - 0.75) < 0.03


def test_token_with_zero_target_probability_is_always_rejected():
    p = torch.tensor([[0.0, 0.5, 0.5, 0.0], [0.25, 0.25, 0.25, 0.25]])
    q = torch.tensor([[1.0, 0.0, 0.0, 0.0]])
    g = rnd(2)
    for i in range(300):
        for probs in (q, None):
            res = verify([[0]], [probs], [p], [SAMPLED], [g], [i])[0]
            assert res.num_accepted == 0 and res.tokens[0] in (1, 2)


def test_q_zero_at_draft_token_is_read_as_one_hot():
    # q claims the draft token was impossible: the proposer's q is wrong, read it as one-hot
    # (accept with p(x), residual p without x), which is lossless for any proposal.
    p = torch.tensor([[0.5, 0.5, 0.0], [0.0, 0.0, 1.0]])
    q = torch.tensor([[0.0, 0.0, 1.0]])
    g = rnd(3)
    res = [verify([[0]], [q], [p], [SAMPLED], [g], [i])[0] for i in range(4000)]
    first = torch.tensor([r.tokens[0] for r in res])
    assert set(first.tolist()) <= {0, 1}
    assert abs((first == 0).float().mean().item() - 0.5) < 0.03
    assert all(r.tokens == [0, 2] for r in res if r.num_accepted == 1)


def test_residual_all_zero_falls_back_to_p():
    # q >= p everywhere (an unnormalised q, as a buggy proposer might send): max(0, p - q) = 0.
    p = torch.tensor([[0.5, 0.5, 0.0], [0.0, 0.0, 1.0]])
    q = torch.tensor([[0.9, 0.9, 0.0]])
    g = rnd(4)
    res = [verify([[0]], [q], [p], [SAMPLED], [g], [i])[0] for i in range(2000)]
    assert {r.tokens[0] for r in res if r.num_accepted == 0} <= {0, 1}
    assert any(r.num_accepted == 0 for r in res)


def test_rows_are_independent_of_batch_composition():
    torch.manual_seed(0)
    p = torch.softmax(torch.randn(4, V) * 2, dim=-1)
    q = torch.softmax(torch.randn(3, V) * 2, dim=-1)
    alone = verify([[1, 2, 3]], [q], [p], [SAMPLED], [rnd(9)], [4])
    other_p = torch.softmax(torch.randn(2, V), dim=-1)
    batched = verify([[5], [1, 2, 3], []], [None, q, None], [other_p, p, other_p[:1]],
                     [SAMPLED, SAMPLED, GREEDY], [rnd(1), rnd(9), rnd(2)], [0, 4, 0])
    assert batched[1] == alone[0]


def test_shape_errors_are_named():
    with pytest.raises(ValueError, match="target_probs"):
        verify([[1, 2]], [None], [torch.ones(2, V) / V], [SAMPLED], [rnd()], [0])
    with pytest.raises(ValueError, match="draft_probs"):
        verify([[1, 2]], [torch.ones(1, V)], [torch.ones(3, V) / V], [SAMPLED], [rnd()], [0])
    with pytest.raises(ValueError, match="vocabulary"):
        verify([[V]], [None], [torch.ones(2, V) / V], [SAMPLED], [rnd()], [0])


# --------------------------------------------------------------------------- losslessness, statistically


@functools.cache
def tables() -> tuple[torch.Tensor, torch.Tensor]:
    """Trigram logits: table[a, b] = logits of the token after (a, b). Draft differs on purpose."""
    g = torch.Generator().manual_seed(1234)
    target = torch.randn(V, V, V, generator=g) * 1.5
    draft = torch.randn(V, V, V, generator=g) * 1.5 + 0.5 * target  # correlated, far from equal
    return target, draft


@functools.cache
def _processed(which: int, params_key: tuple) -> torch.Tensor:
    # No penalties here, so each history's row is processed alike whoever asks: do all 64 once.
    table = tables()[which]
    params = SamplingParams(temperature=params_key[0], top_k=params_key[1], top_p=params_key[2])
    return logits_to_probs(table.reshape(V * V, V), [params] * (V * V)).reshape(V, V, V)


def probs_of(table: torch.Tensor, a: torch.Tensor, b: torch.Tensor, params: SamplingParams) -> torch.Tensor:
    """logits_to_probs(table[a, b]) for a batch of histories."""
    assert not params.has_penalties
    which = 0 if table is tables()[0] else 1
    return _processed(which, (params.temperature, params.top_k, params.top_p))[a, b]


def sample_randoms(n: int, seed: int) -> list[TokenRandom]:
    """Each sample is a sequence of its own, with its own key."""
    return [TokenRandom(seed * n + i) for i in range(n)]


def plain_prefixes(params: SamplingParams, n: int, seed: int) -> torch.Tensor:
    target, _ = tables()
    randoms = sample_randoms(n, seed)
    a = torch.full((n,), PROMPT[0])
    b = torch.full((n,), PROMPT[1])
    out = []
    for step in range(3):
        uniforms = [r.uniform(len(PROMPT) + step, TokenRandom.DRAW) for r in randoms]
        x = torch.tensor(sample(probs_of(target, a, b, params), [params] * n, uniforms))
        out.append(x)
        a, b = b, x
    return torch.stack(out, dim=1)


def spec_prefixes(params: SamplingParams, n: int, seed: int, k: int = 3, verify_fn=verify,
                  pass_q: bool = True) -> torch.Tensor:
    """Speculative sampling until every sample has 3 tokens; drafts from the draft table with its q."""
    target, draft_table = tables()
    g_draft, randoms = torch.Generator().manual_seed(seed), sample_randoms(n, seed)
    texts = [list(PROMPT) for _ in range(n)]
    active = list(range(n))
    while active:
        a = torch.tensor([texts[i][-2] for i in active])
        b = torch.tensor([texts[i][-1] for i in active])
        ctx_a, ctx_b, drafted, qs = [a], [b], [], []
        for _ in range(k):
            q = probs_of(draft_table, a, b, params)
            x = torch.multinomial(q, 1, generator=g_draft).squeeze(1)
            drafted.append(x)
            qs.append(q)
            a, b = b, x
            ctx_a.append(a)
            ctx_b.append(b)
        p = torch.stack([probs_of(target, ca, cb, params) for ca, cb in zip(ctx_a, ctx_b, strict=True)], 1)
        q = torch.stack(qs, dim=1)
        d = torch.stack(drafted, dim=1).tolist()
        m = len(active)
        for lo in range(0, m, 32):  # engine-sized batches
            hi = min(lo + 32, m)
            res = verify_fn(d[lo:hi], list(q[lo:hi]) if pass_q else [None] * (hi - lo), list(p[lo:hi]),
                            [params] * (hi - lo), [randoms[i] for i in active[lo:hi]],
                            [len(texts[i]) for i in active[lo:hi]])
            for i, r in zip(active[lo:hi], res, strict=True):
                texts[i] += r.tokens
        active = [i for i in active if len(texts[i]) < len(PROMPT) + 3]
    return torch.tensor([t[len(PROMPT): len(PROMPT) + 3] for t in texts])


def exact_prefix_probs(params: SamplingParams) -> torch.Tensor:
    target, _ = tables()
    out = torch.zeros(V, V, V, dtype=torch.float64)
    p1 = probs_of(target, torch.tensor([PROMPT[0]]), torch.tensor([PROMPT[1]]), params)[0].double()
    for t1, t2 in itertools.product(range(V), range(V)):
        p2 = probs_of(target, torch.tensor([PROMPT[1]]), torch.tensor([t1]), params)[0].double()
        p3 = probs_of(target, torch.tensor([t1]), torch.tensor([t2]), params)[0].double()
        out[t1, t2] = p1[t1] * p2[t2] * p3
    return out.flatten()


def chi2_sf(stat: float, df: int) -> float:
    return float(torch.special.gammaincc(torch.tensor(df / 2, dtype=torch.float64),
                                         torch.tensor(stat / 2, dtype=torch.float64)))


def cell_counts(prefixes: torch.Tensor) -> torch.Tensor:
    codes = prefixes[:, 0] * V * V + prefixes[:, 1] * V + prefixes[:, 2]
    return torch.bincount(codes, minlength=V ** 3).double()


def pooled(counts: torch.Tensor, keep: torch.Tensor) -> torch.Tensor:
    """Cells with a small expected count are pooled into one, so the chi-square approximation holds."""
    return torch.cat([counts[keep], counts[~keep].sum().unsqueeze(0)])


def two_sample_p(a: torch.Tensor, b: torch.Tensor, keep: torch.Tensor) -> float:
    a, b = pooled(a, keep), pooled(b, keep)
    nonzero = (a + b) > 0
    a, b = a[nonzero], b[nonzero]
    expect_a = (a + b) * a.sum() / (a.sum() + b.sum())
    expect_b = (a + b) * b.sum() / (a.sum() + b.sum())
    stat = (((a - expect_a) ** 2) / expect_a + ((b - expect_b) ** 2) / expect_b).sum()
    return chi2_sf(float(stat), int(nonzero.sum()) - 1)


def goodness_of_fit_p(counts: torch.Tensor, exact: torch.Tensor, keep: torch.Tensor) -> float:
    observed = pooled(counts, keep)
    expected = pooled(exact * counts.sum(), keep)
    live = expected > 0
    stat = (((observed[live] - expected[live]) ** 2) / expected[live]).sum()
    return chi2_sf(float(stat), int(live.sum()) - 1)


PARAMS = {
    "t1": SamplingParams(temperature=1.0),
    "t0.7_topk5_topp0.9": SamplingParams(temperature=0.7, top_k=5, top_p=0.9),
}


@functools.cache
def plain_counts(name: str) -> torch.Tensor:
    return cell_counts(plain_prefixes(PARAMS[name], N_SAMPLES, seed=11))


def p_values(name: str, **spec_kwargs) -> tuple[float, float]:
    """(two-sample p-value vs plain sampling, goodness-of-fit p-value vs the exact distribution)."""
    exact = exact_prefix_probs(PARAMS[name])
    keep = exact * N_SAMPLES >= 5
    spec = cell_counts(spec_prefixes(PARAMS[name], N_SAMPLES, seed=22, **spec_kwargs))
    return two_sample_p(plain_counts(name), spec, keep), goodness_of_fit_p(spec, exact, keep)


@pytest.mark.parametrize("name", list(PARAMS))
def test_speculative_sampling_is_lossless(name):
    vs_plain, vs_exact = p_values(name)
    print(f"{name}: p vs plain {vs_plain:.3g}, p vs exact {vs_exact:.3g}")
    assert vs_plain > 1e-3, vs_plain
    assert vs_exact > 1e-3, vs_exact


def test_dropping_q_is_still_lossless():
    # One-hot reading of q (accept with p(x), residual p without x) is exact for any proposal:
    # a proposer unsure of its q may pass None and only loses acceptance, never correctness.
    vs_plain, vs_exact = p_values("t1", pass_q=False)
    assert vs_plain > 1e-3 and vs_exact > 1e-3, (vs_plain, vs_exact)


def test_drafts_without_q_give_plain_samplings_own_text():
    """Verifying a draft without q draws each position's token as plain decoding draws it (the same
    uniform): per sample, the text equals plain sampling's with the same key, token for token,
    whatever the drafts were, while 3-token drafts are accepted often."""
    params = PARAMS["t0.7_topk5_topp0.9"]
    plain = plain_prefixes(params, 2000, seed=5)
    assert torch.equal(spec_prefixes(params, 2000, seed=5, pass_q=False), plain)
    assert torch.equal(spec_prefixes(params, 2000, seed=5, pass_q=False, k=1), plain)
    assert not torch.equal(plain_prefixes(params, 2000, seed=6), plain)


def _always_accept(drafts, draft_probs, target_probs, params, randoms, positions):
    out = []
    for d, p, r, pos in zip(drafts, target_probs, randoms, positions, strict=True):
        bonus = draw_rows(p[len(d):], [r.uniform(pos + len(d), TokenRandom.DRAW)])[0]
        out.append(VerifyResult(list(d) + [bonus], len(d)))
    return out


def test_broken_verifier_always_accept_fails():
    vs_plain, vs_exact = p_values("t1", verify_fn=_always_accept)
    print(f"broken: p vs plain {vs_plain:.3g}, p vs exact {vs_exact:.3g}")
    assert vs_plain < 1e-6 and vs_exact < 1e-6, (vs_plain, vs_exact)


def test_broken_verifier_residual_p_fails(monkeypatch):
    # The real verifier with one mutation: on rejection draw from p instead of max(0, p - q).
    monkeypatch.setattr(verify_mod, "_residual", lambda p_rows, q_rows: p_rows)
    vs_plain, vs_exact = p_values("t1")
    print(f"broken: p vs plain {vs_plain:.3g}, p vs exact {vs_exact:.3g}")
    assert vs_plain < 1e-6 and vs_exact < 1e-6, (vs_plain, vs_exact)
