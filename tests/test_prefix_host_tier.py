"""CPU tier (L2) of the prefix cache: blocks evicted from a tight KV pool come back from host memory
with exactly the cold run's tokens and logits, within the tier's own budget, per tenant; and the
tier's LRU / budget bookkeeping on its own."""

from __future__ import annotations

from collections import defaultdict

import pytest
import torch

from specache import LLM, SamplingParams
from specache.errors import ConfigError
from specache.kv.cache import KVCache
from specache.prefix.host_tier import HostKVTier, HostTierIndex, chain_digests

GREEDY = SamplingParams(max_tokens=12, temperature=0, ignore_eos=True)
BLOCK = 8
BLOCK_BYTES = 2 * 4 * BLOCK * 2 * 16 * 4  # K+V x 4 layers x 8 tokens x 2 kv heads x head_dim 16 x fp32


def _prompts(seed: int, n: int, length: int) -> list[list[int]]:
    g = torch.Generator().manual_seed(seed)
    return [torch.randint(3, 49152, (length,), generator=g).tolist() for _ in range(n)]


def _llm(model_dir, host_blocks: int | str, device_blocks: int = 40, **kw) -> LLM:
    """host_blocks: an int counts blocks of the tiny model; a string is a size as the user writes it."""
    host = host_blocks * BLOCK_BYTES if isinstance(host_blocks, int) else host_blocks
    return LLM(model=str(model_dir), dtype="float32", enable_prefix_caching=True, block_size=BLOCK,
               kv_cache_memory=device_blocks * BLOCK_BYTES, prefix_cpu_cache_memory=host, **kw)


class Recorder:
    """Wraps the model runner: logits and computed token counts per request, in step order."""

    def __init__(self, llm: LLM) -> None:
        self.logits: dict[str, list[torch.Tensor]] = defaultdict(list)
        self.computed: dict[str, int] = defaultdict(int)
        run = llm.engine.runner.run

        def recording_run(items, *args, **kwargs):
            out = run(items, *args, **kwargs)
            for it, lg in zip(items, out, strict=True):
                self.computed[it.seq.request_id] += len(it.token_ids)
                if lg is not None:
                    self.logits[it.seq.request_id].append(lg.clone())
            return out

        llm.engine.runner.run = recording_run

    def of(self, out) -> torch.Tensor:
        return torch.cat(self.logits[out.request_id])


def _generate_with_logits(llm: LLM, rec: Recorder, prompt: list[int], **kw):
    out = llm.generate([prompt], GREEDY, **kw)[0]
    return out, rec.of(out)


@pytest.fixture(scope="module")
def cold(tiny_model_dir):
    """The reference: prefix cache off, every prompt prefilled from scratch."""
    llm = LLM(model=str(tiny_model_dir), dtype="float32", block_size=BLOCK, kv_cache_memory="16MiB")
    return llm, Recorder(llm)


def _evict_with_others(llm: LLM, seed: int, n: int = 3) -> None:
    """Long unrelated prompts that need the whole tight pool, pushing earlier prefixes out of it."""
    for p in _prompts(seed, n, 200):
        llm.generate([p], GREEDY)


# ---------------------------------------------------------------------- engine level


def test_evicted_prefix_comes_back_from_host_with_cold_tokens_and_logits(tiny_model_dir, cold):
    cold_llm, cold_rec = cold
    prompt = _prompts(1, 1, 127)[0]
    ref_out, ref_logits = _generate_with_logits(cold_llm, cold_rec, prompt)

    llm = _llm(tiny_model_dir, host_blocks=128)
    rec = Recorder(llm)
    first, first_logits = _generate_with_logits(llm, rec, prompt)
    device_hit, device_logits = _generate_with_logits(llm, rec, prompt)
    assert device_hit.metrics["cached_tokens"] >= 120 and device_hit.metrics["host_cached_tokens"] == 0
    _evict_with_others(llm, seed=2)
    assert llm.engine.prefix_cache.match_prefix(prompt).num_tokens == 0  # gone from the device tier
    again, again_logits = _generate_with_logits(llm, rec, prompt)

    assert first.token_ids == device_hit.token_ids == again.token_ids == ref_out.token_ids
    assert torch.equal(first_logits, ref_logits)  # a cold prefill, with the prefix cache on
    # Restored K/V are bitwise the ones computed: a host hit gives exactly a device hit's logits.
    assert torch.equal(again_logits, device_logits)
    # Both prefill only the suffix; CPU GEMM rows depend on the row count (7 vs 127 here), so
    # any prefix hit is within float rounding of the cold logits, not bitwise (see test_prefix).
    assert torch.allclose(again_logits, ref_logits, rtol=0, atol=1e-5)
    assert again.metrics["cached_tokens"] == again.metrics["host_cached_tokens"] == 120  # (127 - 1) // 8 blocks
    assert rec.computed[again.request_id] == rec.computed[first.request_id] - 120
    stats = llm.engine.prefix_stats()
    assert stats["host_hit_tokens"] == 120 and stats["host_hit_blocks"] == 15 and stats["host_stores"] > 0
    assert stats["hit_tokens"] == stats["device_hit_tokens"] + 120
    assert 0 < stats["host_hit_rate"] <= stats["hit_rate"] <= 1


