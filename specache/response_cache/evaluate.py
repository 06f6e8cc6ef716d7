"""`specache cache-eval FILE [--json]`: measure semantic-cache precision on labelled pairs.

Each JSONL line is {"cached": ..., "query": ..., "should_hit": bool}. For every line we start from
an empty cache, store an answer for `cached`, look up `query` and record whether it was served.
hit_rate = served share of should_hit lines; wrong_hit_rate = served share of should_hit=false lines.
Lines alternate between a calibration half (even line numbers) and a held-out half (odd): thresholds
are chosen on the first, reported on the second.
"""

from __future__ import annotations

import argparse
import json
from dataclasses import replace
from pathlib import Path
from typing import Any

import numpy as np

from specache.response_cache.cache import ResponseCache
from specache.response_cache.config import CacheConfig, CacheRequest
from specache.response_cache.embed import Embedder, default_embedder
from specache.response_cache.guard import Guard
from specache.response_cache.keys import normalise_text

THRESHOLDS = (0.70, 0.75, 0.80, 0.85, 0.90, 0.95)
MAX_WRONG_HIT_RATE = 0.02


def load_pairs(path: str | Path) -> list[dict[str, Any]]:
    rows = []
    with open(path, encoding="utf-8") as f:
        for n, line in enumerate(f, 1):
            if line.strip():
                row = json.loads(line)
                if not {"cached", "query", "should_hit"} <= row.keys():
                    raise ValueError(f"{path}:{n}: each line needs cached, query and should_hit")
                rows.append(row)
    return rows


def _request(text: str) -> CacheRequest:
    return CacheRequest(
        tenant="eval",
        model="eval-model",
        messages=[{"role": "user", "content": text}],
        params={"temperature": 0.0},
    )


class _MemoEmbedder:
    """Embeds every eval text once, in batches; per-line caches then reuse the vectors."""

    def __init__(self, inner: Embedder, texts: list[str], batch: int = 64):
        self.inner, self.dim = inner, inner.dim
        uniq = sorted(set(texts))
        self._memo: dict[str, np.ndarray] = {}
        for i in range(0, len(uniq), batch):
            self._memo.update(zip(uniq[i : i + batch], inner.embed(uniq[i : i + batch]), strict=True))

    def embed(self, texts: list[str]) -> np.ndarray:
        missing = [t for t in texts if t not in self._memo]
        if missing:
            self._memo.update(zip(missing, self.inner.embed(missing), strict=True))
        return np.stack([self._memo[t] for t in texts])


def served_by_cache(row: dict[str, Any], config: CacheConfig, embedder: Embedder) -> bool:
    """Empty cache, store `cached`, look up `query`: the end-to-end path the server takes."""
    with ResponseCache(replace(config, store_url=None), embedder=embedder) as cache:
        cache.store(_request(row["cached"]), {"text": "cached answer", "finish_reason": "stop"})
        return cache.lookup(_request(row["query"])).hit


def _rates(served: np.ndarray, labels: np.ndarray) -> dict[str, float]:
    pos, neg = labels, ~labels
    return {
        "hit_rate": float(served[pos].mean()) if pos.any() else 0.0,
        "wrong_hit_rate": float(served[neg].mean()) if neg.any() else 0.0,
        "positives": int(pos.sum()),
        "negatives": int(neg.sum()),
    }


def _pair_features(
    rows: list[dict[str, Any]], embedder: Embedder
) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """Similarity, guard verdict and exact-match flag per pair (to sweep thresholds cheaply)."""
    a = embedder.embed([r["cached"] for r in rows])
    b = embedder.embed([r["query"] for r in rows])
    sims = np.sum(a * b, axis=1)
    guard = Guard(embedder=embedder)
    ok = np.array([guard.verify(normalise_text(r["cached"]), normalise_text(r["query"])).ok for r in rows])
    exact = np.array([normalise_text(r["cached"]) == normalise_text(r["query"]) for r in rows])
    return sims, ok, exact


def sweep(
    sims: np.ndarray,
    ok: np.ndarray,
    exact: np.ndarray,
    labels: np.ndarray,
    thresholds: tuple[float, ...] = THRESHOLDS,
) -> list[dict[str, Any]]:
    table = []
    for guard_on in (False, True):
        for t in thresholds:
            served = exact | ((sims >= t) & (ok if guard_on else True))
            table.append({"threshold": t, "guard": guard_on, **_rates(served, labels)})
    return table


