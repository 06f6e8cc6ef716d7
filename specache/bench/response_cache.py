"""`specache bench response-cache`: lookup latency of the response cache at 10k / 100k entries for
the embedded (SQLite+usearch) and Redis stores, with and without query embedding, plus quality on
the labelled eval set. Writes JSON + a markdown table to --out (default bench_results/).

Bulk fill uses random unit vectors (the index cost does not depend on what the vectors mean);
queries are real questions embedded with all-MiniLM-L6-v2, so nearly all lookups walk the full
semantic path (exact miss -> HNSW search -> threshold) - the common and the most expensive case.
"""

from __future__ import annotations

import argparse
import json
import tempfile
import time
from pathlib import Path
from typing import Any

import numpy as np
from tqdm import tqdm

from specache.response_cache import CacheConfig, CacheRequest, ResponseCache
from specache.response_cache.embed import default_embedder
from specache.response_cache.keys import partition_key
from specache.response_cache.stores import Entry, open_store
from specache.response_cache.stores.local_redis import LocalRedis, redis_binaries

QUERIES = [
    "How do I reverse a linked list in C?",
    "What is the capital of Peru?",
    "Explain quantum entanglement simply",
    "Best way to learn German vocabulary",
    "How do I fix a slow laptop?",
    "What causes migraines?",
    "Write a poem about the sea",
    "How does HTTPS work?",
    "Recipe for vegetable lasagne",
    "What is the difference between a list and a tuple?",
]
DEFAULT_EVAL = Path(__file__).resolve().parents[2] / "tests" / "data" / "cache_eval.jsonl"


class _FixedEmbedder:
    """Returns precomputed vectors: isolates lookup cost from embedding cost."""

    def __init__(self, vectors: dict[str, np.ndarray], dim: int):
        self.vectors, self.dim = vectors, dim

    def embed(self, texts: list[str]) -> np.ndarray:
        return np.stack([self.vectors[t] for t in texts])


def _request(text: str) -> CacheRequest:
    return CacheRequest(
        tenant="bench", model="m", messages=[{"role": "user", "content": text}], params={"temperature": 0.0}
    )


def _fill(store: Any, n: int, dim: int, seed: int = 0, batch: int = 1000) -> None:
    rng = np.random.default_rng(seed)
    part = partition_key("bench", "m", _request("x").messages, {"temperature": 0.0})
    for start in tqdm(range(0, n, batch), desc=f"fill {n}", unit_scale=batch, leave=False):
        vecs = rng.standard_normal((min(batch, n - start), dim)).astype(np.float32)
        vecs /= np.linalg.norm(vecs, axis=1, keepdims=True)
        entries = [
            Entry(
                key=f"bulk-{start + i}",
                tenant="bench",
                model="m",
                partition=part,
                prompt=f"bulk prompt {start + i}",
                response={"text": "bulk answer"},
                expires_at=time.time() + 86400,
                created_at=time.time(),
                vector=v,
            )
            for i, v in enumerate(vecs)
        ]
        store.put_many(entries, time.time())


def _latency(cache: ResponseCache, texts: list[str], repeats: int) -> dict[str, float]:
    times = []
    for _ in range(repeats):
        for t in texts:
            cache._memo.clear()  # measure a real embedding on every lookup, not the memo
            t0 = time.perf_counter()
            cache.lookup(_request(t))
            times.append((time.perf_counter() - t0) * 1000)
    return {
        "p50_ms": float(np.percentile(times, 50)),
        "p99_ms": float(np.percentile(times, 99)),
        "n": len(times),
    }


def _start_redis() -> tuple[LocalRedis, str] | None:
    if redis_binaries() is None:
        return None
    server = LocalRedis().start()
    return server, server.url


def _bench_store(url: str | None, size: int, repeats: int) -> dict[str, Any]:
    embedder = default_embedder()
    vecs = dict(zip(QUERIES, embedder.embed(QUERIES), strict=True))
    store = open_store(url, embedder.dim, max_entries=size + 1000, max_bytes=1 << 40, namespace=f"bench{size}")
    store.clear()
    t0 = time.perf_counter()
    _fill(store, size, embedder.dim)
    if hasattr(store, "wait_indexed"):
        store.wait_indexed()  # Redis indexes in the background; time lookups on a finished index
    fill_s = time.perf_counter() - t0
    with_embed = ResponseCache(CacheConfig(store_url=url), embedder=embedder, store=store)
    without = ResponseCache(CacheConfig(store_url=url), embedder=_FixedEmbedder(vecs, embedder.dim), store=store)
    _latency(without, QUERIES, 1)  # warm-up
    _latency(with_embed, QUERIES, 1)
    out = {
        "entries": size,
        "fill_s": fill_s,
        "with_embedding": _latency(with_embed, QUERIES, repeats),
        "without_embedding": _latency(without, QUERIES, repeats * 5),
    }
    store.clear()
    store.close()
    return out


