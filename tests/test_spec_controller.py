"""SpecController: K follows acceptance and cost, disabled sequences recover by probing, stats add up."""

from __future__ import annotations

import itertools
import math
import random

import pytest

from specache.spec.controller import (
    QUIET_PLAN_STEPS,
    DraftSlot,
    SpecController,
    _without_spikes,
    expected_speedup,
    expected_tokens,
)

# A memory-bound target: a pass over up to 64 tokens costs about the same as over 1 (CPU decode).
MEMORY_BOUND = {1: 0.020, 8: 0.021, 32: 0.024, 64: 0.030}
# A compute-bound target: cost grows linearly with the tokens in the pass.
COMPUTE_BOUND = {1: 0.002, 64: 0.128}


def test_expected_tokens_and_seed_speedup_formula():
    assert expected_tokens(0.5, 0) == 1.0
    assert expected_tokens(1.0, 4) == 5.0
    assert expected_tokens(0.8, 4) == pytest.approx((1 - 0.8 ** 5) / 0.2)
    assert expected_speedup(0.8, 4, 0.0) == pytest.approx(3.3616)
    assert expected_speedup(0.8, 4, 0.1) == pytest.approx(3.3616 / 1.4)
    assert SpecController.expected_speedup(0.0, 3, 0.5) == pytest.approx(1 / 2.5)


def test_high_acceptance_keeps_k_at_max():
    c = SpecController(max_k=4)
    c.calibrate(MEMORY_BOUND)
    for _ in range(20):
        k = c.choose_k(1, batch_size=1)
        assert k == 4
        c.record(1, k, k)


def test_low_acceptance_turns_speculation_off():
    c = SpecController(max_k=4, probe_every=1000)
    c.calibrate(MEMORY_BOUND)
    ks = []
    for _ in range(10):
        k = c.choose_k(1, batch_size=1)
        ks.append(k)
        if k:
            c.record(1, k, 0)
    assert ks[0] == 4  # optimistic before any evidence
    assert ks[-5:] == [0] * 5
    assert c.alpha(1) < c.min_alpha


def test_disabled_sequence_probes_and_recovers():
    c = SpecController(max_k=4, probe_every=8)
    c.calibrate(MEMORY_BOUND)
    for _ in range(6):
        k = c.choose_k(1, 1)
        if k:
            c.record(1, k, 0)
    assert c.choose_k(1, 1) == 0
    # While drafts stay bad, only a short probe now and then; each failed probe doubles the wait
    # (probing is cheap here, so the base interval is probe_every), up to max_probe_backoff doublings.
    ks = []
    for _ in range(120):
        k = c.choose_k(1, 1)
        ks.append(k)
        if k:
            c.record(1, k, 0)
    probes = [i for i, k in enumerate(ks) if k]
    assert all(ks[i] == c.probe_k for i in probes)
    gaps = [b - a for a, b in itertools.pairwise(probes)]
    assert gaps[:3] == [16, 32, 32] and set(gaps[2:]) == {8 * 2 ** c.max_probe_backoff}, gaps
    # The text becomes predictable: probes get accepted and speculation comes back for good.
    ks = []
    for _ in range(60):
        k = c.choose_k(1, 1)
        ks.append(k)
        if k:
            c.record(1, k, k)
    assert ks[-10:] == [4] * 10
    # at most one backed-off wait, then successful probes come every probe_every steps
    assert ks.index(4) <= 32 + 2 * 8
    assert c.stats()["probes"] >= 4


