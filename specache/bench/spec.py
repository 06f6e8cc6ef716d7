"""Speculative decoding: speedup, acceptance and mean accepted length per method and task,
side by side with our plain decode and transformers' prompt lookup / assisted generation."""

from __future__ import annotations

import argparse
import json
from dataclasses import replace
from pathlib import Path

import torch
from tqdm import tqdm

from specache.bench.report import Timer, environment, markdown_table, median, write_report

CODE = '''def total_price(items, tax_rate):
    subtotal = 0
    for item in items:
        subtotal += item["price"] * item["quantity"]
    tax = subtotal * tax_rate
    return subtotal + tax


def apply_discount(total, code):
    if code == "SAVE10":
        return total * 0.9
    if code == "SAVE20":
        return total * 0.8
    return total
'''
RECORD = ("Invoice 4471 was issued on 12 March 2024 by Northwind Traders to Contoso Ltd for 37 units of "
          "part AX-200 at 14.50 EUR each, payable within 30 days to IBAN-free account 55-1029.")

TASKS = {
    # Code first, instruction after: asked the other way round, SmolLM2-135M answered in ~20 tokens
    # without writing the code, and the cell measured prefill instead of editing.
    "code edit": [f"```python\n{CODE}```\n\nRewrite the code above with the variable `subtotal` renamed to `net`. "
                  "Reply with the full code only.",
                  f"Fix the indentation of this code and return it:\n\n```python\n{CODE}```"],
    "summarise with quotes": ["Summarise the following text, quoting its key sentences verbatim:\n\n{doc}"],
    "extract fields": [f"Copy this record, then list its invoice number, date, seller, buyer, quantity and unit "
                       f"price, one per line:\n\n{RECORD}"],
    "multi-turn repeat": ["__multiturn__"],
    "open-ended chat": ["Write a short story about a lighthouse keeper who finds a message in a bottle.",
                        "What are some good habits for staying healthy while working from home?"],
}
GROUNDED = ["code edit", "summarise with quotes", "extract fields", "multi-turn repeat"]


def add_arguments(p: argparse.ArgumentParser) -> None:
    p.add_argument("--model", default=None)
    p.add_argument("--dtype", default="float32")
    p.add_argument("--weight-format", default="dense", choices=["dense", "int8", "hybrid"],
                   help="the target's weights (plain decode runs on the same)")
    p.add_argument("--methods", default="ngram,lookahead,layer-skip:8,quantized,auto,draft")
    p.add_argument("--temperatures", default="0,0.7")
    p.add_argument("--batches", default="1,4,16",
                   help="batch sizes for the batch study (each method vs plain; empty: none)")
    p.add_argument("--new-tokens", type=int, default=96)
    p.add_argument("--num-spec-tokens", type=int, default=16)
    p.add_argument("--repeats", type=int, default=1)
    p.add_argument("--no-transformers", action="store_true")
    p.add_argument("--docs", default="docs", help="where the speedup plot goes")


def _chat(tok, task: str, prompt: str) -> list[int]:
    from pydoc_data.topics import topics

    if prompt == "__multiturn__":
        answer = ("Sure. A good morning routine: wake at a fixed time, drink a glass of water, stretch for five "
                  "minutes, write down the three most important tasks of the day, and avoid email for the "
                  "first hour.")
        msgs = [{"role": "user", "content": "Give me a simple morning routine."},
                {"role": "assistant", "content": answer},
                {"role": "user", "content": "Thanks! Please repeat your previous answer word for word."}]
    else:
        msgs = [{"role": "user", "content": prompt.format(doc=topics["assert"][:1200])}]
    return tok.encode(tok.apply_chat_template(msgs))


def make_truncated_draft(model_dir: Path, layers: int, out: Path) -> Path:
    """A smaller model with the same tokenizer: the target's first `layers` layers (draft:PATH demo)."""
    import shutil

    from safetensors.torch import load_file, save_file

    if (out / "config.json").exists():
        return out
    out.mkdir(parents=True, exist_ok=True)
    cfg = json.loads((model_dir / "config.json").read_text())
    cfg["num_hidden_layers"] = layers
    cfg.pop("specache", None)
    weights = {k: v for k, v in load_file(str(model_dir / "model.safetensors")).items()
               if not k.startswith("model.layers.") or int(k.split(".")[2]) < layers}
    save_file(weights, str(out / "model.safetensors"), metadata={"format": "pt"})
    (out / "config.json").write_text(json.dumps(cfg))
    for name in ("tokenizer.json", "tokenizer_config.json", "chat_template.jinja"):
        if (model_dir / name).exists():
            shutil.copy(model_dir / name, out / name)
    return out


