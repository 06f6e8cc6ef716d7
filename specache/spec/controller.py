"""Adaptive speculation: how many tokens to draft per sequence, and when not to draft at all.

Acceptance. A draft of K tokens with n accepted is n Bernoulli successes and, when n < K, one
failure; positions after the first rejection were never tested. So the per-token acceptance
alpha is estimated as successes / trials (not n / K, which underestimates alpha for long drafts),
from exponentially decayed sums so it follows a sequence whose text changes character. A new
sequence starts from the global estimate as a prior worth `prior_trials` trials.

Cost. With per-token acceptance alpha a K-token draft yields (1 - alpha^(K+1)) / (1 - alpha)
tokens per step. The step costs one target pass over B * (K + 1) tokens (a batch of B sequences,
each verifying [last, K drafts]) plus drafting, against one pass over B tokens for plain decoding.
`calibrate` takes the target's measured pass times; the drafter's time comes from `draft_ms` or
from `record_draft_time` measurements (per drafting pass and batch size); a draft flagged
`free_draft` (a prompt-lookup hit) adds nothing. K is the value that maximises tokens per unit
time; 0 when no K beats plain decoding by `margin`, or when alpha fell below `min_alpha` after
warm-up. Records are kept per key: the decoder uses (sequence, free or paid source), because an
`auto` sequence's lookup hits and model drafts are accepted at different rates.

The step plan. `choose_k` prices a batch as if every sequence drafted alike; the decoder instead
asks `plan` once per step for every decoding sequence's K together, maximising the step's
expected tokens per ms: one copying sequence in a batch of 16 drafts 16 tokens and the rest none,
where drafting alike had either priced it out or made everyone draft. Each draft's own costs
(its rows' attention over its context, a drafter's passes) add up per sequence and the target
pass's cost follows from the step's total rows (the AMX 16-row steps included), which makes the
search exact for a given rate: the best S extra rows are the S largest increments alpha^k - rate
* cost over all sequences, and the rate is raised to the plan's own until it stops rising
(Dinkelbach). Beside a prompt chunk the drafts must instead pay at `margin` times plain
decoding's rate. Measured in one process against the per-sequence choices (everything else
equal): int8 self-draft on open-ended chat 2.41x vs 2.02x, `auto` 1.97x vs 1.80x (dense bf16);
prompt lookup on the hybrid target within noise (batch 16: 1.02x vs 1.03x).

Kinds. A proposer may label each draft with a kind that predicts its acceptance
(`Proposer.draft_kind`; prompt lookup: how many tokens matched). Records are then kept per
(sequence, kind), a new one starting from the kind's global rate: a copy-heavy request drafts 16
tokens after a long match and few or none after a one-token match, instead of one K for both.

Recovery. A sequence switched off because of its acceptance (not because of cost) is probed
with a short draft now and then, so it comes back when the text becomes predictable. A failed
probe costs what its draft and wider verification cost (measured: 0.2 of a step with prompt lookup,
1.2 steps with an 8-layer self-draft), so the interval is at least `probe_every` steps and long
enough that failed probes spend at most `max_probe_overhead` of decode time, and it doubles after
each failed probe (up to `max_probe_backoff` times). A new sequence that starts off because of the
global prior is probed on its first step when probing is cheap. A proposer whose drafts cost
nothing to make (prompt lookup) need not wait for probes: while a sequence is off, the decoder
keeps drafting in the shadow, compares each shadow draft with the tokens decoding then produced,
and feeds that evidence in through `record_shadow`, so drafting resumes as soon as the text turns
copyable (a copy-heavy request whose first sentence is not a copy used to wait 24+ steps).
"""

from __future__ import annotations

import bisect
import math
from collections.abc import Callable, Hashable, Mapping, Sequence
from dataclasses import dataclass

import numpy as np

_HIGH_ALPHA = 0.9  # "would speculation pay if drafts were good?": decides whether to probe
# The cost of a K past what a drafter may draft: large enough to lose to any real plan, finite so
# the plan's sums stay numbers.
_NEVER_MS = 1e9
# At most this many steps reuse a plan that drafted nothing before planning afresh (see _quiet_plan)
QUIET_PLAN_STEPS = 8
PASS_LUT_ROWS = 1024  # passes up to this many tokens are looked up in a table when planning a step


def _without_spikes(step_ms: dict[int, float]) -> dict[int, float]:
    """The pass table with each entry capped by the entries of more tokens: a pass never costs
    more than a wider one, and timing noise only adds (a 33-token pass once read 25.9 ms next to
    20.3 ms for 48 tokens, which made 33 rows look dearer than 48 to the step planner)."""
    out, cheapest = {}, math.inf
    for n in sorted(step_ms, reverse=True):
        cheapest = min(cheapest, step_ms[n])
        out[n] = cheapest
    return dict(sorted(out.items()))


def expected_tokens(alpha: float, k: int) -> float:
    """Expected tokens per verification step: (1 - alpha^(K+1)) / (1 - alpha)."""
    if k <= 0:
        return 1.0
    if alpha >= 1.0:
        return k + 1.0
    return (1 - alpha ** (k + 1)) / (1 - alpha)


def expected_speedup(alpha: float, k: int, draft_cost_ratio: float) -> float:
    """The seed formula: (1 - alpha^(K+1)) / ((1 - alpha) (K c + 1)), c = draft cost / target step cost.

    It assumes verifying K + 1 tokens costs one plain step (memory-bound decoding).
    """
    return expected_tokens(alpha, k) / (k * draft_cost_ratio + 1)


