"""Native CPU kernels (int8 weight GEMV and AMX matmul, batched paged attention, a fused decode
step, RMSNorm / SwiGLU rows), built on first use. What each does: the header of cpu_kernels.cpp.

The extension is compiled once per machine and Python environment with ``-march=native`` (into
``<venv>/var/specache-kernels``); later processes load the built library in milliseconds. Where no
compiler is available the model keeps PyTorch's own kernels (``load()`` returns None) and says so
once in the log: the kernels are a speed-up, never a requirement.
"""

from __future__ import annotations

import functools
import hashlib
import logging
import os
import platform
import sys
from pathlib import Path
from types import ModuleType

import torch

log = logging.getLogger(__name__)

SOURCE = Path(__file__).with_name("cpu_kernels.cpp")
DISABLE_ENV = "SPECACHE_NO_KERNELS"  # set to 1 to run on PyTorch's kernels only (A/B, debugging)
BUILD_DIR_ENV = "SPECACHE_KERNELS_DIR"  # where the build goes (default: inside the Python environment)


def _cpu_fingerprint() -> str:
    """The CPU's feature flags, hashed: a -march=native build must not be loaded on another CPU."""
    try:
        flags = next(line for line in Path("/proc/cpuinfo").read_text().splitlines() if line.startswith("flags"))
    except (OSError, StopIteration):
        flags = platform.processor() or platform.machine()
    return hashlib.sha256(flags.encode()).hexdigest()[:12]


@functools.cache
def machine_identity() -> str:
    """What a measurement of these kernels on this machine depends on: the CPU model and its
    feature flags, torch's version and thread count, and the kernel source (a changed kernel is
    measured again)."""
    try:
        model = next((line.split(":", 1)[1].strip() for line in Path("/proc/cpuinfo").read_text().splitlines()
                      if line.startswith("model name")), platform.processor())
    except OSError:
        model = platform.processor() or platform.machine()
    source = hashlib.sha256(SOURCE.read_bytes()).hexdigest()[:12]
    native = "native" if load() is not None else "pytorch"
    return (f"{model} flags {_cpu_fingerprint()} torch {torch.__version__} threads {torch.get_num_threads()} "
            f"kernels {native} {source}")


def machine_dir() -> Path:
    """The build's directory: one per Python environment, torch version and CPU, so it also keeps
    what is measured on this machine (hybrid weights' switch points)."""
    # Inside the Python environment, not $SPECACHE_HOME: tests and servers that each get their own
    # SPECACHE_HOME must not rebuild (~40 s each), and `make clean` removes the build with the venv.
    root = Path(os.environ.get(BUILD_DIR_ENV) or Path(sys.prefix) / "var" / "specache-kernels")
    path = root / f"torch-{torch.__version__.split('+')[0]}-cpu-{_cpu_fingerprint()}"
    path.mkdir(parents=True, exist_ok=True)
    return path


@functools.cache
def load() -> ModuleType | None:
    """The compiled extension, or None when it is disabled or cannot be built here."""
    if os.environ.get(DISABLE_ENV, "") not in ("", "0"):
        return None
    from torch.utils import cpp_extension

    try:
        return cpp_extension.load(
            name="specache_cpu_kernels", sources=[str(SOURCE)], build_directory=str(machine_dir()),
            extra_cflags=["-O3", "-march=native", "-fopenmp", "-fno-math-errno"],
            extra_ldflags=["-fopenmp"], verbose=False)
    except Exception as e:  # no compiler / ninja, or a build error: fall back to PyTorch
        reason = (str(e).splitlines() or [repr(e)])[0][:200]
        log.warning("native CPU kernels unavailable (%s); using PyTorch kernels", reason)
        return None
