"""The real SmolLM2-135M-Instruct: greedy output equals transformers' token for token (fp32)."""

from __future__ import annotations

import pytest
import torch

from specache import SamplingParams

pytestmark = pytest.mark.real

PROMPTS = [
    "What is the capital of France?",
    "Write a haiku about the sea.",
    "Explain in one paragraph why the sky is blue.",
    "List three uses of Python.",
    "def fibonacci(n):",
]


@pytest.fixture(scope="module")
def hf_model(real_model_dir):
    from transformers import AutoModelForCausalLM

    return AutoModelForCausalLM.from_pretrained(str(real_model_dir), dtype=torch.float32).eval()


def _chat_ids(llm, text: str) -> list[int]:
    return llm.tokenizer.encode(llm.tokenizer.apply_chat_template([{"role": "user", "content": text}]))


def test_greedy_64_tokens_equal_transformers(real_llm, hf_model):
    prompts = [_chat_ids(real_llm, p) for p in PROMPTS]
    params = SamplingParams(max_tokens=64, temperature=0)
    ours = real_llm.generate(prompts, params)
    for ids, out in zip(prompts, ours, strict=True):
        with torch.no_grad():
            ref = hf_model.generate(torch.tensor([ids]), max_new_tokens=64, do_sample=False,
                                    eos_token_id=2, pad_token_id=2)[0, len(ids):].tolist()
        assert out.token_ids == ref
    assert real_llm.engine.pool.all_free()


def test_batch_of_8_mixed_lengths_equals_alone(real_llm):
    base = "Tell me a short fact about the number "
    prompts = [_chat_ids(real_llm, base + str(i) * (1 + 7 * i)) for i in range(8)]
    params = SamplingParams(max_tokens=24, temperature=0)
    alone = [real_llm.generate([p], params)[0].token_ids for p in prompts]
    batched = real_llm.generate(prompts, params)
    assert [o.token_ids for o in batched] == alone
    assert real_llm.engine.pool.all_free()


def test_chat_answers_sensibly(real_llm):
    out = real_llm.chat([{"role": "user", "content": "What is the capital of France?"}],
                        SamplingParams(max_tokens=16, temperature=0))[0]
    assert "Paris" in out.text
    assert out.finish_reason in ("stop", "length")


def _system_prompt(llm, tokens: int) -> str:
    """A long shared system prompt of about `tokens` tokens, from offline text."""
    from pydoc_data.topics import topics

    ids = llm.tokenizer.encode(topics["assert"] + topics["pass"] + topics["import"])[:tokens]
    return llm.tokenizer.decode(ids)


def test_prefix_cache_on_equals_off_for_20_prompts_sharing_a_500_token_system_prompt(real_model_dir, real_llm):
    from specache import LLM

    system = _system_prompt(real_llm, 500)
    tok = real_llm.tokenizer
    prompts = [tok.encode(tok.apply_chat_template([{"role": "system", "content": system},
                                                   {"role": "user", "content": f"Question {i}: what is {i} + {i}?"}]))
               for i in range(20)]
    params = SamplingParams(max_tokens=12, temperature=0)
    cold = [o.token_ids for o in real_llm.generate(prompts, params)]  # real_llm: prefix caching off
    with LLM(model=str(real_model_dir), dtype="float32", kv_cache_memory="512MiB", enable_prefix_caching=True) as warm:
        first = warm.generate(prompts[:1], params)[0]
        rest = warm.generate(prompts[1:], params)
        assert [first.token_ids] + [o.token_ids for o in rest] == cold
        assert first.metrics["cached_tokens"] == 0
        assert all(o.metrics["cached_tokens"] >= 480 for o in rest)  # the system prompt, block-aligned
        # the same prompt under another tenant reuses nothing
        other = warm.generate(prompts[:1], params, cache_salt="tenant-b")[0]
        assert other.metrics["cached_tokens"] == 0 and other.token_ids == cold[0]
        assert warm.engine.pool.num_free + warm.engine.prefix_cache.cached_blocks() == warm.engine.pool.num_blocks


@pytest.mark.parametrize("method", ["ngram", "lookahead", "layer-skip:8", "quantized", "auto"])
def test_greedy_speculative_output_equals_plain_on_the_real_model(real_model_dir, real_llm, method):
    from specache import LLM

    record = ("Invoice 4471 was issued on 12 March 2024 by Northwind Traders to Contoso Ltd for 37 units of "
              "part AX-200 at 14.50 EUR each.")
    prompts = [_chat_ids(real_llm, f"Copy this record exactly, then list its fields:\n\n{record}"),
               _chat_ids(real_llm, "Write a short poem about autumn.")]
    params = SamplingParams(max_tokens=40, temperature=0)
    plain = [o.token_ids for o in real_llm.generate(prompts, params)]
    with LLM(model=str(real_model_dir), dtype="float32", kv_cache_memory="256MiB", speculative=method,
             num_spec_tokens=4, spec_adaptive=False) as spec:
        outs = spec.generate(prompts, params)
        assert [o.token_ids for o in outs] == plain
        assert spec.engine.pool.all_free()
    if method in ("ngram", "auto"):  # the copy prompt must actually exercise multi-token acceptance
        assert outs[0].metrics["spec_accepted_tokens"] > 0


@pytest.mark.parametrize("weight_format,method", [("int8", "ngram"), ("int8", "lookahead"), ("int8", "auto"),
                                                  ("dense", "ngram"), ("dense", "lookahead"), ("dense", "auto"),
                                                  ("hybrid", "ngram")])
