"""The KV memory formula (GQA aware): how many tokens and blocks a budget holds."""

from __future__ import annotations

import torch

from specache.models.config import ModelConfig


def kv_bytes_per_token(config: ModelConfig, dtype: torch.dtype = torch.float32) -> int:
    """2 (K and V) x layers x kv_heads x head_dim x bytes per element."""
    elem = torch.empty((), dtype=dtype).element_size()
    return 2 * config.num_layers * config.num_kv_heads * config.head_dim * elem


def num_blocks_for_budget(config: ModelConfig, budget_bytes: int, block_size: int,
                          dtype: torch.dtype = torch.float32) -> int:
    return budget_bytes // (kv_bytes_per_token(config, dtype) * block_size)


def parse_bytes(text: str | int) -> int:
    """'512MiB', '2GB', '1.5G', '1048576' -> bytes."""
    if isinstance(text, int):
        return text
    s = text.strip().upper().replace("IB", "").replace("B", "")
    units = {"K": 1 << 10, "M": 1 << 20, "G": 1 << 30, "T": 1 << 40}
    if s and s[-1] in units:
        return int(float(s[:-1]) * units[s[-1]])
    return int(float(s))


def describe(config: ModelConfig, context_tokens: int, batch: int, dtype: torch.dtype) -> dict:
    per_token = kv_bytes_per_token(config, dtype)
    mha_per_token = per_token * config.num_heads // config.num_kv_heads
    return {
        "bytes_per_token": per_token,
        "total_bytes": per_token * context_tokens * batch,
        "total_gib": per_token * context_tokens * batch / (1 << 30),
        "gqa_saving_vs_mha": mha_per_token / per_token,
    }