def test_expensive_probes_are_rare_enough_to_cost_at_most_max_probe_overhead():
    """A layer-skip style drafter: a 2-token probe costs 1.2 extra plain steps (bench spec measured a
    0.71x slowdown with 0% acceptance when such probes came every 16 steps)."""
    c = SpecController(max_k=4, probe_every=16)
    c.calibrate(verify_ms=lambda k, b: 20.0 + k, plain_ms=lambda b: 20.0, draft_ms=lambda k, b: 11.0 * k)
    assert c.probe_cost(1) == pytest.approx((20 + 2 + 22) / 20 - 1)
    assert c.probe_interval(1) == math.ceil(c.probe_cost(1) / 0.02)  # 60: well past probe_every
    for seq in range(20):  # a hopeless workload: the global prior is low
        c.record(seq, 4, 0)
    ks = [c.choose_k(999, 1) for _ in range(300)]
    assert ks[0] == 0  # no immediate probe: it would cost more than a step
    wasted = sum(c.probe_cost(1) for k in ks if k)
    assert 0 < wasted / len(ks) <= c.max_probe_overhead


def test_shadow_evidence_turns_a_sequence_back_on_before_any_probe():
    """Prompt lookup drafts for free: while a sequence is off, the decoder's shadow drafts report
    how they would have fared, and a sequence whose text turns copyable resumes at once."""
    c = SpecController(max_k=4, probe_every=1000)
    c.calibrate(MEMORY_BOUND)
    for _ in range(6):
        if k := c.choose_k(1, 1):
            c.record(1, k, 0)
    assert c.choose_k(1, 1) == 0 and c.is_off_for_acceptance(1)
    before = c.stats()
    for _ in range(4):
        c.record_shadow(1, 4, 4)
    assert c.choose_k(1, 1) == 4 and not c.is_off_for_acceptance(1)
    after = c.stats()
    assert after["drafts"] == before["drafts"] and after["draft_tokens"] == before["draft_tokens"]
    assert after["shadow_drafts"] == 4 and after["probes"] == 0


def test_a_sequence_off_for_cost_is_not_off_for_acceptance():
    c = SpecController(max_k=4)
    c.calibrate(COMPUTE_BOUND)
    assert c.choose_k(1, batch_size=32) == 0
    assert not c.is_off_for_acceptance(1)  # better drafts could not help: no shadow drafting


def test_large_compute_bound_batches_do_not_speculate_and_do_not_probe():
    c = SpecController(max_k=4, probe_every=2)
    c.calibrate(COMPUTE_BOUND)
    for _ in range(10):
        assert c.choose_k(1, batch_size=32) == 0  # verifying 5x the tokens costs 5x: never pays
    assert c.stats()["probes"] == 0  # off for cost, not acceptance: probing could not help
    # Same acceptance on a memory-bound target: batch 1 speculates, a huge batch does not.
    c2 = SpecController(max_k=4)
    c2.calibrate(MEMORY_BOUND)
    assert c2.choose_k(1, batch_size=1) == 4
    assert c2.choose_k(2, batch_size=4096) == 0


def test_k_balances_acceptance_against_draft_cost():
    # Verify is free, drafting costs 0.3 of a step per token: short drafts for mediocre acceptance.
    c = SpecController(max_k=8)
    c.calibrate(verify_ms=lambda k, b: 10.0, plain_ms=lambda b: 10.0, draft_ms=lambda k, b: 3.0 * k)
    rates = {k: expected_tokens(0.7, k) / (10.0 + 3.0 * k) for k in range(1, 9)}
    assert c.best_k(0.7, 1) == max(rates, key=rates.get)
    assert 0 < c.best_k(0.7, 1) < 8
    assert c.best_k(0.98, 1) > c.best_k(0.7, 1)
    assert c.best_k(0.2, 1) == 0  # 1.2 tokens for 1.3 steps: plain is faster


def test_measured_draft_time_is_used_without_draft_ms():
    c = SpecController(max_k=8)
    c.calibrate(MEMORY_BOUND)
    free = c.best_k(0.7, 1)
    for _ in range(20):
        c.record_draft_time(seconds=0.010, num_passes=1, batch_size=1)  # half a target step per token
    assert c.draft_pass_ms(1) == pytest.approx(10.0)
    assert c.best_k(0.7, 1) < free


