"""Sampling: logits -> probabilities (temperature, top-k, top-p, min-p, penalties) and seeded
draws, checked against hand computations and brute-force references; then the same knobs
end to end through the engine on the tiny random model."""

from __future__ import annotations

import pytest
import torch

from specache import SamplingParams
from specache.sampling import TokenRandom, apply_penalties, draw_rows, logits_to_probs, sample

V = 50


def rand_logits(n: int, seed: int, vocab: int = V, scale: float = 3.0) -> torch.Tensor:
    return torch.randn(n, vocab, generator=torch.Generator().manual_seed(seed)) * scale


def reference_probs(logits: torch.Tensor, p: SamplingParams) -> torch.Tensor:
    """Brute force, one row, in float64: top-k, renormalise, nucleus, min-p, renormalise."""
    probs = (logits.double() / p.temperature).softmax(-1)
    order = sorted(range(len(probs)), key=lambda i: -probs[i].item())
    keep = order[: p.top_k] if p.top_k > 0 else order
    mass = sum(probs[i].item() for i in keep)
    kept, acc = [], 0.0
    for i in keep:  # the smallest prefix whose (renormalised) mass reaches top_p
        kept.append(i)
        acc += probs[i].item() / mass
        if acc >= p.top_p:
            break
    top = probs[order[0]].item()
    kept = [i for i in kept if probs[i].item() >= p.min_p * top]
    out = torch.zeros_like(probs)
    out[kept] = probs[kept]
    return out / out.sum()


def near_a_boundary(logits: torch.Tensor, p: SamplingParams) -> bool:
    """Cumulative masses within float error of top_p make the reference ambiguous: skip those."""
    probs = (logits.double() / p.temperature).softmax(-1).sort(descending=True).values
    if p.top_k > 0:
        probs = probs[: p.top_k] / probs[: p.top_k].sum()
    cum = probs.cumsum(0)
    ratio = probs / probs[0]
    near_p = p.top_p < 1 and ((cum - p.top_p).abs() < 1e-4).any()
    near_min_p = p.min_p > 0 and ((ratio - p.min_p).abs() < 1e-4).any()
    return bool(near_p or near_min_p)


# ---------------------------------------------------------------- logits_to_probs


def test_greedy_is_one_hot_on_the_argmax_whatever_the_other_knobs():
    logits = rand_logits(4, 0)
    for p in [SamplingParams(temperature=0), SamplingParams(temperature=0, top_k=3, top_p=0.5, min_p=0.2)]:
        probs = logits_to_probs(logits, [p] * 4)
        assert torch.equal(probs, torch.nn.functional.one_hot(logits.argmax(-1), V).float())
        assert sample(probs, [p] * 4, [None] * 4) == logits.argmax(-1).tolist()


@pytest.mark.parametrize("temperature", [0.25, 0.7, 1.0, 2.5])
def test_temperature_scales_logits(temperature):
    logits = rand_logits(3, 1)
    probs = logits_to_probs(logits, [SamplingParams(temperature=temperature)] * 3)
    torch.testing.assert_close(probs, (logits / temperature).softmax(-1))


def test_lower_temperature_sharpens():
    logits = rand_logits(1, 2)
    ent = []
    for t in (0.3, 1.0, 3.0):
        q = logits_to_probs(logits, [SamplingParams(temperature=t)])[0]
        ent.append(-(q * q.clamp_min(1e-30).log()).sum().item())
    assert ent[0] < ent[1] < ent[2]


@pytest.mark.parametrize("k", [1, 2, 7, V - 1, V])
def test_top_k_keeps_exactly_the_k_largest(k):
    logits = rand_logits(5, 3)
    probs = logits_to_probs(logits, [SamplingParams(top_k=k)] * 5)
    for row, lg in zip(probs, logits, strict=True):
        kept = set(row.nonzero().flatten().tolist())
        assert kept == set(lg.topk(k).indices.tolist())
        torch.testing.assert_close(row[list(kept)], lg[list(kept)].softmax(-1))


@pytest.mark.parametrize("k", [0, -1])
def test_top_k_disabled_keeps_everything(k):
    probs = logits_to_probs(rand_logits(2, 4), [SamplingParams(top_k=k)] * 2)
    assert (probs > 0).all()