def test_greedy_speculative_output_equals_plain_in_bf16(real_model_dir, weight_format, method):
    """On the native int8 and dense bf16 paths every row is computed by the same instructions
    whatever its batch, so exactness holds in bf16 too, not only in fp32 (PyTorch's bf16 GEMM, which
    dense weights used to go through, parted from plain decoding's text at near-ties)."""
    from specache import LLM, kernels
    from specache.bench.spec import TASKS

    if kernels.load() is None:
        pytest.skip("bf16 rows are batch-invariant on the native kernels only (PyTorch's GEMMs block by rows)")
    options = dict(model=str(real_model_dir), dtype="bfloat16", weight_format=weight_format, kv_cache_memory="256MiB")
    params = SamplingParams(max_tokens=72, temperature=0)
    with LLM(**options) as plain_llm:
        record = "Order 8812: 3 x USB-C cable (2 m), 1 x 65 W charger, ship to 14 Rue de Rivoli, Paris."
        # The last two: on PyTorch's bf16 GEMM, prompt lookup parted from plain decoding on them
        prompts = [_chat_ids(plain_llm, f"Repeat this order exactly, then summarise it:\n\n{record}"),
                   _chat_ids(plain_llm, "Describe a sunrise over the sea."),
                   _chat_ids(plain_llm, "List five prime numbers and explain why each is prime."),
                   _chat_ids(plain_llm, TASKS["code edit"][0]), _chat_ids(plain_llm, TASKS["open-ended chat"][1])]
        # One request at a time too: a one-row decode step against a multi-row verification step
        # is where a GEMM that blocks by row count parts (a batch of 5 rows against 25 did not)
        plain = [o.token_ids for o in plain_llm.generate(prompts, params)]
        plain_alone = [plain_llm.generate([p], params)[0].token_ids for p in prompts]
    with LLM(**options, speculative=method, num_spec_tokens=4, spec_adaptive=False) as spec:
        outs = spec.generate(prompts, params)
        assert [o.token_ids for o in outs] == plain
        assert [spec.generate([p], params)[0].token_ids for p in prompts] == plain_alone
        assert spec.engine.pool.all_free()
    assert sum(o.metrics["spec_accepted_tokens"] for o in outs) > 0


@pytest.mark.parametrize("weight_format", ["hybrid", "dense"])
def test_prompts_arriving_mid_decode_leave_a_requests_greedy_text_unchanged(real_model_dir, weight_format):
    """Long prompts arrive while a request decodes, each prefilled in a step beside its decode
    row. That row must keep the kernels of a step without them (the runner runs it in a pass of
    its own), so the request's greedy text is the one it gets alone, bit for bit, in bf16."""
    from specache import LLM, kernels
    from specache.bench.spec import TASKS

    if kernels.load() is None:
        pytest.skip("bf16 rows are batch-invariant on the native kernels only")
    params = SamplingParams(max_tokens=64, temperature=0)
    with LLM(model=str(real_model_dir), dtype="bfloat16", weight_format=weight_format,
             kv_cache_memory="256MiB") as llm:
        request = _chat_ids(llm, "Describe a sunrise over the sea.")
        alone = llm.generate([request], params)[0].token_ids
        engine = llm.engine
        engine.add_request(request, params, request_id="decoding")
        arrivals = [_chat_ids(llm, p) for p in TASKS["code edit"] + TASKS["open-ended chat"]]
        finished = {}
        for step in range(1000):
            if step % 6 == 3 and arrivals:  # a prompt every few steps, each 50-300 tokens
                engine.add_request(arrivals.pop(), SamplingParams(max_tokens=4, temperature=0))
            finished.update({o.request_id: o for o in engine.step() if o.finished})
            if not engine.has_unfinished() and not arrivals:
                break
        assert finished["decoding"].outputs[0].token_ids == alone
        assert engine.pool.all_free()


def test_hybrid_verification_rows_equal_their_decode_steps_at_batch_16(real_model_dir):
    """16 sequences verifying 16 drafts each are a 272-row step, past where hybrid weights switch
    projections to dense bf16 by row count. Every decode and verification step stays on the fused
    int8 layers, so each row's logits are bit for bit those of decoding its token alone (greedy
    speculation equals plain decoding at batch 16 too)."""
    from specache import LLM, kernels
    from specache.engine.runner import BatchItem
    from specache.engine.sequence import Sequence

    if kernels.load() is None:
        pytest.skip("the fused int8 layers need the native kernels")
    with LLM(model=str(real_model_dir), dtype="bfloat16", weight_format="hybrid", kv_cache_memory="256MiB") as llm:
        engine = llm.engine
        generator = torch.Generator().manual_seed(0)
        seqs = []
        for i in range(16):
            seq = Sequence(-1 - i, f"s{i}", 0, torch.randint(100, 20000, (40,), generator=generator).tolist(),
                           SamplingParams(temperature=0))
            seq.block_table = engine.pool.allocate(engine.pool.blocks_needed(60))
            engine.runner.run([BatchItem(seq, seq.prompt_ids, 0, 1)])
            seqs.append(seq)
        rows = [torch.randint(100, 20000, (17,), generator=generator).tolist() for _ in seqs]
        together = engine.runner.run([BatchItem(s, r, 40, 17, num_draft=16) for s, r in zip(seqs, rows, strict=True)])
        for i in (0, 7, 15):
            alone = [engine.runner.run([BatchItem(seqs[i], [t], 40 + j, 1)])[0] for j, t in enumerate(rows[i])]
            assert torch.equal(torch.cat(alone), together[i])
        for seq in seqs:
            engine.pool.free(seq.block_table)