@dataclass
class _SeqState:
    successes: float = 0.0  # decayed count of accepted draft tokens
    trials: float = 0.0  # decayed count of tested draft tokens
    raw_trials: int = 0  # undecayed, for the warm-up rule
    off_steps: int = 0  # steps switched off for low acceptance since the last probe
    failed_probes: int = 0  # consecutive probes that accepted nothing
    probing: bool = False  # the last K handed out was a probe
    off: bool = False  # switched off for its acceptance (not for cost) at the last decision


@dataclass
class _QuietPlan:
    """A step plan that drafted nothing (see SpecController._quiet_plan)."""
    shape: tuple  # batch, rows, prompt rows and the open slots' records
    alphas: list[float]  # the open slots' acceptance then
    dearer: float  # realized_draft_cost_factor then
    steps_left: int  # steps it may still stand for


@dataclass
class DraftSlot:
    """One sequence whose draft a step's plan sizes (see SpecController.plan)."""
    key: Hashable  # its acceptance record (the decoder keys by sequence and draft source)
    kind: Hashable = None  # Proposer.draft_kind of its draft
    free: bool = True  # the draft costs nothing next to a target pass (a lookup hit)
    context: int = 0  # tokens its rows attend to


class SpecController:
    def __init__(self, max_k: int = 4, min_alpha: float = 0.4, decay: float = 0.8, prior_alpha: float = 0.6,
                 prior_trials: float = 2.0, warmup_trials: int = 4, probe_every: int = 16, probe_k: int = 2,
                 margin: float = 1.05, global_decay: float = 0.95, max_probe_overhead: float = 0.02,
                 max_probe_backoff: int = 2, max_paid_k: int | None = None) -> None:
        self.max_k = max_k
        # the most tokens a paid drafter (a model) drafts: its later tokens are accepted less and
        # less often than the one alpha of this model says (dense target, open-ended chat, int8
        # self-draft: 2.21x at K <= 4, 1.82x at K <= 16)
        self.max_paid_k = max_k if max_paid_k is None else min(max_paid_k, max_k)
        self.min_alpha = min_alpha  # below this (after warm-up) a sequence stops drafting
        self.decay = decay  # weight of the past per record: ~1 / (1 - decay) drafts of memory
        self.global_decay = global_decay  # the global prior sees every sequence's records: longer memory
        self.prior_alpha = prior_alpha  # used until the global estimate has data
        self.prior_trials = prior_trials
        self.warmup_trials = warmup_trials
        self.probe_every = probe_every
        self.probe_k = probe_k
        self.margin = margin  # a K must beat plain decoding by this factor to be chosen
        if max_probe_overhead <= 0:
            raise ValueError(f"max_probe_overhead must be > 0, got {max_probe_overhead}")
        self.max_probe_overhead = max_probe_overhead
        self.max_probe_backoff = max_probe_backoff
        self._step_ms: dict[int, float] = {}  # tokens in one target pass -> ms
        self._pass_lut: np.ndarray | None = None  # _pass_ms for 0 .. PASS_LUT_ROWS tokens (plan's lookups)
        self._pass_list: list[float] | None = None  # the same as floats (scalar lookups)
        # whether a good draft (alpha 0.9) would be planned, per step shape (see plan)
        self._good_pays: dict[tuple, bool] = {}
        self._quiet: _QuietPlan | None = None  # the last step plan, when it drafted nothing
        # (batch, free draft, context // 32) -> predicted step ms for K = 0 .. max_k: every running
        # sequence asks for its K every step, and 17 interpolated step costs each time showed up
        # as ~3% of a fast target's decode time
        self._cost_cache: dict[tuple[int, bool, int], list[float]] = {}
        # drafted step? -> [decayed measured ms, decayed predicted ms, steps]: what decode steps
        # really took against what the model predicted (see record_step_time)
        self._realized: dict[bool, list[float]] = {True: [0.0, 0.0, 0], False: [0.0, 0.0, 0]}
        # Attention's share, which the pass table (measured on a short context) leaves out: ms per
        # context token for a sequence's first query row, and for each further row. Every
        # verification row attends to its sequence's whole context: on the row-at-a-time kernel
        # each further row costs about what the first does (16 sequences x 350 tokens at K=4: ~5x
        # plain decoding's attention); a kernel whose rows share each key's pass costs less, and
        # the decoder measures which at start.
        self.attention_ms_per_key = 0.0
        self.attention_ms_per_key_extra_row: float | None = None  # None: as the first row
        self.context_tokens = 0  # context length of the sequence being decided (set_context)
        self._verify_ms: Callable[[int, int], float] | None = None  # (K, batch) -> ms
        self._plain_ms: Callable[[int], float] | None = None  # batch -> ms
        self._draft_ms: Callable[[int, int], float] | None = None  # (K, batch) -> ms
        # batch size -> EMA of measured ms per drafting pass (one token for every drafting sequence),
        # used when no draft_ms is given
        self._draft_pass_ms: dict[int, float] = {}
        # per (sequence, draft kind); the sequence key may itself carry the draft source
        self.seqs: dict[tuple[Hashable, Hashable], _SeqState] = {}
        self._global = _SeqState()  # every draft: the prior of kinds without data of their own
        self._global_by_kind: dict[Hashable, _SeqState] = {}  # the prior of a new (sequence, kind)
        self.drafts = 0
        self.draft_tokens = 0
        self.accepted_tokens = 0
        self.per_position: list[list[int]] = []  # position -> [drafted, accepted]
        self.chosen_k: dict[int, int] = {}
        self.probes = 0
        self.shadow_drafts = 0

    # ------------------------------------------------------------------ cost model

    def calibrate(self, step_cost_s: Mapping[int, float] | None = None, *,
                  verify_ms: Callable[[int, int], float] | None = None,
                  plain_ms: Callable[[int], float] | None = None,
                  draft_ms: Callable[[int, int], float] | None = None,
                  attention_ms_per_key: float | None = None,
                  attention_ms_per_key_extra_row: float | None = None) -> None:
        """Set the cost model once at start.

        step_cost_s: measured seconds for one target pass over n tokens ({n: seconds}); verify of
        K drafts for a batch of B costs step(B * (K + 1)), plain decoding step(B). Or give
        verify_ms(K, batch) and plain_ms(batch) directly. draft_ms(K, batch): drafting time for the
        batch; without it, K times the measured time of one drafting pass at that batch size
        (`record_draft_time`). attention_ms_per_key: attention's cost per context token of a
        sequence's first query row, attention_ms_per_key_extra_row of each further row (default:
        the same), added for every sequence of a step (see `set_context`).
        """
        self._cost_cache.clear()
        self._quiet = None
        if attention_ms_per_key is not None:
            self.attention_ms_per_key = max(0.0, attention_ms_per_key)
        if attention_ms_per_key_extra_row is not None:
            self.attention_ms_per_key_extra_row = max(0.0, attention_ms_per_key_extra_row)
        if step_cost_s:
            self._step_ms = _without_spikes({n: s * 1000.0 for n, s in sorted(step_cost_s.items())})
            self._pass_lut = self._pass_list = None
            self._good_pays.clear()
        self._verify_ms = verify_ms or self._verify_ms
        self._plain_ms = plain_ms or self._plain_ms
        self._draft_ms = draft_ms or self._draft_ms

    @property
    def calibrated(self) -> bool:
        return bool(self._step_ms) or self._verify_ms is not None

    def record_draft_time(self, seconds: float, num_passes: int, batch_size: int) -> None:
        """The proposer's measured time for drafting `num_passes` tokens for each of `batch_size`
        sequences. Kept per batch size: a model drafter's pass over 2 sequences costs about what a
        pass over 1 does (memory-bound), so a cost per drafted token would double-count batches."""
        if num_passes > 0 and batch_size > 0:
            per = seconds * 1000.0 / num_passes
            # A first sample at a new size starts from the estimate carried over from the sizes
            # measured so far: the step where a request joins (and the size changes) can be slow
            # (a draft model's prompt catch-up, first-call costs), and a size that looked too dear
            # to draft at would never be measured again.
            old = self.draft_pass_ms(batch_size) or None  # the stored value, else the carried estimate
            self._draft_pass_ms[batch_size] = per if old is None else 0.8 * old + 0.2 * per
            self._cost_cache.clear()
            self._good_pays.clear()
            self._quiet = None  # cheaper drafting passes may make paid drafts pay

    def draft_pass_ms(self, batch_size: int) -> float:
        """Measured ms of one drafting pass for a batch; for a batch size not measured yet, the
        nearest measured one scaled by how the target's pass cost grows between the two sizes
        (drafters are models too: flat while memory-bound, linear once compute-bound). 0 before any
        measurement."""
        if not self._draft_pass_ms:
            return 0.0
        if batch_size in self._draft_pass_ms:
            return self._draft_pass_ms[batch_size]
        nearest = min(self._draft_pass_ms, key=lambda b: (abs(b - batch_size), b))
        return self._draft_pass_ms[nearest] * self.step_ms(0, batch_size) / self.step_ms(0, nearest)

    def _pass_ms(self, tokens: int) -> float:
        """Target pass over `tokens` tokens: the measured table, interpolated, linear past its end.
        Read from a table of every count up to PASS_LUT_ROWS: the decoder asks several times a step,
        and interpolating each time was ~25 us of a 5 ms step."""
        if self._step_ms and 0 <= tokens <= PASS_LUT_ROWS:
            if self._pass_list is None:
                self._pass_list = [self._interpolated_pass_ms(t) for t in range(PASS_LUT_ROWS + 1)]
            return self._pass_list[tokens]
        return self._interpolated_pass_ms(tokens)

    def _interpolated_pass_ms(self, tokens: int) -> float:
        if not self._step_ms:
            return 1.0 + tokens / 64  # uncalibrated guess: weight reads dominate small passes
        xs = list(self._step_ms)
        ys = list(self._step_ms.values())
        if tokens <= xs[0] or len(xs) == 1:
            return ys[0] if tokens <= xs[0] else ys[-1] * tokens / xs[-1]
        i = min(bisect.bisect_left(xs, tokens), len(xs) - 1)
        slope = (ys[i] - ys[i - 1]) / (xs[i] - xs[i - 1])
        return ys[i - 1] + slope * (tokens - xs[i - 1])

    def predict_step_ms(self, ks: list[int], contexts: list[int]) -> float | None:
        """The model's time for one decode step whose sequences draft ks with these contexts
        (drafting itself left out); None without a measured pass table."""
        if not self._step_ms:
            return None
        attention = sum(self._attention_ms(k, c) for k, c in zip(ks, contexts, strict=True))
        return self._pass_ms(sum(k + 1 for k in ks)) + attention

    def _attention_ms(self, k: int, context: int) -> float:
        """Attention of one sequence's k + 1 rows over `context` tokens."""
        extra = self.attention_ms_per_key if self.attention_ms_per_key_extra_row is None \
            else self.attention_ms_per_key_extra_row
        return (self.attention_ms_per_key + extra * k) * context

    def record_step_time(self, measured_ms: float, predicted_ms: float, drafted: bool) -> None:
        """A decode step's measured time (target pass and verification) next to `predict_step_ms`.
        The pass table times the model alone; verification's bookkeeping, the wider logits and the
        rows' attention on a real batch come on top, and more so for drafted steps."""
        if predicted_ms is None or predicted_ms <= 0 or measured_ms <= 0:
            return
        st = self._realized[drafted]
        st[0] = 0.95 * st[0] + measured_ms
        st[1] = 0.95 * st[1] + predicted_ms
        st[2] += 1

    def realized_draft_cost_factor(self) -> float:
        """How much dearer drafted steps really are than predicted, relative to plain steps
        (measured / predicted of each, in [1, 2]); 1 until both kinds of step have 8 samples. Never
        below 1: the table under-predicts a many-sequence plain step more than a drafted one (its
        attention of 16 first rows was 12 ms measured against 8.4 predicted), and a factor below 1
        had made drafts look cheaper than they were. Multiplies a drafted step's predicted cost in
        best_k and the step plan: on a fast target where speculation barely pays (open-ended text),
        the model's optimism was the margin between 0.95x and 1x."""
        drafted, plain = self._realized[True], self._realized[False]
        if drafted[2] < 8 or plain[2] < 8:
            return 1.0
        return min(2.0, max(1.0, (drafted[0] / drafted[1]) / (plain[0] / plain[1])))

    def set_context(self, tokens: int) -> None:
        """The context length of the sequence whose K is decided next: its K + 1 rows each attend
        to it (the batch is costed as sequences of this length)."""
        self.context_tokens = max(0, tokens)

    def step_ms(self, k: int, batch: int, free_draft: bool = False) -> float:
        """Predicted time of one decode step for a batch of `batch` sequences drafting k each
        (free_draft: the drafts cost nothing next to a target pass, e.g. a prompt-lookup hit),
        attention over the context included."""
        return self._step_without_attention(k, batch, free_draft) + batch * self._attention_ms(k, self.context_tokens)

    def _step_without_attention(self, k: int, batch: int, free_draft: bool = False) -> float:
        if k == 0:
            return self._plain_ms(batch) if self._plain_ms else self._pass_ms(batch)
        verify = self._verify_cost(k, batch)
        if free_draft:
            draft = 0.0
        elif self._draft_ms:
            draft = self._draft_ms(k, batch)
        elif self.calibrated:
            draft = self.draft_pass_ms(batch) * k
        else:
            draft = 0.0  # uncalibrated steps are in made-up units: measured ms would not compare
        return verify + draft

    def _verify_cost(self, k: int, batch: int) -> float:
        return self._verify_ms(k, batch) if self._verify_ms else self._pass_ms(batch * (k + 1))

    def best_k(self, alpha: float, batch_size: int, free_draft: bool = False) -> int:
        """K in [0, max_k] (max_paid_k for a paid draft) maximising expected tokens per ms; 0 unless
        it beats plain by `margin`."""
        costs = self._step_costs(max(batch_size, 1), free_draft)
        dearer = self.realized_draft_cost_factor()
        best, best_rate = 0, self.margin / costs[0]
        for k in range(1, (self.max_k if free_draft else self.max_paid_k) + 1):
            rate = expected_tokens(alpha, k) / (costs[k] * dearer)
            if rate > best_rate:
                best, best_rate = k, rate
        return best

    def _step_costs(self, batch: int, free_draft: bool) -> list[float]:
        """step_ms for K = 0 .. max_k at this batch size and (to 32 tokens) context."""
        key = (batch, free_draft, self.context_tokens // 32)
        costs = self._cost_cache.get(key)
        if costs is None:
            if len(self._cost_cache) > 4096:
                self._cost_cache.clear()
            costs = self._cost_cache[key] = [self.step_ms(k, batch, free_draft) for k in range(self.max_k + 1)]
        return costs

    # ------------------------------------------------------------------ acceptance

    def alpha(self, seq_id: Hashable | None = None, kind: Hashable = None) -> float:
        """Per-token acceptance estimate for a sequence's drafts of one kind: its own record, shrunk
        towards the kind's global record, itself shrunk towards the rate of every draft (each prior
        worth `prior_trials` trials)."""
        g = self._global
        prior = g.successes / g.trials if g.trials > 0 else self.prior_alpha
        if kind is not None:
            prior = self._shrunk(self._global_by_kind.get(kind), prior)
        return self._shrunk(self.seqs.get((seq_id, kind)), prior) if seq_id is not None else prior

    def _state(self, seq_id: Hashable, kind: Hashable) -> _SeqState:
        """The record of a sequence's drafts of one kind, made on first use (not a throwaway
        _SeqState per call, as setdefault builds: the step plan asks for every slot every step)."""
        st = self.seqs.get((seq_id, kind))
        if st is None:
            st = self.seqs[seq_id, kind] = _SeqState()
        return st

    def _shrunk(self, st: _SeqState | None, prior: float) -> float:
        if st is None:
            return prior
        return (st.successes + self.prior_trials * prior) / (st.trials + self.prior_trials)

    def choose_k(self, seq_id: Hashable, batch_size: int, free_draft: bool = False, kind: Hashable = None) -> int:
        """K for the sequence's next step; free_draft: its draft will cost nothing (a lookup hit);
        kind: the proposer's label for the draft (`Proposer.draft_kind`)."""
        st = self._state(seq_id, kind)
        k = self._choose(st, self.alpha(seq_id, kind), batch_size, free_draft, kind)
        self.chosen_k[k] = self.chosen_k.get(k, 0) + 1
        return k

    def plan(self, slots: list[DraftSlot], undrafted_contexts: Sequence[int] = (), prefill_rows: int = 0) -> list[int]:
        """K for every sequence of one decode step, chosen together (undrafted_contexts: the step's
        other decode sequences, one row each). `choose_k` prices a batch as if every sequence
        drafted alike; a real step mixes a copying sequence that drafts 16 with many that draft
        none, and what one sequence's rows cost depends on the rows already in the step (AMX takes
        rows 16 at a time: a 16-sequence step's 17th row costs ~2 ms, its 18th to 32nd little more;
        each verification row also attends to its sequence's whole context). So the Ks maximise the
        step's expected tokens per ms together (`_plan_ks`); a plan that does not beat plain
        decoding by `margin` drafts nothing.
        Sequences off for their acceptance keep their probe schedule (as in choose_k). prefill_rows:
        prompt tokens that go into the same pass (their rows are what makes draft rows dear there)."""
        batch = len(slots) + len(undrafted_contexts)
        if self.max_k <= 0 or not slots:
            return [0] * len(slots)
        states = [self._state(s.key, s.kind) for s in slots]
        alphas = [self.alpha(s.key, s.kind) for s in slots]
        ks = [-1] * len(slots)
        for i, (slot, st, alpha) in enumerate(zip(slots, states, alphas, strict=True)):
            if self._low_acceptance(st, alpha, slot.kind):
                self.set_context(slot.context)  # what a probe of it costs (probe_cost)
                ks[i] = self._settle(st, 0, True, lambda: True, batch, slot.free)
        probing = [k for k in ks if k > 0]
        base_rows = batch + sum(probing)
        base_ms = sum(self._attention_ms(0, c) for c in undrafted_contexts) + \
            sum(self._attention_ms(max(k, 0), s.context) for s, k in zip(slots, ks, strict=True))
        open_slots = [i for i, k in enumerate(ks) if k < 0]
        planned = self._quiet_plan(slots, open_slots, alphas, base_rows, batch, prefill_rows)
        if planned is None:
            planned = self._plan_ks([alphas[i] for i in open_slots], [slots[i] for i in open_slots], base_rows,
                                    base_ms, batch, prefill_rows)
            self._remember_quiet(slots, open_slots, alphas, base_rows, batch, prefill_rows, planned)

        def good_drafts_pay(slot: DraftSlot) -> bool:
            # ~0.1 ms to plan: kept per step shape (its attention to the ms), which changes slowly
            key = (batch, base_rows, slot.free, slot.context // 64, round(base_ms))
            if key not in self._good_pays:
                if len(self._good_pays) > 4096:
                    self._good_pays.clear()
                self._good_pays[key] = any(self._plan_ks([_HIGH_ALPHA], [slot], base_rows, base_ms, batch))
            return self._good_pays[key]

        for i, k in zip(open_slots, planned, strict=True):
            self.set_context(slots[i].context)
            ks[i] = self._settle(states[i], k, False, lambda i=i: good_drafts_pay(slots[i]), batch, slots[i].free)
        for k in ks:
            self.chosen_k[k] = self.chosen_k.get(k, 0) + 1
        return ks

    def _quiet_plan(self, slots: list[DraftSlot], open_slots: list[int], alphas: list[float], base_rows: int,
                    batch: int, prefill_rows: int) -> list[int] | None:
        """No drafts for the open slots, without planning, when the last plan of the same step shape
        (the same records, batch and rows) drafted nothing and since then no slot's acceptance rose
        and drafted steps' overrun did not shrink: a plan gains only from higher acceptance, so it
        would draft nothing again. The contexts (a token longer each step) are left out, so a full
        plan is made at least every QUIET_PLAN_STEPS steps. On this VNNI VM a 16-sequence plan took
        ~0.3 ms of a ~12 ms step with cold caches, for lookahead at batch 16, which drafted nothing."""
        quiet = self._quiet
        if quiet is None or quiet.steps_left <= 0 or self.realized_draft_cost_factor() < quiet.dearer:
            return None
        if quiet.shape != self._step_shape(slots, open_slots, base_rows, batch, prefill_rows):
            return None
        if any(alphas[i] > a for i, a in zip(open_slots, quiet.alphas, strict=True)):
            return None
        quiet.steps_left -= 1
        return [0] * len(open_slots)

    def _remember_quiet(self, slots: list[DraftSlot], open_slots: list[int], alphas: list[float], base_rows: int,
                        batch: int, prefill_rows: int, planned: list[int]) -> None:
        self._quiet = None if any(planned) or not planned else _QuietPlan(
            self._step_shape(slots, open_slots, base_rows, batch, prefill_rows), [alphas[i] for i in open_slots],
            self.realized_draft_cost_factor(), QUIET_PLAN_STEPS)

    @staticmethod
    def _step_shape(slots: list[DraftSlot], open_slots: list[int], base_rows: int, batch: int,
                    prefill_rows: int) -> tuple:
        return batch, base_rows, prefill_rows, [(slots[i].key, slots[i].kind, slots[i].free) for i in open_slots]

    def _plan_ks(self, alphas: list[float], slots: list[DraftSlot], base_rows: int, base_ms: float,
                 batch: int, prefill_rows: int = 0) -> list[int]:
        """Ks for `slots` (with these acceptances) on top of a decode step of base_rows rows whose
        attention costs base_ms, maximising expected tokens per ms; all 0 unless that beats plain
        decoding by `margin`. Tokens and the drafts' own costs add up per sequence, the pass cost
        depends on the step's total rows: for a rate lambda, the best plan of S extra rows takes
        the S largest increments alpha^k - lambda * (cost of row k) over all sequences (each
        sequence's increments shrink with k, so the S largest are a K per sequence), and the best S
        follows from the pass table; lambda is then that plan's rate, until it stops rising
        (Dinkelbach). With prompt rows in the pass (prefill_rows) the step's rate says little (its
        time is the prompt's): there drafts must pay at `margin` times plain decoding's rate, each
        extra token against the time its rows add."""
        n = len(slots)
        if n == 0:
            return []
        karr = np.arange(self.max_k + 1)
        alpha = np.asarray([[min(max(a, 0.0), 1.0 - 1e-9)] for a in alphas])
        gain = (1.0 - alpha ** (karr + 1)) / (1.0 - alpha) - 1.0  # expected extra tokens for K = 0 .. max_k
        extra_row = self.attention_ms_per_key if self.attention_ms_per_key_extra_row is None \
            else self.attention_ms_per_key_extra_row
        added = extra_row * np.asarray([[float(s.context)] for s in slots]) * karr  # rows' attention
        num_paid = sum(not s.free for s in slots)
        paid = np.asarray([not s.free for s in slots]) if num_paid else None
        plain_ms = self._pass_ms(base_rows) + base_ms
        rate_to_beat = self.margin * batch / plain_ms
        pass_ms = self.draft_pass_ms(batch) if num_paid else 0.0
        # A drafting pass drafts one token for every paid sequence at once, so the passes cost
        # pass_ms x the deepest paid draft. One paid sequence: its own K. Several: the plan is made
        # for each depth (paid Ks capped there, the passes a fixed cost) and the best one kept;
        # sharing the passes' cost out per token instead let one sequence draft 7 and another 1
        # while 7 passes ran for both (int8 self-draft, open-ended chat: 1.60x against 1.74x).
        if num_paid == 1:
            depths = [None]
            own_passes = pass_ms * karr + _NEVER_MS * np.maximum(karr - self.max_paid_k, 0)
            added = added + np.where(paid[:, None], own_passes, 0.0)
        elif num_paid == 0:
            depths = [None]
        else:
            depths = list(range(self.max_paid_k + 1))
        best, best_score = [0] * n, -math.inf
        for depth in depths:
            cost, fixed = added, 0.0
            if depth is not None:
                cost = added + np.where(paid[:, None], _NEVER_MS * np.maximum(karr - depth, 0), 0.0)
                fixed = pass_ms * depth
            if prefill_rows:  # drafts beside a prompt chunk: extra tokens against the time they add
                ks, score = self._plan_at_rate(gain, cost, fixed, base_rows + prefill_rows, rate_to_beat)
            else:
                ks, score = self._plan_at_best_rate(gain, cost, fixed, base_rows, plain_ms, batch)
                if score < rate_to_beat:
                    ks, score = [0] * n, batch / plain_ms
            if score > best_score:
                best, best_score = ks, score
        return best

    def _plan_at_best_rate(self, gain: np.ndarray, added: np.ndarray, fixed_ms: float, base_rows: int,
                           plain_ms: float, batch: int) -> tuple[list[int], float]:
        """Ks maximising expected tokens per ms for a decode step of base_rows rows costing plain_ms
        undrafted (added: each sequence's own cost of K drafts, fixed_ms: paid once if anything is
        drafted), and that rate: Dinkelbach over the sorted increments (see _plan_ks)."""
        # Small arrays (2 sequences x 17 Ks on open-ended chat), planned every step: slices and
        # in-place ops rather than diff / where / concatenate (64 -> ~35 us a plan, measured)
        n, dearer = gain.shape[0], self.realized_draft_cost_factor()
        base_ms = plain_ms - self._pass_ms(base_rows)
        if n == 1:  # every K at once
            ms = self._pass_span(base_rows, gain.shape[1]) + base_ms + added[0]
            ms[1:] += fixed_ms
            ms[1:] *= dearer
            rates = (batch + gain[0]) / ms
            k = int(rates.argmax())
            return [k], float(rates[k])
        step_gain = (gain[:, 1:] - gain[:, :-1]).ravel()  # [n * max_k]: the k-th drafted token's alpha^k
        step_cost = (added[:, 1:] - added[:, :-1]).ravel()
        pass_ms = self._pass_span(base_rows, step_gain.size + 1) + base_ms
        pass_ms[1:] += fixed_ms
        best, rate = np.zeros(n, dtype=np.int64), batch / plain_ms
        tokens, ms = np.full(step_gain.size + 1, float(batch)), np.zeros(step_gain.size + 1)
        for _ in range(4):
            order = (rate * dearer * step_cost - step_gain).argsort(kind="stable")
            step_gain[order].cumsum(out=tokens[1:])
            tokens[1:] += batch
            step_cost[order].cumsum(out=ms[1:])
            ms[0] = 0.0
            ms += pass_ms
            ms[1:] *= dearer
            size = int((tokens - rate * ms).argmax())
            new_rate = tokens[size] / ms[size]
            if new_rate <= rate * (1.0 + 1e-9):
                break
            rate, best = new_rate, np.bincount(order[:size] // (gain.shape[1] - 1), minlength=n)
        return best.tolist(), float(rate)

    def _plan_at_rate(self, gain: np.ndarray, added: np.ndarray, fixed_ms: float, base_rows: int,
                      rate: float) -> tuple[list[int], float]:
        """Ks maximising expected extra tokens - rate * the ms they add (a drafted step's realized
        overrun included), for a pass of base_rows rows without them, and that net gain."""
        n, dearer = gain.shape[0], self.realized_draft_cost_factor()
        step_gain = (gain[:, 1:] - gain[:, :-1]).ravel()
        step_cost = (added[:, 1:] - added[:, :-1]).ravel()
        order = (rate * dearer * step_cost - step_gain).argsort(kind="stable")
        pass_ms = self._pass_span(base_rows, step_gain.size + 1) - self._pass_ms(base_rows)
        pass_ms[1:] += fixed_ms
        ms = (pass_ms + np.concatenate(([0.0], np.cumsum(step_cost[order])))) * dearer
        net = np.concatenate(([0.0], np.cumsum(step_gain[order]))) - rate * ms
        size = int(np.argmax(net))
        return np.bincount(order[:size] // (gain.shape[1] - 1), minlength=n).tolist(), float(net[size])

    def _pass_span(self, first: int, count: int) -> np.ndarray:
        """_pass_ms for first .. first + count - 1 tokens: a slice of the table where it reaches."""
        if first + count - 1 > PASS_LUT_ROWS or self._pass_lut is None:
            return self._pass_at(np.arange(first, first + count))
        return self._pass_lut[first: first + count]

    def _pass_at(self, rows):
        """_pass_ms over an array of token counts (a table up to PASS_LUT_ROWS, linear past it)."""
        if self._pass_lut is None:
            self._pass_lut = np.asarray([self._pass_ms(t) for t in range(PASS_LUT_ROWS + 1)])
        rows = np.asarray(rows)
        inside = self._pass_lut[np.minimum(rows, PASS_LUT_ROWS)]
        return np.where(rows <= PASS_LUT_ROWS, inside, self._pass_lut[-1] * rows / PASS_LUT_ROWS)

    def wants_draft(self, seq_id: Hashable, batch_size: int, free_draft: bool = False, kind: Hashable = None) -> bool:
        """Whether the sequence's acceptance makes drafting pay now (no side effects, no probes)."""
        alpha = self.alpha(seq_id, kind)
        if self._low_acceptance(self.seqs.get((seq_id, kind)), alpha, kind):
            return False
        return self.best_k(alpha, batch_size, free_draft) > 0

    def _low_acceptance(self, st: _SeqState | None, alpha: float, kind: Hashable = None) -> bool:
        """Below min_alpha past warm-up, the sequence's own or (for its first drafts of a kind) the
        kind's over every sequence: drafting is off until the evidence changes. Without the
        kind's, every new sequence drafted after its one-token matches (13% accepted) until its
        own four trials had been spent: ~6% of open-ended chat's decode time on the hybrid target."""
        if alpha >= self.min_alpha:
            return False
        if st is not None and st.raw_trials >= self.warmup_trials:
            return True
        by_kind = self._global_by_kind.get(kind) if kind is not None else None
        return by_kind is not None and by_kind.raw_trials >= self.warmup_trials

    def is_off_for_acceptance(self, seq_id: Hashable, kind: Hashable = None) -> bool:
        """Whether the last decision for the sequence's drafts of this kind was K=0 because they are
        bad while good drafts would pay: evidence about their acceptance (shadow drafts) could bring
        them back."""
        st = self.seqs.get((seq_id, kind))
        return st is not None and st.off

    def _choose(self, st: _SeqState, alpha: float, batch_size: int, free_draft: bool = False,
                kind: Hashable = None) -> int:
        st.probing = st.off = False
        if self.max_k <= 0:
            return 0
        low = self._low_acceptance(st, alpha, kind)
        k = 0 if low else self.best_k(alpha, batch_size, free_draft)
        return self._settle(st, k, low, lambda: self.best_k(_HIGH_ALPHA, batch_size, free_draft) > 0,
                            batch_size, free_draft)

    def _settle(self, st: _SeqState, k: int, low: bool, good_drafts_pay: Callable[[], bool], batch_size: int,
                free_draft: bool) -> int:
        """The K handed out for a sequence whose cost-based choice was k: a probe instead of 0 now
        and then when it is off for its acceptance (low, or good drafts would pay)."""
        st.probing = st.off = False
        # Off because drafts are bad, while good drafts would pay: probe now and then, and at once
        # for a sequence with no record of its own when a probe is cheap (the global prior came
        # from other requests: one copy-heavy request after many open-ended ones must not wait).
        if k == 0 and (low or good_drafts_pay()):
            st.off = True
            st.off_steps += 1
            extra = self.probe_cost(batch_size, free_draft)
            interval = self.probe_interval(batch_size, extra) * 2 ** min(st.failed_probes, self.max_probe_backoff)
            first = st.raw_trials == 0 and st.off_steps == 1 and extra <= 0.5
            if st.off_steps >= interval or first:
                st.off_steps = 0
                st.probing = True
                self.probes += 1
                return min(self.probe_k, self.max_k)
            return 0
        st.off_steps = 0
        return k

    def probe_cost(self, batch_size: int, free_draft: bool = False) -> float:
        """Extra time of a probe step over a plain step, in plain steps (what a failed probe wastes)."""
        costs = self._step_costs(max(batch_size, 1), free_draft)
        return costs[min(self.probe_k, self.max_k)] / costs[0] - 1.0

    def probe_interval(self, batch_size: int, extra: float | None = None) -> int:
        """Steps between probes of a switched-off sequence before any back-off."""
        extra = self.probe_cost(batch_size) if extra is None else extra
        return max(self.probe_every, math.ceil(extra / self.max_probe_overhead))

    def record(self, seq_id: Hashable, num_drafted: int, num_accepted: int, kind: Hashable = None) -> None:
        """One verification result: num_accepted of num_drafted drafts (of this kind) survived."""
        if num_drafted <= 0:
            return
        num_accepted = max(0, min(num_accepted, num_drafted))
        seq = self._state(seq_id, kind)
        if seq.probing:
            seq.failed_probes = 0 if num_accepted else seq.failed_probes + 1
            seq.probing = False
        self._update_acceptance(seq, num_drafted, num_accepted, kind)
        self.drafts += 1
        self.draft_tokens += num_drafted
        self.accepted_tokens += num_accepted
        while len(self.per_position) < num_drafted:
            self.per_position.append([0, 0])
        for pos in range(num_drafted):
            self.per_position[pos][0] += 1
            self.per_position[pos][1] += pos < num_accepted

    def record_shadow(self, seq_id: Hashable, num_drafted: int, num_accepted: int, kind: Hashable = None) -> None:
        """A draft that was never verified, compared with the tokens decoding produced instead:
        the same evidence about acceptance as `record`, without counting as a draft."""
        if num_drafted <= 0:
            return
        self.shadow_drafts += 1
        seq = self._state(seq_id, kind)
        if num_accepted:
            seq.failed_probes = 0
        self._update_acceptance(seq, num_drafted, max(0, min(num_accepted, num_drafted)), kind)

    def _update_acceptance(self, seq: _SeqState, num_drafted: int, num_accepted: int, kind: Hashable) -> None:
        trials = num_accepted + (1 if num_accepted < num_drafted else 0)
        records = [(seq, self.decay), (self._global, self.global_decay)]
        if kind is not None:
            records.append((self._global_by_kind.setdefault(kind, _SeqState()), self.global_decay))
        for st, decay in records:
            st.successes = decay * st.successes + num_accepted
            st.trials = decay * st.trials + trials
            st.raw_trials += trials

    def release(self, seq_id: Hashable) -> None:
        """Drop the sequence's records of every kind."""
        for key in [key for key in self.seqs if key[0] == seq_id]:
            del self.seqs[key]

    # ------------------------------------------------------------------ reporting

    def draft_cost_ratio(self) -> float:
        """c of the seed speedup formula: drafting one token over one plain step (batch 1)."""
        return (self._step_without_attention(1, 1) - self._verify_cost(1, 1)) / self._step_without_attention(0, 1)

    def stats(self) -> dict:
        drafts = self.drafts
        rate = self.accepted_tokens / self.draft_tokens if self.draft_tokens else 0.0
        mean_k = self.draft_tokens / drafts if drafts else 0.0
        ratio = self.draft_cost_ratio()
        alpha = self.alpha()
        return {
            "drafts": drafts,
            "draft_tokens": self.draft_tokens,
            "accepted_tokens": self.accepted_tokens,
            "acceptance_rate": rate,  # accepted / drafted
            "alpha": alpha,  # per-token acceptance (decayed), the global prior of every record
            "alpha_by_kind": {str(kind): self.alpha(kind=kind) for kind in sorted(self._global_by_kind, key=str)},
            # tokens emitted per verification step, bonus included (the EAGLE / vLLM convention)
            "mean_accepted_length": 1 + self.accepted_tokens / drafts if drafts else 0.0,
            "mean_draft_length": mean_k,
            "acceptance_per_position": [a / d if d else 0.0 for d, a in self.per_position],
            "k_chosen": dict(sorted(self.chosen_k.items())),
            "probes": self.probes,
            "shadow_drafts": self.shadow_drafts,
            "draft_cost_ratio": ratio,
            "realized_draft_cost_factor": self.realized_draft_cost_factor(),
            "expected_speedup": expected_speedup(alpha, round(mean_k), ratio) if drafts else None,
        }

    expected_speedup = staticmethod(expected_speedup)
