"""Every engine knob in one place, validated at construction."""

from __future__ import annotations

import functools
from dataclasses import dataclass

import torch

from specache.errors import ConfigError
from specache.kv.sizing import parse_bytes

MAX_SPEC_TOKENS = 16  # the most draft tokens per step

DTYPES = {"float32": torch.float32, "fp32": torch.float32, "bfloat16": torch.bfloat16, "bf16": torch.bfloat16,
          "float16": torch.float16, "fp16": torch.float16}


def resolve_device(device: str | None) -> torch.device:
    if device in (None, "auto"):
        return torch.device("cuda" if torch.cuda.is_available() else "cpu")
    try:
        dev = torch.device(device)
    except RuntimeError as e:
        raise ConfigError(f"unknown device {device!r}; use cpu, cuda, cuda:N or auto") from e
    if dev.type not in ("cpu", "cuda"):
        raise ConfigError(f"device {device!r} is not supported; use cpu, cuda, cuda:N or auto")
    if dev.type == "cuda" and not torch.cuda.is_available():
        raise ConfigError("device 'cuda' was asked for but no CUDA GPU is available; use --device cpu")
    return dev


def resolve_dtype(dtype: str | torch.dtype, device: torch.device) -> torch.dtype:
    if isinstance(dtype, torch.dtype):
        return dtype
    if dtype == "auto":
        # bf16 where the hardware multiplies it natively (GPUs, AVX512-BF16/AMX CPUs): batched
        # matmuls run ~6x faster than fp32 here. Elsewhere fp32.
        if device.type == "cuda" or cpu_has_bf16():
            return torch.bfloat16
        return torch.float32
    if dtype not in DTYPES:
        raise ConfigError(f"dtype must be one of {sorted(DTYPES)} or 'auto', got {dtype!r}")
    return DTYPES[dtype]


@functools.cache
def cpu_flags() -> frozenset[str]:
    """The CPU's feature flags from /proc/cpuinfo (empty where there is none)."""
    try:
        text = open("/proc/cpuinfo").read()
    except OSError:
        return frozenset()
    return frozenset(next((line.split(":", 1)[1].split() for line in text.splitlines()
                           if line.startswith("flags")), []))


def cpu_has_bf16() -> bool:
    return bool({"avx512_bf16", "amx_bf16"} & cpu_flags())


@dataclass
class EngineConfig:
    dtype: str | torch.dtype = "auto"
    weight_format: str = "dense"  # dense | int8 | hybrid (int8 for decode rows, dense for batches)
    kv_cache_dtype: str = "auto"  # auto: the model dtype, except float32 on CPUs without native bf16
    device: str | None = "auto"
    block_size: int = 16
    kv_cache_memory: str | int = "1GiB"
    max_num_seqs: int = 32
    max_num_batched_tokens: int = 2048
    max_model_len: int | None = None  # None: the model's context length, capped at 8192
    enable_prefix_caching: bool = False
    prefix_cache_dir: str | None = None  # save the prefix cache here on shutdown, restore it on start
    warmup_prompts: str | None = None  # file of prompts prefilled at start (one per line or JSON chat)
    # CPU tier (L2) of the prefix cache: host memory for blocks evicted from the KV pool (0: off).
    prefix_cpu_cache_memory: str | int = 0
    speculative: str | None = None
    num_spec_tokens: int = 16  # the most draft tokens per step (model drafts: 8, see spec/decoder.py)
    spec_adaptive: bool = True  # False: always draft num_spec_tokens (tests, raw method benchmarks)
    seed: int | None = None

    def __post_init__(self) -> None:
        self.torch_device = resolve_device(self.device)
        self.torch_dtype = resolve_dtype(self.dtype, self.torch_device)
        if self.weight_format not in ("dense", "int8", "hybrid"):
            raise ConfigError(f"weight_format must be dense, int8 or hybrid, got {self.weight_format!r}")
        if self.kv_cache_dtype == "auto":
            # bf16 attention on a CPU without native bf16 (AVX2) is 2-3x slower than fp32; with
            # AVX512-BF16/AMX a bf16 cache is faster (half the bytes to read) and half the size.
            slow_bf16 = self.torch_device.type == "cpu" and not cpu_has_bf16()
            self.torch_kv_dtype = torch.float32 if slow_bf16 else self.torch_dtype
        else:
            self.torch_kv_dtype = resolve_dtype(self.kv_cache_dtype, self.torch_device)
        try:
            self.kv_cache_bytes = parse_bytes(self.kv_cache_memory)
        except ValueError as e:
            raise ConfigError(f"kv_cache_memory {self.kv_cache_memory!r} is not a size; use e.g. 512MiB or 2GiB") from e
        try:
            self.prefix_cpu_cache_bytes = parse_bytes(self.prefix_cpu_cache_memory)
        except ValueError as e:
            raise ConfigError(f"prefix_cpu_cache_memory {self.prefix_cpu_cache_memory!r} is not a size; "
                              "use e.g. 256MiB, or 0 for no CPU tier") from e
        if self.prefix_cpu_cache_bytes < 0:
            raise ConfigError(f"prefix_cpu_cache_memory must be >= 0, got {self.prefix_cpu_cache_memory!r}")
        if not isinstance(self.block_size, int):
            raise ConfigError(f"block_size must be an integer, got {self.block_size!r}")
        for name in ("block_size", "max_num_seqs", "max_num_batched_tokens", "kv_cache_bytes"):
            if getattr(self, name) <= 0:
                raise ConfigError(f"{name} must be positive, got {getattr(self, name)}")
        if self.max_model_len is not None and self.max_model_len <= 1:
            raise ConfigError(f"max_model_len must be > 1, got {self.max_model_len}")
        if not 0 <= self.num_spec_tokens <= MAX_SPEC_TOKENS:
            raise ConfigError(f"num_spec_tokens must be in [0, {MAX_SPEC_TOKENS}], got {self.num_spec_tokens}")