def _ours(model, dtype, method, k, weight_format="dense"):
    from specache import LLM

    spec = None if method == "plain" else method
    return LLM(model=model, dtype=dtype, speculative=spec, num_spec_tokens=k, kv_cache_memory="1GiB",
               weight_format=weight_format)


def _seeded(params, repeat: int):
    """A sampled cell's params for one repeat: each repeat samples another text (seed = the repeat),
    so the cell averages over texts instead of timing one text again; greedy params as they are."""
    return params if params.greedy else replace(params, seed=repeat)


def _time_ours(llm, prompts, params, repeats, one_at_a_time=False, first_repeat=0):
    """Tokens per second over the prompts, as one batch or (one_at_a_time) each request alone, one
    after the other: the latency a request sees, which is what speculation is for, and how the
    transformers rows are timed. Repeat r samples with seed first_repeat + r (see _seeded)."""
    from specache import SamplingParams

    llm.generate(prompts[:1], SamplingParams(max_tokens=4, temperature=0))  # warm-up: first-call costs
    model_tokens_before = _model_draft_tokens(llm)
    batches = [[p] for p in prompts] if one_at_a_time else [prompts]
    times, decode_times, outs = [], [], None
    for repeat in range(first_repeat, first_repeat + repeats):
        outs, total, decode = [], 0.0, 0.0
        for batch in batches:
            with Timer() as t:
                got = llm.generate(batch, _seeded(params, repeat))
            total += t.s
            # The decode phase: after every prompt's first token (prefill is the same work with or
            # without speculation, and for long prompts it caps the end-to-end ratio).
            decode += t.s - max(o.metrics["ttft_s"] for o in got)
            outs += got
        times.append(total)
        decode_times.append(decode)
    toks = sum(len(o.token_ids) for o in outs)
    drafted = sum(o.metrics["spec_draft_tokens"] for o in outs)
    accepted = sum(o.metrics["spec_accepted_tokens"] for o in outs)
    draft_steps = sum(o.metrics["spec_draft_steps"] for o in outs)
    passes = sum(o.metrics["target_passes"] for o in outs)
    lengths = [o.metrics["spec_mean_accepted_length"] for o in outs if o.metrics["spec_mean_accepted_length"]]
    return {"s": median(times), "decode s": median(decode_times), "tokens": toks, "tok/s": toks / median(times),
            "decode tok/s": (toks - len(outs)) / median(decode_times),
            "acceptance": accepted / drafted if drafted else None,
            "mean accepted length": sum(lengths) / len(lengths) if lengths else None,
            "mean K": drafted / draft_steps if draft_steps else 0.0,
            # of the decode steps (each sequence's first token came from its prefill, never drafted)
            "steps drafted": draft_steps / (passes - len(outs)) if passes > len(outs) else 0.0,
            "seed-formula speedup": seed_formula_speedup(toks, passes, _paid_draft_cost(llm, model_tokens_before,
                                                                                        drafted)),
            "outputs": [o.token_ids for o in outs]}


def seed_formula_speedup(tokens: int, passes: int, draft_cost: float) -> float:
    """The seed formula's speedup, (1 - alpha^(K+1)) / ((1 - alpha)(K c + 1)), with its expected
    tokens per pass replaced by the run's own count: the tokens each target pass produced, against
    passes that cost one plain step each (verifying K + 1 tokens as cheap as decoding one) plus c
    per paid drafted token (draft_cost: c x those tokens). It equals the closed form at the fitted
    alpha when every step drafts K, and also covers steps that drafted less or nothing."""
    cost = passes + draft_cost
    return tokens / cost if cost else 1.0


def lookup_ceiling(prompts: list[list[int]], outputs: list[list[int]], k: int) -> float:
    """The most prompt lookup could gain on a task's greedy outputs, its requests decoded one after
    the other: their plain decode steps over the passes they would need if every step drafted k
    tokens and verifying k + 1 tokens cost what decoding one does (replay_passes)."""
    from specache.spec.ngram import replay_passes

    plain = sum(len(o) - 1 for o in outputs)
    lookup = sum(replay_passes(p, o, k) for p, o in zip(prompts, outputs, strict=True))
    return plain / lookup if lookup else 1.0


def end_to_end_ceiling(total_s: float, decode_s: float, decode_ceiling: float) -> float:
    """The lookup ceiling over a whole request: prefill (total - decode) takes as long with
    speculation as without, so at most total / (prefill + decode / ceiling) (Amdahl)."""
    return total_s / (total_s - decode_s + decode_s / decode_ceiling) if decode_ceiling > 0 else 1.0


def _model_draft_tokens(llm) -> int | None:
    """Tokens a model has drafted so far where the proposer mixes lookups and a model (auto), else None."""
    return getattr(llm.engine.spec.proposer, "model_draft_tokens", None) if llm.engine.spec is not None else None


