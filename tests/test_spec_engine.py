"""Speculative decoding inside the engine: greedy output equals plain greedy for every proposer,
sampled output has plain sampling's distribution, and every KV block comes back."""

from __future__ import annotations

import pytest
import torch
from conftest import make_tiny_model

from specache import LLM, SamplingParams

GREEDY = SamplingParams(max_tokens=40, temperature=0, ignore_eos=True)


def _prompts() -> list[list[int]]:
    g = torch.Generator().manual_seed(5)
    base = torch.randint(3, 49152, (12,), generator=g).tolist()
    # Repetitive prompts give the n-gram and lookahead proposers real matches (accepting 0..K).
    return [base * 3, base[:5] * 4 + base, torch.randint(3, 49152, (30,), generator=g).tolist(), base[:3]]


@pytest.fixture(scope="module")
def draft_dir(tmp_path_factory):
    return make_tiny_model(tmp_path_factory.mktemp("tiny-draft"), seed=1, num_hidden_layers=2)


@pytest.fixture(scope="module")
def plain_outputs(tiny_llm):
    return [o.token_ids for o in tiny_llm.generate(_prompts(), GREEDY)]


@pytest.mark.parametrize("method", ["ngram", "lookahead", "layer-skip:2", "quantized", "draft", "auto"])
def test_greedy_speculative_equals_plain_greedy(tiny_model_dir, draft_dir, plain_outputs, method):
    spec = f"draft:{draft_dir}" if method == "draft" else method
    # block_size 4 so drafts routinely cross block boundaries and rollback frees whole blocks
    llm = LLM(model=str(tiny_model_dir), dtype="float32", speculative=spec, num_spec_tokens=5, block_size=4,
              spec_adaptive=method == "auto")
    outs = llm.generate(_prompts(), GREEDY)
    assert [o.token_ids for o in outs] == plain_outputs
    assert llm.engine.pool.all_free()
    spec_state = llm.engine.spec  # finished sequences leave no per-sequence state behind
    assert not spec_state.controller.seqs and not spec_state._shadows and not spec_state._free_draft
    if method != "auto":  # the adaptive controller may rightly decline to draft for a random model
        assert llm.engine.spec.stats()["draft_tokens"] > 0


def test_a_draft_models_cache_gives_back_the_blocks_of_rejected_drafts(tiny_model_dir, draft_dir):
    """After each verification the draft model's cache holds the verified prefix only: blocks that
    held nothing but rejected drafts go back to its pool at once, not when the request ends."""
    llm = LLM(model=str(tiny_model_dir), dtype="float32", speculative=f"draft:{draft_dir}", num_spec_tokens=5,
              block_size=4, spec_adaptive=False)
    engine, proposer = llm.engine, llm.engine.spec.proposer
    for prompt in _prompts():
        engine.add_request(prompt, GREEDY)
    rolled_back = 0
    while engine.has_unfinished():
        engine.step()
        for st in proposer.seqs.values():
            rolled_back += st.num_tokens - st.num_computed > 1  # drafts past the verified prefix
            assert len(st.block_table) == proposer.pool.blocks_needed(st.num_computed)
    assert rolled_back > 0  # the random draft is rejected often: rollbacks were exercised
    assert engine.pool.all_free() and proposer.pool.all_free()


def test_a_draft_model_takes_the_targets_weight_format(tiny_model_dir, draft_dir):
    """A draft pass is a one-row pass, where int8 weights read half the bytes of bf16: the draft
    model is loaded in the target's format, and greedy output stays the int8 target's own."""
    llm = LLM(model=str(tiny_model_dir), dtype="float32", weight_format="int8", speculative=f"draft:{draft_dir}",
              num_spec_tokens=4, spec_adaptive=False)
    assert llm.engine.spec.proposer.model.weight_format == "int8"
    plain = LLM(model=str(tiny_model_dir), dtype="float32", weight_format="int8")
    assert [o.token_ids for o in llm.generate(_prompts(), GREEDY)] == \
        [o.token_ids for o in plain.generate(_prompts(), GREEDY)]


