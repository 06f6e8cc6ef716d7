"""Glue between the engine and speculative decoding: build the proposer from its name,
ask the controller for K, draft, verify in one target pass, record acceptance.
"""

from __future__ import annotations

import time
from collections.abc import Hashable, Iterator
from contextlib import contextmanager

import torch

from specache.config import MAX_SPEC_TOKENS
from specache.engine.runner import BatchItem
from specache.engine.scheduler import SchedulerOutput
from specache.engine.sequence import Sequence
from specache.errors import ConfigError
from specache.sampling import SamplingParams, argmax_rows, logits_to_probs, sample_for_sequences
from specache.spec.base import NOTHING_TO_DRAFT, DraftRequest, Proposer
from specache.spec.controller import DraftSlot, SpecController
from specache.spec.verify import verify, verify_greedy_targets

METHODS = "ngram | draft:PATH | layer-skip:L | quantized | lookahead | auto"
# The most tokens a model drafter drafts per step (lookup drafts go up to num_spec_tokens).
PAID_DRAFT_MAX_K = 8


def build_proposer(engine, method: str) -> Proposer:
    from specache.spec.ngram import NgramProposer

    if method == "ngram":
        return NgramProposer()
    if method == "auto":
        from specache.spec.auto import AutoProposer

        if engine.config.weight_format != "dense":
            # An int8 self-draft of a target that already decodes with int8 weights is the target
            # itself, at the target's cost: auto is its prompt lookup alone there.
            return NgramProposer(min_ngram=3, name="auto")
        return AutoProposer(_quantized_proposer(engine))
    if method == "lookahead":
        from specache.spec.lookahead import LookaheadProposer

        return LookaheadProposer()
    if method.startswith("layer-skip"):
        _, _, layers = method.partition(":")
        n = int(layers) if layers else engine.model.num_layers // 2
        from specache.spec.layer_skip import SelfDraftProposer

        return SelfDraftProposer(engine.runner, engine.live_seqs, num_layers=n)
    if method == "quantized":
        if engine.config.weight_format != "dense":
            raise ConfigError(f"speculative='quantized' drafts with the int8 weights that a "
                              f"weight_format={engine.config.weight_format!r} target already decodes with: "
                              "the draft would cost a full step; use a dense target, or ngram/lookahead/auto")
        return _quantized_proposer(engine)
    if method.startswith("draft:"):
        return _model_proposer(engine, method.split(":", 1)[1])
    raise ConfigError(f"unknown speculative method {method!r}; use {METHODS}")


def _quantized_proposer(engine) -> Proposer:
    """The target with int8 weights, drafting in the target's own KV cache."""
    from specache.engine.runner import ModelRunner
    from specache.models.llama import LlamaModel
    from specache.spec.layer_skip import SelfDraftProposer

    model = LlamaModel(engine.model_config, engine.loaded.weights, engine.model.dtype, engine.device,
                       weight_format="int8")
    return SelfDraftProposer(ModelRunner(model, engine.runner.cache), engine.live_seqs, name="quantized")


def _model_proposer(engine, path: str) -> Proposer:
    """A smaller model with the same tokenizer, with its own paged KV cache."""
    from specache.models.llama import LlamaModel
    from specache.models.loader import load_model
    from specache.spec.draft import ModelProposer

    draft = load_model(path)
    if draft.config.vocab_size != engine.model_config.vocab_size:
        raise ConfigError("the draft model must share the target's tokenizer (vocab sizes differ)")
    if draft.config.max_position_embeddings < engine.max_model_len:
        # its RoPE table ends there: a longer sequence would fail every request in the step
        raise ConfigError(f"the draft model's context ({draft.config.max_position_embeddings} tokens) is shorter "
                          f"than max_model_len ({engine.max_model_len}); lower --max-model-len to at most that")
    # In the target's weight format: a draft pass is one row, where int8 weights read half the bytes
    # (a 6-layer bf16 draft of SmolLM2-135M took 8.6 ms a pass, its LM head alone ~4 ms, against
    # 7 ms for the whole hybrid target)
    model = LlamaModel(draft.config, draft.weights, engine.model.dtype, engine.device, engine.model.weight_format)
    return ModelProposer(model, engine.pool.num_blocks, engine.pool.block_size, "draft",
                         prefix_sharing=engine.config.enable_prefix_caching)


