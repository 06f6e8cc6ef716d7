"""Builds the flat batch tensors for one step and calls the model."""

from __future__ import annotations

from dataclasses import dataclass

import torch

from specache.engine.sequence import Sequence
from specache.kv.cache import KVCache
from specache.models.llama import AttentionMetadata, LlamaModel


@dataclass
class BatchItem:
    seq: Sequence
    token_ids: list[int]  # computed this step at positions start .. start + len - 1
    start: int
    num_logits: int  # logits for the last num_logits tokens (0: a prefill chunk that is not the last)
    num_draft: int = 0  # trailing draft tokens (speculative verification)


def build_metadata(items: list[BatchItem], block_size: int, device: torch.device
                   ) -> tuple[torch.Tensor, torch.Tensor, AttentionMetadata, torch.Tensor]:
    """(input_ids, positions, attention metadata, logits_indices) for a list of items."""
    q_lens = [len(it.token_ids) for it in items]
    q_max = max(q_lens)
    ends = [it.start + n for it, n in zip(items, q_lens, strict=True)]
    nb = max(-(-e // block_size) for e in ends)
    batch = len(items)
    tables = torch.zeros(batch, nb, dtype=torch.long)
    positions, slots, logits_idx, q_index = [], [], [], []
    offset = 0
    for b, it in enumerate(items):
        bt = torch.tensor(it.seq.block_table[:nb], dtype=torch.long)
        tables[b, : len(bt)] = bt
        pos = torch.arange(it.start, it.start + q_lens[b])
        positions.append(pos)
        slots.append(bt[pos // block_size] * block_size + pos % block_size)
        q_index.append(torch.arange(q_lens[b]) + b * q_max)
        logits_idx.extend(range(offset + q_lens[b] - it.num_logits, offset + q_lens[b]))
        offset += q_lens[b]
    positions_t = torch.cat(positions)
    mask = None
    kv_len = ends[0] if batch == 1 else None  # one sequence: slice its keys, no padding to mask
    causal = batch == 1 and items[0].start == 0 and q_max > 1
    if not (batch == 1 and q_max == 1) and not causal:
        qpos = torch.zeros(batch, q_max, dtype=torch.long)
        for b, it in enumerate(items):
            qpos[b, : q_lens[b]] = torch.arange(it.start, ends[b])
        # Causal over absolute positions; padding query rows see only slot 0 (never NaN).
        cols = torch.arange(kv_len or nb * block_size)
        mask = (cols[None, None, :] <= qpos[:, :, None]).unsqueeze(1).to(device)
    uniform = all(n == q_max for n in q_lens)
    meta = AttentionMetadata(
        slot_mapping=torch.cat(slots).to(device),
        block_tables=tables.to(device),
        mask=mask,
        q_index=None if uniform else torch.cat(q_index).to(device),
        batch=batch,
        q_max=q_max,
        kv_len=kv_len,
        causal=causal,
    )
    input_ids = torch.tensor([t for it in items for t in it.token_ids], dtype=torch.long, device=device)
    return input_ids, positions_t.to(device), meta, torch.tensor(logits_idx, dtype=torch.long, device=device)


class ModelRunner:
    def __init__(self, model: LlamaModel, cache: KVCache) -> None:
        self.model = model
        self.cache = cache
        self.device = model.device

    @torch.inference_mode()
    def run(self, items: list[BatchItem], num_layers: int | None = None) -> list[torch.Tensor | None]:
        """Computes every item's tokens (writing their K/V) and returns each item's logits [num_logits, V]."""
        input_ids, positions, meta, logits_idx = build_metadata(items, self.cache.block_size, self.device)
        logits = self.model.forward(input_ids, positions, meta, self.cache, logits_idx, num_layers)
        out: list[torch.Tensor | None] = []
        offset = 0
        for it in items:
            out.append(logits[offset: offset + it.num_logits] if it.num_logits else None)
            offset += it.num_logits
        return out
