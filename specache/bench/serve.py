"""`specache bench serve`: the HTTP server under load (concurrency 1, 8, 32) on the real model:
requests/s, TTFT p50/p99, generated tokens/s, against a plain transformers server (one
`generate` at a time, streamed with TextIteratorStreamer) behind the same client harness.

Both servers run as subprocesses on loopback; the harness sends streaming chat requests with
`stream_options.include_usage` and times the first content chunk (TTFT) and the whole run.
The response cache is off: this measures the engine, not cache hits.
"""

from __future__ import annotations

import argparse
import asyncio
import json
import os
import signal
import socket
import statistics
import subprocess
import sys
import threading
import time
from pathlib import Path
from typing import Any

QUESTIONS = [
    "What is the capital of France?",
    "Give me three tips for better sleep.",
    "Explain what a hash table is.",
    "Write a haiku about autumn.",
    "How do vaccines work?",
    "What is the difference between weather and climate?",
    "Summarise the plot of Hamlet.",
    "Why do cats purr?",
]


def add_parser(subparsers: Any) -> None:
    p = subparsers.add_parser("serve", help="HTTP server throughput / TTFT vs a plain transformers server")
    p.add_argument("--out", default="bench_results")
    p.add_argument("--model", default=None, help="HF directory (default: the converted SmolLM2-135M)")
    p.add_argument("--dtype", default="float32")
    p.add_argument("--concurrency", default="1,8,32")
    p.add_argument(
        "--requests", type=int, default=0, help="requests per level (default: max(8, 2 x concurrency))"
    )
    p.add_argument("--max-tokens", type=int, default=32)
    p.add_argument("--backends", default="specache,transformers")
    p.add_argument("--weight-format", default="dense", choices=["dense", "int8", "hybrid"],
                   help="specache's weights (make run serves hybrid)")
    p.set_defaults(func=_cli)


def _cli(args: argparse.Namespace) -> int:
    run(args)
    return 0


# ---------------------------------------------------------------------- client harness


async def _one(http: Any, url: str, question: str, max_tokens: int) -> dict:
    body = {
        "model": "bench",
        "messages": [{"role": "user", "content": question}],
        "max_tokens": max_tokens,
        "temperature": 0,
        "stream": True,
        "stream_options": {"include_usage": True},
        "cache": "bypass",
    }
    t0 = time.perf_counter()
    ttft, tokens = None, 0
    async with http.stream("POST", url, json=body) as r:
        r.raise_for_status()
        async for line in r.aiter_lines():
            if not line.startswith("data: {"):
                continue
            data = json.loads(line[6:])
            if ttft is None and data["choices"] and data["choices"][0]["delta"].get("content"):
                ttft = time.perf_counter() - t0
            if data.get("usage"):
                tokens = data["usage"]["completion_tokens"]
    return {
        "ttft_s": ttft if ttft is not None else time.perf_counter() - t0,
        "tokens": tokens,
        "latency_s": time.perf_counter() - t0,
    }


async def load_level(base: str, concurrency: int, n_requests: int, max_tokens: int) -> dict:
    import httpx

    sem = asyncio.Semaphore(concurrency)
    url = base + "/v1/chat/completions"

    async def bounded(i: int, http: Any) -> dict:
        async with sem:
            return await _one(http, url, QUESTIONS[i % len(QUESTIONS)], max_tokens)

    async with httpx.AsyncClient(timeout=3600, limits=httpx.Limits(max_connections=concurrency + 4)) as http:
        await _one(http, url, "warm up", 4)
        t0 = time.perf_counter()
        results = await asyncio.gather(*(bounded(i, http) for i in range(n_requests)))
        wall = time.perf_counter() - t0
    ttfts = sorted(r["ttft_s"] for r in results)
    tokens = sum(r["tokens"] for r in results)
    return {
        "concurrency": concurrency,
        "requests": n_requests,
        "wall_s": wall,
        "requests_per_s": n_requests / wall,
        "ttft_p50_s": statistics.median(ttfts),
        "ttft_p99_s": _percentile(ttfts, 0.99),
        "tokens_per_s": tokens / wall,
        "completion_tokens": tokens,
    }


def _percentile(sorted_xs: list[float], q: float) -> float:
    return sorted_xs[min(len(sorted_xs) - 1, int(round(q * (len(sorted_xs) - 1))))]


# ---------------------------------------------------------------------- servers


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def _start(cmd: list[str], port: int, log: Path) -> subprocess.Popen:
    import httpx

    with open(log, "w") as fh:
        proc = subprocess.Popen(cmd, stdout=fh, stderr=subprocess.STDOUT)
    try:  # stopped however the wait ends (no start, or the bench itself terminated meanwhile)
        deadline = time.monotonic() + 600
        while time.monotonic() < deadline:
            if proc.poll() is not None:
                raise RuntimeError(f"server exited: {log.read_text()[-2000:]}")
            try:
                if httpx.get(f"http://127.0.0.1:{port}/health", timeout=1).status_code == 200:
                    return proc
            except httpx.HTTPError:
                time.sleep(0.5)
        raise RuntimeError("server did not start")
    except BaseException:
        _stop(proc)
        raise


def _stop(proc: subprocess.Popen) -> None:
    if proc.poll() is None:
        os.kill(proc.pid, signal.SIGTERM)
        try:
            proc.wait(timeout=30)
        except subprocess.TimeoutExpired:
            os.kill(proc.pid, signal.SIGKILL)
            proc.wait()


