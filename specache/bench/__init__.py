"""`specache bench SUITE`: each suite writes JSON + a markdown table (+ PNG) to --out."""

from __future__ import annotations

import argparse
import importlib

# suite name -> module under specache.bench providing add_arguments(parser) and run(args) -> dict
SUITES = {
    "decode": "decode",
    "quality": "quality",
    "prefix": "prefix",
    "spec": "spec",
    "peers": "peers",
    "response-cache": "response_cache",
    "serve": "serve",
}


def add_bench_parser(sub) -> None:
    p = sub.add_parser("bench", help="benchmarks: " + ", ".join(SUITES))
    suites = p.add_subparsers(dest="suite", required=True)
    for name, module in SUITES.items():
        try:
            mod = importlib.import_module(f"specache.bench.{module}")
        except ModuleNotFoundError as e:
            if e.name != f"specache.bench.{module}":
                raise
            continue
        if hasattr(mod, "add_parser"):  # modules that build their own sub-parser
            mod.add_parser(suites)
            continue
        sp = suites.add_parser(name, help=(mod.__doc__ or "").strip().splitlines()[0])
        sp.add_argument("--out", default="bench_results", help="output directory")
        mod.add_arguments(sp)
        sp.set_defaults(func=lambda args, m=mod: _run(m, args))


def _run(mod, args: argparse.Namespace) -> int:
    mod.run(args)
    return 0
