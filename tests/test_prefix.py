"""Prefix caching in the engine: same output as cold prefill, tenants isolated, persistence
round trip, and every corrupt / mismatched cache file starts cold without crashing."""

from __future__ import annotations

import json
import logging

import pytest
import torch

from specache import LLM, SamplingParams

GREEDY = SamplingParams(max_tokens=12, temperature=0, ignore_eos=True)


def _system_and_questions(n: int, system_len: int = 120) -> list[list[int]]:
    g = torch.Generator().manual_seed(11)
    system = torch.randint(3, 49152, (system_len,), generator=g).tolist()
    return [system + torch.randint(3, 49152, (7,), generator=g).tolist() for _ in range(n)]


def _llm(model_dir, **kw) -> LLM:
    return LLM(model=str(model_dir), dtype="float32", enable_prefix_caching=True, block_size=8, **kw)


def test_cached_prefix_gives_same_tokens_and_logits_as_cold(tiny_model_dir, tiny_llm):
    prompts = _system_and_questions(6)
    cold = [o.token_ids for o in tiny_llm.generate(prompts, GREEDY)]
    llm = _llm(tiny_model_dir)
    first = llm.generate(prompts[:1], GREEDY)[0]
    rest = llm.generate(prompts[1:], GREEDY)
    assert [first.token_ids] + [o.token_ids for o in rest] == cold
    assert first.metrics["cached_tokens"] == 0
    assert all(o.metrics["cached_tokens"] >= 112 for o in rest)
    assert llm.engine.prefix_cache.stats()["hit_tokens"] > 0


def test_tenants_share_nothing(tiny_model_dir):
    llm = _llm(tiny_model_dir)
    p = _system_and_questions(1)[0]
    llm.generate([p], GREEDY, cache_salt="tenant-a")
    other = llm.generate([p], GREEDY, cache_salt="tenant-b")[0]
    same = llm.generate([p], GREEDY, cache_salt="tenant-a")[0]
    assert other.metrics["cached_tokens"] == 0
    assert same.metrics["cached_tokens"] > 0


@pytest.mark.parametrize("seed", range(6))
def test_eviction_under_a_tight_pool_keeps_output(tiny_model_dir, tiny_llm, seed):
    g = torch.Generator().manual_seed(seed)
    prompts = _system_and_questions(4) + [torch.randint(3, 49152, (150,), generator=g).tolist() for _ in range(4)]
    cold = [o.token_ids for o in tiny_llm.generate(prompts, GREEDY)]
    llm = _llm(tiny_model_dir, kv_cache_memory=60 * 8 * 1024)  # 60 blocks of 8 tokens
    outs = [llm.generate([p], GREEDY)[0].token_ids for p in prompts]
    assert outs == cold
    assert llm.engine.prefix_cache.stats()["evicted_blocks"] > 0
    llm.engine.prefix_cache.reset()
    assert llm.engine.pool.all_free()


def test_persistence_round_trip_makes_the_first_request_warm(tiny_model_dir, tmp_path):
    prompts = _system_and_questions(2)
    with _llm(tiny_model_dir, prefix_cache_dir=str(tmp_path)) as llm:
        expected = llm.generate(prompts[:1], GREEDY)[0].token_ids
    assert (tmp_path / "prefix-cache.json").exists()
    restarted = _llm(tiny_model_dir, prefix_cache_dir=str(tmp_path))
    out = restarted.generate(prompts[:1], GREEDY)[0]
    assert out.metrics["cached_tokens"] > 0 and out.token_ids == expected


def _saved(tiny_model_dir, tmp_path):
    with _llm(tiny_model_dir, prefix_cache_dir=str(tmp_path)) as llm:
        llm.generate(_system_and_questions(1), GREEDY)
    return tmp_path


@pytest.mark.parametrize("damage", ["truncate_tensors", "garbage_manifest", "other_model", "other_block_size",
                                    "bad_entry", "missing_tensors"])
def test_corrupt_or_foreign_cache_files_start_cold(tiny_model_dir, tmp_path, caplog, damage):
    d = _saved(tiny_model_dir, tmp_path)
    manifest, tensors = d / "prefix-cache.json", d / "prefix-cache.safetensors"
    m = json.loads(manifest.read_text())
    if damage == "truncate_tensors":
        tensors.write_bytes(tensors.read_bytes()[:1000])
    elif damage == "garbage_manifest":
        manifest.write_text("{not json")
    elif damage == "other_model":
        manifest.write_text(json.dumps(m | {"fingerprint": "0123456789abcdef"}))
    elif damage == "other_block_size":
        manifest.write_text(json.dumps(m | {"block_size": 16}))
    elif damage == "bad_entry":
        m["entries"][0]["blocks"] = [10_000]
        manifest.write_text(json.dumps(m))
    else:
        tensors.unlink()
    with caplog.at_level(logging.WARNING):
        llm = _llm(tiny_model_dir, prefix_cache_dir=str(d))
    assert any("starting cold" in r.message for r in caplog.records)
    assert llm.engine.prefix_cache.cached_blocks() == 0
    assert llm.generate(_system_and_questions(1), GREEDY)[0].metrics["cached_tokens"] == 0


def test_warmup_prompts_fill_the_cache(tiny_model_dir, tmp_path):
    system = _system_and_questions(1)[0][:120]
    llm0 = _llm(tiny_model_dir)
    text = llm0.tokenizer.decode(system)
    f = tmp_path / "warmup.txt"
    f.write_text(text.replace("\n", "\\n") + "\n")
    llm = _llm(tiny_model_dir, warmup_prompts=str(f))
    assert llm.engine.prefix_cache.cached_blocks() > 0
    out = llm.generate([text + " and a question?"], GREEDY)[0]
    assert out.metrics["cached_tokens"] > 0