def specache_serve_command(model_dir: Path, port: int, served_name: str, dtype: str, *extra: str) -> list[str]:
    """`specache serve` on loopback as a child process (also used by the server tests)."""
    return [sys.executable, "-m", "specache.cli", "serve", "--model", str(model_dir), "--port", str(port),
            "--served-model-name", served_name, "--dtype", dtype, "--log-level", "warning", *extra]


def _server_cmd(backend: str, model_dir: Path, dtype: str, port: int, weight_format: str = "dense") -> list[str]:
    if backend == "specache":
        return specache_serve_command(model_dir, port, "bench", dtype, "--no-response-cache",
                                      "--weight-format", weight_format)
    return [sys.executable, "-m", "specache.bench.serve", "--hf-server", str(model_dir), str(port), dtype]


def hf_server(model_dir: str, port: int, dtype: str) -> None:
    """A plain transformers server: one generate() at a time (a lock), streamed token by token."""
    import torch
    import uvicorn
    from fastapi import FastAPI, Request
    from fastapi.responses import JSONResponse, StreamingResponse
    from transformers import AutoModelForCausalLM, AutoTokenizer, TextIteratorStreamer

    tok = AutoTokenizer.from_pretrained(model_dir)
    model = AutoModelForCausalLM.from_pretrained(model_dir, dtype=getattr(torch, dtype)).eval()
    lock = threading.Lock()
    app = FastAPI()

    async def health(request: Request) -> JSONResponse:
        return JSONResponse({"status": "ok"})

    async def chat(request: Request) -> StreamingResponse:
        body = await request.json()
        ids = tok.apply_chat_template(body["messages"], add_generation_prompt=True, return_tensors="pt")
        ids = ids["input_ids"] if hasattr(ids, "keys") else ids
        streamer = TextIteratorStreamer(tok, skip_prompt=True, skip_special_tokens=True)
        counted: dict[str, int] = {}

        def work() -> None:
            with lock, torch.inference_mode():
                out = model.generate(
                    ids, max_new_tokens=body["max_tokens"], do_sample=False, streamer=streamer
                )
            counted["n"] = out.shape[1] - ids.shape[1]

        worker = threading.Thread(target=work)
        worker.start()

        async def events():
            it = iter(streamer)
            while True:
                piece = await asyncio.to_thread(next, it, None)
                if piece is None:
                    break
                if piece:
                    yield f"data: {json.dumps({'choices': [{'index': 0, 'delta': {'content': piece}}]})}\n\n"
            await asyncio.to_thread(worker.join)
            yield f"data: {json.dumps({'choices': [], 'usage': {'completion_tokens': counted['n']}})}\n\n"
            yield "data: [DONE]\n\n"

        return StreamingResponse(events(), media_type="text/event-stream")

    # Plain Starlette routes: FastAPI cannot resolve these locally imported annotations.
    app.router.add_route("/health", health, methods=["GET"])
    app.router.add_route("/v1/chat/completions", chat, methods=["POST"])
    uvicorn.run(app, host="127.0.0.1", port=port, log_level="warning")


# ---------------------------------------------------------------------- the suite


def _exit_on_sigterm(signum: int, frame: Any) -> None:
    """A terminated bench exits through its `finally` blocks, which stop the servers it started
    (the default handler left the transformers server running)."""
    raise SystemExit(128 + signum)


def run(args: argparse.Namespace) -> dict:
    from specache.bench.report import environment, markdown_table, write_report
    from specache.models.loader import resolve_model_path

    model_dir = resolve_model_path(args.model)
    levels = [int(c) for c in args.concurrency.split(",")]
    out = Path(args.out)
    out.mkdir(parents=True, exist_ok=True)
    rows = []
    if threading.current_thread() is threading.main_thread():
        signal.signal(signal.SIGTERM, _exit_on_sigterm)
    for backend in args.backends.split(","):
        port = _free_port()
        cmd = _server_cmd(backend, model_dir, args.dtype, port, args.weight_format)
        proc = _start(cmd, port, out / f"serve-{backend}.log")
        try:
            for c in levels:
                n = args.requests or max(8, 2 * c)
                row = asyncio.run(load_level(f"http://127.0.0.1:{port}", c, n, args.max_tokens))
                rows.append({"backend": backend, **row})
                print(json.dumps(rows[-1]), flush=True)
        finally:
            _stop(proc)
    _add_ratios(rows)
    result = {
        "suite": "serve",
        "model": str(model_dir),
        "dtype": args.dtype,
        "weight_format": args.weight_format,
        "max_tokens": args.max_tokens,
        "environment": environment(),
        "rows": rows,
    }
    cols = [
        "backend",
        "concurrency",
        "requests",
        "requests_per_s",
        "tokens_per_s",
        "ttft_p50_s",
        "ttft_p99_s",
        "speedup_tokens_per_s",
    ]
    write_report(out, "serve", result, markdown_table(rows, cols))
    return result


def _add_ratios(rows: list[dict]) -> None:
    base = {r["concurrency"]: r["tokens_per_s"] for r in rows if r["backend"] == "transformers"}
    for r in rows:
        if r["concurrency"] in base and base[r["concurrency"]]:
            r["speedup_tokens_per_s"] = r["tokens_per_s"] / base[r["concurrency"]]


if __name__ == "__main__":
    if len(sys.argv) == 5 and sys.argv[1] == "--hf-server":
        hf_server(sys.argv[2], int(sys.argv[3]), sys.argv[4])
    else:
        parser = argparse.ArgumentParser(prog="python -m specache.bench.serve")
        add_parser(parser.add_subparsers(dest="suite", required=True))
        ns = parser.parse_args()
        run(ns)
