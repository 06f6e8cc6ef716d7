"""The server as users see it: the official openai client against `specache serve` on loopback
(tiny random-weight model with the real tokenizer), plus error mapping and auth."""

from __future__ import annotations

import asyncio
import json
import signal

import httpx
import openai
import pytest
from server_fixtures import MODEL, running_server

KEY_A, KEY_B = "sk-test-a", "sk-test-b"


@pytest.fixture(scope="module")
def server(tiny_model_dir, tmp_path_factory):
    work = tmp_path_factory.mktemp("serve")
    keys = work / "keys.json"
    keys.write_text(json.dumps({KEY_A: "tenant-a", KEY_B: "tenant-b"}))
    with running_server(
        tiny_model_dir,
        work,
        "--api-keys",
        str(keys),
        "--max-model-len",
        "256",
        "--enable-prefix-caching",
        "--no-cache-semantic",
    ) as srv:
        yield srv


def client(server, key: str = KEY_A) -> openai.OpenAI:
    return openai.OpenAI(base_url=server.v1, api_key=key, max_retries=0, timeout=120)


def auth(key: str = KEY_A) -> dict:
    return {"authorization": f"Bearer {key}"}


NO_CACHE = {"cache": "bypass"}


def test_models_lists_the_served_model(server):
    assert [m.id for m in client(server).models.list().data] == [MODEL]


def test_chat_completion_and_usage(server):
    r = client(server).chat.completions.create(
        model=MODEL,
        messages=[{"role": "user", "content": "hi there"}],
        max_tokens=5,
        temperature=0,
        extra_body=NO_CACHE,
    )
    assert r.object == "chat.completion" and r.id.startswith("chatcmpl-")
    assert r.choices[0].message.role == "assistant" and r.choices[0].finish_reason in ("stop", "length")
    assert 0 < r.usage.completion_tokens <= 5 and r.usage.prompt_tokens > 0
    assert r.usage.total_tokens == r.usage.prompt_tokens + r.usage.completion_tokens
    assert r.usage.prompt_tokens_details.cached_tokens == 0


def test_shared_prefix_shows_as_cached_tokens(server):
    system = {"role": "system", "content": "You are a careful assistant who answers briefly. " * 6}
    c = client(server)
    c.chat.completions.create(
        model=MODEL,
        messages=[system, {"role": "user", "content": "first"}],
        max_tokens=2,
        temperature=0,
        extra_body=NO_CACHE,
    )
    r = c.chat.completions.create(
        model=MODEL,
        messages=[system, {"role": "user", "content": "second"}],
        max_tokens=2,
        temperature=0,
        extra_body=NO_CACHE,
    )
    assert r.usage.prompt_tokens_details.cached_tokens >= 16  # at least one whole KV block reused
    # Another tenant's requests never reuse tenant-a's KV blocks (the tenant salts the prefix cache).
    other = client(server, KEY_B).chat.completions.create(
        model=MODEL,
        messages=[system, {"role": "user", "content": "second"}],
        max_tokens=2,
        temperature=0,
        extra_body=NO_CACHE,
    )
    assert other.usage.prompt_tokens_details.cached_tokens == 0


def test_greedy_is_deterministic_and_seeded_sampling_reproducible(server):
    c = client(server)
    kw = dict(model=MODEL, prompt="The weather today", max_tokens=8, extra_body=NO_CACHE)
    assert (
        c.completions.create(temperature=0, **kw).choices[0].text
        == c.completions.create(temperature=0, **kw).choices[0].text
    )
    a = c.completions.create(temperature=1.0, seed=7, **kw).choices[0].text
    assert a == c.completions.create(temperature=1.0, seed=7, **kw).choices[0].text


def test_completions_n_choices(server):
    r = client(server).completions.create(
        model=MODEL,
        prompt="Once upon a time",
        max_tokens=6,
        n=3,
        temperature=1.0,
        seed=1,
        extra_body=NO_CACHE,
    )
    assert r.object == "text_completion" and sorted(ch.index for ch in r.choices) == [0, 1, 2]
    assert r.usage.completion_tokens == sum(1 for _ in r.choices) * 6 or r.usage.completion_tokens <= 18


def test_stop_string_cuts_the_text(server):
    c = client(server)
    kw = dict(model=MODEL, prompt="Count with me:", max_tokens=16, temperature=0, extra_body=NO_CACHE)
    full = c.completions.create(**kw).choices[0].text
    assert len(full) >= 6
    stop = full[3:6]
    cut = c.completions.create(stop=[stop], **kw).choices[0]
    assert cut.text == full[: full.index(stop)] and cut.finish_reason == "stop"


