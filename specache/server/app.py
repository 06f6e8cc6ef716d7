"""OpenAI-compatible HTTP server: FastAPI routes over one background engine loop.

Run N replicas behind any HTTP load balancer (nginx, HAProxy, a cloud LB) and point them at
one Redis with `--redis-url redis://host:6379/0`: the response cache is then shared, so a
miss answered by one replica is a hit on every other. The prefix cache stays per replica
(it holds KV tensors); route a tenant's traffic to the same replica (consistent hashing on
the API key) to keep its prefix hits.
"""

from __future__ import annotations

import asyncio
import json
import logging
import os
import time
import uuid
from collections.abc import AsyncIterator
from contextlib import asynccontextmanager
from dataclasses import dataclass, field
from pathlib import Path

from fastapi import Depends, FastAPI, Request
from fastapi.exceptions import RequestValidationError
from fastapi.responses import JSONResponse, Response, StreamingResponse
from prometheus_client import generate_latest
from starlette.concurrency import run_in_threadpool
from starlette.exceptions import HTTPException as StarletteHTTPException

from specache.errors import SpecacheError
from specache.sampling import SamplingParams
from specache.server.engine_loop import EngineLoop
from specache.server.metrics import ServerMetrics
from specache.server.openai_schema import ChatCompletionRequest, CompletionRequest

log = logging.getLogger(__name__)


@dataclass
class ServerSettings:
    model_name: str = "smollm2-135m-instruct"
    api_keys: dict[str, str] = field(default_factory=dict)  # key -> tenant; empty = one open tenant
    max_queue: int = 256
    request_timeout_s: float = 300.0
    response_cache: object | None = None  # a specache.response_cache.ResponseCache, or None


class APIError(SpecacheError):
    def __init__(self, message: str, status: int, error_type: str, code: str | None = None) -> None:
        super().__init__(message)
        self.status_code, self.error_type, self.code = status, error_type, code


def error_response(status: int, message: str, error_type: str, code: str | None = None,
                   headers: dict | None = None) -> JSONResponse:
    body = {"error": {"message": message, "type": error_type, "param": None, "code": code}}
    return JSONResponse(body, status_code=status, headers=headers)


def load_api_keys(path: str | None) -> dict[str, str]:
    """API keys from a JSON file {key: tenant} and/or SPECACHE_API_KEYS="key1=tenantA,key2=tenantB"."""
    keys: dict[str, str] = {}
    if path:
        keys.update(json.loads(Path(path).read_text()))
    for pair in filter(None, os.environ.get("SPECACHE_API_KEYS", "").split(",")):
        key, _, tenant = pair.partition("=")
        keys[key.strip()] = tenant.strip() or key.strip()
    return keys