def test_restored_blocks_join_the_device_tree(tiny_model_dir):
    """After a host hit the prefix is in the radix tree again: the next request hits the device."""
    llm = _llm(tiny_model_dir, host_blocks=128)
    prompt = _prompts(3, 1, 127)[0]
    llm.generate([prompt], GREEDY)
    _evict_with_others(llm, seed=4)
    assert llm.generate([prompt], GREEDY)[0].metrics["host_cached_tokens"] == 120
    third = llm.generate([prompt], GREEDY)[0]
    assert third.metrics["cached_tokens"] >= 120 and third.metrics["host_cached_tokens"] == 0
    llm.engine.prefix_cache.reset()
    assert llm.engine.pool.all_free()


def test_host_tier_stays_within_its_budget(tiny_model_dir, cold):
    cold_llm, _ = cold
    budget = 6 * BLOCK_BYTES + BLOCK_BYTES // 2  # room for 6 blocks, not 7
    llm = _llm(tiny_model_dir, host_blocks=str(budget))
    tier = llm.engine.host_tier
    assert tier.index.capacity == 6 and tier.k.nbytes + tier.v.nbytes <= budget
    seen: list = []  # every key offered to the tier, in order (a re-offered key is refreshed)
    store = tier.store

    def recording_store(salt, path, block_id):
        seen.append(tier._path_key(salt, path))
        store(salt, path, block_id)

    llm.engine.prefix_cache.on_evict = recording_store
    prompts = _prompts(5, 6, 150)
    outs = [llm.generate([p], GREEDY)[0].token_ids for p in prompts]
    assert outs == [o.token_ids for o in cold_llm.generate(prompts, GREEDY)]
    s = tier.stats()
    assert s["blocks"] == 6 and s["bytes"] <= budget and s["evictions"] == s["stores"] - 6 > 0
    llm.engine.prefix_cache.reset()
    assert llm.engine.pool.all_free() and tier.stats()["blocks"] == 6
    # LRU within the tier: it holds exactly the 6 keys offered most recently.
    recent = list(dict.fromkeys(reversed(seen)))[:6]
    assert all(k in tier for k in recent)


def test_tenants_never_hit_each_others_host_blocks(tiny_model_dir):
    llm = _llm(tiny_model_dir, host_blocks=256)
    prompt = _prompts(6, 1, 127)[0]
    llm.generate([prompt], GREEDY, cache_salt="tenant-a")
    _evict_with_others(llm, seed=7)
    other = llm.generate([prompt], GREEDY, cache_salt="tenant-b")[0]
    assert other.metrics["cached_tokens"] == 0 and llm.engine.prefix_stats()["host_hit_tokens"] == 0
    _evict_with_others(llm, seed=8)
    same = llm.generate([prompt], GREEDY, cache_salt="tenant-a")[0]
    assert same.metrics["host_cached_tokens"] == 120
    assert same.token_ids == other.token_ids


