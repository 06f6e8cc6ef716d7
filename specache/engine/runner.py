"""Builds the flat batch tensors for one step and calls the model."""

from __future__ import annotations

from dataclasses import dataclass

import torch

from specache.engine.sequence import Sequence
from specache.kv.cache import KVCache
from specache.models.llama import AttentionMetadata, LlamaModel, SeqAttention


@dataclass
class BatchItem:
    seq: Sequence
    token_ids: list[int]  # computed this step at positions start .. start + len - 1
    start: int
    num_logits: int  # logits for the last num_logits tokens (0: a prefill chunk that is not the last)
    num_draft: int = 0  # trailing draft tokens (speculative verification)


def _slots(block_table: list[int], length: int, block_size: int) -> torch.Tensor | slice:
    """Flat cache slots of positions 0 .. length - 1: a slice when the blocks are one contiguous run
    (attention then reads a view, no copy), else an index tensor."""
    used = block_table[: -(-length // block_size)]
    first = used[0]
    if used[-1] - first == len(used) - 1 and used == list(range(first, first + len(used))):
        return slice(first * block_size, first * block_size + length)
    blocks = torch.tensor(used, dtype=torch.long)
    return (blocks[:, None] * block_size + torch.arange(block_size)).flatten()[:length]


def _new_slots(slots: torch.Tensor | slice, start: int) -> torch.Tensor:
    if isinstance(slots, slice):
        return torch.arange(slots.start + start, slots.stop)
    return slots[start:]


def build_metadata(items: list[BatchItem], block_size: int, device: torch.device
                   ) -> tuple[torch.Tensor, torch.Tensor, AttentionMetadata, torch.Tensor]:
    """(input_ids, positions, attention metadata, logits_indices) for a list of items."""
    positions, new_slots, logits_idx, seqs = [], [], [], []
    offset = 0
    for it in items:
        n = len(it.token_ids)
        end = it.start + n
        slots = _slots(it.seq.block_table, end, block_size)
        mask = None
        if it.start > 0 and n > 1:  # a chunk after cached tokens: causal with an offset
            mask = (torch.arange(end)[None, :] <= torch.arange(it.start, end)[:, None]).to(device)
        seqs.append(SeqAttention(offset, n, slots if isinstance(slots, slice) else slots.to(device), mask,
                                 it.num_logits))
        positions.append(torch.arange(it.start, end))
        new_slots.append(_new_slots(slots, it.start))
        logits_idx.extend(range(offset + n - it.num_logits, offset + n))
        offset += n
    meta = AttentionMetadata(slot_mapping=torch.cat(new_slots).to(device), seqs=seqs)
    input_ids = torch.tensor([t for it in items for t in it.token_ids], dtype=torch.long, device=device)
    return (input_ids, torch.cat(positions).to(device), meta,
            torch.tensor(logits_idx, dtype=torch.long, device=device))


class ModelRunner:
    def __init__(self, model: LlamaModel, cache: KVCache) -> None:
        self.model = model
        self.cache = cache
        self.device = model.device

    @torch.inference_mode()
    def run(self, items: list[BatchItem], num_layers: int | None = None) -> list[torch.Tensor | None]:
        """Computes every item's tokens (writing their K/V) and returns each item's logits [num_logits, V]."""
        input_ids, positions, meta, logits_idx = build_metadata(items, self.cache.block_size, self.device)
        if self.model.decode_rows_need_own_pass(meta, self.cache):
            return self._run_apart(items, meta, num_layers)
        logits = self.model.forward(input_ids, positions, meta, self.cache, logits_idx, num_layers)
        out: list[torch.Tensor | None] = []
        offset = 0
        for it in items:
            out.append(logits[offset: offset + it.num_logits] if it.num_logits else None)
            offset += it.num_logits
        return out

    def _run_apart(self, items: list[BatchItem], meta: AttentionMetadata,
                   num_layers: int | None) -> list[torch.Tensor | None]:
        """The decoding items in one pass and the prompt chunks in another (each sequence attends
        only to its own slots, so the two passes compute what one would); logits in items' order.
        The extra pass costs about one decode step, on a step that prefills a long chunk."""
        out: list[torch.Tensor | None] = [None] * len(items)
        for group in (True, False):
            index = [i for i, sa in enumerate(meta.seqs) if sa.decodes == group]
            for i, logits in zip(index, self.run([items[i] for i in index], num_layers), strict=True):
                out[i] = logits
        return out
