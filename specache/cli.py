"""`specache serve | generate | chat | bench | kv-size | convert | cache-eval`."""

from __future__ import annotations

import argparse
import json
import sys

from specache.errors import SpecacheError

SERVER_PREFIX_CPU_CACHE = "256MiB"


def add_engine_args(p: argparse.ArgumentParser) -> None:
    p.add_argument("--model", default=None, help="GGUF file or Hugging Face directory (default: SmolLM2-135M)")
    p.add_argument("--dtype", default="auto", help="float32 | bfloat16 | auto")
    p.add_argument("--device", default="auto", help="cpu | cuda | auto")
    p.add_argument("--weight-format", default="dense", choices=["dense", "int8", "hybrid"],
                   help="int8: weight-only int8 (fast decode); hybrid: int8 for decode rows, "
                        "dense weights for batches and prefill")
    p.add_argument("--kv-cache-memory", default="1GiB", help="KV cache budget, e.g. 512MiB, 2GiB")
    p.add_argument("--block-size", type=int, default=16)
    p.add_argument("--max-num-seqs", type=int, default=32)
    p.add_argument("--max-num-batched-tokens", type=int, default=2048)
    p.add_argument("--max-model-len", type=int, default=None)
    p.add_argument("--enable-prefix-caching", action=argparse.BooleanOptionalAction, default=None)
    p.add_argument("--prefix-cache-dir", default=None, help="persist the prefix cache here across restarts")
    p.add_argument("--prefix-cpu-cache-memory", default=None,
                   help="host memory for prefix-cache blocks evicted from the KV cache, copied back on a hit "
                        f"instead of recomputed (0: off; default {SERVER_PREFIX_CPU_CACHE} for serve/chat, 0 else)")
    p.add_argument("--warmup-prompts", default=None, help="file of prompts to prefill at start")
    p.add_argument("--speculative", default=None,
                   help="ngram | draft:PATH | layer-skip:L | quantized | lookahead | auto")
    p.add_argument("--num-spec-tokens", type=int, default=16)
    p.add_argument("--spec-adaptive", action=argparse.BooleanOptionalAction, default=True,
                   help="let the controller pick K per step (and 0 when speculation does not pay)")


def engine_options(args: argparse.Namespace, prefix_default: bool) -> dict:
    prefix = args.enable_prefix_caching
    cpu_tier = args.prefix_cpu_cache_memory
    if cpu_tier is None:  # long-lived processes keep evicted prefixes in host memory by default
        cpu_tier = SERVER_PREFIX_CPU_CACHE if prefix_default else 0
    return dict(
        dtype=args.dtype, device=args.device, weight_format=args.weight_format,
        kv_cache_memory=args.kv_cache_memory, block_size=args.block_size,
        max_num_seqs=args.max_num_seqs, max_num_batched_tokens=args.max_num_batched_tokens,
        max_model_len=args.max_model_len, enable_prefix_caching=prefix_default if prefix is None else prefix,
        speculative=args.speculative, num_spec_tokens=args.num_spec_tokens, spec_adaptive=args.spec_adaptive,
        prefix_cache_dir=args.prefix_cache_dir, warmup_prompts=args.warmup_prompts,
        prefix_cpu_cache_memory=cpu_tier,
    )


def add_sampling_args(p: argparse.ArgumentParser) -> None:
    p.add_argument("--max-tokens", type=int, default=128)
    p.add_argument("--temperature", type=float, default=0.0)
    p.add_argument("--top-p", type=float, default=1.0)
    p.add_argument("--top-k", type=int, default=0)
    p.add_argument("--seed", type=int, default=None)
    p.add_argument("--stop", action="append", default=[])


def sampling_from_args(args: argparse.Namespace):
    from specache.sampling import SamplingParams

    return SamplingParams(max_tokens=args.max_tokens, temperature=args.temperature, top_p=args.top_p,
                          top_k=args.top_k, seed=args.seed, stop=args.stop)


def cmd_generate(args: argparse.Namespace) -> int:
    from specache.api import LLM

    params = sampling_from_args(args)  # validate before the model loads
    llm = LLM(model=args.model, **engine_options(args, prefix_default=False))
    if args.json:
        out = llm.generate([args.prompt], params)[0]
        print(json.dumps({"text": out.text, "token_ids": out.token_ids, "finish_reason": out.finish_reason,
                          "metrics": out.metrics}))
        return 0
    for out in llm.stream(args.prompt, params):
        print(out.outputs[0].delta_text, end="", flush=True)
    print()
    return 0


