"""Property tests of the Scheduler, driven by a fake step loop instead of a model.

The fake loop mirrors ``Engine.step``: each scheduled sequence computes ``num_new_tokens``
(plus drafts in its spec slots); when its prompt is done a token is "sampled" (plus accepted
drafts), rejected drafts are rolled back, the stop rule ends it after max_tokens, and
``trim_blocks`` gives back what the rolled-back drafts reserved.
"""

from __future__ import annotations

import random
from collections import Counter
from dataclasses import dataclass

import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from specache.engine.scheduler import Scheduler, SchedulerConfig, SchedulerOutput
from specache.engine.sequence import Sequence, Status
from specache.kv.block_pool import BlockPool
from specache.sampling import SamplingParams

VOCAB = 7  # a small alphabet so prompts share prefixes (exercises the prefix cache)


@dataclass
class Req:
    arrival: int  # step at which the request arrives
    prompt: list[int]
    max_tokens: int
    priority: int


@dataclass
class Setup:
    block_size: int
    num_blocks: int
    max_num_seqs: int
    max_num_batched_tokens: int
    max_model_len: int
    spec_k: int  # 0: no speculative slots
    seed: int


def radix_blocks(cache) -> Counter:
    out: Counter = Counter()
    if cache is not None:
        for node in cache._nodes():
            out.update(node.blocks)
    return out