# Dense where the cost curve has steps, which linear interpolation would hide: the int8 kernel of
# hybrid weights costs about the same for 1-4 rows and jumps by half at 5 (measured), and on AMX
# every 16 rows start another tile pass (17 rows cost well above 16).
STEP_COST_SIZES = (1, 2, 3, 4, 5, 6, 8, 12, 16, 17, 24, 32, 33, 48, 64, 65, 128, 256)


@contextmanager
def _calibration_sequence(engine, length: int) -> Iterator[Sequence | None]:
    """A throwaway sequence holding cache blocks for `length` tokens (None when they are not free)."""
    pool = engine.pool
    if pool.blocks_needed(length) > pool.num_free:
        yield None
        return
    seq = Sequence(-1, "calibrate", 0, [0] * length, SamplingParams(temperature=0))
    seq.block_table = pool.allocate(pool.blocks_needed(length))
    try:
        yield seq
    finally:
        pool.free(seq.block_table)


def _best_seconds(engine, item: BatchItem, repeats: int) -> float:
    """The fastest of `repeats` target passes over one item."""
    best = float("inf")
    for _ in range(repeats):
        t0 = time.perf_counter()
        engine.runner.run([item])
        best = min(best, time.perf_counter() - t0)
    return best


def measure_step_costs(engine, sizes: tuple[int, ...] = STEP_COST_SIZES, repeats: int = 2) -> dict[int, float]:
    """Seconds for one target pass over n tokens with logits for all n (as a verification step has,
    and a decode step of n sequences), measured once at start (the controller's cost model). With
    logits for one row only, a 16-sequence K=16 step's 272 rows of LM head (a dense-weight matmul
    past the int8 kernel's row range) were missing from the table, and such steps ran at 0.86x.
    Sizes past max_model_len are left out: the model has no positions there (nor will a step)."""
    sizes = tuple(n for n in sizes if n <= engine.max_model_len)
    with _calibration_sequence(engine, max(sizes)) as seq:
        if seq is None:
            return {}
        return {n: _best_seconds(engine, BatchItem(seq, [0] * n, 0, n), repeats) for n in sizes}


def measure_attention_cost(engine, context: int = 1024, repeats: int = 5) -> tuple[float, float]:
    """ms per context token of attention for a sequence's first query row, and for each further row
    of a verification step: steps of 1 and MAX_SPEC_TOKENS + 1 rows at the end of a `context`-token
    sequence against the same at its start (the cache's contents do not matter for the timing)."""
    wide = MAX_SPEC_TOKENS + 1
    context = min(context, engine.max_model_len)
    if context < 2 * wide:
        return 0.0, 0.0
    with _calibration_sequence(engine, context) as seq:
        if seq is None:
            return 0.0, 0.0

        def per_key(rows: int) -> float:
            first, last = (_best_seconds(engine, BatchItem(seq, [0] * rows, start, 1), repeats)
                           for start in (0, context - rows))
            return max(0.0, (last - first) * 1000.0 / (context - rows))

        one, many = per_key(1), per_key(wide)
    return one, max(0.0, (many - one) / (wide - 1))