def _paid_draft_cost(llm, model_tokens_before: int | None, drafted: int) -> float:
    """c x the run's drafted tokens that cost a drafting pass: the controller's measured cost of
    drafting one token over a plain step; lookups cost nothing, and of auto's drafts only the
    model's tokens count."""
    spec = llm.engine.spec
    if spec is None or spec.proposer.free_to_draft:
        return 0.0
    ratio = spec.controller.draft_cost_ratio()
    now = _model_draft_tokens(llm)  # None for a proposer that only drafts with a model
    paid = drafted if now is None else now - model_tokens_before
    return ratio * paid


def _time_paired(llm, plain_llm, prompts, params, repeats, one_at_a_time=False) -> tuple[dict, float]:
    """The method and plain decode alternately (A B, B A, A B ...), so a machine whose speed drifts
    over the minutes of a benchmark slows both alike and neither always runs first; the speedup is
    the median of the pairs' ratios. Both sides of a pair sample with the same seed; "output =
    plain" says whether every pair's texts were equal (greedy; and sampled under drafts without a
    q, which verification keeps plain sampling's own text)."""
    pairs = []
    for i in range(repeats):
        if i % 2:
            plain = _time_ours(plain_llm, prompts, params, 1, one_at_a_time, first_repeat=i)
            pairs.append((_time_ours(llm, prompts, params, 1, one_at_a_time, first_repeat=i), plain))
        else:
            pairs.append((_time_ours(llm, prompts, params, 1, one_at_a_time, first_repeat=i),
                          _time_ours(plain_llm, prompts, params, 1, one_at_a_time, first_repeat=i)))
    ratios = [m["tok/s"] / p["tok/s"] for m, p in pairs]
    result = dict(pairs[-1][0])
    result["output = plain"] = all(m["outputs"] == p["outputs"] for m, p in pairs)
    result["tok/s"] = median([m["tok/s"] for m, _ in pairs])
    result["plain tok/s"] = median([p["tok/s"] for _, p in pairs])
    result["decode speedup"] = median([m["decode tok/s"] / p["decode tok/s"] for m, p in pairs])
    for key in ("seed-formula speedup", "mean K", "steps drafted"):
        result[key] = median([m[key] for m, _ in pairs])
    return result, median(ratios)


def run(args: argparse.Namespace) -> dict:
    from specache import SamplingParams
    from specache.models.loader import resolve_model_path

    model_dir = resolve_model_path(args.model)
    draft_dir = make_truncated_draft(model_dir, 6, Path(args.out) / "draft-6-layers")
    methods = ["plain"] + [f"draft:{draft_dir}" if m == "draft" else m for m in args.methods.split(",")]
    rows, batch_rows = [], []
    plain_tps: dict[tuple[str, float], float] = {}
    plain_llm = _ours(str(model_dir), args.dtype, "plain", args.num_spec_tokens, args.weight_format)
    for method in tqdm(methods, desc="bench spec", unit="method"):
        llm = plain_llm if method == "plain" else _ours(str(model_dir), args.dtype, method, args.num_spec_tokens,
                                                        args.weight_format)
        tok = llm.tokenizer
        for temp in [float(t) for t in args.temperatures.split(",")]:
            params = SamplingParams(max_tokens=args.new_tokens, temperature=temp, seed=0)
            for task, prompts in TASKS.items():
                ids = [_chat(tok, task, p) for p in prompts]
                key = (task, temp)
                if method == "plain":
                    r = _time_ours(llm, ids, params, args.repeats, one_at_a_time=True)
                    plain_tps[key], speedup = r["tok/s"], 1.0
                else:
                    r, speedup = _time_paired(llm, plain_llm, ids, params, args.repeats, one_at_a_time=True)
                row = {"method": method.split("/")[-1] if method.startswith("draft:") else method,
                       "task": task, "temperature": temp, "tok/s": r["tok/s"],
                       "speedup": speedup, "decode speedup": r.get("decode speedup", 1.0),
                       "seed-formula speedup": r["seed-formula speedup"], "acceptance": r["acceptance"],
                       "mean accepted length": r["mean accepted length"]}
                if method != "plain":
                    row["output = plain"] = r["output = plain"]
                if temp == 0 and method == "plain":
                    ceiling = lookup_ceiling(ids, r["outputs"], args.num_spec_tokens)
                    row["lookup ceiling"] = ceiling
                    row["lookup ceiling, end to end"] = end_to_end_ceiling(r["s"], r["decode s"], ceiling)
                rows.append(row)
        if llm.engine.spec is not None:  # the tasks' record, before the batch study adds to it
            rows[-1]["controller"] = json.dumps(llm.engine.spec.stats(), default=str)[:200]
        if method != "plain":
            batch_rows += _batch_study(llm, plain_llm, rows[-1]["method"], args)
        if llm is not plain_llm:
            del llm
    if not args.no_transformers:
        rows += _transformers_rows(model_dir, draft_dir, args, plain_tps)
    cols = ["method", "task", "temperature", "tok/s", "speedup", "decode speedup", "seed-formula speedup",
            "acceptance", "mean accepted length", "output = plain", "lookup ceiling",
            "lookup ceiling, end to end"]
    table = markdown_table(rows, cols) + "\n\n## Batch study (temperature 0)\n\n" + \
        markdown_table(batch_rows, ["method", "batch", "tok/s", "speedup", "mean K", "steps drafted", "output = plain"])
    result = {"rows": rows, "batch": batch_rows, "env": environment(), "args": {k: v for k, v in vars(args).items()
                                                                                if k != "func"}}
    write_report(args.out, "spec", result, table)
    plot_speedups(rows, Path(args.docs))
    return result


