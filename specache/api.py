"""The Python entry points: ``LLM`` and ``SamplingParams``."""

from __future__ import annotations

import os
from collections.abc import Iterator

from specache.config import EngineConfig
from specache.engine.engine import Engine
from specache.engine.outputs import RequestOutput
from specache.models.loader import load_model
from specache.sampling import SamplingParams


class LLM:
    """``LLM(model=PATH).generate(prompts, SamplingParams(...))``.

    ``model`` is a GGUF file, a Hugging Face directory, or None for the default model
    (SmolLM2-135M-Instruct, converted on first use). Other keywords are EngineConfig fields.
    """

    def __init__(self, model: str | os.PathLike | None = None, dtype: str = "auto", **engine_options) -> None:
        self.loaded = load_model(model)
        self.engine = Engine(self.loaded, EngineConfig(dtype=dtype, **engine_options))
        self.tokenizer = self.engine.tokenizer

    def close(self) -> None:
        """Finish: aborts running requests and saves the prefix cache when prefix_cache_dir is set."""
        self.engine.shutdown()

    def __enter__(self) -> LLM:
        return self

    def __exit__(self, *exc) -> None:
        self.close()

    def generate(self, prompts: str | list[str] | list[int] | list[list[int]],
                 params: SamplingParams | list[SamplingParams] | None = None,
                 priority: list[int] | None = None, cache_salt=None,
                 progress: bool = False) -> list[RequestOutput]:
        """One result per prompt, in order; all prompts share the continuous batch."""
        prompts = _as_prompt_list(prompts)
        params_list = params if isinstance(params, list) else [params or SamplingParams()] * len(prompts)
        ids: list[str] = []
        try:
            for i, (p, sp) in enumerate(zip(prompts, params_list, strict=True)):
                ids.append(self.engine.add_request(p, sp, priority=priority[i] if priority else 0,
                                                   cache_salt=cache_salt))
        except Exception:
            for rid in ids:  # one bad prompt rejects the whole call: leave nothing running
                self.engine.abort(rid)
            raise
        done: dict[str, RequestOutput] = {}
        while len(done) < len(ids):
            for out in self.engine.step(finished_only=True):
                if out.finished:
                    done[out.request_id] = out
        return [done[i] for i in ids]

    def chat(self, messages: list[dict] | list[list[dict]], params: SamplingParams | None = None,
             **kwargs) -> list[RequestOutput]:
        """Apply the model's chat template, then generate. One conversation or a list of them."""
        convs = [messages] if messages and isinstance(messages[0], dict) else messages
        prompts = [self.tokenizer.apply_chat_template(c, add_generation_prompt=True) for c in convs]
        return self.generate(prompts, params, **kwargs)

    def stream(self, prompt: str | list[int], params: SamplingParams | None = None) -> Iterator[RequestOutput]:
        """Yields a RequestOutput each time new text is ready; ``delta_text`` holds the new part."""
        rid = self.engine.add_request(prompt, params)
        try:
            while True:
                for out in self.engine.step():
                    if out.request_id == rid:
                        yield out
                        if out.finished:
                            return
        finally:
            self.engine.abort(rid)


def _as_prompt_list(prompts) -> list:
    if isinstance(prompts, str):
        return [prompts]
    if isinstance(prompts, list) and prompts and all(isinstance(t, int) for t in prompts):
        return [prompts]
    return list(prompts)


__all__ = ["LLM", "SamplingParams"]