def test_a_draft_model_shares_cached_prompt_blocks_within_a_tenant(tiny_model_dir, draft_dir):
    """With prefix caching on, a request whose prompt another request drafted with catches the
    draft cache up from the cached blocks (within its tenant), and greedy output stays plain's."""
    shared = _prompts()[0]  # 36 tokens: 9 blocks of 4
    prompts = [shared + [7, 8, 9], shared + [10, 11]]
    plain = LLM(model=str(tiny_model_dir), dtype="float32", block_size=4)
    expected = [o.token_ids for o in plain.generate(prompts, GREEDY)]
    llm = LLM(model=str(tiny_model_dir), dtype="float32", speculative=f"draft:{draft_dir}", num_spec_tokens=4,
              block_size=4, spec_adaptive=False, enable_prefix_caching=True)
    proposer = llm.engine.spec.proposer

    def catch_up_tokens(prompt, salt=None) -> int:
        before = proposer.computed_tokens
        out = llm.generate([prompt], GREEDY, cache_salt=salt)[0]
        return proposer.computed_tokens - before - out.metrics["spec_draft_tokens"], out.token_ids

    first, out_a = catch_up_tokens(prompts[0])
    second, out_b = catch_up_tokens(prompts[1])
    other_tenant, out_c = catch_up_tokens(prompts[1], salt="tenant-b")
    assert [out_a, out_b] == expected and out_c == expected[1]
    # the second request computed at most its own suffix and the last shared block, not the prompt
    assert second <= first - len(shared) + 2 * 4
    assert other_tenant >= len(prompts[1])  # another tenant never reads the first tenant's blocks
    assert proposer.stats()["draft_prefix_hit_tokens"] >= len(shared) - 4
    # only the tree holds blocks once every request has finished, and nothing is locked
    assert proposer.pool.num_used == proposer.prefix.cached_blocks() > 0
    assert all(root.lock_ref == 0 for root in proposer.prefix.roots.values())


@pytest.mark.parametrize("seed", [0, 1, 2])
def test_a_draft_model_under_preemption_and_prefix_sharing_keeps_output_and_blocks(tiny_model_dir, draft_dir, seed):
    """Requests sharing prefixes in a KV cache too small for them all (preemptions, draft-cache
    evictions, tree hits): greedy output stays plain's, and once they finish only the two prefix
    trees hold blocks, with nothing locked."""
    g = torch.Generator().manual_seed(seed)
    system = torch.randint(3, 49152, (20,), generator=g).tolist()
    prompts = [system[: int(torch.randint(8, 21, (1,), generator=g))] +
               torch.randint(3, 49152, (int(torch.randint(3, 11, (1,), generator=g)),), generator=g).tolist()
               for _ in range(6)]
    params = SamplingParams(max_tokens=20, temperature=0, ignore_eos=True)
    opts = dict(dtype="float32", block_size=4, kv_cache_memory="160KiB", enable_prefix_caching=True)
    expected = [o.token_ids for o in LLM(model=str(tiny_model_dir), **opts).generate(prompts, params)]
    llm = LLM(model=str(tiny_model_dir), speculative=f"draft:{draft_dir}", num_spec_tokens=4, spec_adaptive=False,
              **opts)
    engine, proposer = llm.engine, llm.engine.spec.proposer
    assert engine.pool.num_blocks <= 48  # the six requests need ~75 blocks at once: they compete
    assert [o.token_ids for o in llm.generate(prompts, params)] == expected
    stats = engine.spec.stats()
    assert engine.scheduler.num_preemptions > 0 and stats["draft_cache_evicted_seqs"] > 0
    assert stats["draft_prefix_hit_tokens"] > 0 and stats["draft_tokens"] > 0
    assert not proposer.seqs
    assert engine.pool.num_used == engine.prefix_cache.cached_blocks()
    assert proposer.pool.num_used == proposer.prefix.cached_blocks()
    for tree in (engine.prefix_cache, proposer.prefix):
        assert all(root.lock_ref == 0 for root in tree.roots.values())


@pytest.mark.parametrize("prefix", [False, True])
def test_an_aborted_request_frees_the_draft_models_blocks(tiny_model_dir, draft_dir, prefix):
    """A client that hangs up mid-generation: the target's and the draft model's blocks come back at
    once (with prefix caching, only the trees keep the verified prompt blocks), and no per-sequence
    speculation state stays behind."""
    llm = LLM(model=str(tiny_model_dir), dtype="float32", speculative=f"draft:{draft_dir}", num_spec_tokens=4,
              block_size=4, spec_adaptive=False, enable_prefix_caching=prefix)
    engine, proposer = llm.engine, llm.engine.spec.proposer
    rid = engine.add_request(_prompts()[0], SamplingParams(max_tokens=50, temperature=0.8, seed=1))
    for _ in range(4):
        engine.step()
    assert proposer.pool.num_used > 0 and proposer.seqs
    engine.abort(rid)
    assert not engine.has_unfinished() and not proposer.seqs and not engine.spec.controller.seqs
    if prefix:
        assert engine.pool.num_used == engine.prefix_cache.cached_blocks()
        assert proposer.pool.num_used == proposer.prefix.cached_blocks() > 0
    else:
        assert engine.pool.all_free() and proposer.pool.all_free()


def _draft_proposer(draft_dir, num_blocks: int, prefix_sharing: bool = False):
    from specache.models.llama import LlamaModel
    from specache.models.loader import load_model
    from specache.spec.draft import ModelProposer

    draft = load_model(str(draft_dir))
    model = LlamaModel(draft.config, draft.weights, torch.float32, torch.device("cpu"))
    return ModelProposer(model, num_blocks, 4, prefix_sharing=prefix_sharing)


