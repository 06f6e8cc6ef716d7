"""specache vs transformers vs llama.cpp on the same weights: prefill, decode, concurrency,
prompt lookup. Interleaved repeats, medians; JSON + markdown + PNG plots in docs/."""

from __future__ import annotations

import argparse
from pathlib import Path

import torch
from tqdm import tqdm

from specache.bench.engines import (
    LlamaCppEngine,
    SpecacheEngine,
    TransformersEngine,
    llama_cpp_available,
    text_prompts,
)
from specache.bench.report import Timer, environment, markdown_table, median, write_report


def add_arguments(p: argparse.ArgumentParser) -> None:
    p.add_argument("--repeats", type=int, default=3)
    p.add_argument("--new-tokens", type=int, default=128)
    p.add_argument("--docs", default="docs", help="where benchmarks.md and the plots go")


def _copy_heavy(tok) -> list[list[int]]:
    """Prompts whose answer repeats the input (the prompt-lookup case)."""
    from pydoc_data.topics import topics

    docs = [topics["assert"][:900], topics["pass"][:900]]
    return [tok.encode(tok.apply_chat_template([{"role": "user", "content": f"Repeat this text exactly:\n\n{d}"}]))
            for d in docs]


def _fast_specache(**options) -> SpecacheEngine:
    """Our fastest CPU set-up: hybrid int8 weights, activations in the dtype this CPU computes fastest
    (bf16 with AVX512-BF16/AMX, else fp32); named after what it resolved to."""
    engine = SpecacheEngine(dtype="auto", weight_format="hybrid", **options)
    dtype = str(engine.llm.engine.model.dtype).removeprefix("torch.").replace("bfloat16", "bf16")
    dtype = dtype.replace("float32", "fp32")
    engine.name = f"specache int8+{dtype}" + (" ngram" if options.get("speculative") else "")
    return engine


def _engines() -> list:
    from specache.config import cpu_has_bf16
    from specache.models.loader import default_gguf_path

    ours = _fast_specache()
    engines = [ours, SpecacheEngine(dtype="float32", name="specache fp32"),
               TransformersEngine(ours.llm.loaded.path, torch.float32, name="transformers fp32")]
    if cpu_has_bf16():  # without native bf16 (AVX2) transformers bf16 is only slower than its fp32
        engines.append(TransformersEngine(ours.llm.loaded.path, torch.bfloat16, name="transformers bf16"))
    if llama_cpp_available():
        engines.append(LlamaCppEngine(default_gguf_path(), name="llama.cpp Q4_1"))
    return engines


def _lookup_engines(ours_path) -> list:
    from specache.config import cpu_has_bf16
    from specache.models.loader import default_gguf_path

    engines = [_fast_specache(speculative="ngram"),
               TransformersEngine(ours_path, torch.bfloat16 if cpu_has_bf16() else torch.float32,
                                  name="transformers prompt_lookup", prompt_lookup_num_tokens=4)]
    if llama_cpp_available():
        engines.append(LlamaCppEngine(default_gguf_path(), prompt_lookup=4, name="llama.cpp Q4_1 prompt lookup"))
    return engines


def _measure(engines, workloads, repeats) -> dict:
    times: dict[tuple[str, str], list[float]] = {}
    tokens: dict[tuple[str, str], int] = {}
    for e in engines:
        e.generate(next(iter(workloads.values()))[0][:1], 4)  # warm-up
    steps = [(w, e) for _ in range(repeats) for w in workloads for e in engines]
    for wname, eng in tqdm(steps, desc="bench peers", unit="run"):
        prompts, new = workloads[wname]
        with Timer() as t:
            n = eng.generate(prompts, new)
        times.setdefault((wname, eng.name), []).append(t.s)
        tokens[(wname, eng.name)] = n if new > 1 else sum(len(p) for p in prompts)
    return {k: tokens[k] / median(v) for k, v in times.items()}


