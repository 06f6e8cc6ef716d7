"""Load: 200 concurrent streaming clients through the official async openai client, 20% of them
hanging up mid-stream. Every other stream must complete with the right text, nothing may 500,
and once the dust settles no KV block may be held by a request."""

from __future__ import annotations

import asyncio
import random

import httpx
import openai
import pytest
from server_fixtures import MODEL, running_server

N_CLIENTS = 200
PROMPTS = ["The history of tea", "A recipe for bread", "Why is the sky blue", "Rules of chess", "Ocean tides"]


@pytest.fixture(scope="module")
def server(tiny_model_dir, tmp_path_factory):
    with running_server(
        tiny_model_dir,
        tmp_path_factory.mktemp("load"),
        "--max-queue",
        "512",
        "--max-num-seqs",
        "64",
        "--no-response-cache",
        "--enable-prefix-caching",
    ) as srv:
        yield srv


async def _one(client: openai.AsyncOpenAI, prompt: str, drop: bool) -> tuple[str, str | None]:
    stream = await client.completions.create(
        model=MODEL, prompt=prompt, max_tokens=8, temperature=0, stream=True
    )
    text, finish = "", None
    async for chunk in stream:
        if drop:
            await stream.close()  # hang up mid-stream: the server must abort and free the blocks
            return "dropped", None
        for choice in chunk.choices:
            text += choice.text
            finish = choice.finish_reason or finish
    return text, finish


async def _run(base: str, jobs: list[tuple[str, bool]]) -> list:
    http = httpx.AsyncClient(limits=httpx.Limits(max_connections=N_CLIENTS + 10), timeout=300)
    client = openai.AsyncOpenAI(base_url=base, api_key="none", max_retries=0, http_client=http)
    try:
        return await asyncio.gather(*(_one(client, p, d) for p, d in jobs), return_exceptions=True)
    finally:
        await http.aclose()


def test_200_concurrent_streams_with_disconnects(server):
    c = openai.OpenAI(base_url=server.v1, api_key="none", max_retries=0, timeout=120)
    expected = {
        p: c.completions.create(model=MODEL, prompt=p, max_tokens=8, temperature=0).choices[0].text
        for p in PROMPTS
    }
    rng = random.Random(1234)
    jobs = [(rng.choice(PROMPTS), rng.random() < 0.2) for _ in range(N_CLIENTS)]
    results = asyncio.run(_run(server.v1, jobs))

    errors = [r for r in results if isinstance(r, BaseException)]
    assert not errors, errors[:3]
    for (prompt, drop), (text, finish) in zip(jobs, results, strict=True):
        if not drop:
            assert finish in ("stop", "length") and text == expected[prompt]
    assert 0 < sum(d for _, d in jobs) < N_CLIENTS

    snap = server.wait_idle()
    assert snap["engine_requests"] == 0 and snap["queue_depth"] == 0, snap
    assert snap["kv_block_refs_held_by_requests"] == 0, snap  # only the prefix cache holds blocks
    metrics = httpx.get(server.base + "/metrics", timeout=30).text
    assert 'status="500"' not in metrics
    assert (
        f'specache_requests_total{{endpoint="/v1/completions",status="200"}} {N_CLIENTS + len(PROMPTS)}.0'
        in metrics
    )