def test_draft_cost_is_per_pass_and_per_batch_size():
    """A model drafter's pass over 2 sequences costs about what a pass over 1 costs: the cost of
    a K-token draft is K passes at that batch size, not K * batch * (ms per drafted token)."""
    c = SpecController(max_k=4)
    c.calibrate(MEMORY_BOUND)
    c.record_draft_time(seconds=0.040, num_passes=4, batch_size=2)  # 10 ms per pass over 2 sequences
    assert c.draft_pass_ms(2) == pytest.approx(10.0)
    # unmeasured sizes follow the target's cost curve from the nearest measured size
    assert c.draft_pass_ms(1) == pytest.approx(10.0 * c._pass_ms(1) / c._pass_ms(2))
    assert c.draft_pass_ms(64) == pytest.approx(10.0 * 30 / c._pass_ms(2))
    assert c.step_ms(4, 2) == pytest.approx(c.step_ms(0, 2 * 5) + 40.0, rel=0.05)
    carried = c.draft_pass_ms(1)
    c.record_draft_time(seconds=0.009, num_passes=1, batch_size=1)  # a first sample at size 1 ...
    assert c.draft_pass_ms(1) == pytest.approx(0.8 * carried + 0.2 * 9.0)  # ... blends into the estimate
    assert c.draft_pass_ms(2) == pytest.approx(10.0)


def test_one_slow_first_sample_at_a_new_batch_size_does_not_switch_that_size_off():
    """The step where a request joins changes the batch size and can be slow (a draft model's
    prompt catch-up): taken whole, that sample would price the size out for good."""
    c = SpecController(max_k=4)
    c.calibrate(MEMORY_BOUND)
    for _ in range(5):
        c.record_draft_time(seconds=0.002, num_passes=1, batch_size=1)
    c.record_draft_time(seconds=0.020, num_passes=1, batch_size=2)  # 10x the usual pass
    assert c.draft_pass_ms(2) < 0.3 * 20
    assert c.best_k(0.9, 2) > 0  # taken whole, 20 ms per pass would have priced batch 2 out


def test_alpha_estimate_is_per_token_acceptance_not_accepted_over_drafted():
    rng = random.Random(0)
    c = SpecController(max_k=4, global_decay=1.0)
    true_alpha = 0.7
    for _ in range(3000):
        n = 0
        while n < 4 and rng.random() < true_alpha:
            n += 1
        c.record(rng.randrange(50), 4, n)
    s = c.stats()
    assert c.alpha() == pytest.approx(true_alpha, abs=0.02)
    # accepted / drafted = (a + a^2 + a^3 + a^4) / 4 for geometric acceptance: well below alpha
    assert s["acceptance_rate"] == pytest.approx(sum(true_alpha ** i for i in range(1, 5)) / 4, abs=0.02)


def test_new_sequences_start_from_the_global_estimate():
    c = SpecController(max_k=4, global_decay=1.0)
    for seq in range(20):
        c.record(seq, 4, 0)
    assert c.alpha(999) < 0.1
    c.calibrate(MEMORY_BOUND)
    # a fresh sequence in a hopeless workload starts off after one short probe of its own
    assert c.choose_k(999, 1) == c.probe_k
    c.record(999, c.probe_k, 0)
    assert [c.choose_k(999, 1) for _ in range(c.probe_every - 2)] == [0] * (c.probe_every - 2)


def test_a_copying_sequence_after_a_hopeless_workload_drafts_within_a_few_steps():
    """The global prior must not keep a predictable request from drafting (seen in bench spec:
    extract-fields accepted 98% when forced, but got no drafts after an open-ended task)."""
    c = SpecController(max_k=4, global_decay=1.0)
    c.calibrate(MEMORY_BOUND)
    for seq in range(20):
        c.record(seq, 4, 0)
    ks = []
    for _ in range(6):
        k = c.choose_k(999, 1)
        ks.append(k)
        c.record(999, k, k)  # every draft accepted
    assert ks[0] > 0 and max(ks) >= 3, ks


