"""The engines benchmarks compare, behind one tiny interface: generate(prompts, new_tokens) -> tokens.

All take token-id prompts, decode greedily and never stop early, so each produces exactly
len(prompts) * new_tokens tokens and the timings compare like with like.
"""

from __future__ import annotations

import random
from collections.abc import Iterator
from contextlib import contextmanager

import torch


def text_prompts(tokenizer, n: int, lo: int, hi: int, seed: int = 0) -> list[list[int]]:
    """n token-id prompts of lo..hi tokens cut from CPython's language reference (offline text)."""
    from pydoc_data.topics import topics

    ids = tokenizer.encode(" ".join(topics[k] for k in sorted(topics))[:200_000])
    rng = random.Random(seed)
    out = []
    for _ in range(n):
        length = rng.randint(lo, hi)
        start = rng.randint(0, len(ids) - length - 1)
        out.append(ids[start: start + length])
    return out


class SpecacheEngine:
    def __init__(self, model=None, dtype: str = "float32", name: str = "specache", **options) -> None:
        from specache import LLM

        self.name = name
        self.llm = LLM(model=model, dtype=dtype, kv_cache_memory=options.pop("kv_cache_memory", "2GiB"),
                       **options)

    def generate(self, prompts: list[list[int]], new_tokens: int) -> int:
        from specache import SamplingParams

        params = SamplingParams(max_tokens=new_tokens, temperature=0, ignore_eos=True)
        return sum(len(o.token_ids) for o in self.llm.generate(prompts, params))


class TransformersEngine:
    """transformers `generate`: a padded batch (left padding), optionally with prompt lookup."""

    def __init__(self, model_dir, dtype: torch.dtype, name: str = "transformers", device: torch.device | str = "cpu",
                 **generate_kwargs) -> None:
        from transformers import AutoModelForCausalLM

        self.name = name
        self.device = torch.device(device)
        self.model = AutoModelForCausalLM.from_pretrained(str(model_dir), dtype=dtype).eval().to(self.device)
        self.kwargs = generate_kwargs

    @torch.inference_mode()
    def generate(self, prompts: list[list[int]], new_tokens: int) -> int:
        if len(prompts) > 1 and ("prompt_lookup_num_tokens" in self.kwargs or "assistant_model" in self.kwargs):
            # transformers' assisted generation (prompt lookup included) takes batch size 1 only
            return sum(self.generate([p], new_tokens) for p in prompts)
        width = max(len(p) for p in prompts)
        ids = torch.tensor([[2] * (width - len(p)) + p for p in prompts], device=self.device)
        mask = torch.tensor([[0] * (width - len(p)) + [1] * len(p) for p in prompts], device=self.device)
        out = self.model.generate(ids, attention_mask=mask, max_new_tokens=new_tokens, min_new_tokens=new_tokens,
                                  do_sample=False, pad_token_id=2, **self.kwargs)
        return (out.shape[1] - width) * len(prompts)


class LlamaCppEngine:
    """llama-cpp-python on the original GGUF: one sequence at a time (its high-level API)."""

    def __init__(self, gguf_path, threads: int | None = None, prompt_lookup: int = 0,
                 name: str = "llama.cpp") -> None:
        import os

        from llama_cpp import Llama

        draft = None
        if prompt_lookup:
            from llama_cpp.llama_speculative import LlamaPromptLookupDecoding

            draft = LlamaPromptLookupDecoding(num_pred_tokens=prompt_lookup)
        self.name = name
        with _without_amx_buffers():
            self.llm = Llama(model_path=str(gguf_path), n_ctx=4096, n_batch=512,
                             n_threads=threads or os.cpu_count(), verbose=False, draft_model=draft, logits_all=False)

    def generate(self, prompts: list[list[int]], new_tokens: int) -> int:
        total = 0
        for p in prompts:
            self.llm.reset()
            n = 0
            for _ in self.llm.generate(p, temp=0.0, top_k=1, reset=True):
                n += 1
                if n >= new_tokens:
                    break
            total += n
        return total


@contextmanager
def _without_amx_buffers() -> Iterator[None]:
    """On CPUs with AMX, load the model without ggml's extra buffer types: its AMX kernels die with
    SIGILL on the first multi-token batch on this project's VMs (one-token decode works). For the
    Q4_1 GGUF that buffer type is the only one affected (ggml has no other CPU repack for Q4_1)."""
    import llama_cpp.llama_cpp as lib

    from specache.config import cpu_flags

    if "amx_int8" not in cpu_flags():
        yield
        return
    default = lib.llama_model_default_params

    def no_extra_buffers():
        params = default()
        params.use_extra_bufts = False
        return params

    lib.llama_model_default_params = no_extra_buffers
    try:
        yield
    finally:
        lib.llama_model_default_params = default


def llama_cpp_available() -> bool:
    try:
        import llama_cpp  # noqa: F401
    except ImportError:
        return False
    return True