def _draft(proposer, seq_id: int, tokens: list[int], k: int, params=GREEDY):
    from specache.sampling import TokenRandom
    from specache.spec.base import DraftRequest

    return proposer.propose([DraftRequest(seq_id, tokens, k, params, TokenRandom(seq_id))])[0]


def test_a_full_draft_cache_gives_an_idle_sequences_blocks_to_a_drafting_one(tiny_model_dir, draft_dir):
    """A sequence not drafting this step (waiting, preempted, switched off) loses its draft cache
    when a drafting sequence needs the blocks, instead of that sequence getting no draft; the idle
    one catches up from scratch when it drafts again, to the same draft."""
    a, b = _prompts()[1][:15], _prompts()[2][:10]
    proposer = _draft_proposer(draft_dir, num_blocks=6)  # 24 tokens: a with 3 drafts takes 5 blocks
    assert len(_draft(proposer, 1, a, 3).tokens) == 3
    got_b = _draft(proposer, 2, b, 3)
    assert got_b.tokens == _draft(_draft_proposer(draft_dir, 6), 2, b, 3).tokens
    assert proposer.evicted_seqs == 1 and not proposer.seqs[1].block_table
    proposer.on_verified(2, 0)
    proposer.release(2)
    assert _draft(proposer, 1, a, 3).tokens == _draft(_draft_proposer(draft_dir, 6), 1, a, 3).tokens


def test_rewinding_into_a_shared_draft_block_leaves_the_cached_copy_intact(tiny_model_dir, draft_dir):
    """A sequence whose history changes inside a block the prefix tree also holds recomputes that
    block in one of its own: writing into it would corrupt the K/V another request then reads."""
    sampled = SamplingParams(max_tokens=8, temperature=1.0, ignore_eos=True)
    tokens = _prompts()[0][:12]  # three full blocks, cached after the catch-up
    proposer = _draft_proposer(draft_dir, num_blocks=32, prefix_sharing=True)
    _draft(proposer, 1, tokens, 2, sampled)
    proposer.on_verified(1, 0)
    assert proposer.prefix.cached_blocks() == 3
    _draft(proposer, 1, tokens[:6] + [5, 6, 7, 8], 2, sampled)  # rewritten from position 6, in block 1
    proposer.on_verified(1, 0)
    reader = tokens + [9]
    shared = _draft(proposer, 2, reader, 2, sampled)
    assert proposer.stats()["draft_prefix_hit_tokens"] >= 12
    fresh = _draft(_draft_proposer(draft_dir, 32), 2, reader, 2, sampled)
    torch.testing.assert_close(shared.probs, fresh.probs)


@pytest.mark.parametrize("method", ["draft", "quantized", "layer-skip:2"])
def test_a_seeded_request_samples_the_same_text_alone_or_in_any_batch(tiny_model_dir, draft_dir, method):
    """A model drafter samples its drafts with the request's own uniforms (keyed by the seed and the
    position): the same seeded request gives the same text again, and beside other requests."""
    spec = f"draft:{draft_dir}" if method == "draft" else method
    llm = LLM(model=str(tiny_model_dir), dtype="float32", speculative=spec, num_spec_tokens=3,
              spec_adaptive=False)
    seeded = SamplingParams(max_tokens=16, temperature=1.0, seed=7, ignore_eos=True)
    others = SamplingParams(max_tokens=16, temperature=1.0, ignore_eos=True)
    prompt = _prompts()[1]
    alone = llm.generate([prompt], seeded)[0].token_ids
    again = llm.generate([prompt], seeded)[0].token_ids
    batched = llm.generate([_prompts()[0], prompt, _prompts()[2]], [others, seeded, others])[1].token_ids
    assert alone == again == batched
    assert llm.engine.spec.stats()["draft_tokens"] > 0


@pytest.mark.parametrize("method", ["ngram", "lookahead"])
def test_a_seeded_request_under_lookup_drafts_gives_plain_samplings_text(tiny_model_dir, method):
    """Drafts without q are verified by drawing each token as plain decoding would (the same
    uniform, keyed by position): a seeded sampled request gives plain sampling's text token for
    token, under the adaptive controller (whatever K it picks) and at a fixed K alike."""
    params = [SamplingParams(max_tokens=40, temperature=0.05, top_k=4, seed=seed, ignore_eos=True)
              for seed in range(len(_prompts()))]
    plain = LLM(model=str(tiny_model_dir), dtype="float32")
    expected = [o.token_ids for o in plain.generate(_prompts(), params)]
    for adaptive in (True, False):
        llm = LLM(model=str(tiny_model_dir), dtype="float32", speculative=method, num_spec_tokens=5,
                  spec_adaptive=adaptive)
        assert [o.token_ids for o in llm.generate(_prompts(), params)] == expected
    # (the adaptive controller may rightly decline to draft on a random model; a fixed K drafts)
    assert llm.engine.spec.stats()["accepted_tokens"] > 0


