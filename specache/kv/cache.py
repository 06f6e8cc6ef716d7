"""The KV tensors: one flat slot array per layer, viewed as fixed-size blocks.

Slot ``b * block_size + i`` holds token ``i`` of block ``b``. Writing scatters new keys and
values to their slots; attention gathers whole blocks of each sequence's block table.
"""

from __future__ import annotations

import torch


class KVCache:
    def __init__(self, num_layers: int, num_blocks: int, block_size: int, num_kv_heads: int,
                 head_dim: int, dtype: torch.dtype = torch.float32, device: str | torch.device = "cpu") -> None:
        self.num_blocks = num_blocks
        self.block_size = block_size
        shape = (num_layers, num_blocks, block_size, num_kv_heads, head_dim)
        self.k = torch.zeros(shape, dtype=dtype, device=device)
        self.v = torch.zeros(shape, dtype=dtype, device=device)
        self._k_slots = self.k.view(num_layers, num_blocks * block_size, num_kv_heads, head_dim)
        self._v_slots = self.v.view(num_layers, num_blocks * block_size, num_kv_heads, head_dim)

    def write(self, layer: int, slots: torch.Tensor, k: torch.Tensor, v: torch.Tensor) -> None:
        self._k_slots[layer].index_copy_(0, slots, k.to(self.k.dtype))
        self._v_slots[layer].index_copy_(0, slots, v.to(self.v.dtype))

    def slot_views(self) -> tuple[torch.Tensor, torch.Tensor]:
        """Keys and values of every layer as flat slot arrays [L, slots, kv_heads, head_dim] (views)."""
        return self._k_slots, self._v_slots

    def layer_slots(self, layer: int) -> tuple[torch.Tensor, torch.Tensor]:
        """One layer's keys and values as flat slot arrays [slots, kv_heads, head_dim] (views)."""
        return self._k_slots[layer], self._v_slots[layer]

    def gather(self, layer: int, block_tables: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """[B, NB] block ids -> keys and values [B, NB * block_size, kv_heads, head_dim]."""
        b, nb = block_tables.shape
        k = self.k[layer][block_tables].view(b, nb * self.block_size, *self.k.shape[-2:])
        v = self.v[layer][block_tables].view(b, nb * self.block_size, *self.v.shape[-2:])
        return k, v

    def gather_slots(self, layer: int, slots: torch.Tensor | slice) -> tuple[torch.Tensor, torch.Tensor]:
        """Keys and values of the given flat slots: [len, kv_heads, head_dim] each (a view for a slice)."""
        if isinstance(slots, slice):
            return self._k_slots[layer][slots], self._v_slots[layer][slots]
        return self._k_slots[layer].index_select(0, slots), self._v_slots[layer].index_select(0, slots)

    def read_blocks(self, block_ids: list[int]) -> tuple[torch.Tensor, torch.Tensor]:
        """All layers of some blocks (for persistence / the CPU tier): [L, n, bs, kvh, hd] each."""
        idx = torch.tensor(block_ids, dtype=torch.long, device=self.k.device)
        return self.k[:, idx].clone(), self.v[:, idx].clone()

    def write_blocks(self, block_ids: list[int], k: torch.Tensor, v: torch.Tensor) -> None:
        idx = torch.tensor(block_ids, dtype=torch.long, device=self.k.device)
        self.k[:, idx] = k.to(self.k.device, self.k.dtype)
        self.v[:, idx] = v.to(self.v.device, self.v.dtype)

    def copy_block_out(self, block_id: int, k_dst: torch.Tensor, v_dst: torch.Tensor) -> None:
        """All layers of one block into host buffers [L, bs, kvh, hd] (the CPU tier's store).

        Asynchronous into pinned memory on CUDA: later kernels on the same stream that reuse the
        block are ordered after the copy, and the host side is only ever read by copy_block_in."""
        non_blocking = k_dst.is_pinned()
        k_dst.copy_(self.k[:, block_id], non_blocking=non_blocking)
        v_dst.copy_(self.v[:, block_id], non_blocking=non_blocking)

    def copy_block_in(self, block_id: int, k_src: torch.Tensor, v_src: torch.Tensor) -> None:
        """Host buffers [L, bs, kvh, hd] back into one block (a CPU-tier hit)."""
        non_blocking = k_src.is_pinned()
        self.k[:, block_id].copy_(k_src, non_blocking=non_blocking)
        self.v[:, block_id].copy_(v_src, non_blocking=non_blocking)

    @property
    def nbytes(self) -> int:
        return self.k.nbytes + self.v.nbytes
