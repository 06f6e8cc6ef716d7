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