def test_quantized_draft_keeps_the_fp32_target_exact(tiny_model_dir, plain_outputs):
    """'quantized' drafts with an int8 copy; verification by the fp32 target keeps output exact."""
    llm = LLM(model=str(tiny_model_dir), dtype="float32", speculative="quantized", num_spec_tokens=4,
              spec_adaptive=False)
    assert llm.engine.model.weight_format == "dense"
    # it drafts in the target's own KV cache: no second cache, no prompt catch-up per request
    assert llm.engine.spec.proposer.runner.cache is llm.engine.runner.cache
    assert llm.engine.spec.proposer.runner.model.weight_format == "int8"
    assert [o.token_ids for o in llm.generate(_prompts(), GREEDY)] == plain_outputs
    assert llm.engine.spec.stats()["accepted_tokens"] > 0


def test_auto_drafts_by_lookup_on_copies_and_by_the_int8_model_elsewhere(tiny_model_dir, plain_outputs):
    llm = LLM(model=str(tiny_model_dir), dtype="float32", speculative="auto", num_spec_tokens=4,
              spec_adaptive=False)
    assert [o.token_ids for o in llm.generate(_prompts(), GREEDY)] == plain_outputs
    stats = llm.engine.spec.stats()
    assert stats["lookup_drafts"] > 0 and stats["model_drafts"] > 0
    assert llm.engine.pool.all_free()


def test_a_draft_model_with_a_shorter_context_is_refused_unless_max_model_len_fits(tiny_model_dir, tmp_path):
    """Its RoPE table ends at its own context: past it every request of the step would fail."""
    from specache.errors import ConfigError

    short = make_tiny_model(tmp_path / "short-draft", seed=1, num_hidden_layers=2, max_position_embeddings=256)
    with pytest.raises(ConfigError, match="draft model's context"):
        LLM(model=str(tiny_model_dir), dtype="float32", speculative=f"draft:{short}")
    llm = LLM(model=str(tiny_model_dir), dtype="float32", speculative=f"draft:{short}", max_model_len=256)
    assert llm.generate(_prompts()[:1], GREEDY)[0].token_ids


@pytest.mark.parametrize("weight_format", ["int8", "hybrid"])
def test_an_int8_target_has_no_int8_self_draft(tiny_model_dir, weight_format):
    """Its int8 draft would be the target itself at the target's cost: 'quantized' is refused with a
    clear error and 'auto' drafts by prompt lookup alone."""
    from specache.errors import ConfigError
    from specache.spec.ngram import NgramProposer

    with pytest.raises(ConfigError, match="quantized"):
        LLM(model=str(tiny_model_dir), dtype="float32", weight_format=weight_format, speculative="quantized")
    llm = LLM(model=str(tiny_model_dir), dtype="float32", weight_format=weight_format, speculative="auto",
              num_spec_tokens=4, spec_adaptive=False)
    assert isinstance(llm.engine.spec.proposer, NgramProposer)
    outputs = [o.token_ids for o in llm.generate(_prompts(), GREEDY)]
    assert llm.engine.spec.stats()["accepted_tokens"] > 0
    if weight_format == "int8":  # hybrid switches weights by row count, so only int8 rows are batch-invariant
        plain = LLM(model=str(tiny_model_dir), dtype="float32", weight_format=weight_format)
        assert outputs == [o.token_ids for o in plain.generate(_prompts(), GREEDY)]


def test_ngram_accepts_on_repetitive_text_and_reports_metrics(tiny_model_dir):
    llm = LLM(model=str(tiny_model_dir), dtype="float32", speculative="ngram", num_spec_tokens=4, spec_adaptive=False)
    out = llm.generate([_prompts()[0]], GREEDY)[0]
    m = out.metrics
    assert m["spec_draft_tokens"] > 0 and 0 <= m["spec_acceptance_rate"] <= 1
    assert m["spec_mean_accepted_length"] >= 1
    # each target pass emits one token plus the draft tokens it accepted (the last pass may stop early)
    assert m["spec_draft_steps"] <= m["target_passes"] <= len(out.token_ids) <= \
        m["target_passes"] + m["spec_accepted_tokens"]


