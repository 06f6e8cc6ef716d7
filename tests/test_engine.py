"""Engine behaviour on a tiny random model: batching, chunking and preemption never change
greedy output, and every KV block comes back."""

from __future__ import annotations

import pytest
import torch

from specache import LLM, SamplingParams

GREEDY = SamplingParams(max_tokens=24, temperature=0, ignore_eos=True)


def _prompts(n: int, seed: int = 0) -> list[list[int]]:
    g = torch.Generator().manual_seed(seed)
    return [torch.randint(3, 49152, (int(torch.randint(3, 90, (1,), generator=g)),), generator=g).tolist()
            for _ in range(n)]


@pytest.fixture(scope="module")
def alone_outputs(tiny_llm):
    return [tiny_llm.generate([p], GREEDY)[0].token_ids for p in _prompts(8)]


def test_batched_generation_equals_each_prompt_alone(tiny_llm, alone_outputs):
    outs = tiny_llm.generate(_prompts(8), GREEDY)
    assert [o.token_ids for o in outs] == alone_outputs
    assert tiny_llm.engine.pool.all_free()


@pytest.mark.parametrize("options", [
    dict(max_num_batched_tokens=7),  # chunked prefill: prompts split over many steps
    dict(kv_cache_memory=40 * 4 * 1024, block_size=4),  # 40 blocks of 4 tokens: forces preemption
    dict(max_num_seqs=2),
])
def test_chunking_preemption_and_seq_limits_do_not_change_output(tiny_model_dir, alone_outputs, options):
    llm = LLM(model=str(tiny_model_dir), dtype="float32", **options)
    outs = llm.generate(_prompts(8), GREEDY)
    assert [o.token_ids for o in outs] == alone_outputs
    assert llm.engine.pool.all_free()
    if "kv_cache_memory" in options:
        assert llm.engine.scheduler.num_preemptions > 0


def test_abort_frees_blocks_at_once(tiny_llm):
    eng = tiny_llm.engine
    rid = eng.add_request(_prompts(1)[0], SamplingParams(max_tokens=50, temperature=0))
    eng.step()
    eng.step()
    assert eng.pool.num_used > 0
    eng.abort(rid)
    assert eng.pool.all_free()
    assert not eng.has_unfinished()


def test_stream_deltas_add_up_to_final_text(tiny_llm):
    params = SamplingParams(max_tokens=20, temperature=0.8, seed=3)
    pieces, final = [], None
    for out in tiny_llm.stream("Once upon a time", params):
        pieces.append(out.outputs[0].delta_text)
        final = out
    assert final.finished and "".join(pieces) == final.text
    assert final.text == tiny_llm.generate(["Once upon a time"], params)[0].text


def test_priority_runs_urgent_request_first(tiny_model_dir):
    llm = LLM(model=str(tiny_model_dir), dtype="float32", max_num_seqs=1)
    eng = llm.engine
    slow = eng.add_request(_prompts(1)[0], SamplingParams(max_tokens=5, temperature=0), priority=5)
    urgent = eng.add_request(_prompts(1, seed=1)[0], SamplingParams(max_tokens=5, temperature=0), priority=0)
    finished = []
    while eng.has_unfinished():
        finished += [o.request_id for o in eng.step() if o.finished]
    assert finished == [urgent, slow]


def test_chat_applies_template_and_reports_metrics(tiny_llm):
    out = tiny_llm.chat([{"role": "user", "content": "hi"}], SamplingParams(max_tokens=4, temperature=0))[0]
    assert out.metrics["prompt_tokens"] > 5  # the template added the system prompt and markers
    assert out.metrics["completion_tokens"] == len(out.token_ids) <= 4
    assert out.metrics["target_passes"] == len(out.token_ids)  # plain decoding: one token a pass
    assert out.metrics["ttft_s"] is not None


def test_prefix_cache_reuses_blocks_and_keeps_output(tiny_model_dir, alone_outputs):
    pytest.importorskip("specache.prefix.radix")
    llm = LLM(model=str(tiny_model_dir), dtype="float32", enable_prefix_caching=True, block_size=4)
    system = _prompts(1, seed=9)[0] * 2
    prompts = [system + p for p in _prompts(6)]
    cold = [LLM.generate(llm, [p], GREEDY)[0] for p in prompts[:1]]
    warm = llm.generate(prompts, GREEDY)
    assert warm[0].token_ids == cold[0].token_ids
    assert all(o.metrics["cached_tokens"] >= len(system) // 4 * 4 - 4 for o in warm[1:])
    ref = LLM(model=str(tiny_model_dir), dtype="float32").generate(prompts, GREEDY)
    assert [o.token_ids for o in warm] == [o.token_ids for o in ref]


def test_finished_only_steps_report_just_the_finished_requests(tiny_llm):
    """generate() asks only for finished requests, so it does not detokenize every request each step."""
    engine = tiny_llm.engine
    short = SamplingParams(max_tokens=3, temperature=0, ignore_eos=True)
    long = SamplingParams(max_tokens=9, temperature=0, ignore_eos=True)
    ids = [engine.add_request("a b c", short), engine.add_request("d e f", long)]
    reported = []
    while engine.has_unfinished():
        outs = engine.step(finished_only=True)
        assert all(o.finished for o in outs)
        reported += [o.request_id for o in outs]
    assert reported == ids  # each exactly once, the shorter first
    assert not engine.requests and engine.pool.all_free()


@pytest.mark.parametrize("weight_format", ["int8", "hybrid"])
def test_a_prompt_longer_than_the_token_budget_on_int8_weights(tiny_model_dir, weight_format):
    """Chunked prefill: the chunks before the prompt's last one produce no logits rows (the native
    int8 GEMM used to divide by zero on them, killing the process)."""
    llm = LLM(model=str(tiny_model_dir), dtype="bfloat16", weight_format=weight_format, max_num_batched_tokens=32)
    out = llm.generate([list(range(100, 200))], SamplingParams(max_tokens=4, temperature=0, ignore_eos=True))
    assert len(out[0].token_ids) == 4 and llm.engine.pool.all_free()
