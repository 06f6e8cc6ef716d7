"""Shared helpers for benchmark suites: timing, medians, JSON + markdown output."""

from __future__ import annotations

import json
import platform
import resource
import statistics
import time
from pathlib import Path

import torch


def median(xs: list[float]) -> float:
    return statistics.median(xs) if xs else float("nan")


def peak_rss_mib() -> float:
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024


class Timer:
    def __enter__(self):
        self.t0 = time.perf_counter()
        return self

    def __exit__(self, *exc):
        self.s = time.perf_counter() - self.t0


def environment() -> dict:
    """What the numbers depend on: the CPU's SIMD level decides which kernels win (AVX2 vs AVX512-BF16)."""
    return {"python": platform.python_version(), "torch": torch.__version__, "threads": torch.get_num_threads(),
            "machine": platform.machine(), "cpu": _cpu_model(),
            "cpu_capability": torch.backends.cpu.get_cpu_capability(),
            "cuda": torch.cuda.get_device_name() if torch.cuda.is_available() else None}


def _cpu_model() -> str:
    try:
        for line in open("/proc/cpuinfo"):
            if line.startswith("model name"):
                return line.split(":", 1)[1].strip()
    except OSError:
        pass
    return platform.processor()


def markdown_table(rows: list[dict], columns: list[str]) -> str:
    lines = ["| " + " | ".join(columns) + " |", "|" + "---|" * len(columns)]
    for r in rows:
        cells = [f"{r[c]:.4g}" if isinstance(r.get(c), float) else "" if r.get(c) is None else str(r[c])
                 for c in columns]
        lines.append("| " + " | ".join(cells) + " |")
    return "\n".join(lines)


def write_report(out_dir: str | Path, name: str, result: dict, table: str) -> Path:
    out = Path(out_dir)
    out.mkdir(parents=True, exist_ok=True)
    (out / f"{name}.json").write_text(json.dumps(result, indent=2, default=str))
    (out / f"{name}.md").write_text(f"# specache bench {name}\n\n{table}\n")
    print(table)
    print(f"\nwrote {out / (name + '.json')} and {out / (name + '.md')}")
    return out