def test_chat_streaming_matches_non_streaming(server):
    c = client(server)
    kw = dict(
        model=MODEL,
        messages=[{"role": "user", "content": "tell me a story"}],
        max_tokens=10,
        temperature=0,
        extra_body=NO_CACHE,
    )
    whole = c.chat.completions.create(**kw)
    chunks = list(c.chat.completions.create(stream=True, stream_options={"include_usage": True}, **kw))
    assert chunks[0].choices[0].delta.role == "assistant"
    text = "".join(ch.choices[0].delta.content or "" for ch in chunks if ch.choices)
    assert text == whole.choices[0].message.content
    finishes = [ch.choices[0].finish_reason for ch in chunks if ch.choices and ch.choices[0].finish_reason]
    assert finishes == [whole.choices[0].finish_reason]
    assert chunks[-1].choices == [] and chunks[-1].usage.completion_tokens == whole.usage.completion_tokens
    assert len([ch for ch in chunks if ch.choices and ch.choices[0].delta.content]) > 1  # token by token


def test_completion_streaming_with_n_and_stop(server):
    c = client(server)
    kw = dict(model=MODEL, prompt="A list of fruits:", max_tokens=12, temperature=0, extra_body=NO_CACHE)
    full = c.completions.create(**kw).choices[0].text
    stop = full[4:6]
    chunks = list(c.completions.create(stream=True, stop=[stop], n=2, **kw))
    for i in range(2):
        text = "".join(ch.choices[0].text for ch in chunks if ch.choices and ch.choices[0].index == i)
        assert text == full[: full.index(stop)]
        finishes = [
            ch.choices[0].finish_reason
            for ch in chunks
            if ch.choices and ch.choices[0].index == i and ch.choices[0].finish_reason
        ]
        assert finishes == ["stop"]


def test_raw_sse_ends_with_done(server):
    body = {"model": MODEL, "prompt": "hello", "max_tokens": 3, "stream": True, "cache": "bypass"}
    with httpx.stream("POST", server.v1 + "/completions", json=body, headers=auth(), timeout=60) as r:
        lines = [ln for ln in r.iter_lines() if ln]
    assert r.headers["content-type"].startswith("text/event-stream")
    assert all(ln.startswith("data: ") for ln in lines) and lines[-1] == "data: [DONE]"


def test_response_cache_hit_header_and_tenant_isolation(server):
    body = {
        "model": MODEL,
        "messages": [{"role": "user", "content": "What is a radix tree?"}],
        "max_tokens": 6,
        "temperature": 0,
    }
    url = server.v1 + "/chat/completions"
    first = httpx.post(url, json=body, headers=auth(KEY_A), timeout=60)
    again = httpx.post(url, json=body, headers=auth(KEY_A), timeout=60)
    other = httpx.post(url, json=body, headers=auth(KEY_B), timeout=60)
    sampled = httpx.post(url, json={**body, "temperature": 0.9}, headers=auth(KEY_A), timeout=60)
    bypass = httpx.post(url, json={**body, "cache": "bypass"}, headers=auth(KEY_A), timeout=60)
    assert [r.headers["x-cache"] for r in (first, again, other, sampled, bypass)] == [
        "miss",
        "hit",
        "miss",
        "bypass",
        "bypass",
    ]
    assert again.json()["choices"][0]["message"] == first.json()["choices"][0]["message"]
    # A streamed request replays the cached answer.
    with httpx.stream("POST", url, json={**body, "stream": True}, headers=auth(KEY_A), timeout=60) as r:
        data = [json.loads(ln[6:]) for ln in r.iter_lines() if ln.startswith("data: {")]
    assert r.headers["x-cache"] == "hit"
    assert (
        "".join(d["choices"][0]["delta"].get("content", "") for d in data)
        == first.json()["choices"][0]["message"]["content"]
    )


def test_extensions_are_accepted(server):
    r = client(server).chat.completions.create(
        model=MODEL,
        messages=[{"role": "user", "content": "x"}],
        max_tokens=2,
        extra_body={
            "speculative": {"method": "ngram", "k": 3},
            "priority": -1,
            "cache_tags": ["docs"],
            "cache": "refresh",
            "top_k": 5,
        },
    )
    assert r.choices[0].message.content is not None


# ---------------------------------------------------------------------- errors