def test_a_stop_inside_an_accepted_draft_leaves_the_cut_tokens_out_of_the_metrics(tiny_model_dir):
    """A request's accepted drafts are tokens of its output, also when a stop token lands inside an
    accepted run: the accepted drafts after the stop are not part of the output, so they are not
    counted (the controller's record still has them)."""
    llm = LLM(model=str(tiny_model_dir), dtype="float32", speculative="ngram", num_spec_tokens=5,
              spec_adaptive=False)
    # A tiny random model falls into loops: with its own loop in the prompt, the output repeats it
    # from the first step, so lookup drafts are accepted from the start and every stop lands in a run
    prompt = _prompts()[2] + llm.generate([_prompts()[2]], GREEDY)[0].token_ids
    full = llm.generate([prompt], GREEDY)[0].token_ids
    stops = list(dict.fromkeys(full[1:]))  # each distinct token as the stop: cuts at many positions
    params = [SamplingParams(max_tokens=40, temperature=0, stop_token_ids=[t]) for t in stops]
    before = llm.engine.spec.stats()["accepted_tokens"]
    outs = llm.generate([prompt] * len(stops), params)
    for out, stop in zip(outs, stops, strict=True):
        m = out.metrics
        assert out.token_ids == full[: full.index(stop) + 1]  # greedy: plain's text up to the stop
        # the first token comes from the prompt's pass; the last pass may end on an accepted draft
        assert m["spec_accepted_tokens"] <= len(out.token_ids) - 1
        assert len(out.token_ids) - 1 <= m["target_passes"] - 1 + m["spec_accepted_tokens"] <= len(out.token_ids)
        assert 0 <= m["spec_accepted_tokens"] <= m["spec_draft_tokens"]
    # some stops did cut accepted runs: the verifier accepted more than the outputs kept
    assert llm.engine.spec.stats()["accepted_tokens"] - before > sum(o.metrics["spec_accepted_tokens"] for o in outs)


def test_shadow_drafts_settle_against_the_decoded_tokens(tiny_model_dir):
    """A shadow draft is settled once decoding shows a mismatch or has matched all of it, and only
    its outcome reaches the controller (as evidence, not as a draft)."""
    from specache.engine.sequence import Sequence

    llm = LLM(model=str(tiny_model_dir), dtype="float32", speculative="ngram", num_spec_tokens=4)
    spec = llm.engine.spec
    seq = Sequence(7, "r", 0, [5, 6, 7], GREEDY)
    seq.tokens = [5, 6, 7, 8, 9]  # decoded so far: 8, 9 after a draft made at index 3
    assert not spec._settle_shadow(seq, 3, [8, 9, 10, 11])  # matches so far, 2 still to come
    assert spec._settle_shadow(seq, 3, [8, 4, 10, 11])  # mismatch at the 2nd token: 1 matched
    seq.tokens += [10, 11]
    assert spec._settle_shadow(seq, 3, [8, 9, 10, 11])  # all 4 matched
    st = spec.controller.seqs[((7, True), None)]  # prompt lookup drafts are free; no kind given
    assert (st.successes, st.raw_trials) == (pytest.approx(0.8 * 1 + 4), 2 + 4)
    assert spec.controller.stats()["shadow_drafts"] == 2 and spec.controller.stats()["drafts"] == 0


def test_a_switched_off_lookup_sequence_drafts_in_the_shadow(tiny_model_dir):
    """While prompt lookup is off for a sequence, each step makes a shadow draft (never verified)
    and settles it against the decoded tokens, as acceptance evidence for the controller."""
    from types import SimpleNamespace

    from specache.engine.scheduler import ScheduledSeq
    from specache.engine.sequence import Sequence
    from specache.spec.controller import _SeqState

    llm = LLM(model=str(tiny_model_dir), dtype="float32", speculative="ngram", num_spec_tokens=4)
    spec = llm.engine.spec
    seq = Sequence(3, "r", 0, [1, 2, 3, 4, 1, 2], GREEDY)
    seq.append(3)
    spec._kinds[3] = 3  # this step's lookup matched 3 tokens ("1 2 3"), and that kind is off
    spec.controller.seqs[((3, True), 3)] = _SeqState(off=True)
    step = SimpleNamespace(scheduled=[ScheduledSeq(seq, 1, 0)])
    spec._shadow_drafts(step)
    assert spec._shadows[3] == (7, [4, 1, 2, 3], 3)  # "1 2 3" was followed by "4 1 2 3"
    seq.append(4)
    seq.append(1)
    spec._shadow_drafts(step)  # matches so far: still pending, nothing recorded
    assert spec._shadows[3] == (7, [4, 1, 2, 3], 3) and spec.controller.shadow_drafts == 0
    seq.append(3)
    spec._shadow_drafts(step)  # the 3rd token differs (3, not 2): 2 of 4 matched; a new shadow starts
    assert spec.controller.shadow_drafts == 1
    assert spec.controller.seqs[((3, True), 3)].successes == pytest.approx(2)
    assert spec._shadows[3][0] == 10
    # once the sequence drafts for real again, the pending shadow is dropped (no double count)
    spec._shadow_drafts(SimpleNamespace(scheduled=[ScheduledSeq(seq, 1, 4)]))
    assert 3 not in spec._shadows