def calibrate(
    sims: np.ndarray,
    ok: np.ndarray,
    exact: np.ndarray,
    labels: np.ndarray,
    max_wrong: float = MAX_WRONG_HIT_RATE / 2,
) -> float:
    """Lowest threshold (best hit rate) whose wrong-hit rate on the calibration half is <= max_wrong.

    Half the target budget leaves room for calibration-to-held-out drift."""
    for t in np.arange(0.50, 1.0001, 0.01):
        if _rates(exact | ((sims >= t) & ok), labels)["wrong_hit_rate"] <= max_wrong:
            return round(float(t), 2)
    return 1.0


def run_cache_eval(
    path: str | Path,
    json_output: bool = False,
    config: CacheConfig | None = None,
    embedder: Embedder | None = None,
    quiet: bool = False,
) -> dict[str, Any]:
    rows = load_pairs(path)
    texts = [normalise_text(r[k]) for r in rows for k in ("cached", "query")]
    embedder = _MemoEmbedder(embedder or default_embedder(), texts)
    config = config or CacheConfig()
    labels = np.array([bool(r["should_hit"]) for r in rows])
    served = np.array([served_by_cache(r, config, embedder) for r in rows])
    no_guard = np.array([served_by_cache(r, replace(config, guard=False), embedder) for r in rows])
    sims, ok, exact = _pair_features(rows, embedder)
    calib = np.arange(len(rows)) % 2 == 0
    held = ~calib
    report: dict[str, Any] = {
        "file": str(path),
        "pairs": len(rows),
        "threshold": config.threshold,
        "guard": config.guard,
        **_rates(served, labels),
        "without_guard": _rates(no_guard, labels),
        "held_out": _rates(served[held], labels[held]),
        "calibrated_threshold": calibrate(sims[calib], ok[calib], exact[calib], labels[calib]),
        "table": sweep(sims, ok, exact, labels),
    }
    if not quiet:
        print(json.dumps(report, indent=2) if json_output else format_report(report))
    return report


def format_report(report: dict[str, Any]) -> str:
    lines = [
        f"cache-eval {report['file']}: {report['pairs']} pairs "
        f"({report['positives']} paraphrases, {report['negatives']} traps)",
        f"default (threshold {report['threshold']:.2f}, guard {'on' if report['guard'] else 'off'}): "
        f"hit_rate {report['hit_rate']:.1%}  wrong_hit_rate {report['wrong_hit_rate']:.1%}",
        f"  held-out half: hit_rate {report['held_out']['hit_rate']:.1%}  "
        f"wrong_hit_rate {report['held_out']['wrong_hit_rate']:.1%}",
        f"  guard off:     hit_rate {report['without_guard']['hit_rate']:.1%}  "
        f"wrong_hit_rate {report['without_guard']['wrong_hit_rate']:.1%}",
        f"  threshold calibrated on the other half: {report['calibrated_threshold']:.2f}",
        "",
        "| threshold | guard | hit_rate | wrong_hit_rate |",
        "|---:|:---:|---:|---:|",
    ]
    for row in report["table"]:
        lines.append(
            f"| {row['threshold']:.2f} | {'on' if row['guard'] else 'off'} | "
            f"{row['hit_rate']:.1%} | {row['wrong_hit_rate']:.1%} |"
        )
    return "\n".join(lines)


def add_cache_eval_parser(subparsers: argparse._SubParsersAction) -> argparse.ArgumentParser:
    """Register `cache-eval FILE [--json]`; the handler is stored as `func` on the namespace."""
    p = subparsers.add_parser(
        "cache-eval", help="measure response-cache hit / wrong-hit rates on labelled pairs"
    )
    p.add_argument("file", help="JSONL with cached, query, should_hit per line")
    p.add_argument("--json", action="store_true", help="print the report as JSON")
    p.add_argument(
        "--threshold", type=float, default=None, help="similarity threshold (default: CacheConfig's)"
    )
    p.add_argument("--no-guard", action="store_true", help="turn the false-hit guard off")
    p.set_defaults(func=_cli)
    return p


def _cli(args: argparse.Namespace) -> int:
    config = CacheConfig()
    if args.threshold is not None:
        config = replace(config, threshold=args.threshold)
    if args.no_guard:
        config = replace(config, guard=False)
    run_cache_eval(args.file, json_output=args.json, config=config)
    return 0