def test_top_p_keeps_the_smallest_set_reaching_p_against_brute_force():
    g = torch.Generator().manual_seed(5)
    checked = 0
    for case in range(300):
        top_p = float(torch.rand((), generator=g)) * 0.98 + 0.01
        p = SamplingParams(temperature=float(torch.rand((), generator=g)) * 1.5 + 0.3, top_p=top_p)
        logits = rand_logits(1, 1000 + case, scale=float(torch.rand((), generator=g)) * 4 + 0.5)
        if near_a_boundary(logits[0], p):
            continue
        got = logits_to_probs(logits, [p])[0]
        ref = reference_probs(logits[0], p)
        assert set(got.nonzero().flatten().tolist()) == set(ref.nonzero().flatten().tolist()), case
        torch.testing.assert_close(got.double(), ref, atol=1e-6, rtol=1e-5)
        checked += 1
    assert checked > 250


def test_top_p_one_token_above_p_keeps_only_it():
    logits = torch.tensor([[5.0, 1.0, 0.0, -1.0]])
    probs = logits_to_probs(logits, [SamplingParams(top_p=0.5)])
    assert probs[0].tolist() == [1.0, 0.0, 0.0, 0.0]


def test_min_p_drops_tokens_below_a_fraction_of_the_best():
    logits = torch.log(torch.tensor([[0.5, 0.3, 0.12, 0.05, 0.03]]))
    probs = logits_to_probs(logits, [SamplingParams(min_p=0.2)])  # keep p >= 0.1
    assert (probs[0] > 0).tolist() == [True, True, True, False, False]
    torch.testing.assert_close(probs[0, :3], torch.tensor([0.5, 0.3, 0.12]) / 0.92)


def test_combined_knobs_and_mixed_batch_rows_against_brute_force():
    g = torch.Generator().manual_seed(6)
    params, checked = [], 0
    for _ in range(40):
        params.append(SamplingParams(
            temperature=float(torch.rand((), generator=g)) * 1.5 + 0.2,
            top_k=int(torch.randint(0, V, (1,), generator=g)),
            top_p=float(torch.rand((), generator=g)) * 0.9 + 0.1,
            min_p=float(torch.rand((), generator=g)) * 0.3))
    params += [SamplingParams(), SamplingParams(temperature=0)]
    logits = rand_logits(len(params), 7)
    batched = logits_to_probs(logits, params)
    for i, p in enumerate(params):
        alone = logits_to_probs(logits[i: i + 1], [p])[0]
        torch.testing.assert_close(batched[i], alone)  # rows never leak into each other
        if p.greedy or near_a_boundary(logits[i], p):
            continue
        torch.testing.assert_close(batched[i].double(), reference_probs(logits[i], p), atol=1e-6, rtol=1e-5)
        checked += 1
    assert checked > 30


def test_penalties_match_a_hand_computation():
    logits = torch.tensor([2.0, -1.0, 0.5, 3.0, -2.0, 1.0])
    prompt, output = [0, 1], [1, 2, 2]
    p = SamplingParams(repetition_penalty=2.0, presence_penalty=0.5, frequency_penalty=0.25)
    # repetition (prompt + output: 0, 1, 2): positive / 2, negative * 2
    # presence + frequency (output only): 1 seen once, 2 seen twice
    expected = torch.tensor([2.0 / 2, -1.0 * 2 - (0.5 + 0.25), 0.5 / 2 - (0.5 + 0.5), 3.0, -2.0, 1.0])
    got = apply_penalties(logits.clone(), p, prompt, output)
    torch.testing.assert_close(got, expected)
    before = logits.clone()
    probs = logits_to_probs(logits[None], [p], [prompt], [output])
    torch.testing.assert_close(probs[0], expected.softmax(-1))
    assert torch.equal(logits, before), "logits_to_probs must not modify the caller's logits"


def test_repetition_penalty_below_one_and_negative_presence_encourage():
    logits = torch.tensor([1.0, -1.0, 0.0])
    p = SamplingParams(repetition_penalty=0.5, presence_penalty=-1.0)
    got = apply_penalties(logits.clone(), p, [0], [1])
    torch.testing.assert_close(got, torch.tensor([2.0, -0.5 + 1.0, 0.0]))


def test_penalties_only_change_rows_that_ask_for_them_and_steer_greedy():
    logits = torch.tensor([[3.0, 2.9, 0.0], [3.0, 2.9, 0.0]])
    params = [SamplingParams(temperature=0, frequency_penalty=1.0), SamplingParams(temperature=0)]
    probs = logits_to_probs(logits, params, [[], []], [[0], [0]])
    assert probs.argmax(-1).tolist() == [1, 0]


# ---------------------------------------------------------------- draws


def _draws(seed: int, n: int) -> list[float]:
    return TokenRandom(seed).uniforms(0, n, TokenRandom.DRAW)