def _first_tokens(llm, n: int, seed0: int) -> list[tuple[int, ...]]:
    prompts = [[1, 2, 3, 1, 2]] * n
    # The first two tokens of three: drafting stops at what max_tokens allows, so with two tokens
    # the second would never be verified against a draft
    params = [SamplingParams(max_tokens=3, temperature=1.0, seed=seed0 + i, ignore_eos=True) for i in range(n)]
    return [tuple(o.token_ids[:2]) for o in llm.generate(prompts, params)]


def _chi2_two_sample(a: list, b: list) -> float:
    from scipy.stats import chi2_contingency

    cells = sorted(set(a) | set(b))
    ca, cb = [a.count(c) for c in cells], [b.count(c) for c in cells]
    keep = [i for i in range(len(cells)) if ca[i] + cb[i] >= 5]  # pool rare cells
    rest = [i for i in range(len(cells)) if i not in keep]
    table = [[ca[i] for i in keep] + [sum(ca[i] for i in rest)], [cb[i] for i in keep] + [sum(cb[i] for i in rest)]]
    if table[0][-1] + table[1][-1] == 0:
        table = [row[:-1] for row in table]
    return chi2_contingency(table)[1]


@pytest.fixture(scope="module")
def small_vocab(tmp_path_factory):
    """A target and a draft over an 8-token vocabulary, and plain-sampling samples from the target."""
    pytest.importorskip("scipy")
    kw = dict(vocab_size=8, initializer_range=0.6, num_hidden_layers=2)
    target = make_tiny_model(tmp_path_factory.mktemp("v8-target"), seed=3, **kw)
    draft = make_tiny_model(tmp_path_factory.mktemp("v8-draft"), seed=4, **kw)
    opts = dict(dtype="float32", max_num_seqs=256, kv_cache_memory="64MiB")
    plain = _first_tokens(LLM(model=str(target), **opts), 2500, 0)
    spec_llm = LLM(model=str(target), speculative=f"draft:{draft}", num_spec_tokens=2, spec_adaptive=False, **opts)
    return spec_llm, plain, target, opts


def test_speculative_sampling_matches_plain_sampling_distribution(small_vocab):
    """Two-token prefixes: plain sampling vs draft-model speculation with rejection sampling."""
    spec_llm, plain, _, _ = small_vocab
    spec = _first_tokens(spec_llm, 2500, 100_000)
    assert spec_llm.engine.spec.stats()["draft_tokens"] > 0
    assert _chi2_two_sample(plain, spec) > 1e-3


@pytest.mark.parametrize("method", ["quantized", "auto"])
def test_self_drafts_in_the_target_cache_keep_the_sampling_distribution(small_vocab, method):
    """The int8 self-draft writes its K/V into the target's cache; `auto` mixes one-hot lookup
    drafts with the model's q. Both must leave plain sampling's distribution intact."""
    _, plain, target, opts = small_vocab
    spec_llm = LLM(model=str(target), speculative=method, num_spec_tokens=2, spec_adaptive=False, **opts)
    spec = _first_tokens(spec_llm, 2500, 300_000)
    assert spec_llm.engine.spec.stats()["draft_tokens"] > 0
    assert _chi2_two_sample(plain, spec) > 1e-3
    assert spec_llm.engine.pool.all_free()


def test_a_broken_verifier_fails_the_same_check(small_vocab, monkeypatch):
    """The check has power: accepting every draft (no rejection step) is caught."""
    import specache.spec.decoder as decoder
    from specache.sampling import TokenRandom, draw_rows
    from specache.spec.verify import VerifyResult

    def accept_all(drafts, draft_probs, target_probs, params, randoms, positions):
        return [VerifyResult(list(d) + draw_rows(p[len(d):], [r.uniform(pos + len(d), TokenRandom.DRAW)]), len(d))
                for d, p, r, pos in zip(drafts, target_probs, randoms, positions, strict=True)]

    spec_llm, plain, _, _ = small_vocab
    monkeypatch.setattr(decoder, "verify", accept_all)
    assert _chi2_two_sample(plain, _first_tokens(spec_llm, 2500, 200_000)) < 1e-6


def test_cost_model_calibration_fits_a_short_max_model_len(tiny_model_dir):
    """The controller's attention measurement runs a step at the end of a long context: a model
    whose max_model_len is shorter than that context must still start (measured at its length)."""
    llm = LLM(model=str(tiny_model_dir), dtype="float32", speculative="ngram", num_spec_tokens=3, max_model_len=96)
    assert llm.engine.spec.controller.attention_ms_per_key >= 0.0
    out = llm.generate([[5, 6, 7, 5, 6, 7, 5, 6]], SamplingParams(max_tokens=8, temperature=0, ignore_eos=True))
    assert len(out[0].token_ids) == 8 and llm.engine.pool.all_free()