def check_schedule(sched: Scheduler, out: SchedulerOutput, setup: Setup) -> None:
    pool, bs = sched.pool, setup.block_size
    cfg = sched.config
    assert out.num_tokens <= cfg.max_num_batched_tokens
    assert len(sched.running) <= cfg.max_num_seqs
    scheduled_ids = [id(s.seq) for s in out.scheduled]
    assert len(scheduled_ids) == len(set(scheduled_ids)), "a sequence was scheduled twice"
    running = {id(s) for s in sched.running}
    for s in out.scheduled:
        seq = s.seq
        assert id(seq) in running and seq.status is Status.RUNNING
        assert s.num_new_tokens >= 1 and s.num_spec_slots >= 0
        assert seq.num_computed + s.num_new_tokens <= seq.num_tokens
        if s.num_spec_slots:
            assert seq.num_tokens - seq.num_computed == 1, "spec slots are only for decode steps"
            assert seq.num_tokens + s.num_spec_slots <= cfg.max_model_len
        end = seq.num_computed + s.num_new_tokens + s.num_spec_slots
        assert len(seq.block_table) * bs >= end, "block table does not cover the scheduled tokens"
        # Copy-on-write safety: every block written this step belongs to this sequence alone.
        for j in range(seq.num_computed // bs, -(-end // bs)):
            assert pool.ref_count(seq.block_table[j]) == 1, "a step writes into a shared block"
    for seq in sched.waiting:
        assert seq.status is Status.WAITING
        assert not seq.block_table and seq.prefix_node is None
    for p in out.preempted:
        assert p.num_preemptions > 0
        if p.status is Status.WAITING:  # (a victim may be re-admitted, from scratch, in the same step)
            assert p.num_computed == 0 and not p.block_table
    check_pool(sched)


def check_pool(sched: Scheduler, after_step: bool = False) -> None:
    pool, bs = sched.pool, sched.pool.block_size
    holders: Counter = Counter()
    owner: dict[int, tuple[int, Sequence]] = {}
    cached = radix_blocks(sched.prefix_cache)
    assert all(c == 1 for c in cached.values()), "the radix tree holds a block twice"
    for seq in sched.running:
        assert len(seq.block_table) == len(set(seq.block_table)), "a block appears twice in one table"
        if after_step:  # trim_blocks gave back whatever rolled-back drafts had reserved
            assert len(seq.block_table) == pool.blocks_needed(seq.num_computed)
        for j, b in enumerate(seq.block_table):
            holders[b] += 1
            if b in owner:
                # Shared between live sequences: only through the prefix cache, for a full,
                # computed block holding the same tokens at the same place.
                assert b in cached, f"block {b} is held by two sequences without the prefix cache"
                j0, other = owner[b]
                assert j0 == j
                for s in (seq, other):
                    assert s.num_computed >= (j + 1) * bs
                assert seq.tokens[j * bs:(j + 1) * bs] == other.tokens[j * bs:(j + 1) * bs]
            owner[b] = (j, seq)
    for b in range(pool.num_blocks):
        assert pool.ref_count(b) == holders[b] + cached[b], f"block {b}: ref count != holders"
    assert pool.num_free == sum(1 for b in range(pool.num_blocks) if pool.ref_count(b) == 0)


def simulate(reqs: list[Req], setup: Setup, prefix: bool = False, check: bool = True) -> Scheduler:
    rng = random.Random(setup.seed)
    pool = BlockPool(setup.num_blocks, setup.block_size)
    cache = None
    if prefix:
        radix = pytest.importorskip("specache.prefix.radix")
        cache = radix.RadixCache(pool, setup.block_size)
    sched = Scheduler(SchedulerConfig(setup.max_num_seqs, setup.max_num_batched_tokens, setup.max_model_len),
                      pool, cache)
    spec_slots = (lambda seq: rng.randint(0, setup.spec_k)) if setup.spec_k else None
    pending = sorted(enumerate(reqs), key=lambda x: x[1].arrival)
    seqs: list[Sequence] = []
    total_work = sum(len(r.prompt) + r.max_tokens for r in reqs)
    limit = 50 + 40 * total_work
    step = 0
    while pending or sched.has_unfinished():
        while pending and pending[0][1].arrival <= step:
            i, r = pending.pop(0)
            seq = Sequence(i, f"r{i}", 0, r.prompt, SamplingParams(max_tokens=r.max_tokens), r.priority,
                           arrival=float(r.arrival) + i * 1e-6)
            seqs.append(seq)
            sched.add(seq)
        out = sched.schedule(spec_slots)
        if check:
            check_schedule(sched, out, setup)
        if sched.has_unfinished():
            assert out.scheduled, "unfinished work but nothing scheduled (deadlock)"
        for s in out.scheduled:
            fake_step(sched, s.seq, s.num_new_tokens, s.num_spec_slots, rng, setup.max_model_len)
        if check:
            check_pool(sched, after_step=True)
        step += 1
        assert step < limit, "no progress (livelock)"
    for seq in seqs:
        assert seq.is_finished and seq.finish_reason == "length"
        assert len(seq.output_ids) == min(seq.params.max_tokens, setup.max_model_len - seq.num_prompt)
        assert not seq.block_table and seq.prefix_node is None
    assert not sched.running and not sched.waiting
    if cache is not None:
        for node in cache._nodes():
            assert node.lock_ref == 0, "a radix node stays locked after every request finished"
        cache.reset()
    assert pool.all_free()
    return sched


def fake_step(sched: Scheduler, seq: Sequence, n: int, k: int, rng: random.Random,
              max_model_len: int) -> None:
    """What Engine.step does for one sequence, with a random draft and a random acceptance."""
    start = seq.num_computed
    ends_prompt = start + n == seq.num_tokens
    num_draft = rng.randint(0, k) if ends_prompt else 0  # a proposer may draft fewer than its slots
    seq.num_computed = start + n + num_draft
    if not ends_prompt:
        sched.trim_blocks(seq, seq.num_computed)
        return
    accepted = rng.randint(0, num_draft)
    seq.num_computed -= num_draft - accepted  # rejected drafts hold no valid K/V
    was_prefill = not seq.output_ids
    for _ in range(accepted + 1):
        seq.append(rng.randrange(VOCAB))
        if len(seq.output_ids) >= seq.params.max_tokens or seq.num_tokens >= max_model_len:
            seq.num_computed = min(seq.num_computed, seq.num_tokens - 1)
            sched.finish(seq, "length")
            return
    sched.trim_blocks(seq, seq.num_computed)
    if was_prefill and sched.prefix_cache is not None:
        sched.cache_prefix(seq)


@st.composite
def workloads(draw, tight: bool = False, spec: bool | None = None):
    block_size = draw(st.sampled_from([1, 2, 4, 8, 16]))
    n = draw(st.integers(1, 10))
    bases = [[draw(st.integers(0, VOCAB - 1)) for _ in range(40)] for _ in range(2)]
    reqs = []
    for _ in range(n):
        base = bases[draw(st.integers(0, 1))]
        shared = draw(st.integers(0, 40))
        tail = draw(st.lists(st.integers(0, VOCAB - 1), max_size=24))
        prompt = (base[:shared] + tail) or [0]
        reqs.append(Req(draw(st.integers(0, 12)), prompt, draw(st.integers(1, 24)), draw(st.integers(0, 2))))
    spec_k = draw(st.integers(0, 4)) if spec is None else (draw(st.integers(1, 4)) if spec else 0)
    max_model_len = draw(st.integers(max(len(r.prompt) for r in reqs) + 1, 100))
    # Like Engine.check_fits: every request fits the whole pool on its own.
    need = max(-(-(min(len(r.prompt) + r.max_tokens, max_model_len) + spec_k) // block_size) for r in reqs)
    num_blocks = need + (draw(st.integers(0, 2)) if tight else draw(st.integers(0, 40)))
    setup = Setup(block_size, num_blocks, draw(st.integers(1, 8)), draw(st.integers(1, 96)), max_model_len,
                  spec_k, draw(st.integers(0, 2**32)))
    return reqs, setup


FAST = settings(max_examples=100, deadline=None, suppress_health_check=[HealthCheck.too_slow])


@FAST
@given(workloads(spec=False))
def test_invariants_without_speculation(work):
    simulate(*work)


@FAST
@given(workloads(spec=True))
def test_invariants_with_spec_slots_and_rollback(work):
    simulate(*work)


@FAST
@given(workloads(tight=True))
def test_tight_block_budget_still_finishes_everything(work):
    simulate(*work)


@FAST
@given(workloads())
def test_invariants_with_prefix_cache(work):
    simulate(*work, prefix=True)


@FAST
@given(workloads(tight=True))
def test_prefix_cache_under_tight_budget(work):
    simulate(*work, prefix=True)


@pytest.mark.parametrize("spec_k", [0, 3])
def test_preemption_happens_under_a_tight_budget_and_everything_finishes(spec_k):
    reqs = [Req(0, [i % VOCAB] * 12, 20, 0) for i in range(6)]
    need = -(-(12 + 20 + spec_k) // 4)
    setup = Setup(block_size=4, num_blocks=need + 1, max_num_seqs=6, max_num_batched_tokens=64,
                  max_model_len=128, spec_k=spec_k, seed=1)
    sched = simulate(reqs, setup)
    assert sched.num_preemptions > 0


def test_urgent_late_arrival_runs_before_earlier_waiting_requests():
    pool = BlockPool(64, 4)
    sched = Scheduler(SchedulerConfig(max_num_seqs=1, max_num_batched_tokens=64, max_model_len=256), pool)
    params = SamplingParams(max_tokens=3)
    a = Sequence(0, "a", 0, [1, 2, 3], params, priority=0, arrival=0.0)
    b = Sequence(1, "b", 0, [1, 2, 3], params, priority=0, arrival=1.0)
    c = Sequence(2, "c", 0, [4, 5, 6], params, priority=-1, arrival=2.0)
    rng = random.Random(0)
    order: list[str] = []
    sched.add(a)
    for step in range(40):
        if step == 1:
            sched.add(b)
        if step == 2:
            sched.add(c)
        out = sched.schedule()
        assert len(out.scheduled) <= 1
        for s in out.scheduled:
            if not order or order[-1] != s.seq.request_id:
                order.append(s.seq.request_id)
            fake_step(sched, s.seq, s.num_new_tokens, 0, rng, 256)
        if not sched.has_unfinished():
            break
    # a starts alone; c (more urgent, arrived last) takes its slot; then a (earlier than b), then b.
    assert order == ["a", "c", "a", "b"]
    assert all(s.is_finished for s in (a, b, c))
    assert sched.num_preemptions == 1 and a.num_preemptions == 1
    assert pool.all_free()


def test_waiting_order_is_priority_then_arrival():
    pool = BlockPool(64, 4)
    sched = Scheduler(SchedulerConfig(max_num_seqs=1, max_num_batched_tokens=64, max_model_len=256), pool)
    params = SamplingParams(max_tokens=1)
    seqs = [Sequence(i, f"s{i}", 0, [1, 2], params, priority=p, arrival=float(t))
            for i, (p, t) in enumerate([(2, 0), (1, 5), (1, 3), (0, 9), (2, -1)])]
    for s in seqs:
        sched.add(s)
    finished = []
    rng = random.Random(0)
    while sched.has_unfinished():
        for s in sched.schedule().scheduled:
            fake_step(sched, s.seq, s.num_new_tokens, 0, rng, 256)
            if s.seq.is_finished:
                finished.append(s.seq.request_id)
    assert finished == ["s3", "s2", "s1", "s4", "s0"]
    assert pool.all_free()


def test_preempted_sequence_keeps_its_place_ahead_of_less_urgent_waiting_ones():
    """A sequence preempted for memory must not be overtaken, in the same step, by a less urgent one."""
    pool = BlockPool(10, 1)
    sched = Scheduler(SchedulerConfig(max_num_seqs=3, max_num_batched_tokens=64, max_model_len=64), pool)
    a = Sequence(0, "a", 0, [1, 2], SamplingParams(max_tokens=20), priority=0, arrival=0.0)
    v = Sequence(1, "v", 0, [1, 2, 3, 4, 5, 6], SamplingParams(max_tokens=20), priority=1, arrival=1.0)
    w = Sequence(2, "w", 0, [7, 8, 9], SamplingParams(max_tokens=20), priority=2, arrival=2.0)
    rng = random.Random(0)
    sched.add(a)
    sched.add(v)
    for step in range(2):  # a and v fill the pool; w arrives and cannot be admitted
        for s in sched.schedule().scheduled:
            fake_step(sched, s.seq, s.num_new_tokens, 0, rng, 64)
        if step == 0:
            sched.add(w)
    assert pool.num_free == 0 and sched.running == [a, v] and sched.waiting == [w]
    out = sched.schedule()  # a grows: v (the least urgent running) is preempted
    assert out.preempted == [v]
    assert w not in sched.running, "a less urgent request took the memory freed by preempting v"


def test_urgent_arrival_gets_the_budget_of_the_sequence_it_preempts():
    pool = BlockPool(64, 4)
    sched = Scheduler(SchedulerConfig(max_num_seqs=1, max_num_batched_tokens=4, max_model_len=256), pool)
    a = Sequence(0, "a", 0, [1, 2, 3, 4], SamplingParams(max_tokens=20), priority=1, arrival=0.0)
    sched.add(a)
    rng = random.Random(0)
    for s in sched.schedule().scheduled:
        fake_step(sched, s.seq, s.num_new_tokens, 0, rng, 256)
    c = Sequence(1, "c", 0, [5, 6, 7], SamplingParams(max_tokens=20), priority=0, arrival=1.0)
    sched.add(c)
    out = sched.schedule()
    assert out.preempted == [a]
    assert [(s.seq.request_id, s.num_new_tokens) for s in out.scheduled] == [("c", 3)]


def _decoding(pool: BlockPool, prompt: list[int], max_tokens: int) -> tuple[Scheduler, Sequence]:
    """A scheduler whose one sequence has its prompt computed and its first token sampled."""
    sched = Scheduler(SchedulerConfig(max_num_seqs=4, max_num_batched_tokens=64, max_model_len=256), pool)
    seq = Sequence(0, "a", 0, prompt, SamplingParams(max_tokens=max_tokens), priority=0, arrival=0.0)
    sched.add(seq)
    [s] = sched.schedule().scheduled
    seq.num_computed += s.num_new_tokens
    seq.append(1)
    return sched, seq


def test_drafts_are_dropped_before_anyone_is_preempted_for_their_slots():
    """One block of 4: the sequence's next token fits, its 3 drafts would not. Reserving them used
    to preempt the sequence itself (then recompute its context, every step, for optional drafts)."""
    sched, seq = _decoding(BlockPool(1, 4), [5, 6], 20)
    out = sched.schedule(lambda s: 3)
    assert [(s.seq, s.num_new_tokens, s.num_spec_slots) for s in out.scheduled] == [(seq, 1, 0)]
    assert out.preempted == [] and sched.num_preemptions == 0


@pytest.mark.parametrize("max_tokens,expected_k", [(2, 0), (4, 2), (50, 8)])
def test_drafts_stop_at_the_tokens_max_tokens_still_allows(max_tokens, expected_k):
    """Verifying k drafts yields up to k + 1 tokens: one token left, no drafts."""
    sched, seq = _decoding(BlockPool(64, 4), [5, 6], max_tokens)
    [s] = sched.schedule(lambda s: 8).scheduled
    assert s.num_spec_slots == expected_k
