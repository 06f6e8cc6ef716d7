"""Quality of each weight format: perplexity on a fixed text and greedy agreement with fp32."""

from __future__ import annotations

import argparse
import math

import torch
from tqdm import tqdm

from specache.bench.report import environment, markdown_table, write_report

FORMATS = [("float32", "dense"), ("bfloat16", "dense"), ("bfloat16", "int8"), ("bfloat16", "hybrid")]
PROMPTS = ["Explain how a hash table works.", "Write a limerick about a cat.", "What causes the seasons?",
           "Give three tips for writing clean code.", "Summarise the plot of Hamlet in two sentences.",
           "How do vaccines train the immune system?", "Translate 'good morning' into French and Spanish.",
           "What is the difference between TCP and UDP?"]


def add_arguments(p: argparse.ArgumentParser) -> None:
    p.add_argument("--model", default=None)
    p.add_argument("--ppl-tokens", type=int, default=2048)
    p.add_argument("--new-tokens", type=int, default=48)


def perplexity(llm, ids: list[int], chunk: int = 256) -> float:
    """Teacher-forced perplexity through the engine's own paged cache, chunk by chunk."""
    from specache.engine.runner import BatchItem
    from specache.engine.sequence import Sequence
    from specache.sampling import SamplingParams

    eng = llm.engine
    seq = Sequence(-1, "ppl", 0, ids, SamplingParams(temperature=0))
    seq.block_table = eng.pool.allocate(eng.pool.blocks_needed(len(ids)))
    nll, count = 0.0, 0
    try:
        for start in range(0, len(ids) - 1, chunk):
            piece = ids[start: start + chunk]
            logits = eng.runner.run([BatchItem(seq, piece, start, len(piece))])[0]
            targets = torch.tensor(ids[start + 1: start + 1 + len(piece)])
            logp = torch.log_softmax(logits[: len(targets)].float(), dim=-1)
            nll -= logp.gather(1, targets[:, None]).sum().item()
            count += len(targets)
    finally:
        eng.pool.free(seq.block_table)
    return math.exp(nll / count)


def run(args: argparse.Namespace) -> dict:
    from pydoc_data.topics import topics

    from specache import LLM, SamplingParams

    text = " ".join(topics[k] for k in sorted(topics))
    params = SamplingParams(max_tokens=args.new_tokens, temperature=0)
    rows, reference = [], None
    for dtype, fmt in tqdm(FORMATS, desc="bench quality", unit="format"):
        llm = LLM(model=args.model, dtype=dtype, weight_format=fmt, kv_cache_memory="512MiB")
        ids = llm.tokenizer.encode(text[: args.ppl_tokens * 8])[: args.ppl_tokens]
        chats = [llm.tokenizer.encode(llm.tokenizer.apply_chat_template([{"role": "user", "content": p}]))
                 for p in PROMPTS]
        outs = [llm.generate([c], params)[0].token_ids for c in chats]
        reference = reference or outs
        agree = [_common_prefix(a, b) / max(len(b), 1) for a, b in zip(outs, reference, strict=True)]
        rows.append({"dtype": dtype, "weights": fmt, "perplexity": perplexity(llm, ids),
                     "greedy agreement vs fp32": sum(agree) / len(agree),
                     "identical outputs": sum(a == b for a, b in zip(outs, reference, strict=True))})
        del llm
    table = markdown_table(rows, ["dtype", "weights", "perplexity", "greedy agreement vs fp32",
                                  "identical outputs"])
    table += (f"\n\nperplexity over {args.ppl_tokens} tokens of CPython's language reference (pydoc_data); "
              f"agreement = mean share of the fp32 greedy continuation ({args.new_tokens} tokens, "
              f"{len(PROMPTS)} chat prompts) reproduced before the first difference")
    result = {"rows": rows, "env": environment()}
    write_report(args.out, "quality", result, table)
    return result


def _common_prefix(a: list[int], b: list[int]) -> int:
    n = 0
    for x, y in zip(a, b, strict=False):
        if x != y:
            break
        n += 1
    return n