def plot_speedups(rows: list[dict], docs: Path) -> Path:
    """docs/spec-speedup.png: speedup over our plain decode per method and task (temperature 0)."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    greedy = [r for r in rows if r["temperature"] == 0 and r["method"] != "plain" and r.get("speedup")]
    methods = list(dict.fromkeys(r["method"] for r in greedy))
    tasks = list(TASKS)
    width = 0.8 / max(len(methods), 1)
    fig, ax = plt.subplots(figsize=(9, 4))
    for i, m in enumerate(methods):
        by_task = {r["task"]: r["speedup"] for r in greedy if r["method"] == m}
        ax.bar([t + i * width for t in range(len(tasks))], [by_task.get(t, 0) for t in tasks], width, label=m)
    ax.axhline(1.0, color="black", linewidth=0.8)
    ax.set_xticks([t + width * (len(methods) - 1) / 2 for t in range(len(tasks))], tasks, fontsize=8)
    ax.set_ylabel("speedup over plain decode")
    ax.set_title("Speculative decoding, temperature 0 (SmolLM2-135M, 2 CPU cores)")
    ax.legend(fontsize=7, ncol=2)
    fig.tight_layout()
    docs.mkdir(parents=True, exist_ok=True)
    out = docs / "spec-speedup.png"
    fig.savefig(out, dpi=120)
    plt.close(fig)
    return out


def _batch_study(llm, plain_llm, method, args) -> list[dict]:
    """The method against plain decode at growing batch sizes, timed in alternating pairs, with the K
    the controller chose: the mean draft of the steps that drafted, and the share of steps that did;
    and whether the batch's greedy texts equal plain decoding's."""
    from specache import SamplingParams

    params = SamplingParams(max_tokens=args.new_tokens, temperature=0)
    tok = llm.tokenizer
    grounded = [_chat(tok, t, p) for t in GROUNDED for p in TASKS[t]]
    out = []
    for b in [int(x) for x in args.batches.split(",") if x]:
        prompts = (grounded * (b // len(grounded) + 1))[:b]
        r, speedup = _time_paired(llm, plain_llm, prompts, params, args.repeats)
        out += [{"method": f"plain (vs {method})", "batch": b, "tok/s": r["plain tok/s"]},
                {"method": method, "batch": b, "tok/s": r["tok/s"], "speedup": speedup, "mean K": r["mean K"],
                 "steps drafted": r["steps drafted"], "output = plain": r["output = plain"]}]
    return out


def _transformers_rows(model_dir, draft_dir, args, plain_tps) -> list[dict]:
    from transformers import AutoModelForCausalLM

    from specache.config import DTYPES
    from specache.models.tokenizer import Tokenizer

    dtype = DTYPES[args.dtype]
    target = AutoModelForCausalLM.from_pretrained(str(model_dir), dtype=dtype).eval()
    assistant = AutoModelForCausalLM.from_pretrained(str(draft_dir), dtype=dtype).eval()
    tok = Tokenizer.from_dir(model_dir, [])  # the same prompt ids as our rows
    variants = {"transformers plain": {}, "transformers prompt_lookup": {"prompt_lookup_num_tokens": 4},
                "transformers assistant_model": {"assistant_model": assistant}}
    rows = []
    for name, kwargs in variants.items():
        for task, prompts in TASKS.items():
            times, n = [], 0
            for p in prompts:
                ids = torch.tensor([_chat(tok, task, p)])
                with Timer() as t, torch.inference_mode():
                    out = target.generate(ids, max_new_tokens=args.new_tokens, do_sample=False, pad_token_id=2,
                                          **kwargs)
                times.append(t.s)
                n += out.shape[1] - ids.shape[1]
            tps = n / sum(times)
            rows.append({"method": name, "task": task, "temperature": 0.0, "tok/s": tps,
                         "speedup": tps / plain_tps[(task, 0.0)]})
    return rows