def _cli(args: argparse.Namespace) -> int:
    run(args)
    return 0  # the CLI's exit status (returning the result dict made the command exit 1)


def run(args: argparse.Namespace) -> dict[str, Any]:
    sizes = [int(s) for s in str(args.sizes).split(",")]
    out_dir = Path(args.out)
    out_dir.mkdir(parents=True, exist_ok=True)
    results: dict[str, Any] = {"latency": [], "quality": None}
    redis_proc = None
    stores = [s.strip() for s in args.stores.split(",")]
    with tempfile.TemporaryDirectory() as tmp:
        for kind in stores:
            url: str | None = f"sqlite://{tmp}/bench.db"
            if kind == "redis":
                url = args.redis_url
                if url is None:
                    started = _start_redis()
                    if started is None:
                        print("redis: no redis-server available, skipped")
                        continue
                    redis_proc, url = started
            for size in sizes:
                r = _bench_store(url, size, args.repeats)
                r["store"] = kind
                results["latency"].append(r)
                w, wo = r["with_embedding"], r["without_embedding"]
                print(
                    f"{kind:7s} {size:>7d} entries: with embedding p50 {w['p50_ms']:.2f} ms "
                    f"p99 {w['p99_ms']:.2f} ms | without p50 {wo['p50_ms']:.2f} ms p99 {wo['p99_ms']:.2f} ms"
                )
    if redis_proc is not None:
        redis_proc.stop()
    if not args.skip_quality:
        from specache.response_cache.evaluate import run_cache_eval

        q = run_cache_eval(args.eval_file, quiet=True)
        results["quality"] = {
            k: q[k]
            for k in (
                "pairs",
                "threshold",
                "hit_rate",
                "wrong_hit_rate",
                "without_guard",
                "held_out",
                "calibrated_threshold",
                "table",
            )
        }
    _write(results, out_dir)
    return results


def _write(results: dict[str, Any], out_dir: Path) -> None:
    (out_dir / "response_cache.json").write_text(json.dumps(results, indent=2))
    lines = [
        "# Response cache lookup latency",
        "",
        "| store | entries | p50 with embedding (ms) | p99 with embedding (ms) | p50 without (ms) "
        "| p99 without (ms) | fill (s) |",
        "|---|---:|---:|---:|---:|---:|---:|",
    ]
    for r in results["latency"]:
        w, wo = r["with_embedding"], r["without_embedding"]
        lines.append(
            f"| {r['store']} | {r['entries']} | {w['p50_ms']:.2f} | {w['p99_ms']:.2f} | {wo['p50_ms']:.2f} "
            f"| {wo['p99_ms']:.2f} | {r['fill_s']:.1f} |"
        )
    q = results.get("quality")
    if q:
        lines += [
            "",
            "# Quality (cache-eval)",
            "",
            f"default: hit_rate {q['hit_rate']:.1%}, wrong_hit_rate {q['wrong_hit_rate']:.1%}; guard off: "
            f"hit_rate {q['without_guard']['hit_rate']:.1%}, wrong_hit_rate "
            f"{q['without_guard']['wrong_hit_rate']:.1%}",
            "",
            "| threshold | guard | hit_rate | wrong_hit_rate |",
            "|---:|:---:|---:|---:|",
        ]
        lines += [
            f"| {t['threshold']:.2f} | {'on' if t['guard'] else 'off'} | {t['hit_rate']:.1%} | "
            f"{t['wrong_hit_rate']:.1%} |"
            for t in q["table"]
        ]
    (out_dir / "response_cache.md").write_text("\n".join(lines) + "\n")


def add_parser(subparsers: argparse._SubParsersAction) -> argparse.ArgumentParser:
    p = subparsers.add_parser("response-cache", help="response cache lookup latency and quality")
    p.add_argument("--sizes", default="10000,100000", help="comma-separated entry counts")
    p.add_argument("--stores", default="sqlite,redis", help="comma-separated: sqlite, redis")
    p.add_argument("--redis-url", default=None, help="use this Redis (default: start a local one if installed)")
    p.add_argument("--repeats", type=int, default=10, help="passes over the query set per measurement")
    p.add_argument("--eval-file", default=str(DEFAULT_EVAL))
    p.add_argument("--skip-quality", action="store_true")
    p.add_argument("--out", default="bench_results")
    p.set_defaults(func=_cli)
    return p


def main() -> None:
    parser = argparse.ArgumentParser(prog="specache bench")
    sub = parser.add_subparsers(dest="suite", required=True)
    add_parser(sub)
    args = parser.parse_args()
    args.func(args)


if __name__ == "__main__":
    main()