def test_same_seed_same_draws_and_different_seeds_differ():
    probs = logits_to_probs(rand_logits(1, 8, scale=0.5), [SamplingParams()]).expand(64, V)
    p = [SamplingParams()] * 64
    assert sample(probs, p, _draws(123, 64)) == sample(probs, p, _draws(123, 64))
    assert sample(probs, p, _draws(123, 64)) != sample(probs, p, _draws(124, 64))


def test_token_uniforms_are_keyed_by_seed_position_and_use():
    """The same (seed, position, use) always gives the same number, in any order of asking; every
    other key gives another; and they are uniform on [0, 1) (chi-square over 20 bins, df 19: 43.82
    is the 0.1% quantile)."""
    a, b = TokenRandom(7), TokenRandom(7)
    assert [a.uniform(i, TokenRandom.DRAW) for i in (5, 3, 9)] == [b.uniform(i, TokenRandom.DRAW) for i in (5, 3, 9)]
    keys = {TokenRandom(seed).uniform(pos, use) for seed in (7, 8) for pos in (0, 1, 2)
            for use in (TokenRandom.DRAW, TokenRandom.DRAFT, TokenRandom.ACCEPT, TokenRandom.RESIDUAL)}
    assert len(keys) == 24
    for seed, use in ((0, TokenRandom.DRAW), (1, TokenRandom.ACCEPT)):
        u = torch.tensor(TokenRandom(seed).uniforms(0, 20_000, use))
        assert 0 <= u.min() and u.max() < 1
        counts = torch.bincount((u * 20).long(), minlength=20).double()
        assert float(((counts - 1000) ** 2 / 1000).sum()) < 43.82
    assert TokenRandom().seed != TokenRandom().seed  # unseeded: a fresh key each time


def test_blocked_draw_is_the_inverse_cdf_draw():
    """draw_rows finds a token's block from block sums, then the token within it: the same token a
    float64 cumulative sum over the whole row gives (a vocabulary that is not a multiple of the
    block, zero-weight tokens inside it, uniforms at both ends)."""
    g = torch.Generator().manual_seed(3)
    weights = torch.rand(6, 3000, generator=g) ** 4
    weights[:, 1000:1200] = 0.0
    weights[2, 2000:] = 0.0  # the last tokens carry no weight: u -> 1 lands on the last that does
    u = torch.rand(6, generator=g, dtype=torch.float64)
    u[0], u[1], u[2] = 0.0, 1.0 - 2.0 ** -53, 1.0 - 2.0 ** -53
    cdf = weights.double().cumsum(dim=-1)
    reference = torch.searchsorted(cdf, (u * cdf[:, -1]).unsqueeze(1), right=True).squeeze(1).clamp(max=2999)
    drawn = draw_rows(weights, u)
    assert drawn == reference.tolist() or all(weights[r, t] > 0 for r, t in enumerate(drawn))
    assert drawn[2] == 1999 and all(weights[r, t] > 0 for r, t in enumerate(drawn))
    with pytest.raises(ValueError, match="no probability mass"):
        draw_rows(torch.zeros(1, 10), [0.5])


def test_a_target_past_a_blocks_rounded_sum_stays_in_that_block():
    """Block sums and a block's own cumulative sum round differently: a target at the chosen block's
    end by its sum but past it by its cumulative sum takes the block's last token with weight, not
    one from a later block."""
    w = torch.zeros(1, 2048, dtype=torch.float64)
    w[0, 0], w[0, 1:1024], w[0, 1024] = 1.0, 2.0 ** -60, 1.0
    block_sum = float(w[0, :1024].sum())
    assert block_sum > float(w[0, :1024].cumsum(0)[-1])  # the two roundings differ here
    total = float(w.reshape(1, 2, 1024).sum(dim=-1).cumsum(dim=-1)[0, -1])
    u = (1.0 + 2 * 2.0 ** -52) / total  # lands between the cumulative sum (1.0) and the block sum
    assert draw_rows(w, [u]) == [1023]


def test_masked_tokens_are_never_drawn():
    probs = logits_to_probs(rand_logits(1, 10, scale=0.3), [SamplingParams(top_k=3)]).expand(3000, V)
    allowed = set(probs[0].nonzero().flatten().tolist())
    drawn = sample(probs, [SamplingParams(top_k=3)] * 3000, _draws(0, 3000))
    assert set(drawn) == allowed