@pytest.mark.parametrize(
    "body,status,param,word",
    [
        ({"temperature": -1}, 400, "temperature", "greater than or equal"),
        ({"temperature": "hot"}, 400, "temperature", "number"),
        ({"top_p": 0}, 400, "top_p", "greater than"),
        ({"max_tokens": 0}, 400, "max_tokens", "greater than"),
        ({"n": 0}, 400, "n", "greater than"),
        ({"stop": ["a", "b", "c", "d", "e"]}, 400, "stop", "at most"),
        ({"messages": []}, 400, "messages", "at least 1"),
        ({"messages": [{"role": "wizard", "content": "x"}]}, 400, "messages.0.role", "Input should be"),
        ({"messages": None}, 400, "messages", "list"),
        ({"model": "gpt-99"}, 404, "model", "does not exist"),
        ({"messages": [{"role": "user", "content": "word " * 400}]}, 400, None, "max_model_len"),
        ({"max_tokens": 10**10}, 400, "max_tokens", "less than or equal"),
        ({"logprobs": True}, 400, "logprobs", "not supported"),
        ({"top_logprobs": 3}, 400, "logprobs", "not supported"),
    ],
)
def test_bad_chat_requests_get_openai_errors(server, body, status, param, word):
    full = {"model": MODEL, "messages": [{"role": "user", "content": "x"}], **body}
    r = httpx.post(server.v1 + "/chat/completions", json=full, headers=auth(), timeout=60)
    assert r.status_code == status, r.text
    err = r.json()["error"]
    assert set(err) == {"message", "type", "param", "code"}
    assert word in err["message"] and err["type"] and err["param"] == param


def test_openai_client_raises_typed_errors(server):
    c = client(server)
    with pytest.raises(openai.BadRequestError, match="empty"):
        c.completions.create(model=MODEL, prompt="", max_tokens=2)
    with pytest.raises(openai.BadRequestError, match="max_model_len"):
        c.completions.create(model=MODEL, prompt="many words " * 300, max_tokens=2)
    with pytest.raises(openai.NotFoundError):
        c.chat.completions.create(model="nope", messages=[{"role": "user", "content": "x"}])
    with pytest.raises(openai.BadRequestError):
        c.chat.completions.create(model=MODEL, messages=[{"role": "user", "content": "x"}], top_p=3)
    with pytest.raises(openai.BadRequestError):  # the error arrives before the stream starts
        list(c.completions.create(model=MODEL, prompt="", max_tokens=2, stream=True))


@pytest.mark.parametrize("content", [b'{"model": ', b"not json", b"[1, 2]", b'"string"', b"", b"\xff\xfe"])
def test_malformed_bodies_are_400(server, content):
    r = httpx.post(
        server.v1 + "/completions",
        content=content,
        headers={**auth(), "content-type": "application/json"},
        timeout=30,
    )
    assert r.status_code == 400 and r.json()["error"]["type"] == "invalid_request_error"


def test_bad_token_ids_and_prompt_batches(server):
    url = server.v1 + "/completions"
    r = httpx.post(url, json={"model": MODEL, "prompt": [10**9]}, headers=auth(), timeout=30)
    assert r.status_code == 400
    r = httpx.post(url, json={"model": MODEL, "prompt": ["a", "b"]}, headers=auth(), timeout=30)
    assert r.status_code == 400 and "one prompt" in r.json()["error"]["message"]
    r = httpx.post(
        url, json={"model": MODEL, "prompt": [1, 2, 3], "max_tokens": 2}, headers=auth(), timeout=30
    )
    assert r.status_code == 200


def test_auth(server):
    url = server.v1 + "/chat/completions"
    body = {"model": MODEL, "messages": [{"role": "user", "content": "x"}], "max_tokens": 1}
    for headers in ({}, auth("wrong"), {"authorization": KEY_A}):
        r = httpx.post(url, json=body, headers=headers, timeout=30)
        assert r.status_code == 401 and r.json()["error"]["code"] == "invalid_api_key"
    # Auth is checked before the body: a bad key with a malformed body is still a 401.
    assert httpx.post(url, content=b"{", headers=auth("wrong"), timeout=30).status_code == 401
    with pytest.raises(openai.AuthenticationError):
        client(server, "wrong").models.list()
    assert httpx.get(server.base + "/health", timeout=30).status_code == 200  # open: load balancers probe it


def test_unknown_route_and_method(server):
    r = httpx.get(server.v1 + "/nothing", headers=auth(), timeout=30)
    assert r.status_code == 404 and "error" in r.json()
    r = httpx.get(server.v1 + "/chat/completions", headers=auth(), timeout=30)
    assert r.status_code == 405 and "error" in r.json()