def cmd_chat(args: argparse.Namespace) -> int:
    from specache.api import LLM

    params = sampling_from_args(args)
    llm = LLM(model=args.model, **engine_options(args, prefix_default=True))
    messages: list[dict] = []
    if args.system:
        messages.append({"role": "system", "content": args.system})
    print("specache chat — empty line or Ctrl-D to quit")
    while True:
        try:
            user = input("> ").strip()
        except EOFError:
            break
        if not user:
            break
        messages.append({"role": "user", "content": user})
        prompt = llm.tokenizer.apply_chat_template(messages)
        reply = ""
        for out in llm.stream(prompt, params):
            print(out.outputs[0].delta_text, end="", flush=True)
            reply = out.text
        print()
        messages.append({"role": "assistant", "content": reply})
    return 0


def cmd_convert(args: argparse.Namespace) -> int:
    from pathlib import Path

    from specache.models.loader import convert_gguf, default_gguf_path, default_model_dir, resolve_model_path

    if args.default or not args.gguf:
        out = convert_gguf(default_gguf_path(), Path(args.out) if args.out else default_model_dir())
    elif args.out:
        out = convert_gguf(Path(args.gguf), Path(args.out))
    else:
        out = resolve_model_path(args.gguf)
    print(out)
    return 0


def cmd_build_kernels(args: argparse.Namespace) -> int:
    """Compile the native CPU kernels now (otherwise the first model load does it)."""
    from rich.console import Console

    from specache import kernels

    console = Console(stderr=True, soft_wrap=True)
    with console.status("building specache's native CPU kernels (once per machine, ~40 s)"):
        module = kernels.load()
    if module is None:
        console.print("native kernels unavailable: specache runs on PyTorch's kernels (slower decode)")
        return 0 if args.optional else 1
    console.print(f"native kernels ready: {module.__file__}")
    return 0


def cmd_kv_size(args: argparse.Namespace) -> int:
    from rich.console import Console
    from rich.table import Table

    from specache.config import DTYPES
    from specache.kv.sizing import describe
    from specache.models.config import ModelConfig
    from specache.models.loader import resolve_model_path

    config = ModelConfig.from_json_file(resolve_model_path(args.model) / "config.json")
    table = Table(title=f"KV cache for {config.name or args.model}")
    for col in ("dtype", "context", "batch", "bytes/token", "total GiB", "GQA saving"):
        table.add_column(col)
    rows = []
    for dt in args.dtypes.split(","):
        d = describe(config, args.context, args.batch, DTYPES[dt])
        rows.append({"dtype": dt, **d})
        table.add_row(dt, str(args.context), str(args.batch), f"{d['bytes_per_token']:,}", f"{d['total_gib']:.3f}",
                      f"{d['gqa_saving_vs_mha']:.1f}x")
    if args.json:
        print(json.dumps(rows))
    else:
        Console().print(table)
    return 0


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="specache", description=__doc__)
    sub = parser.add_subparsers(dest="command", required=True)

    p = sub.add_parser("generate", help="generate a completion for one prompt")
    p.add_argument("prompt")
    add_engine_args(p)
    add_sampling_args(p)
    p.add_argument("--json", action="store_true", help="print one JSON object instead of streaming text")
    p.set_defaults(func=cmd_generate)

    p = sub.add_parser("chat", help="interactive chat with the model's chat template")
    add_engine_args(p)
    add_sampling_args(p)
    p.add_argument("--system", default=None)
    p.set_defaults(func=cmd_chat)

    p = sub.add_parser("convert", help="convert a GGUF into a cached safetensors directory")
    p.add_argument("gguf", nargs="?", default=None)
    p.add_argument("--out", default=None)
    p.add_argument("--default", action="store_true", help="convert the default model (SmolLM2-135M-Instruct)")
    p.set_defaults(func=cmd_convert)

    p = sub.add_parser("build-kernels", help="compile the native CPU kernels (int8 GEMV, paged attention)")
    p.add_argument("--optional", action="store_true", help="exit 0 when they cannot be built here")
    p.set_defaults(func=cmd_build_kernels)

    p = sub.add_parser("kv-size", help="KV cache memory calculator")
    p.add_argument("--model", default=None)
    p.add_argument("--context", type=int, default=8192)
    p.add_argument("--batch", type=int, default=1)
    p.add_argument("--dtypes", default="float32,bfloat16")
    p.add_argument("--json", action="store_true")
    p.set_defaults(func=cmd_kv_size)

    _add_optional_commands(sub)
    return parser


def _add_optional_commands(sub) -> None:
    """Commands owned by other packages register themselves here."""
    try:
        from specache.server.app import add_serve_parser
    except ImportError:
        pass
    else:
        add_serve_parser(sub, add_engine_args)
    try:
        from specache.response_cache.evaluate import add_cache_eval_parser
    except ImportError:
        pass
    else:
        add_cache_eval_parser(sub)
    try:
        from specache.bench import add_bench_parser
    except ImportError:
        pass
    else:
        add_bench_parser(sub)


def main(argv: list[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    try:
        return args.func(args) or 0
    except SpecacheError as e:
        print(f"error: {e}", file=sys.stderr)
        return 2


if __name__ == "__main__":
    sys.exit(main())