def test_stats_math():
    c = SpecController(max_k=4)
    c.record(1, 4, 4)
    c.record(1, 4, 1)
    c.record(2, 2, 0)
    c.record(2, 0, 0)  # no draft: not a verification step
    s = c.stats()
    assert (s["drafts"], s["draft_tokens"], s["accepted_tokens"]) == (3, 10, 5)
    assert s["acceptance_rate"] == pytest.approx(0.5)
    assert s["mean_accepted_length"] == pytest.approx(1 + 5 / 3)
    assert s["mean_draft_length"] == pytest.approx(10 / 3)
    assert s["acceptance_per_position"] == pytest.approx([2 / 3, 1 / 3, 1 / 2, 1 / 2])
    assert SpecController().stats()["drafts"] == 0


def test_release_and_zero_max_k():
    c = SpecController(max_k=4)
    c.record(3, 4, 2)
    c.release(3)
    assert 3 not in c.seqs
    off = SpecController(max_k=0)
    assert off.choose_k(1, 1) == 0


def test_stats_expected_speedup_uses_the_seed_formula():
    c = SpecController(max_k=4)
    c.calibrate(verify_ms=lambda k, b: 10.0, plain_ms=lambda b: 10.0, draft_ms=lambda k, b: 2.0 * k)
    for _ in range(5):
        c.record(1, 4, 4)
        c.record(1, 4, 3)
    s = c.stats()
    assert s["draft_cost_ratio"] == pytest.approx(0.2)
    assert s["expected_speedup"] == pytest.approx(expected_speedup(c.alpha(), 4, 0.2))


def test_attention_over_long_contexts_makes_wide_verification_dear():
    """Each verification row attends to its sequence's whole context, which the pass table (a
    short context) leaves out: with 16 sequences of 2000 tokens, K falls where a short context
    keeps it, and a single sequence still drafts."""
    c = SpecController(max_k=4)
    c.calibrate(MEMORY_BOUND, attention_ms_per_key=0.0008)  # measured here: ~0.0007-0.0008
    alpha = 0.7
    c.set_context(50)
    short = c.best_k(alpha, 16)
    c.set_context(2000)
    long = c.best_k(alpha, 16)
    assert short > 0 and long < short
    assert c.best_k(alpha, 1) > 0  # one sequence: 4 extra rows of attention are cheap
    assert c.step_ms(2, 16) == pytest.approx(c._pass_ms(48) + 0.0008 * 48 * 2000)  # 48 rows x 2000 keys
    c.set_context(0)
    assert c.step_ms(2, 16) == pytest.approx(c._pass_ms(48))


def test_attention_shared_by_a_sequences_rows_makes_wide_verification_cheap():
    """Where a kernel lets a sequence's verification rows share each key's pass (the further rows'
    attention measured at 1/8 of the first's), long contexts no longer push K down."""
    c = SpecController(max_k=4)
    c.calibrate(MEMORY_BOUND, attention_ms_per_key=0.0008, attention_ms_per_key_extra_row=0.0001)
    c.set_context(2000)
    assert c.step_ms(2, 16) == pytest.approx(c._pass_ms(48) + (0.0008 + 2 * 0.0001) * 16 * 2000)
    row_kernel = SpecController(max_k=4)
    row_kernel.calibrate(MEMORY_BOUND, attention_ms_per_key=0.0008)
    row_kernel.set_context(2000)
    assert c.best_k(0.7, 16) > row_kernel.best_k(0.7, 16)


def test_drafted_steps_that_run_dearer_than_predicted_draft_less():
    """Measured step times correct the cost model: drafted steps taking 1.3x their prediction while
    plain steps take theirs make a borderline K unprofitable."""
    c = SpecController(max_k=4)
    c.calibrate(MEMORY_BOUND)
    alpha = 0.2
    k = c.best_k(alpha, 1, free_draft=True)
    assert k > 0 and c.realized_draft_cost_factor() == 1.0
    for _ in range(7):  # too few samples: no correction yet
        c.record_step_time(1.3 * c.predict_step_ms([k], [100]), c.predict_step_ms([k], [100]), drafted=True)
        c.record_step_time(c.predict_step_ms([0], [100]), c.predict_step_ms([0], [100]), drafted=False)
    assert c.realized_draft_cost_factor() == 1.0
    for _ in range(20):
        c.record_step_time(1.3 * c.predict_step_ms([k], [100]), c.predict_step_ms([k], [100]), drafted=True)
        c.record_step_time(c.predict_step_ms([0], [100]), c.predict_step_ms([0], [100]), drafted=False)
    assert c.realized_draft_cost_factor() == pytest.approx(1.3)
    assert c.best_k(alpha, 1, free_draft=True) == 0
    assert c.best_k(0.95, 1, free_draft=True) > 0  # good drafts still pay