def test_metrics_exposes_counters_histograms_and_gauges(server):
    client(server).completions.create(model=MODEL, prompt="metrics", max_tokens=3, extra_body=NO_CACHE)
    text = httpx.get(server.base + "/metrics", timeout=30).text
    for name in (
        "specache_requests_total",
        "specache_time_to_first_token_seconds_bucket",
        "specache_inter_token_latency_seconds_bucket",
        "specache_queue_depth",
        "specache_kv_blocks_used",
        "specache_kv_blocks_total",
        "specache_prefix_cache_hit_rate",
        "specache_response_cache_hits",
        "specache_response_cache_requests_total",
        "specache_spec_acceptance_rate",
    ):
        assert name in text, name
    assert 'specache_requests_total{endpoint="/v1/completions",status="200"}' in text
    assert 'status="401"' in text and 'status="400"' in text


def test_client_disconnect_frees_kv_blocks(server):
    async def leave_early() -> None:
        body = {
            "model": MODEL,
            "prompt": "a long story",
            "max_tokens": 200,
            "stream": True,
            "cache": "bypass",
            "temperature": 0.7,
        }
        async with httpx.AsyncClient(timeout=60, headers=auth()) as http:
            async with http.stream("POST", server.v1 + "/completions", json=body) as r:
                async for line in r.aiter_lines():
                    if line.startswith("data: {"):
                        return  # closes the connection mid-stream

    async def non_stream_gives_up() -> None:
        # ignore_eos and 1500 tokens: the tiny model must not finish (or sample EOS) inside 0.3 s
        body = {
            "model": MODEL,
            "prompt": "a long story",
            "max_tokens": 1500,
            "ignore_eos": True,
            "cache": "bypass",
            "temperature": 0.7,
        }
        async with httpx.AsyncClient(timeout=0.3, headers=auth()) as http:
            with pytest.raises(httpx.TimeoutException):
                await http.post(server.v1 + "/completions", json=body)

    asyncio.run(leave_early())
    asyncio.run(non_stream_gives_up())
    snap = server.wait_idle()
    assert snap["engine_requests"] == 0 and snap["kv_block_refs_held_by_requests"] == 0, snap


def test_queue_full_is_429_with_retry_after_and_timeout_is_504(tiny_model_dir, tmp_path):
    with running_server(
        tiny_model_dir, tmp_path, "--max-queue", "2", "--no-response-cache", "--request-timeout", "1.5"
    ) as srv:

        async def burst() -> list[httpx.Response]:
            body = {"model": MODEL, "prompt": "x", "max_tokens": 60, "temperature": 0.5, "ignore_eos": True}
            async with httpx.AsyncClient(timeout=60) as http:
                return await asyncio.gather(
                    *(http.post(srv.v1 + "/completions", json=body) for _ in range(8))
                )

        codes = [r.status_code for r in asyncio.run(burst())]
        assert 429 in codes and set(codes) <= {200, 429, 504}, codes
        r429 = next(r for r in asyncio.run(burst()) if r.status_code == 429)
        assert r429.headers["retry-after"] and r429.json()["error"]["type"] == "rate_limit_exceeded"
        slow = {"model": MODEL, "prompt": "x", "max_tokens": 2000, "temperature": 0.5, "ignore_eos": True}
        r = httpx.post(srv.v1 + "/completions", json={**slow, "max_tokens": 200}, timeout=60)
        assert r.status_code in (200, 504)
        snap = srv.wait_idle()
        assert snap["kv_block_refs_held_by_requests"] == 0 and snap["queue_depth"] == 0


def test_graceful_shutdown_ends_streams_and_exits(tiny_model_dir, tmp_path):
    from server_fixtures import stop_pid

    with running_server(tiny_model_dir, tmp_path, "--shutdown-timeout", "1", "--no-response-cache") as srv:
        body = {
            "model": MODEL,
            "prompt": "never ending",
            "max_tokens": 5000,
            "stream": True,
            "temperature": 0.8,
        }
        with httpx.stream("POST", srv.v1 + "/completions", json=body, timeout=60) as r:
            it = r.iter_lines()
            assert next(ln for ln in it if ln.startswith("data: {"))
            # SIGTERM while a stream is open; uvicorn re-raises the signal after a clean shutdown.
            assert stop_pid(srv.proc, timeout=60) in (0, -signal.SIGTERM)
            try:
                rest = list(it)
            except httpx.HTTPError:  # the server may cut the connection once the grace period is over
                rest = []
        assert "data: [DONE]" in rest or rest == [] or any("error" in ln for ln in rest)
        assert "Traceback" not in srv.log.read_text()