def test_a_speculative_engine_starts_on_a_model_with_a_short_context(tmp_path):
    """The cost model's passes stay within the model's positions (its RoPE table ends there)."""
    model = make_tiny_model(tmp_path / "short", max_position_embeddings=128, num_hidden_layers=2)
    llm = LLM(model=str(model), dtype="float32", speculative="ngram", num_spec_tokens=3)
    assert max(llm.engine.spec.controller._step_ms) <= 128
    out = llm.generate([[5, 6, 7, 5, 6, 7, 5, 6]], SamplingParams(max_tokens=8, temperature=0, ignore_eos=True))
    assert len(out[0].token_ids) == 8 and llm.engine.pool.all_free()


def test_seed_formula_speedup_counts_tokens_per_pass_and_the_draft_cost():
    from specache.bench.spec import seed_formula_speedup
    from specache.spec.controller import expected_speedup, expected_tokens

    # 10 tokens in 4 target passes: 2.5 tokens a pass when drafting is free
    assert seed_formula_speedup(10, 4, 0.0) == pytest.approx(2.5)
    assert seed_formula_speedup(10, 4, 0.1 * 12) == pytest.approx(10 / 5.2)  # c = 0.1, 12 tokens drafted
    assert seed_formula_speedup(5, 5, 0.0) == pytest.approx(1.0)  # nothing drafted: plain
    # every step drafting K at a per-token acceptance alpha: the closed form of the seed formula
    alpha, k, c, steps = 0.6, 4, 0.05, 1000
    tokens = steps * expected_tokens(alpha, k)
    assert seed_formula_speedup(tokens, steps, c * k * steps) == pytest.approx(expected_speedup(alpha, k, c))


def test_lookup_ceiling_sums_the_requests_decoded_one_after_the_other():
    from specache.bench.spec import lookup_ceiling

    copied = list(range(10, 40))  # copied after the prompt: 2 passes instead of 29 plain steps
    assert lookup_ceiling([copied], [copied], 16) == pytest.approx(29 / 2)
    # an uncopyable output needs all its 29 steps: 58 plain steps over 2 + 29 passes
    assert lookup_ceiling([copied, copied], [copied, list(range(100, 130))], 16) == pytest.approx(58 / 31)


def test_end_to_end_ceiling_leaves_prefill_as_it_is():
    from specache.bench.spec import end_to_end_ceiling

    # 1 s of which 0.8 s decode: a 4x faster decode makes it 0.2 + 0.2 s
    assert end_to_end_ceiling(1.0, 0.8, 4.0) == pytest.approx(2.5)
    assert end_to_end_ceiling(1.0, 1.0, 3.0) == pytest.approx(3.0)  # no prefill: the decode ceiling
    assert end_to_end_ceiling(1.0, 0.5, 1.0) == pytest.approx(1.0)


def test_bench_spec_reports_the_seed_formula_and_the_chosen_k_per_batch(tiny_model_dir, tmp_path, monkeypatch):
    """`specache bench spec` end to end on a tiny model: every cell has the seed formula's speedup
    next to the measured one, output equals plain (greedy, and sampled with the pair's seed under
    these q-less drafts), and the batch study reports the K the controller chose for each method.
    The controller plans from a fixed, memory-bound pass table instead of one timed at start: timed
    on a loaded machine, it had once priced every draft out and nothing was drafted at all."""
    import argparse
    import json

    from specache.bench import spec as bench_spec
    from specache.spec import decoder

    monkeypatch.setattr(decoder, "measure_step_costs",
                        lambda engine: {n: 0.005 + 0.00002 * n for n in decoder.STEP_COST_SIZES})
    monkeypatch.setattr(decoder, "measure_attention_cost", lambda engine: (0.0, 0.0))

    args = argparse.Namespace(model=str(tiny_model_dir), dtype="float32", weight_format="dense",
                              methods="ngram,lookahead", temperatures="0,0.7", batches="1,4", new_tokens=12,
                              num_spec_tokens=4, repeats=1, no_transformers=True, docs=str(tmp_path / "docs"),
                              out=str(tmp_path / "out"))
    result = bench_spec.run(args)
    cells = [r for r in result["rows"] if r["method"] != "plain"]
    assert len(cells) == 2 * 2 * len(bench_spec.TASKS)
    assert all(r["output = plain"] for r in cells)
    # tokens per target pass, less what drafting costs (nothing for lookups)
    assert all(r["seed-formula speedup"] >= 1.0 for r in cells if r["method"] == "ngram")
    assert any(r["seed-formula speedup"] > 1.0 for r in cells)
    assert all(r["seed-formula speedup"] > 0.5 for r in cells)
    plain_rows = [r for r in result["rows"] if r["method"] == "plain" and r["temperature"] == 0]
    assert all(r["lookup ceiling"] >= r["lookup ceiling, end to end"] >= 1.0 for r in plain_rows)
    batch = [r for r in result["batch"] if not r["method"].startswith("plain")]
    assert [(r["method"], r["batch"]) for r in batch] == \
        [("ngram", 1), ("ngram", 4), ("lookahead", 1), ("lookahead", 4)]
    assert all(r["mean K"] >= 0 and 0 <= r["steps drafted"] <= 1 for r in batch)
    assert any(r["mean K"] > 0 for r in batch)
    report = (tmp_path / "out" / "spec.md").read_text()
    assert "seed-formula speedup" in report and "mean K" in report and "lookup ceiling" in report
    assert json.loads((tmp_path / "out" / "spec.json").read_text())["batch"]
    assert (tmp_path / "docs" / "spec-speedup.png").exists()