def create_app(engine, settings: ServerSettings | None = None) -> FastAPI:
    settings = settings or ServerSettings()
    loop = EngineLoop(engine, settings.max_queue)
    metrics = ServerMetrics()

    @asynccontextmanager
    async def lifespan(app: FastAPI):
        loop.start()
        yield
        loop.stop()  # stop accepting, abort in-flight requests
        engine.shutdown()  # persists the prefix cache when configured
        if settings.response_cache is not None:
            settings.response_cache.close()

    app = FastAPI(title="specache", version="0.1.0", lifespan=lifespan)
    app.state.engine, app.state.loop, app.state.settings, app.state.metrics = engine, loop, settings, metrics
    _install_error_handlers(app, metrics)

    def tenant_of(request: Request) -> str:
        if not settings.api_keys:
            return "default"
        auth = request.headers.get("authorization", "")
        key = auth[7:].strip() if auth.lower().startswith("bearer ") else ""
        if key not in settings.api_keys:
            raise APIError("invalid or missing API key", 401, "invalid_request_error", "invalid_api_key")
        return settings.api_keys[key]

    def check_model(name: str | None) -> None:
        if name not in (None, "", settings.model_name):
            raise APIError(f"model {name!r} does not exist; this server serves {settings.model_name!r}", 404,
                           "invalid_request_error", "model_not_found")

    @app.get("/health")
    async def health() -> dict:
        return {"status": "ok", "in_flight": loop.in_flight}

    @app.get("/v1/models")
    async def models(tenant: str = Depends(tenant_of)) -> dict:
        return {"object": "list", "data": [{"id": settings.model_name, "object": "model", "created": 0,
                                            "owned_by": "specache"}]}

    @app.get("/metrics")
    async def prometheus() -> Response:
        metrics.refresh(engine, loop)
        if settings.response_cache is not None:
            _export_cache_stats(metrics, settings.response_cache.stats())
        return Response(generate_latest(metrics.registry), media_type="text/plain; version=0.0.4")

    @app.post("/v1/chat/completions")
    async def chat(body: ChatCompletionRequest, request: Request, tenant: str = Depends(tenant_of)):
        check_model(body.model)
        messages = [m.model_dump() for m in body.messages]
        prompt = engine.tokenizer.apply_chat_template(messages)
        max_tokens = body.max_completion_tokens or body.max_tokens or 256
        return await _serve(request, body, prompt, max_tokens, tenant, "chat", messages)

    @app.post("/v1/completions")
    async def completions(body: CompletionRequest, request: Request, tenant: str = Depends(tenant_of)):
        check_model(body.model)
        prompt = body.prompt
        if isinstance(prompt, list) and prompt and isinstance(prompt[0], str):
            if len(prompt) != 1:
                raise APIError("specache takes one prompt per request; send several requests", 400,
                               "invalid_request_error")
            prompt = prompt[0]
        return await _serve(request, body, prompt, body.max_tokens or 16, tenant, "completion",
                            [{"role": "user", "content": prompt if isinstance(prompt, str) else json.dumps(prompt)}])

    async def _serve(request: Request, body, prompt, max_tokens: int, tenant: str, kind: str, messages: list):
        params = SamplingParams(max_tokens=max_tokens, temperature=body.temperature, top_p=body.top_p,
                                top_k=body.top_k, min_p=body.min_p, n=body.n, stop=body.stop or [],
                                seed=body.seed, presence_penalty=body.presence_penalty,
                                frequency_penalty=body.frequency_penalty,
                                repetition_penalty=body.repetition_penalty)
        rid = f"{'chatcmpl' if kind == 'chat' else 'cmpl'}-{uuid.uuid4().hex}"
        cache_req, cached, x_cache = await _cache_lookup(tenant, messages, body, kind)
        if cached is not None:
            metrics.requests.labels(kind, "200").inc()
            if body.stream:
                return _sse(_replay_stream(rid, kind, cached, body), {"x-cache": "hit"})
            return JSONResponse(_final_body(rid, kind, [(0, cached["text"], cached["finish_reason"])],
                                            cached["usage"]), headers={"x-cache": "hit"})
        req_id, out_queue = await loop.submit(prompt, params, body.priority, cache_salt=tenant)
        if body.stream:
            return _sse(_stream(request, req_id, out_queue, rid, kind, body, cache_req), {"x-cache": x_cache})
        final = await _collect(req_id, out_queue)
        usage = _usage(final)
        choices = [(o.index, o.text, o.finish_reason) for o in final.outputs]
        if cache_req is not None and body.n == 1:
            await run_in_threadpool(_store, cache_req, {"text": final.text, "finish_reason": final.finish_reason,
                                                        "usage": usage})
        metrics.requests.labels(kind, "200").inc()
        return JSONResponse(_final_body(rid, kind, choices, usage), headers={"x-cache": x_cache})

    async def _cache_lookup(tenant, messages, body, kind):
        rc = settings.response_cache
        if rc is None or body.n != 1:
            return None, None, "bypass"
        from specache.response_cache import CacheRequest

        params = {"temperature": body.temperature, "top_p": body.top_p, "max_tokens": body.max_tokens,
                  "seed": body.seed, "stop": body.stop, "kind": kind}
        try:
            req = CacheRequest(tenant=tenant, model=settings.model_name, messages=messages, params=params,
                               tags=body.cache_tags, mode=body.cache)
            result = await run_in_threadpool(rc.lookup, req)
        except Exception:  # the response cache fails open: serve from the model
            log.warning("response cache lookup failed; serving from the model", exc_info=True)
            return None, None, "bypass"
        if result.hit:
            metrics.response_cache.labels("hit").inc()
            return req, result.response, "hit"
        outcome = "bypass" if result.bypass_reason else "miss"
        metrics.response_cache.labels(outcome).inc()
        return (None if result.bypass_reason and body.cache != "refresh" else req), None, outcome

    def _store(req, response: dict) -> None:
        try:
            settings.response_cache.store(req, response)
        except Exception:
            log.warning("response cache store failed", exc_info=True)

    async def _next(req_id: str, out_queue: asyncio.Queue, deadline: float):
        try:
            item = await asyncio.wait_for(out_queue.get(), timeout=max(deadline - time.monotonic(), 0.001))
        except TimeoutError:
            loop.abort(req_id)
            raise APIError(f"request timed out after {settings.request_timeout_s:.0f} s", 504, "timeout") from None
        if isinstance(item, Exception):
            raise item
        return item

    async def _collect(req_id: str, out_queue: asyncio.Queue):
        deadline = time.monotonic() + settings.request_timeout_s
        try:
            while True:
                out = await _next(req_id, out_queue, deadline)
                if out.finished:
                    _observe(out)
                    return out
        except asyncio.CancelledError:
            loop.abort(req_id)  # client went away: free the KV blocks now
            raise

    def _observe(out) -> None:
        if out.metrics.get("ttft_s") is not None:
            metrics.ttft.observe(out.metrics["ttft_s"])
        metrics.tokens.inc(out.metrics.get("completion_tokens", 0))

    async def _stream(request: Request, req_id, out_queue, rid, kind, body, cache_req) -> AsyncIterator[str]:
        deadline = time.monotonic() + settings.request_timeout_s
        created, last = int(time.time()), time.monotonic()
        finished = False
        try:
            if kind == "chat":
                for i in range(body.n):
                    yield _chunk(rid, kind, created, i, {"role": "assistant", "content": ""}, None)
            while not finished:
                out = await _next(req_id, out_queue, deadline)
                now = time.monotonic()
                metrics.itl.observe(now - last)
                last = now
                for o in out.outputs:
                    if o.delta_text or o.finish_reason:
                        delta = {"content": o.delta_text} if o.delta_text else {}
                        yield _chunk(rid, kind, created, o.index, delta, o.finish_reason if out.finished else None)
                finished = out.finished
            _observe(out)
            usage = _usage(out)
            if body.stream_options and body.stream_options.include_usage:
                yield "data: " + json.dumps({"id": rid, "object": _object(kind, True), "created": created,
                                             "model": settings.model_name, "choices": [], "usage": usage}) + "\n\n"
            yield "data: [DONE]\n\n"
            metrics.requests.labels(kind, "200").inc()
            if cache_req is not None and body.n == 1:  # a streamed miss is stored only once complete
                await run_in_threadpool(_store, cache_req, {"text": out.text, "finish_reason": out.finish_reason,
                                                            "usage": usage})
        except APIError as e:
            yield "data: " + json.dumps({"error": {"message": str(e), "type": e.error_type}}) + "\n\n"
        finally:
            if not finished:
                loop.abort(req_id)  # disconnect or error mid-stream: free the KV blocks at once

    async def _replay_stream(rid, kind, cached: dict, body) -> AsyncIterator[str]:
        from specache.response_cache import stream_chunks

        created = int(time.time())
        if kind == "chat":
            yield _chunk(rid, kind, created, 0, {"role": "assistant", "content": ""}, None)
        for text in stream_chunks(cached):
            yield _chunk(rid, kind, created, 0, {"content": text}, None)
        yield _chunk(rid, kind, created, 0, {}, cached.get("finish_reason", "stop"))
        if body.stream_options and body.stream_options.include_usage:
            yield "data: " + json.dumps({"id": rid, "object": _object(kind, True), "created": created,
                                         "model": settings.model_name, "choices": [],
                                         "usage": cached["usage"]}) + "\n\n"
        yield "data: [DONE]\n\n"

    def _chunk(rid, kind, created, index, delta: dict, finish_reason) -> str:
        choice = {"index": index, "finish_reason": finish_reason}
        if kind == "chat":
            choice["delta"] = delta
        else:
            choice["text"] = delta.get("content", "")
        return "data: " + json.dumps({"id": rid, "object": _object(kind, True), "created": created,
                                      "model": settings.model_name, "choices": [choice]}) + "\n\n"

    def _final_body(rid, kind, choices, usage) -> dict:
        out = []
        for index, text, reason in choices:
            c = {"index": index, "finish_reason": reason, "logprobs": None}
            if kind == "chat":
                c["message"] = {"role": "assistant", "content": text}
            else:
                c["text"] = text
            out.append(c)
        return {"id": rid, "object": _object(kind, False), "created": int(time.time()),
                "model": settings.model_name, "choices": out, "usage": usage}

    return app