def run(args: argparse.Namespace) -> dict:
    engines = _engines()
    tok = engines[0].llm.tokenizer
    n = args.new_tokens
    workloads = {
        "prefill (1000-token prompt), tok/s": (text_prompts(tok, 1, 1000, 1000, seed=2), 1),
        "decode, 1 stream": (text_prompts(tok, 1, 64, 64), n),
        "decode, 4 concurrent": (text_prompts(tok, 4, 50, 500, seed=1), n),
        "decode, 16 concurrent": (text_prompts(tok, 16, 50, 500, seed=3), n),
    }
    tps = _measure(engines, workloads, args.repeats)
    lookup_engines = _lookup_engines(engines[0].llm.loaded.path)
    lookup = _measure(lookup_engines + engines[:1], {"prompt lookup, copy-heavy": (_copy_heavy(tok), n)},
                      args.repeats)
    rows = []
    for w in workloads:
        row = {"workload": w} | {e.name: tps[(w, e.name)] for e in engines}
        rows.append(row)
    lookup_row = {"workload": "prompt lookup, copy-heavy"} | {k[1]: v for k, v in lookup.items()}
    names = [e.name for e in engines]
    table = markdown_table(rows, ["workload"] + names) + "\n\n" + \
        markdown_table([lookup_row], ["workload"] + list(lookup_row)[1:])
    table += _ratios(rows, names)
    result = {"rows": rows, "lookup": lookup_row, "env": environment()}
    out = write_report(args.out, "peers", result, table)
    _plot(rows, names, Path(args.docs))
    _write_docs(Path(args.docs), table, out)
    return result


def _ratios(rows, names) -> str:
    ours = names[0]
    lines = ["", "", f"Ratios of {ours} against each peer (higher is better):", ""]
    for r in rows:
        parts = [f"{n}: {r[ours] / r[n]:.2f}x" for n in names[1:] if r.get(n)]
        lines.append(f"- {r['workload']}: " + ", ".join(parts))
    return "\n".join(lines)


def _plot(rows, names, docs: Path) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    docs.mkdir(parents=True, exist_ok=True)
    conc = [r for r in rows if r["workload"].startswith("decode")]
    xs = [1, 4, 16]
    fig, ax = plt.subplots(figsize=(6, 4))
    for n in names:
        ax.plot(xs, [r[n] for r in conc], marker="o", label=n)
    ax.set_xscale("log", base=2)
    ax.set_xticks(xs, [str(x) for x in xs])
    ax.set_xlabel("concurrent requests")
    ax.set_ylabel("generated tokens/s")
    ax.set_title("Decode throughput vs concurrency (SmolLM2-135M, 2 CPU cores)")
    ax.legend(fontsize=8)
    fig.tight_layout()
    fig.savefig(docs / "peers-throughput.png", dpi=120)
    plt.close(fig)


def _write_docs(docs: Path, table: str, out: Path) -> None:
    env = environment()
    text = ("# Benchmarks against peers\n\n"
            "`make bench-peers` (installs llama-cpp-python from source, then runs `specache bench peers`).\n"
            f"Machine: {env['cpu']} ({env['cpu_capability']}), {env['threads']} threads, torch {env['torch']}.\n\n"
            f"{table}\n\n![throughput vs concurrency](peers-throughput.png)\n\n"
            "Notes: all engines decode greedily and never stop early, 128 new tokens per request. "
            "llama.cpp runs through llama-cpp-python's high-level API, which serves one sequence at a "
            "time, so its concurrent rows are sequential (the llama.cpp server with parallel slots would "
            "batch). On CPUs with AMX it is loaded without ggml's extra buffer types: their AMX kernels "
            "die with SIGILL on this project's VMs. `specache int8+bf16` is `weight_format=\"hybrid\"`: "
            "int8 weights through specache's native kernels (each activation row split into two int8 "
            "limbs, multiplied on AMX tiles or by AVX512-VNNI; a whole decode step in one native call) "
            "for decode steps and prefill chunks up to a row count calibrated at load, the dense bf16 "
            "weights for longer prefill chunks.\n\n"
            f"Raw JSON: `{out}/peers.json`.\n")
    if (docs / "spec-speedup.png").exists():  # written by `specache bench spec`
        text += ("\n## Speculative decoding per method and task\n\n`specache bench spec`; table in the README.\n\n"
                 "![speedup per method and task](spec-speedup.png)\n")
    (docs / "benchmarks.md").write_text(text)