def test_speculative_decoding_with_host_tier_matches_cold(tiny_model_dir, cold):
    """Drafts write K/V past the verified tokens; only verified full blocks may reach the tier, so
    every stored block equals what a cold prefill of its path computes."""
    cold_llm, _ = cold
    base = _prompts(9, 1, 12)[0]
    prompts = [base * 10, base[:5] * 4 + base * 6]
    llm = _llm(tiny_model_dir, host_blocks=64, speculative="ngram", num_spec_tokens=5, spec_adaptive=False)
    tier = llm.engine.host_tier
    stored: list[tuple[tuple[int, ...], torch.Tensor]] = []
    store = tier.store

    def recording_store(salt, path, block_id):
        stored.append((path, llm.engine.cache.k[:, block_id].clone()))
        store(salt, path, block_id)

    llm.engine.prefix_cache.on_evict = recording_store
    runs = []
    for _ in range(2):
        runs.append([llm.generate([p], GREEDY)[0] for p in prompts])
        _evict_with_others(llm, seed=10)
    expected = [o.token_ids for o in cold_llm.generate(prompts, GREEDY)]
    assert all([o.token_ids for o in outs] == expected for outs in runs)
    assert sum(o.metrics["host_cached_tokens"] for o in runs[1]) > 0
    assert llm.engine.spec.stats()["draft_tokens"] > 0
    for path, k in stored[:: max(1, len(stored) // 8)]:
        assert torch.allclose(k, _cold_block_keys(cold_llm, list(path)), atol=1e-5)


def _cold_block_keys(llm: LLM, path: list[int]) -> torch.Tensor:
    """K of the last block of path, as a cold prefill computes it: [layers, block, kv_heads, head_dim]."""
    from specache.engine.runner import BatchItem
    from specache.engine.sequence import Sequence

    engine = llm.engine
    seq = Sequence(-1, "probe", 0, path, GREEDY)
    seq.block_table = engine.pool.allocate(engine.pool.blocks_needed(len(path)))
    try:
        engine.runner.run([BatchItem(seq, path, 0, 1)])
        return engine.cache.k[:, seq.block_table[-1]].clone()
    finally:
        engine.pool.free(seq.block_table)


def test_tier_off_behaves_as_before(tiny_model_dir, cold):
    cold_llm, _ = cold
    llm = _llm(tiny_model_dir, host_blocks=0)
    assert llm.engine.host_tier is None and llm.engine.prefix_cache.on_evict is None
    prompt = _prompts(1, 1, 127)[0]
    first = llm.generate([prompt], GREEDY)[0]
    _evict_with_others(llm, seed=2)
    again = llm.generate([prompt], GREEDY)[0]
    assert first.token_ids == again.token_ids == cold_llm.generate([prompt], GREEDY)[0].token_ids
    assert again.metrics["cached_tokens"] == again.metrics["host_cached_tokens"] == 0
    stats = llm.engine.prefix_stats()
    assert stats["host_hit_tokens"] == 0 and "host_stores" not in stats
    llm.engine.prefix_cache.reset()
    assert llm.engine.pool.all_free()


def test_bad_budgets_raise_config_errors(tiny_model_dir):
    with pytest.raises(ConfigError, match="not a size"):
        _llm(tiny_model_dir, host_blocks="lots")
    with pytest.raises(ConfigError, match=">= 0"):
        _llm(tiny_model_dir, host_blocks=-1)
    with pytest.raises(ConfigError, match="holds no KV block"):
        _llm(tiny_model_dir, host_blocks=str(BLOCK_BYTES - 1))


# ---------------------------------------------------------------------- bookkeeping


def test_index_lru_and_budget():
    idx = HostTierIndex(capacity_blocks=3, block_bytes=100)
    assert [idx.reserve(("s", bytes([i]))) for i in range(3)] == [0, 1, 2]
    assert idx.nbytes == 300 and len(idx) == 3
    assert idx.lookup(("s", b"\x00")) == 0  # touch: now most recently used
    assert idx.reserve(("s", b"\x01")) is None  # already held: refreshed, nothing to copy
    assert idx.reserve(("s", b"\x03")) == 2  # evicts the LRU entry, b"\x02", and reuses its slot
    assert ("s", b"\x02") not in idx and idx.lookup(("s", b"\x02")) is None
    assert idx.reserve(("s", b"\x04")) == 0  # then b"\x00"
    assert idx.reserve(("t", b"\x01")) == 1  # another salt is another key
    assert ("s", b"\x01") not in idx and len(idx) == 3 and idx.nbytes == 300
    s = idx.stats()
    assert (s["stores"], s["refreshes"], s["evictions"], s["hit_blocks"]) == (6, 1, 3, 1)
    assert s["capacity_bytes"] == 300 and s["blocks"] == 3
    idx.clear()
    assert len(idx) == 0 and idx.reserve(("s", b"\x00")) == 0


def test_index_with_no_capacity_stores_nothing():
    idx = HostTierIndex(capacity_blocks=0, block_bytes=100)
    assert idx.reserve(("s", b"\x00")) is None and len(idx) == 0 and idx.stats()["stores"] == 0


def test_chain_digests_name_the_whole_path():
    a = list(range(24))
    b = [99] + a[1:]  # differs only in the first token
    da, db = chain_digests(a, 8, 3), chain_digests(b, 8, 3)
    assert chain_digests(a[:16], 8, 2) == da[:2]  # a prefix has the same block digests
    assert all(x != y for x, y in zip(da, db, strict=True))  # block 2's K/V depend on token 0 too
    assert len(set(da)) == 3


def test_store_and_load_round_trip_copies_one_block_bitwise():
    cache = KVCache(num_layers=2, num_blocks=4, block_size=4, num_kv_heads=2, head_dim=8)
    cache.k.normal_()
    cache.v.normal_()
    tier = HostKVTier(cache, budget_bytes=3 * 2 * cache.k[:, 0].nbytes)
    assert tier.index.capacity == 3
    path = tuple(range(8))
    tier.store("s", path[:4], 0)  # deepest-first order of the tree: a prefix of an earlier path
    tier.store("s", path, 1)
    k1, v1 = cache.k[:, 1].clone(), cache.v[:, 1].clone()
    keys = tier.block_keys(path, "s", 2)
    assert keys[1] in tier and keys[0] in tier and tier.block_keys(path, "t", 2)[1] not in tier
    assert tier.load(keys[1], 3) and torch.equal(cache.k[:, 3], k1) and torch.equal(cache.v[:, 3], v1)
    assert not tier.load(("s", b"missing"), 2)
    assert tier.stats()["hit_tokens"] == 4