def test_sampling_frequencies_match_the_probabilities():
    """Pearson chi-square on 20,000 seeded draws over 10 outcomes (df 9: 27.88 is the 0.1% quantile)."""
    n, vocab = 20_000, 10
    logits = torch.tensor([[2.0, 1.5, 1.0, 0.5, 0.0, -0.5, -1.0, 0.3, 0.8, -0.2]])
    probs = logits_to_probs(logits, [SamplingParams(temperature=0.9)])
    drawn = sample(probs.expand(n, vocab), [SamplingParams(temperature=0.9)] * n, _draws(2024, n))
    counts = torch.bincount(torch.tensor(drawn), minlength=vocab).double()
    expected = probs[0].double() * n
    chi2 = float(((counts - expected) ** 2 / expected).sum())
    assert chi2 < 27.88, (counts.tolist(), expected.tolist())
    # and it is a real distribution check: a skewed distribution fails it
    skewed = expected.roll(1)
    assert float(((counts - skewed) ** 2 / skewed).sum()) > 27.88


# ---------------------------------------------------------------- end to end on the tiny model

PROMPT = "The quick brown fox jumps over the lazy dog. Then"


@pytest.fixture
def llm(tiny_llm):
    yield tiny_llm
    assert tiny_llm.engine.pool.all_free(), "KV blocks leaked"
    assert not tiny_llm.engine.has_unfinished()


def test_same_seed_same_output_and_different_seeds_differ(llm):
    def gen(seed):
        p = SamplingParams(max_tokens=12, temperature=1.0, seed=seed, ignore_eos=True)
        return llm.generate(PROMPT, p)[0]

    a, b, c = gen(11), gen(11), gen(12)
    assert a.token_ids == b.token_ids and a.text == b.text
    assert a.token_ids != c.token_ids


def test_seeded_output_does_not_depend_on_the_rest_of_the_batch(llm):
    p = SamplingParams(max_tokens=10, temperature=1.0, seed=5, ignore_eos=True)
    alone = llm.generate(PROMPT, p)[0].token_ids
    others = SamplingParams(max_tokens=6, temperature=1.0, ignore_eos=True)
    batch = llm.generate(["Hello there", PROMPT, "1 2 3 4"], [others, p, others])
    assert batch[1].token_ids == alone


def test_n_returns_n_distinct_seeded_choices(llm):
    p = SamplingParams(n=3, max_tokens=8, temperature=1.0, seed=3, ignore_eos=True)
    out = llm.generate(PROMPT, p)[0]
    assert [o.index for o in out.outputs] == [0, 1, 2]
    assert all(len(o.token_ids) == 8 and o.finish_reason == "length" for o in out.outputs)
    assert len({tuple(o.token_ids) for o in out.outputs}) == 3
    assert out.metrics["completion_tokens"] == 24
    again = llm.generate(PROMPT, p)[0]
    assert [o.token_ids for o in again.outputs] == [o.token_ids for o in out.outputs]


@pytest.mark.parametrize("max_tokens", [1, 5, 17])
def test_max_tokens_gives_exactly_that_many_and_length(llm, max_tokens):
    out = llm.generate(PROMPT, SamplingParams(max_tokens=max_tokens, temperature=0, ignore_eos=True))[0]
    assert len(out.token_ids) == max_tokens
    assert out.finish_reason == "length"


def _greedy_reference(llm, n=40):
    return llm.generate(PROMPT, SamplingParams(max_tokens=n, temperature=0, ignore_eos=True))[0]


def test_stop_string_truncates_text_and_finishes_with_stop(llm):
    ref = _greedy_reference(llm)
    text = ref.text
    # a stop string from the middle of the greedy text: 3 printable ASCII characters after character 10
    def usable(s: str) -> bool:
        return s.isascii() and s.isprintable() and bool(s.strip())

    start = next(i for i in range(10, len(text) - 3) if usable(text[i: i + 3]))
    stop = text[start: start + 3]
    out = llm.generate(PROMPT, SamplingParams(max_tokens=40, temperature=0, ignore_eos=True, stop=[stop]))[0]
    assert out.finish_reason == "stop"
    assert out.text == text[: text.find(stop)]
    assert stop not in out.text
    assert len(out.token_ids) < len(ref.token_ids)
    assert out.token_ids == ref.token_ids[: len(out.token_ids)]


def test_stop_string_never_seen_runs_to_length(llm):
    ref = _greedy_reference(llm, 10)
    out = llm.generate(PROMPT, SamplingParams(max_tokens=10, temperature=0, ignore_eos=True,
                                              stop=["\x00never\x00"]))[0]
    assert out.finish_reason == "length" and out.text == ref.text and out.token_ids == ref.token_ids


def test_stop_token_ids_end_generation_at_that_token(llm):
    ref = _greedy_reference(llm, 20).token_ids
    stop_id = ref[6]
    first = ref.index(stop_id)
    out = llm.generate(PROMPT, SamplingParams(max_tokens=20, temperature=0, ignore_eos=True,
                                              stop_token_ids=[stop_id]))[0]
    assert out.finish_reason == "stop"
    assert out.token_ids == ref[: first + 1]