def test_paid_drafts_stop_at_max_paid_k_while_lookup_drafts_go_to_max_k():
    c = SpecController(max_k=16, max_paid_k=8)
    c.calibrate(MEMORY_BOUND, draft_ms=lambda k, b: 0.0001 * k)  # near-free model drafts, perfect acceptance
    assert c.best_k(0.999, 1, free_draft=False) == 8
    assert c.best_k(0.999, 1, free_draft=True) == 16


# An AMX-like int8 target: rows go 16 at a time through the tile unit (the 17th row starts another pass).
TILED = {1: 0.0050, 16: 0.0080, 17: 0.0114, 32: 0.0130, 33: 0.0200, 48: 0.0203, 64: 0.0258, 256: 0.1057}


def _step_rate(c: SpecController, ks, alphas, contexts, base_rows: int, base_ms: float, batch: int) -> float:
    """Expected tokens per ms of a step where sequence i drafts ks[i] (the planner's objective)."""
    extra = c.attention_ms_per_key_extra_row
    ms = float(c._pass_at(base_rows + sum(ks))) + base_ms
    ms += sum(extra * ctx * k for ctx, k in zip(contexts, ks, strict=True))
    return (batch + sum(expected_tokens(a, k) - 1 for a, k in zip(alphas, ks, strict=True))) / ms


def test_step_plan_is_the_best_plan_of_the_whole_step():
    """The planner's Ks against every possible combination (three sequences, K <= 5, random
    acceptance, contexts and batch sizes): never a worse expected rate."""
    rng = random.Random(0)
    c = SpecController(max_k=5, margin=1.0)
    c.calibrate(TILED, attention_ms_per_key=0.001, attention_ms_per_key_extra_row=0.0008)
    for _ in range(150):
        alphas = [rng.uniform(0.1, 0.99) for _ in range(3)]
        contexts = [rng.randrange(10, 900) for _ in range(3)]
        batch = rng.randrange(3, 20)
        slots = [DraftSlot(i, None, True, ctx) for i, ctx in enumerate(contexts)]
        planned = c._plan_ks(alphas, slots, batch, 3.0, batch)
        best = max(_step_rate(c, ks, alphas, contexts, batch, 3.0, batch)
                   for ks in itertools.product(range(6), repeat=3))
        assert _step_rate(c, planned, alphas, contexts, batch, 3.0, batch) >= best * (1 - 1e-9)


def test_a_copying_sequence_drafts_in_a_batch_that_would_not_draft_alike():
    """16 sequences, one copying (alpha 0.97), fifteen not (0.2): priced as if all drafted alike
    (choose_k), the copier would draft one token at most; the step plan gives it a long draft and
    nobody else one."""
    c = SpecController(max_k=16)
    c.calibrate(TILED, attention_ms_per_key=0.001, attention_ms_per_key_extra_row=0.0008)
    c.set_context(300)
    assert c.best_k(0.97, 16, free_draft=True) <= 1
    slots = [DraftSlot(i, None, True, 300) for i in range(16)]
    ks = c._plan_ks([0.97] + [0.2] * 15, slots, 16, 16 * 0.3, 16)
    assert ks[0] >= 8 and ks[1:] == [0] * 15
    # and K stays below what crossing the next 16-row tile boundary would cost
    assert 16 + sum(ks) <= 32


