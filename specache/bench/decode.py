"""Decode speed vs transformers generate on the same weights and dtype (interleaved, medians)."""

from __future__ import annotations

import argparse

from tqdm import tqdm

from specache.bench.engines import SpecacheEngine, TransformersEngine, text_prompts
from specache.bench.report import Timer, environment, markdown_table, median, peak_rss_mib, write_report


def add_arguments(p: argparse.ArgumentParser) -> None:
    p.add_argument("--model", default=None)
    p.add_argument("--dtype", default="float32")
    p.add_argument("--weight-format", default="dense", choices=["dense", "int8", "hybrid"])
    p.add_argument("--device", default="auto", help="cpu | cuda | auto (both engines run there)")
    p.add_argument("--repeats", type=int, default=3)
    p.add_argument("--new-tokens", type=int, default=128)
    p.add_argument("--concurrency", type=int, default=16)
    p.add_argument("--no-transformers", action="store_true", help="skip the transformers baseline")


def run(args: argparse.Namespace) -> dict:
    from specache.config import DTYPES, resolve_device

    device = resolve_device(args.device)
    ours = SpecacheEngine(args.model, args.dtype, weight_format=args.weight_format, device=str(device))
    engines = [ours]
    if not args.no_transformers:
        engines.append(TransformersEngine(ours.llm.loaded.path, DTYPES[args.dtype], device=device))
    tok = ours.llm.tokenizer
    workloads = {
        "single-stream decode": (text_prompts(tok, 1, 64, 64), args.new_tokens),
        f"{args.concurrency} concurrent (50-500 token prompts)": (
            text_prompts(tok, args.concurrency, 50, 500, seed=1), args.new_tokens),
        "TTFT, 1000-token prompt": (text_prompts(tok, 1, 1000, 1000, seed=2), 1),
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
            # one new token (the TTFT row): its time is the figure; 1 / TTFT read as a rate misleads
            row[f"{e.name} tok/s"] = tokens[(wname, e.name)] / med if workloads[wname][1] > 1 else None
        if len(engines) > 1:
            row["speedup"] = row["transformers s"] / row["specache s"]
        rows.append(row)
    cols = ["workload"] + [f"{e.name} {u}" for e in engines for u in ("tok/s", "s")] + \
        (["speedup"] if len(engines) > 1 else [])
    table = markdown_table(rows, cols) + f"\n\ndtype {args.dtype}, device {device}, " \
        f"{args.repeats} interleaved repeats, medians; peak RSS of the bench process {peak_rss_mib():.0f} MiB"
    result = {"rows": rows, "raw": {f"{k[0]}|{k[1]}": v for k, v in times.items()}, "env": environment(),
              "args": vars(args) | {"func": None}}
    write_report(args.out, f"decode-{args.dtype}-{args.weight_format}", result, table)
    return result
