"""From an OpenAI request body to engine requests, and from engine outputs to OpenAI responses.

One ``Job`` per HTTP request. Non-streaming requests ``collect`` a payload (the same dict the
response cache stores); streaming requests turn each engine step's deltas into SSE chunks.
"""

from __future__ import annotations

import asyncio
import json
import time
import uuid
from collections.abc import AsyncIterator, Awaitable, Callable
from dataclasses import dataclass, field
from typing import Any, Literal

import jinja2

from specache.errors import InvalidPromptError, SpecacheError
from specache.sampling import MIN_TEMPERATURE, SamplingParams
from specache.server.engine_loop import EngineLoop, RequestStream
from specache.server.errors import APIError, error_body
from specache.server.metrics import ServerMetrics
from specache.server.openai_schema import ChatCompletionRequest, CompletionRequest, SamplingFields

Kind = Literal["chat", "text"]
Payload = dict[str, Any]
DEFAULT_COMPLETION_MAX_TOKENS = 16  # OpenAI's default for /v1/completions


@dataclass
class Job:
    kind: Kind
    prompt: str | list[int]
    params: SamplingParams
    priority: int
    cache_salt: str | None
    cache_messages: list[dict]  # what the response cache keys on
    cache_params: dict
    echo: str = ""
    include_usage: bool = False
    request_id: str = field(default_factory=lambda: uuid.uuid4().hex)

    @property
    def response_id(self) -> str:
        return ("chatcmpl-" if self.kind == "chat" else "cmpl-") + self.request_id


def sampling_params(body: SamplingFields, max_tokens: int) -> SamplingParams:
    if getattr(body, "logprobs", None) or getattr(body, "top_logprobs", None):
        # Refused rather than answered with "logprobs": null, which a client would read as data.
        raise APIError("logprobs are not supported by this server yet; omit logprobs / top_logprobs",
                       param="logprobs")
    seed = None if body.seed is None else body.seed % (1 << 62)  # seed + i stays a valid torch seed
    # Below MIN_TEMPERATURE the engine decodes greedily; say so to the cache key as well.
    temperature = 0.0 if body.temperature < MIN_TEMPERATURE else body.temperature
    return SamplingParams(
        max_tokens=max_tokens,
        temperature=temperature,
        top_p=body.top_p,
        top_k=body.top_k,
        min_p=body.min_p,
        repetition_penalty=body.repetition_penalty,
        presence_penalty=body.presence_penalty,
        frequency_penalty=body.frequency_penalty,
        seed=seed,
        stop=_stops(body.stop),
        n=body.n,
    )


def _stops(stop: str | list[str] | None) -> list[str]:
    if stop is None:
        return []
    return [stop] if isinstance(stop, str) else list(stop)


def _cache_params(kind: Kind, params: SamplingParams) -> dict:
    """Everything that changes the text, so two requests share a cache entry only if they would match."""
    return {
        "endpoint": kind,
        "max_tokens": params.max_tokens,
        "temperature": params.temperature,
        "top_p": params.top_p,
        "top_k": params.top_k,
        "min_p": params.min_p,
        "repetition_penalty": params.repetition_penalty,
        "presence_penalty": params.presence_penalty,
        "frequency_penalty": params.frequency_penalty,
        "seed": params.seed,
        "stop": params.stop,
        "n": params.n,
    }


def chat_job(body: ChatCompletionRequest, tokenizer: Any, salt: str | None, default_max_tokens: int) -> Job:
    messages = [m.as_template_dict() for m in body.messages]
    try:
        prompt = tokenizer.apply_chat_template(messages)
    except jinja2.TemplateError as e:  # e.g. the template refuses this order of roles
        raise InvalidPromptError(f"the model's chat template rejected these messages: {e}") from e
    params = sampling_params(body, body.max_completion_tokens or body.max_tokens or default_max_tokens)
    return Job(
        "chat",
        prompt,
        params,
        body.priority,
        salt,
        messages,
        _cache_params("chat", params),
        include_usage=_include_usage(body),
    )