def test_drafts_beside_a_prompt_chunk_must_pay_at_plain_decodings_rate():
    """With prompt rows in the pass the step's own rate is the prompt's; there the plan takes the
    Ks whose extra tokens beat margin x plain decoding's tokens per ms of the time their rows add
    (checked against every combination), so cheap rows draft and dear ones do not."""
    rng = random.Random(1)
    c = SpecController(max_k=5)
    c.calibrate({1: 0.005, 16: 0.006, 64: 0.012, 1024: 0.200, 2048: 0.400}, attention_ms_per_key=0.001,
                attention_ms_per_key_extra_row=0.0008)
    for _ in range(100):
        alphas = [rng.uniform(0.1, 0.99) for _ in range(2)]
        contexts = [rng.randrange(10, 2000) for _ in range(2)]
        batch, prefill = rng.randrange(2, 16), rng.randrange(100, 2000)
        slots = [DraftSlot(i, None, True, ctx) for i, ctx in enumerate(contexts)]
        rate = c.margin * batch / (float(c._pass_at(batch)) + 1.0)

        def net(ks, alphas=alphas, contexts=contexts, rows=batch + prefill, rate=rate):
            ms = float(c._pass_at(rows + sum(ks)) - c._pass_at(rows))
            ms += sum(0.0008 * ctx * k for ctx, k in zip(contexts, ks, strict=True))
            return sum(expected_tokens(a, k) - 1 for a, k in zip(alphas, ks, strict=True)) - rate * ms

        planned = c._plan_ks(alphas, slots, batch, 1.0, batch, prefill)
        assert net(planned) >= max(net(ks) for ks in itertools.product(range(6), repeat=2)) - 1e-9
    # one sequence beside a 1500-token chunk: its rows cost ~0.2 ms each against 5 ms a plain token
    assert c.plan([DraftSlot(1, None, True, 100)], prefill_rows=1500) != [0]


def test_plan_probes_sequences_that_are_off_for_their_acceptance():
    c = SpecController(max_k=4, warmup_trials=1)
    c.calibrate(MEMORY_BOUND)
    slot = DraftSlot(1, None, True, 50)
    for _ in range(6):
        c.record(1, 4, 0)  # nothing accepted: off
    ks = [c.plan([slot])[0] for _ in range(c.probe_every * 2 - 1)]
    assert c.is_off_for_acceptance(1)
    assert ks.count(c.probe_k) == 1 and ks.count(0) == len(ks) - 1


def test_pass_table_spikes_are_capped_by_wider_passes():
    assert _without_spikes({1: 5.0, 32: 13.0, 33: 25.9, 48: 20.3}) == {1: 5.0, 32: 13.0, 33: 20.3, 48: 20.3}


def test_realized_cost_factor_never_discounts_drafts():
    """A many-sequence plain step under-predicted more than a drafted one must not make drafts cheap."""
    c = SpecController(max_k=4)
    c.calibrate(MEMORY_BOUND)
    for _ in range(10):
        c.record_step_time(10.0, 10.0, drafted=True)
        c.record_step_time(15.0, 10.0, drafted=False)
    assert c.realized_draft_cost_factor() == 1.0


def test_plan_keeps_paid_drafts_within_their_cap():
    c = SpecController(max_k=16, max_paid_k=4)
    c.calibrate({1: 0.005, 16: 0.006, 64: 0.012, 1024: 0.200})
    slots = [DraftSlot(1, None, False, 100), DraftSlot(2, None, True, 100), DraftSlot(3, None, False, 100)]
    assert c._plan_ks([0.99] * 3, slots, 3, 0.3, 3) == [4, 16, 4]
    assert c._plan_ks([0.99], slots[:1], 1, 0.3, 1) == [4]