def test_lookahead_checks_its_pool_drafts_in_the_shadow_while_switched_off(tiny_model_dir):
    """Lookahead's drafts are pool lookups (free): a sequence the controller switched off keeps
    giving evidence through shadow drafts, and the output still equals plain decoding's."""
    from specache.spec.lookahead import LookaheadProposer

    assert LookaheadProposer.free_to_draft
    prompts = [torch.randint(3, 49152, (30,), generator=torch.Generator().manual_seed(s)).tolist() for s in range(4)]
    llm = LLM(model=str(tiny_model_dir), dtype="float32", speculative="lookahead", num_spec_tokens=4)
    outputs = [o.token_ids for o in llm.generate(prompts, GREEDY)]
    assert llm.engine.spec.stats()["shadow_drafts"] > 0
    plain = LLM(model=str(tiny_model_dir), dtype="float32")
    assert outputs == [o.token_ids for o in plain.generate(prompts, GREEDY)]


def test_lookahead_labels_pool_drafts_and_jacobi_guesses_apart():
    """The draft's kind says where propose will take it from: the pool's n-gram after the last
    token, else the Jacobi guess kept from the last verification, else nothing to draft."""
    from specache.spec.base import NOTHING_TO_DRAFT, DraftRequest
    from specache.spec.lookahead import JACOBI_DRAFT, POOL_DRAFT, LookaheadProposer

    proposer = LookaheadProposer(ngram=3)
    text = [5, 6, 7, 8, 5]  # "5" was followed by "6 7": a pool hit
    assert proposer.draft_kind(0, text) == POOL_DRAFT
    assert proposer.propose([DraftRequest(0, text, 4, GREEDY)])[0].tokens[:2] == [6, 7]
    assert proposer.draft_kind(0, [*text, 9]) == NOTHING_TO_DRAFT  # "9" is new, no guess yet
    proposer.observe(0, [1, 2], [9, 3, 4], 0)  # draft [1, 2] rejected; the target went on 9 -> 3, 4
    text += [9, 11]
    assert proposer.draft_kind(0, text) == JACOBI_DRAFT
    assert proposer.propose([DraftRequest(0, text, 4, GREEDY)])[0].tokens == [3, 4]


def test_lookahead_keeps_an_acceptance_record_per_draft_source(tiny_model_dir):
    """Pool drafts and Jacobi guesses are accepted at different rates: the controller learns each."""
    llm = LLM(model=str(tiny_model_dir), dtype="float32", speculative="lookahead", num_spec_tokens=4)
    outputs = [o.token_ids for o in llm.generate(_prompts(), GREEDY)]
    assert set(llm.engine.spec.stats()["alpha_by_kind"]) <= {"pool", "jacobi"}
    assert llm.engine.spec.stats()["alpha_by_kind"]
    plain = LLM(model=str(tiny_model_dir), dtype="float32")
    assert outputs == [o.token_ids for o in plain.generate(_prompts(), GREEDY)]


def test_bench_prices_only_model_drafted_tokens(tiny_model_dir):
    """The seed formula's draft cost: lookups are free, and of auto's drafts only the tokens its
    model drafted cost c each. K is fixed: an adaptive controller timed on a loaded machine had
    priced the model's drafts out, and it drafted none."""
    from specache.bench.spec import _model_draft_tokens, _paid_draft_cost

    auto = LLM(model=str(tiny_model_dir), dtype="float32", speculative="auto", num_spec_tokens=4,
               spec_adaptive=False)
    before = _model_draft_tokens(auto)
    assert before == 0
    outs = auto.generate(_prompts(), GREEDY)
    drafted = sum(o.metrics["spec_draft_tokens"] for o in outs)
    stats = auto.engine.spec.stats()
    assert 0 < stats["model_draft_tokens"] <= drafted
    expected = stats["draft_cost_ratio"] * stats["model_draft_tokens"]
    assert _paid_draft_cost(auto, before, drafted) == pytest.approx(expected)
    ngram = LLM(model=str(tiny_model_dir), dtype="float32", speculative="ngram", num_spec_tokens=4)
    assert _model_draft_tokens(ngram) is None
    assert _paid_draft_cost(ngram, None, 100) == 0.0