def _object(kind: str, chunk: bool) -> str:
    if kind == "chat":
        return "chat.completion.chunk" if chunk else "chat.completion"
    return "text_completion"


def _usage(out) -> dict:
    m = out.metrics
    return {"prompt_tokens": m["prompt_tokens"], "completion_tokens": m["completion_tokens"],
            "total_tokens": m["prompt_tokens"] + m["completion_tokens"],
            "prompt_tokens_details": {"cached_tokens": m["cached_tokens"]}}


def _sse(gen: AsyncIterator[str], headers: dict) -> StreamingResponse:
    return StreamingResponse(gen, media_type="text/event-stream", headers={"cache-control": "no-cache", **headers})


def _export_cache_stats(metrics: ServerMetrics, stats: dict) -> None:
    for key, value in stats.items():
        if isinstance(value, int | float):
            gauge_name = f"specache_response_cache_{key}"
            if gauge_name not in metrics.__dict__:
                from prometheus_client import Gauge

                metrics.__dict__[gauge_name] = Gauge(gauge_name, f"response cache {key}", registry=metrics.registry)
            metrics.__dict__[gauge_name].set(value)


def _install_error_handlers(app: FastAPI, metrics: ServerMetrics) -> None:
    @app.exception_handler(SpecacheError)
    async def specache_error(request: Request, exc: SpecacheError):
        metrics.requests.labels(request.url.path, str(exc.status_code)).inc()
        headers = {"retry-after": "1"} if exc.status_code == 429 else None
        return error_response(exc.status_code, str(exc), exc.error_type, getattr(exc, "code", None), headers)

    @app.exception_handler(RequestValidationError)
    async def validation_error(request: Request, exc: RequestValidationError):
        metrics.requests.labels(request.url.path, "400").inc()
        first = exc.errors()[0] if exc.errors() else {}
        where = ".".join(str(p) for p in first.get("loc", ()) if p != "body")
        return error_response(400, f"{where or 'body'}: {first.get('msg', 'invalid request')}",
                              "invalid_request_error")

    @app.exception_handler(StarletteHTTPException)
    async def http_error(request: Request, exc: StarletteHTTPException):
        return error_response(exc.status_code, str(exc.detail), "invalid_request_error")