def test_paid_drafts_share_their_drafting_passes():
    """A model drafter drafts every paid sequence in the same passes: a step costs pass_ms x the
    deepest paid draft. The plan against every combination under that cost (three paid sequences)."""
    rng = random.Random(2)
    c = SpecController(max_k=5, max_paid_k=5, margin=1.0)
    c.calibrate(TILED, attention_ms_per_key=0.001, attention_ms_per_key_extra_row=0.0008)
    c.record_draft_time(seconds=0.004, num_passes=1, batch_size=3)  # 4 ms a drafting pass
    for _ in range(100):
        alphas = [rng.uniform(0.3, 0.99) for _ in range(3)]
        contexts = [rng.randrange(10, 600) for _ in range(3)]
        slots = [DraftSlot(i, None, False, ctx) for i, ctx in enumerate(contexts)]

        def rate(ks, alphas=alphas, contexts=contexts):
            ms = float(c._pass_at(3 + sum(ks))) + 1.0 + c.draft_pass_ms(3) * max(ks)
            ms += sum(0.0008 * ctx * k for ctx, k in zip(contexts, ks, strict=True))
            return (3 + sum(expected_tokens(a, k) - 1 for a, k in zip(alphas, ks, strict=True))) / ms

        best = max(itertools.product(range(6), repeat=3), key=rate)
        assert rate(c._plan_ks(alphas, slots, 3, 1.0, 3)) >= rate(best) * (1 - 1e-9)


def test_a_kind_that_fails_everywhere_is_off_for_a_new_sequence():
    """After one-token matches failed across sequences, a new sequence's first such draft is off
    (probed now and then) instead of spending its own warm-up trials; a good kind still drafts."""
    c = SpecController(max_k=8)
    c.calibrate(MEMORY_BOUND)
    for seq in range(5):
        c.record(seq, 4, 0, kind=1)
        c.record(seq, 8, 8, kind=8)
    assert c.alpha(99, kind=1) < c.min_alpha
    slots = [DraftSlot(99, 1, True, 50), DraftSlot(100, 8, True, 50)]
    ks = []
    for _ in range(c.probe_every - 1):
        ks.append(c.plan(slots))
        if ks[-1][0]:
            c.record(99, ks[-1][0], 0, kind=1)  # its probe fails
    assert all(k[1] > 0 for k in ks)
    assert sum(k[0] > 0 for k in ks) <= 1 and c.is_off_for_acceptance(99, kind=1)  # at most its first probe


def test_a_plan_that_drafted_nothing_stands_until_an_acceptance_rises():
    """A step plan that drafted nothing is reused without planning while no slot's acceptance rose,
    for at most QUIET_PLAN_STEPS steps; a rise plans afresh (and here drafts)."""
    c = SpecController(max_k=4, probe_every=1000)
    c.calibrate({1: 0.010, 2: 0.010, 4: 0.0155, 64: 0.3})  # 4 rows 1.55x 2: pays from alpha ~0.63
    slots = [DraftSlot(1, None, True, 0), DraftSlot(2, None, True, 0)]
    for key in (1, 2):
        for _ in range(10):
            c.record(key, 2, 1)  # alpha 0.5
    sizes, real = [], c._plan_ks

    def counting(alphas, *args, **kwargs):
        sizes.append(len(alphas))
        return real(alphas, *args, **kwargs)

    c._plan_ks = counting

    def step_plans() -> int:
        return sizes.count(2)  # the single-slot plans are good_drafts_pay's

    assert c.plan(slots) == [0, 0] and step_plans() == 1
    for _ in range(QUIET_PLAN_STEPS):
        assert c.plan(slots) == [0, 0]
    assert step_plans() == 1
    assert c.plan(slots) == [0, 0] and step_plans() == 2  # planned afresh after QUIET_PLAN_STEPS
    c.record(2, 2, 0)  # a fall: still nothing to plan
    assert c.plan(slots) == [0, 0] and step_plans() == 2
    assert c.plan(slots, undrafted_contexts=[0]) == [0, 0] and step_plans() == 3  # another batch
    assert c.plan(slots, undrafted_contexts=[0]) == [0, 0] and step_plans() == 3
    for _ in range(5):
        c.record(1, 4, 4)
    assert c.plan(slots, undrafted_contexts=[0])[0] > 0 and step_plans() == 4