def test_eos_stops_unless_ignore_eos(llm):
    ref = _greedy_reference(llm, 20).token_ids
    eos = ref[4]
    added = eos not in llm.engine.eos_ids
    llm.engine.eos_ids.add(eos)  # pretend the model's EOS is a token greedy decoding emits
    try:
        out = llm.generate(PROMPT, SamplingParams(max_tokens=20, temperature=0))[0]
        ignored = llm.generate(PROMPT, SamplingParams(max_tokens=20, temperature=0, ignore_eos=True))[0]
    finally:
        if added:
            llm.engine.eos_ids.discard(eos)
    assert out.finish_reason == "stop" and out.token_ids == ref[: ref.index(eos) + 1]
    assert ignored.token_ids == ref and ignored.finish_reason == "length"


def _filtered_by_full_sort(logits, top_k, top_p, min_p):
    """The filters over each row's whole sorted vocabulary: what the candidate search must equal."""
    vocab = logits.shape[-1]
    sorted_logits, order = logits.sort(dim=-1, descending=True)
    remove = torch.arange(vocab).expand_as(sorted_logits) >= torch.where(top_k > 0, top_k, vocab).unsqueeze(1)
    sorted_probs = sorted_logits.masked_fill(remove, float("-inf")).softmax(dim=-1)
    remove |= ((sorted_probs.cumsum(dim=-1) - sorted_probs) >= top_p.unsqueeze(1)) & (top_p < 1).unsqueeze(1)
    remove |= sorted_probs < (min_p.unsqueeze(1) * sorted_probs[:, :1])
    remove[:, 0] = False
    return logits.masked_fill(torch.zeros_like(remove).scatter(1, order, remove), float("-inf"))


def test_filters_on_a_large_vocabulary_match_a_full_sort():
    """Top-k / top-p / min-p search each row's best 256 tokens first, then 4096, then sort the whole
    row: peaked rows are decided among the first, flat rows (a nucleus of thousands) and a top-k past
    256 go on; every row keeps exactly the tokens a full sort keeps."""
    from specache.sampling import _top_k_top_p_min_p

    g = torch.Generator().manual_seed(11)
    vocab = 20_000
    scales = [4.0, 4.0, 0.5, 0.05, 4.0, 0.05, 2.0, 4.0, 2.0]  # peaked, flat and nearly uniform rows
    logits = torch.randn(len(scales), vocab, generator=g) * torch.tensor(scales).unsqueeze(1)
    # the last row: min-p cuts inside the best 256, but its nucleus is over a top-k set past them
    top_k = torch.tensor([0, 50, 0, 0, 1000, 0, 0, -1, 2000])
    top_p = torch.tensor([0.9, 1.0, 0.95, 0.9, 1.0, 1.0, 0.5, 1.0, 0.3])
    min_p = torch.tensor([0.0, 0.0, 0.0, 0.0, 0.1, 0.01, 0.05, 0.0, 0.2])
    got = _top_k_top_p_min_p(logits, top_k, top_p, min_p)
    want = _filtered_by_full_sort(logits, top_k, top_p, min_p)
    assert torch.equal(torch.isfinite(got), torch.isfinite(want))
    assert torch.equal(got[torch.isfinite(got)], logits[torch.isfinite(want)])
    kept = torch.isfinite(got).sum(dim=-1).tolist()
    assert kept[0] < 256 and kept[1] == 50 and kept[2] > 4096 and kept[7] == vocab  # every tier used
    # min-p cuts inside the best 256, but the nucleus is over a top-k set of 2000: ten top tokens
    # hold 3.6% of it (all kept at top_p = 0.1), though 23% of the best 256 alone
    crafted = torch.full((1, vocab), -10.0)
    crafted[0, :10] = 10.0 - 0.001 * torch.arange(10)
    crafted[0, 10:2000] = 8.0 - 1e-4 * torch.arange(1990)
    args = torch.tensor([2000]), torch.tensor([0.1]), torch.tensor([0.2])
    assert torch.equal(torch.isfinite(_top_k_top_p_min_p(crafted, *args)),
                       torch.isfinite(_filtered_by_full_sort(crafted, *args)))


def test_top_p_one_keeps_a_vanishing_tail():
    """float32 cumsum reaches 1.0 before the last tokens; top_p = 1 must not drop them."""
    logits = torch.zeros(1, V)
    logits[0, 0] = 40.0  # every other token has probability ~4e-18
    probs = logits_to_probs(logits, [SamplingParams(top_k=V, top_p=1.0)])
    assert probs[0].nonzero().numel() == V
