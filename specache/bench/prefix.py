"""Prefix caching: warm vs cold TTFT, throughput with the cache on vs off, restart with
persistence, multi-turn chat hit rate per turn, and LRU vs Belady's optimum on a trace."""

from __future__ import annotations

import argparse
import random
import tempfile

from tqdm import tqdm

from specache.bench.engines import text_prompts
from specache.bench.report import Timer, environment, markdown_table, median, write_report


def add_arguments(p: argparse.ArgumentParser) -> None:
    p.add_argument("--model", default=None)
    p.add_argument("--dtype", default="auto", help="float32 | bfloat16 | auto (the fastest on this CPU)")
    p.add_argument("--system-tokens", type=int, default=2000)
    p.add_argument("--requests", type=int, default=32)
    p.add_argument("--new-tokens", type=int, default=16)
    p.add_argument("--turns", type=int, default=10)


def _llm(args, prefix: bool, **kw):
    from specache import LLM

    return LLM(model=args.model, dtype=args.dtype, enable_prefix_caching=prefix, kv_cache_memory="2GiB", **kw)


def _ttft(llm, prompt, params) -> float:
    with Timer() as t:
        llm.generate([prompt], params)
    return t.s


def shared_prompt_study(args, rows: list[dict]) -> None:
    from specache import SamplingParams

    on = _llm(args, True)
    tok = on.tokenizer
    system = text_prompts(tok, 1, args.system_tokens, args.system_tokens, seed=7)[0]
    questions = text_prompts(tok, args.requests, 50, 50, seed=8)
    prompts = [system + q for q in questions]
    one = SamplingParams(max_tokens=1, temperature=0)
    cold = _ttft(on, prompts[0], one)
    warm = median([_ttft(on, p, one) for p in prompts[1:6]])
    rows.append({"measure": "TTFT cold (s)", "value": cold})
    rows.append({"measure": "TTFT warm (s)", "value": warm})
    rows.append({"measure": "warm / cold TTFT", "value": warm / cold})
    params = SamplingParams(max_tokens=args.new_tokens, temperature=0, ignore_eos=True)
    off = _llm(args, False)
    tput = {}
    for name, llm in (("off", off), ("on", on)):
        with Timer() as t:
            outs = llm.generate(prompts, params)
        tput[name] = (sum(len(o.prompt_token_ids) + len(o.token_ids) for o in outs)) / t.s
    rows.append({"measure": f"throughput, {args.requests} requests, cache off (tok/s)", "value": tput["off"]})
    rows.append({"measure": f"throughput, {args.requests} requests, cache on (tok/s)", "value": tput["on"]})
    rows.append({"measure": "throughput on / off", "value": tput["on"] / tput["off"]})
    with tempfile.TemporaryDirectory() as d:
        with _llm(args, True, prefix_cache_dir=d) as first:
            first.generate([prompts[0]], one)
        restarted = _llm(args, True, prefix_cache_dir=d)
        out = restarted.generate([prompts[1]], one)[0]
        rows.append({"measure": "after restart: first request's cached tokens", "value": out.metrics["cached_tokens"]})
        rows.append({"measure": "after restart: first request TTFT (s)", "value": _ttft(restarted, prompts[2], one)})


def multi_turn_study(args) -> list[dict]:
    from specache import SamplingParams

    llm = _llm(args, True)
    msgs = [{"role": "system", "content": "You are a concise assistant."}]
    rows = []
    for turn in tqdm(range(args.turns), desc="multi-turn", unit="turn"):
        msgs.append({"role": "user", "content": f"Question {turn + 1}: name one fact about the number {turn + 7}."})
        out = llm.chat(msgs, SamplingParams(max_tokens=24, temperature=0))[0]
        msgs.append({"role": "assistant", "content": out.text})
        m = out.metrics
        rows.append({"turn": turn + 1, "prompt tokens": m["prompt_tokens"], "cached tokens": m["cached_tokens"],
                     "hit rate": m["cached_tokens"] / m["prompt_tokens"]})
    return rows


def eviction_study(num_blocks: int = 64, block: int = 16, docs: int = 40, requests: int = 600, seed: int = 0
                   ) -> list[dict]:
    """Replay a Zipf-popular document trace under a tight block budget: LRU (our radix tree) vs Belady."""
    from specache.kv.block_pool import BlockPool
    from specache.prefix.radix import RadixCache

    rng = random.Random(seed)
    weights = [1 / (i + 1) for i in range(docs)]
    doc_tokens = {d: [rng.randrange(50_000) for _ in range(block * rng.randint(2, 8))] for d in range(docs)}
    trace = [rng.choices(range(docs), weights)[0] for _ in range(requests)]
    # LRU through the real radix tree
    pool = BlockPool(num_blocks, block)
    tree = RadixCache(pool, block)
    hit = total = 0
    for d in trace:
        toks = doc_tokens[d] + [0]
        m = tree.match_prefix(toks)
        hit += len(m.block_ids)
        need = len(doc_tokens[d]) // block
        total += need
        missing = need - len(m.block_ids)
        if missing > pool.num_free:
            tree.evict(missing - pool.num_free)
        if missing <= pool.num_free:
            new = pool.allocate(missing)
            tree.insert(doc_tokens[d], list(m.block_ids) + new)
            pool.free(new)
    lru = hit / total
    return [{"policy": "LRU (radix tree)", "block hit rate": lru},
            {"policy": "Belady (offline optimum)", "block hit rate": _belady(trace, doc_tokens, block, num_blocks)},
            {"policy": "LRU / Belady", "block hit rate": lru / max(_belady(trace, doc_tokens, block, num_blocks),
                                                                     1e-9)}]


def _belady(trace, doc_tokens, block, capacity) -> float:
    """Block-level Belady: on a miss evict the cached block whose next use is furthest away."""
    blocks_of = {d: [(d, i) for i in range(len(toks) // block)] for d, toks in doc_tokens.items()}
    next_use: list[dict] = [{} for _ in trace]
    upcoming: dict = {}
    for t in range(len(trace) - 1, -1, -1):
        next_use[t] = dict(upcoming)
        for b in blocks_of[trace[t]]:
            upcoming[b] = t
    cache: set = set()
    hit = total = 0
    for t, d in enumerate(trace):
        for b in blocks_of[d]:
            total += 1
            if b in cache:
                hit += 1
                continue
            if len(cache) >= capacity:
                # never evict a block of the current request
                victim = max((c for c in cache if c[0] != d), key=lambda c: next_use[t].get(c, 1 << 30),
                             default=None)
                if victim is None:
                    continue
                cache.discard(victim)
            cache.add(b)
    return hit / total


def run(args: argparse.Namespace) -> dict:
    rows: list[dict] = []
    shared_prompt_study(args, rows)
    turns = multi_turn_study(args)
    eviction = eviction_study()
    table = (markdown_table(rows, ["measure", "value"]) + "\n\n## Multi-turn chat\n\n"
             + markdown_table(turns, ["turn", "prompt tokens", "cached tokens", "hit rate"])
             + "\n\n## Eviction under a 64-block budget (Zipf trace of 40 documents, 600 requests)\n\n"
             + markdown_table(eviction, ["policy", "block hit rate"]))
    table += (f"\n\n{args.system_tokens}-token shared system prompt + 50-token questions, {args.requests} requests, "
              f"dtype {args.dtype}.")
    result = {"shared": rows, "multi_turn": turns, "eviction": eviction, "env": environment()}
    write_report(args.out, "prefix", result, table)
    return result