class SpecDecoder:
    def __init__(self, engine, method: str, num_spec_tokens: int) -> None:
        self.engine = engine
        self.method = method
        self.max_k = num_spec_tokens
        self.proposer = build_proposer(engine, method)
        self.controller = SpecController(max_k=num_spec_tokens, max_paid_k=PAID_DRAFT_MAX_K)
        first_row, extra_row = measure_attention_cost(engine)
        self.controller.calibrate(measure_step_costs(engine), attention_ms_per_key=first_row,
                                  attention_ms_per_key_extra_row=extra_row)
        self._draft_probs: dict[int, torch.Tensor | None] = {}
        # seq_id -> (index in seq.tokens of the shadow draft's first token, the drafted tokens, their kind)
        self._shadows: dict[int, tuple[int, list[int], Hashable]] = {}
        # seq_id -> whether this step's draft was free: acceptance is tracked per sequence and
        # source, since an `auto` sequence's lookup hits and model drafts fare differently
        self._free_draft: dict[int, bool] = {}
        # drafted by a paid fallback this step: shadow its lookup, whose draft kind is kept here
        self._shadow_wanted: dict[int, Hashable] = {}
        self._kinds: dict[int, Hashable] = {}  # seq_id -> the kind of this step's draft (draft_kind)
        self._step_started: float | None = None  # perf_counter at the end of a decode step's drafting
        self._planned: dict[int, int] = {}  # seq_id -> K of this step's plan

    def _key(self, seq_id: int, free: bool) -> tuple[int, bool]:
        """The controller's record for a sequence's drafts from one source (free or paid)."""
        return seq_id, free

    # -------------------------------------------------------------- scheduling

    def plan(self, running: list[Sequence], waiting: list[Sequence] = ()) -> None:
        """Size the drafts of every sequence that decodes this step together (SpecController.plan);
        the scheduler then asks `slots_for` for each one's share. Prompt tokens waiting to be
        prefilled share the pass, up to the step's token budget."""
        self._planned = {}
        if self.max_k == 0 or not self.engine.config.spec_adaptive:
            return
        batch = len(running)
        slots, seqs, undrafted = [], [], []
        prompt_rows = sum(s.num_tokens - s.num_computed for s in waiting)
        for seq in running:
            if seq.num_tokens - seq.num_computed != 1:
                prompt_rows += seq.num_tokens - seq.num_computed  # a prompt chunk this step: no draft
                continue
            seq_id = seq.seq_id
            free = self.proposer.drafts_free_for(seq_id, seq.tokens)
            kind = self._kinds[seq_id] = self.proposer.draft_kind(seq_id, seq.tokens)
            if kind == NOTHING_TO_DRAFT:
                undrafted.append(seq.num_tokens)
                continue
            if free and self.proposer.can_fall_back and not self._free_drafts_pay(seq, batch, kind) \
                    and self.proposer.fall_back(seq_id, seq.tokens):
                free = False  # its free drafts are not accepted: a paid source drafts it this step
                self._shadow_wanted[seq_id] = kind
                kind = self._kinds[seq_id] = self.proposer.draft_kind(seq_id, seq.tokens)
            slots.append(DraftSlot(self._key(seq_id, free), kind, free, seq.num_tokens))
            seqs.append(seq_id)
        prefill = min(prompt_rows, max(0, self.engine.config.max_num_batched_tokens - len(slots) - len(undrafted)))
        self._planned = dict(zip(seqs, self.controller.plan(slots, undrafted, prefill), strict=True))

    def _free_drafts_pay(self, seq: Sequence, batch: int, kind: Hashable) -> bool:
        self.controller.set_context(seq.num_tokens)
        return self.controller.wants_draft(self._key(seq.seq_id, True), batch, free_draft=True, kind=kind)

    def slots_for(self, seq: Sequence) -> int:
        if not self.engine.config.spec_adaptive:
            return self.max_k
        return self._planned.get(seq.seq_id, 0)

    def propose(self, sched: SchedulerOutput) -> dict[int, list[int]]:
        drafts = self._propose(sched)
        # A decode step (no prompt chunk in it) is timed from here to the end of its verification,
        # next to what the cost model predicted (drafting, timed apart, left out)
        decode_only = all(s.num_new_tokens == 1 for s in sched.scheduled)
        self._step_started = time.perf_counter() if decode_only and self.engine.config.spec_adaptive else None
        return drafts

    def _propose(self, sched: SchedulerOutput) -> dict[int, list[int]]:
        self._shadow_drafts(sched)
        reqs = [DraftRequest(s.seq.seq_id, s.seq.tokens, s.num_spec_slots, s.seq.params, s.seq.random,
                             s.seq.cache_salt)
                for s in sched.scheduled if s.num_spec_slots > 0]
        if not reqs:
            return {}
        # Free drafts (lookup hits) and paid ones (model passes) apart: only the paid ones are timed,
        # so the controller's drafting cost is what a model pass costs. The time is filed under the
        # number of paid drafters, and looked up under the number of running sequences: the same in
        # a batch of one source, an over-estimate (fewer rows draft) otherwise.
        free, paid = [], []
        for r in reqs:
            (free if self.proposer.drafts_free_for(r.seq_id, r.token_ids) else paid).append(r)
        drafts = self.proposer.propose(free) if free else []
        if paid:
            t0 = time.perf_counter()
            paid_drafts = self.proposer.propose(paid)
            self.controller.record_draft_time(time.perf_counter() - t0, max(len(d.tokens) for d in paid_drafts),
                                              sum(1 for d in paid_drafts if d.tokens))
            drafts += paid_drafts
        out = {}
        self._free_draft.update({r.seq_id: True for r in free} | {r.seq_id: False for r in paid})
        for r, d in zip(free + paid, drafts, strict=True):
            toks = d.tokens[: r.num_tokens]
            out[r.seq_id] = toks
            self._draft_probs[r.seq_id] = d.probs[: len(toks)] if d.probs is not None and toks else None
        return out

    def _shadow_drafts(self, sched: SchedulerOutput) -> None:
        """For sequences whose free drafts are not paying (switched off, or drafted by `auto`'s model
        instead): settle the pending shadow draft against the tokens decoding produced since, and
        make a new free one that is never verified. A shadow draft token matches the decoded token
        with the probability that verification would have accepted it (greedy: argmax equality;
        sampling with one-hot q: p(x)), so it is the same evidence a real draft gives."""
        wanted, self._shadow_wanted = self._shadow_wanted, {}
        if not self.proposer.free_to_draft and not wanted:
            return
        for s in sched.scheduled:
            seq = s.seq
            pending = self._shadows.get(seq.seq_id)
            if pending is not None and self._settle_shadow(seq, *pending):
                del self._shadows[seq.seq_id]
                pending = None
            free_drafting = s.num_spec_slots > 0 and seq.seq_id not in wanted
            if pending is not None and free_drafting:
                del self._shadows[seq.seq_id]  # its real drafts report from now on: no double count
                continue
            kind = wanted.get(seq.seq_id, self._kinds.get(seq.seq_id))
            off = seq.seq_id in wanted or (self.proposer.free_to_draft and s.num_spec_slots == 0 and
                                           self.controller.is_off_for_acceptance(self._key(seq.seq_id, True), kind))
            if pending is None and off and s.num_new_tokens == 1 and seq.output_ids:
                draft = self.proposer.shadow_draft(DraftRequest(seq.seq_id, seq.tokens, self.max_k, seq.params,
                                                                seq.random, seq.cache_salt))
                if draft:
                    self._shadows[seq.seq_id] = (len(seq.tokens), list(draft), kind)

    def _settle_shadow(self, seq: Sequence, start: int, draft: list[int], kind: Hashable = None) -> bool:
        """Record the shadow draft once its outcome is known (a mismatch, or every token matched)."""
        actual = seq.tokens[start: start + len(draft)]
        matched = 0
        while matched < len(actual) and actual[matched] == draft[matched]:
            matched += 1
        if matched == len(actual) and len(actual) < len(draft):
            return False  # all matched so far; the rest is not decoded yet
        self.controller.record_shadow(self._key(seq.seq_id, True), len(draft), matched, kind)
        return True

    # -------------------------------------------------------------- verification

    def verify(self, items: list[BatchItem], logits: list[torch.Tensor | None],
               drafts: list[list[int] | None]) -> list[list[int] | None]:
        out = self._verify(items, logits, drafts)
        if self._step_started is not None:
            measured = (time.perf_counter() - self._step_started) * 1000.0
            ks = [len(d or []) for d in drafts]
            predicted = self.controller.predict_step_ms(ks, [it.seq.num_tokens for it in items])
            self.controller.record_step_time(measured, predicted, any(ks))
            self._step_started = None
        return out

    def _verify(self, items: list[BatchItem], logits: list[torch.Tensor | None],
                drafts: list[list[int] | None]) -> list[list[int] | None]:
        rows = [(i, it, lg, drafts[i] or []) for i, (it, lg) in enumerate(zip(items, logits, strict=True))
                if lg is not None]
        out: list[list[int] | None] = [None] * len(items)
        observe = getattr(self.proposer, "observe", None)
        # Rows without a draft (speculation off, nothing to propose) sample as plain decoding does:
        # on a fast target the one-hot probabilities and the verifier's bookkeeping cost ~5% of a step.
        undrafted = [r for r in rows if not r[3]]
        if undrafted:
            tokens = sample_for_sequences(torch.cat([lg for _, _, lg, _ in undrafted]),
                                          [it.seq for _, it, _, _ in undrafted])
            for (i, it, _, _), token in zip(undrafted, tokens, strict=True):
                out[i] = [token]
                self._draft_probs.pop(it.seq.seq_id, None)
                if observe is not None:  # no draft, no trajectory: the Jacobi guess starts over
                    observe(it.seq.seq_id, [], [], 0)
        rows = [r for r in rows if r[3]]
        if not rows:
            return out
        # Greedy rows without penalties verify against the logits' argmax directly; the rest against
        # the processed distributions (what plain decoding samples from).
        by_argmax = [r for r in rows if r[1].seq.params.raw_argmax]
        by_probs = [r for r in rows if not r[1].seq.params.raw_argmax]
        verified = self._verify_by_argmax(by_argmax) + self._verify_by_probs(by_probs)
        for (i, it, _, draft), res, predictions in verified:
            out[i] = list(res.tokens)
            if observe is not None:  # Jacobi-style proposers learn from the target's predictions
                observe(it.seq.seq_id, draft, predictions, res.num_accepted)
            seq = it.seq
            seq.spec_drafted += len(draft)
            seq.spec_accepted += res.num_accepted
            seq.spec_steps += 1
            self.controller.record(self._key(seq.seq_id, self._free_draft.pop(seq.seq_id, False)), len(draft),
                                   res.num_accepted, self._kinds.get(seq.seq_id))
            self.proposer.on_verified(seq.seq_id, res.num_accepted)
        return out

    def _verify_by_argmax(self, rows) -> list[tuple]:
        """(row, result, the target's argmax after each draft prefix) for greedy rows."""
        out = []
        for r in rows:
            # Each sequence's rows apart: concatenating them first copied up to 64 x 49k logits a step
            targets = argmax_rows(r[2].float()).tolist()
            self._draft_probs.pop(r[1].seq.seq_id, None)
            out.append((r, verify_greedy_targets(r[3], targets), targets))
        return out

    def _verify_by_probs(self, rows) -> list[tuple]:
        """(row, result, the target's argmax after each draft prefix) through `verify` on the
        processed distributions (sampled rows, rows with penalties)."""
        if not rows:
            return []
        target_probs = self._target_probs(rows)
        seqs = [it.seq for _, it, _, _ in rows]
        draft_probs = [self._draft_probs.pop(s.seq_id, None) for s in seqs]
        results = verify([d for *_, d in rows], draft_probs, target_probs, [s.params for s in seqs],
                         [s.random for s in seqs], [s.num_tokens for s in seqs])
        return [(r, res, p.argmax(dim=-1).tolist()) for r, res, p in zip(rows, results, target_probs, strict=True)]

    def _target_probs(self, rows) -> list[torch.Tensor]:
        """p for each draft position, with penalty histories that include the earlier drafts."""
        flat_logits, params, prompts, outputs = [], [], [], []
        for _, it, lg, draft in rows:
            seq = it.seq
            for j in range(lg.shape[0]):
                flat_logits.append(lg[j])
                params.append(seq.params)
                prompts.append(seq.prompt_ids)
                outputs.append(seq.output_ids + draft[:j])
        probs = logits_to_probs(torch.stack(flat_logits), params, prompts, outputs)
        out, k = [], 0
        for _, _, lg, _ in rows:
            out.append(probs[k: k + lg.shape[0]])
            k += lg.shape[0]
        return out

    def release(self, seq: Sequence) -> None:
        self._draft_probs.pop(seq.seq_id, None)
        self._shadows.pop(seq.seq_id, None)
        self.proposer.release(seq.seq_id)
        self._free_draft.pop(seq.seq_id, None)
        self._kinds.pop(seq.seq_id, None)
        for free in (True, False):
            self.controller.release(self._key(seq.seq_id, free))

    def stats(self) -> dict:
        sources = {k: getattr(self.proposer, k) for k in ("lookup_drafts", "model_drafts", "model_draft_tokens")
                   if hasattr(self.proposer, k)}
        return {"method": self.method, **self.controller.stats(), **sources, **self.proposer.stats()}