def completion_job(body: CompletionRequest, tokenizer: Any, salt: str | None) -> Job:
    prompt = body.prompt
    if isinstance(prompt, list) and prompt and isinstance(prompt[0], str | list):
        if len(prompt) != 1:
            raise APIError(
                "send one prompt per request (batches of prompts are not supported); "
                "concurrent requests share the engine's batch anyway",
                param="prompt",
            )
        prompt = prompt[0]
    params = sampling_params(body, body.max_tokens or DEFAULT_COMPLETION_MAX_TOKENS)
    text = prompt if isinstance(prompt, str) else json.dumps(prompt)
    echo = "" if not body.echo else (prompt if isinstance(prompt, str) else tokenizer.decode(prompt))
    return Job(
        "text",
        prompt,
        params,
        body.priority,
        salt,
        [{"role": "user", "content": text}],
        _cache_params("text", params),
        echo=echo,
        include_usage=_include_usage(body),
    )


def _include_usage(body: SamplingFields) -> bool:
    return bool(body.stream and body.stream_options and body.stream_options.include_usage)


# ---------------------------------------------------------------------- engine -> payload


def usage_of(metrics: dict) -> dict:
    prompt, completion = metrics.get("prompt_tokens", 0), metrics.get("completion_tokens", 0)
    return {
        "prompt_tokens": prompt,
        "completion_tokens": completion,
        "total_tokens": prompt + completion,
        "prompt_tokens_details": {"cached_tokens": metrics.get("cached_tokens", 0) or 0},
    }


def payload_of(job: Job, out: Any) -> Payload:
    choices = [
        {"index": o.index, "text": job.echo + o.text, "finish_reason": o.finish_reason} for o in out.outputs
    ]
    return {
        "text": choices[0]["text"],
        "finish_reason": choices[0]["finish_reason"],
        "choices": choices,
        "usage": usage_of(out.metrics),
    }


async def collect(
    engine_loop: EngineLoop, job: Job, metrics: ServerMetrics, is_disconnected: Callable[[], Awaitable[bool]]
) -> Payload:
    """Run a job to the end; a client that goes away aborts it (and frees its KV blocks)."""
    stream = await engine_loop.submit(job.prompt, job.params, job.priority, job.cache_salt, job.request_id)
    watcher = asyncio.create_task(_abort_on_disconnect(stream, is_disconnected))
    try:
        while True:
            out = await stream.next()
            if out.finished:
                metrics.observe_finished(out.metrics)
                return payload_of(job, out)
    finally:
        watcher.cancel()
        stream.close()


async def _abort_on_disconnect(
    stream: RequestStream, is_disconnected: Callable[[], Awaitable[bool]], every_s: float = 0.25
) -> None:
    while not stream.finished:
        await asyncio.sleep(every_s)
        if await is_disconnected():
            stream.close(wake=True)
            return


# ---------------------------------------------------------------------- rendering


def render(job: Job, model: str, payload: Payload) -> dict:
    choices = payload.get("choices") or [
        {"index": 0, "text": payload["text"], "finish_reason": payload.get("finish_reason", "stop")}
    ]
    if job.kind == "chat":
        rendered = [
            {
                "index": c["index"],
                "message": {"role": "assistant", "content": c["text"]},
                "finish_reason": c["finish_reason"],
                "logprobs": None,
            }
            for c in choices
        ]
    else:
        rendered = [
            {"index": c["index"], "text": c["text"], "finish_reason": c["finish_reason"], "logprobs": None}
            for c in choices
        ]
    return {
        "id": job.response_id,
        "object": "chat.completion" if job.kind == "chat" else "text_completion",
        "created": int(time.time()),
        "model": model,
        "choices": rendered,
        "usage": payload["usage"],
    }