# ---------------------------------------------------------------------- CLI


def add_serve_parser(sub, add_engine_args) -> None:
    p = sub.add_parser("serve", help="OpenAI-compatible HTTP server")
    p.add_argument("--host", default="127.0.0.1")
    p.add_argument("--port", type=int, default=8000)
    p.add_argument("--served-model-name", default=None)
    p.add_argument("--api-keys", default=None, help="JSON file {api_key: tenant}; or env SPECACHE_API_KEYS")
    p.add_argument("--max-queue", type=int, default=256, help="requests in flight before answering 429")
    p.add_argument("--request-timeout", type=float, default=300.0)
    p.add_argument("--response-cache", action=argparse_bool(), default=True)
    p.add_argument("--response-cache-path", default=None, help="SQLite file (default: under SPECACHE_HOME)")
    p.add_argument("--redis-url", default=None, help="share the response cache across replicas")
    add_engine_args(p)
    p.set_defaults(func=run_server)


def argparse_bool():
    import argparse

    return argparse.BooleanOptionalAction


def run_server(args) -> int:
    import uvicorn

    from specache.api import LLM
    from specache.cli import engine_options
    from specache.models.loader import cache_home

    logging.basicConfig(level=logging.INFO, format="%(asctime)s %(levelname)s %(name)s: %(message)s")
    llm = LLM(model=args.model, **engine_options(args, prefix_default=True))
    rc = None
    if args.response_cache:
        from specache.response_cache import CacheConfig, ResponseCache

        path = Path(args.response_cache_path or cache_home() / "response-cache.db")
        path.parent.mkdir(parents=True, exist_ok=True)
        url = args.redis_url or f"sqlite:///{path}"
        rc = ResponseCache(CacheConfig(store_url=str(url)))
    name = args.served_model_name or (llm.loaded.config.name or Path(str(llm.loaded.path)).name)
    settings = ServerSettings(model_name=name, api_keys=load_api_keys(args.api_keys), max_queue=args.max_queue,
                              request_timeout_s=args.request_timeout, response_cache=rc)
    app = create_app(llm.engine, settings)
    print(f"specache serving {name} on http://{args.host}:{args.port}/v1", flush=True)
    uvicorn.run(app, host=args.host, port=args.port, log_level="warning")
    return 0
