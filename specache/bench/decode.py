"""Decode speed vs transformers generate on the same weights and dtype (interleaved, medians)."""

from __future__ import annotations

import argparse
import random

import torch
from tqdm import tqdm

from specache.bench.report import Timer, environment, markdown_table, median, peak_rss_mib, write_report


def add_arguments(p: argparse.ArgumentParser) -> None:
    p.add_argument("--model", default=None)
    p.add_argument("--dtype", default="float32")
    p.add_argument("--repeats", type=int, default=3)
    p.add_argument("--new-tokens", type=int, default=128)
    p.add_argument("--concurrency", type=int, default=16)
    p.add_argument("--no-transformers", action="store_true", help="skip the transformers baseline")


def _prompts(tokenizer, n: int, lo: int, hi: int, seed: int = 0) -> list[list[int]]:
    from pydoc_data.topics import topics

    text = " ".join(topics.values())
    ids = tokenizer.encode(text[:200_000])
    rng = random.Random(seed)
    out = []
    for _ in range(n):
        length = rng.randint(lo, hi)
        start = rng.randint(0, len(ids) - length - 1)
        out.append(ids[start: start + length])
    return out


class _Ours:
    name = "specache"

    def __init__(self, model, dtype):
        from specache import LLM

        self.llm = LLM(model=model, dtype=dtype, kv_cache_memory="2GiB")

    def generate(self, prompts, new_tokens):
        from specache import SamplingParams

        params = SamplingParams(max_tokens=new_tokens, temperature=0, ignore_eos=True)
        return sum(len(o.token_ids) for o in self.llm.generate(prompts, params))


class _Transformers:
    name = "transformers"

    def __init__(self, model_dir, dtype):
        from transformers import AutoModelForCausalLM

        self.model = AutoModelForCausalLM.from_pretrained(str(model_dir), dtype=dtype).eval()

    @torch.inference_mode()
    def generate(self, prompts, new_tokens):
        width = max(len(p) for p in prompts)
        ids = torch.tensor([[2] * (width - len(p)) + p for p in prompts])  # left padding
        mask = torch.tensor([[0] * (width - len(p)) + [1] * len(p) for p in prompts])
        out = self.model.generate(ids, attention_mask=mask, max_new_tokens=new_tokens, min_new_tokens=new_tokens,
                                  do_sample=False, pad_token_id=2)
        return (out.shape[1] - width) * len(prompts)


def run(args: argparse.Namespace) -> dict:
    from specache.config import DTYPES

    ours = _Ours(args.model, args.dtype)
    engines = [ours]
    if not args.no_transformers:
        engines.append(_Transformers(ours.llm.loaded.path, DTYPES[args.dtype]))
    tok = ours.llm.tokenizer
    workloads = {
        "single-stream decode": (_prompts(tok, 1, 64, 64), args.new_tokens),
        f"{args.concurrency} concurrent (50-500 token prompts)": (
            _prompts(tok, args.concurrency, 50, 500, seed=1), args.new_tokens),
        "TTFT, 1000-token prompt": (_prompts(tok, 1, 1000, 1000, seed=2), 1),
    }
    times: dict[tuple[str, str], list[float]] = {}
    tokens: dict[tuple[str, str], int] = {}
    for e in engines:  # warm-up
        e.generate(workloads["single-stream decode"][0], 4)
    steps = [(w, e) for _ in range(args.repeats) for w in workloads for e in engines]  # interleaved A B A B
    for wname, eng in tqdm(steps, desc="bench decode", unit="run"):
        prompts, new = workloads[wname]
        with Timer() as t:
            n = eng.generate(prompts, new)
        times.setdefault((wname, eng.name), []).append(t.s)
        tokens[(wname, eng.name)] = n
    rows = []
    for wname in workloads:
        row = {"workload": wname}
        for e in engines:
            med = median(times[(wname, e.name)])
            row[f"{e.name} s"] = med
            row[f"{e.name} tok/s"] = tokens[(wname, e.name)] / med
        if len(engines) > 1:
            row["speedup"] = row["transformers s"] / row["specache s"]
        rows.append(row)
    cols = ["workload"] + [f"{e.name} {u}" for e in engines for u in ("tok/s", "s")] + \
        (["speedup"] if len(engines) > 1 else [])
    table = markdown_table(rows, cols) + f"\n\ndtype {args.dtype}, {args.repeats} interleaved repeats, medians; " \
        f"peak RSS of the bench process {peak_rss_mib():.0f} MiB"
    result = {"rows": rows, "raw": {f"{k[0]}|{k[1]}": v for k, v in times.items()}, "env": environment(),
              "args": vars(args) | {"func": None}}
    write_report(args.out, f"decode-{args.dtype}", result, table)
    return result