class ChunkWriter:
    """SSE ``data:`` lines in the OpenAI chunk format of one job."""

    def __init__(self, job: Job, model: str) -> None:
        self.job, self.model, self.created = job, model, int(time.time())
        self.object = "chat.completion.chunk" if job.kind == "chat" else "text_completion"

    def _line(self, choices: list[dict], usage: dict | None = None) -> str:
        body: dict[str, Any] = {
            "id": self.job.response_id,
            "object": self.object,
            "created": self.created,
            "model": self.model,
            "choices": choices,
        }
        if usage is not None:
            body["usage"] = usage
        return f"data: {json.dumps(body, ensure_ascii=False)}\n\n"

    def opening(self, index: int) -> str | None:
        if self.job.kind == "chat":
            return self._line(
                [
                    {
                        "index": index,
                        "delta": {"role": "assistant", "content": ""},
                        "finish_reason": None,
                        "logprobs": None,
                    }
                ]
            )
        if self.job.echo:
            return self.text(index, self.job.echo, None)
        return None

    def text(self, index: int, text: str, finish_reason: str | None) -> str:
        if self.job.kind == "chat":
            delta = {"content": text} if text else {}
            return self._line(
                [{"index": index, "delta": delta, "finish_reason": finish_reason, "logprobs": None}]
            )
        return self._line([{"index": index, "text": text, "finish_reason": finish_reason, "logprobs": None}])

    def usage(self, usage: dict) -> str:
        return self._line([], usage)

    @staticmethod
    def error(exc: SpecacheError) -> str:
        body = error_body(str(exc), exc.error_type, getattr(exc, "code", None))
        return f"data: {json.dumps(body)}\n\n"

    DONE = "data: [DONE]\n\n"


async def stream_events(
    stream: RequestStream,
    job: Job,
    writer: ChunkWriter,
    metrics: ServerMetrics,
    on_complete: Callable[[Payload], None] | None = None,
) -> AsyncIterator[str]:
    """One chunk per choice per engine step that produced text; usage (if asked) and [DONE] at the end.

    The ``finally`` runs when the client disconnects (the response task is cancelled): the request
    is aborted in the engine at once.
    """
    try:
        for i in range(job.params.n):
            line = writer.opening(i)
            if line:
                yield line
        out, done = None, set()
        async for out in _timed_outputs(stream, metrics):
            for o in out.outputs:
                # A choice's finish_reason repeats in later steps (n > 1): send it once.
                newly_done = o.finish_reason is not None and o.index not in done
                if o.delta_text or newly_done:
                    yield writer.text(o.index, o.delta_text, o.finish_reason if newly_done else None)
                if newly_done:
                    done.add(o.index)
        metrics.observe_finished(out.metrics)
        if job.include_usage:
            yield writer.usage(usage_of(out.metrics))
        if on_complete is not None:
            on_complete(payload_of(job, out))
        yield writer.DONE
    except SpecacheError as e:  # timeout or shutdown mid-stream: headers are gone, say it in-band
        yield writer.error(e)
        yield writer.DONE
    finally:
        stream.close()


async def _timed_outputs(stream: RequestStream, metrics: ServerMetrics) -> AsyncIterator[Any]:
    last = time.monotonic()
    while True:
        out = await stream.next()
        now = time.monotonic()
        tokens = sum(len(o.delta_token_ids) for o in out.outputs)
        if tokens:
            metrics.itl.observe((now - last) / tokens)
            last = now
        yield out
        if out.finished:
            return


async def replay_events(job: Job, writer: ChunkWriter, payload: Payload) -> AsyncIterator[str]:
    """A cached answer as a stream: word-aligned chunks of the stored text (n > 1 is never cached)."""
    from specache.response_cache import stream_chunks

    line = writer.opening(0)
    if line:
        yield line
    for piece in stream_chunks(payload):
        yield writer.text(0, piece, None)
    yield writer.text(0, "", payload.get("finish_reason") or "stop")
    if job.include_usage and payload.get("usage"):
        yield writer.usage(payload["usage"])
    yield writer.DONE
