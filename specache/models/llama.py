"""Llama-family decoder (Llama, SmolLM2, Mistral, Qwen2) in plain PyTorch over a paged KV cache.

Plain tensors instead of nn.Modules: a module call costs several microseconds and a decode
step runs hundreds of them. Projections are fused (q|k|v and gate|up) and stored
pre-transposed, because ``x @ W_t`` reads weights about twice as fast as ``F.linear`` on CPU.
"""

from __future__ import annotations

import functools
import logging
import time
from dataclasses import dataclass

import torch
import torch.nn.functional as F

from specache import kernels
from specache.config import MAX_SPEC_TOKENS
from specache.kv.cache import KVCache
from specache.models import switch_points
from specache.models.config import ModelConfig

log = logging.getLogger(__name__)


def _num_slots(slots: torch.Tensor | slice) -> int:
    return slots.stop - slots.start if isinstance(slots, slice) else slots.numel()


@dataclass
class SeqAttention:
    """One sequence's share of a step: its queries and every cache slot it attends to."""

    q_start: int  # offset of its first new token in the flat batch
    q_len: int
    slots: torch.Tensor | slice  # flat cache slots of positions 0 .. kv_len - 1 (slice: contiguous)
    mask: torch.Tensor | None  # [q_len, kv_len] when a chunk continues a cached prefix, else None
    num_logits: int = 0  # logits wanted for its last num_logits tokens

    @property
    def decodes(self) -> bool:
        """It decodes or verifies drafts: at most VERIFY_MAX_Q new tokens after cached ones (a
        prompt's first chunk is prefill however short)."""
        return self.q_len <= VERIFY_MAX_Q and _num_slots(self.slots) > self.q_len


@dataclass
class AttentionMetadata:
    """Where each new token's K/V goes and what each sequence attends to.

    Attention runs per sequence on exactly its own slots: no padding to the longest sequence
    and no mask in the common cases (decode, prefill from position 0). Measured here, a
    padded masked batch spent ~60% of a 16-sequence decode step inside SDPA.
    """

    slot_mapping: torch.Tensor  # [T] flat slot index for each new token
    seqs: list[SeqAttention]

    @functools.cached_property
    def kernel_args(self) -> tuple[torch.Tensor, torch.Tensor]:
        """The native kernels' view: [B, 4] rows of (q_start, q_len, kv_len, offset into slots) and
        every sequence's slots concatenated. Built once per step, shared by all layers."""
        info, slots, offset = [], [], 0
        for sa in self.seqs:
            seq_slots = torch.arange(sa.slots.start, sa.slots.stop) if isinstance(sa.slots, slice) else sa.slots
            info.append((sa.q_start, sa.q_len, len(seq_slots), offset))
            slots.append(seq_slots)
            offset += len(seq_slots)
        return torch.tensor(info, dtype=torch.long), torch.cat(slots).to(torch.long)

    @property
    def max_q_len(self) -> int:
        return max(sa.q_len for sa in self.seqs)

    @functools.cached_property
    def decode_step(self) -> bool:
        """Every sequence decodes or verifies drafts (SeqAttention.decodes)."""
        return all(sa.decodes for sa in self.seqs)

    @functools.cached_property
    def padded(self) -> PaddedBatch:
        """Every sequence padded to the longest, for one batched SDPA call per layer. Built once per
        step (a few host-to-device copies), shared by all layers."""
        device = self.slot_mapping.device
        q_lens = [sa.q_len for sa in self.seqs]
        slots = [torch.arange(sa.slots.start, sa.slots.stop, device=device) if isinstance(sa.slots, slice)
                 else sa.slots for sa in self.seqs]
        kv_lens = torch.tensor([len(s) for s in slots])
        q_max, kv_max = max(q_lens), int(kv_lens.max())
        q_len_t = torch.tensor(q_lens)
        rows = torch.arange(q_max)
        # A padding query row repeats its sequence's last query (its output is dropped), so no row
        # is fully masked (that would give NaN).
        q_row = torch.minimum(rows[None, :], q_len_t[:, None] - 1)
        q_index = torch.tensor([sa.q_start for sa in self.seqs])[:, None] + q_row  # [B, q_max]
        last_key = (kv_lens - q_len_t)[:, None] + q_row  # causal: query i sees keys 0 .. last_key
        mask = torch.arange(kv_max)[None, None, :] <= last_key[:, :, None]  # [B, q_max, kv_max]
        out_index = [b * q_max + i for b, n in enumerate(q_lens) for i in range(n)]
        return PaddedBatch(
            q_index=None if q_max == 1 else q_index.flatten().to(device),
            slots=torch.nn.utils.rnn.pad_sequence(slots, batch_first=True),
            mask=mask.unsqueeze(1).to(device),
            out_index=None if q_max == 1 else torch.tensor(out_index, device=device))


@dataclass
class PaddedBatch:
    q_index: torch.Tensor | None  # [B * q_max] flat query row of each padded row (None: all q_len 1)
    slots: torch.Tensor  # [B, kv_max] cache slots, padded with slot 0 (masked out)
    mask: torch.Tensor  # [B, 1, q_max, kv_max] True where a query attends to a key
    out_index: torch.Tensor | None  # [T] padded row of each flat token (None: q_max == 1)


WEIGHT_FORMATS = ("dense", "int8", "hybrid")
NATIVE_KV_DTYPES = (torch.float32, torch.bfloat16)  # what the native attention reads
# Above this many new tokens per sequence (prefill chunks) SDPA's blocked kernel beats the native
# one, which computes each query row on its own (except on AMX CPUs with a bf16 cache, where the
# native attention multiplies prefill chunks on the tile unit and takes any length). Up to it a
# hybrid model's short prompt is one fused native call (measured, bf16: 48 tokens 23 -> 17 ms,
# 64 tokens 28 -> 22 ms vs 32 here; dense models unchanged within noise).
NATIVE_ATTENTION_MAX_Q = 64
# On CUDA, steps whose sequences bring at most this many new tokens each (decode, verification)
# run one padded SDPA call per layer: per-sequence calls are launch-bound there (16 sequences:
# 0.80x transformers' padded generate on an H200).
BATCHED_ATTENTION_MAX_Q = 32
# A step whose sequences bring at most this many new tokens each decodes or verifies drafts.
VERIFY_MAX_Q = MAX_SPEC_TOKENS + 1
# Before calibration: measured on 2-core AVX2 and AVX512-BF16 CPUs, int8 wins up to ~8 rows.
HYBRID_INT8_MAX_ROWS = 8
# Up to 128 rows: on a 2-core AVX512-VNNI EPYC without AMX the int8 kernel is 1.0-1.17x dense
# bf16's speed at 128 rows over all 30 layers' copies (qkv 1.17, gate_up 1.12, o 1.10, down 1.00;
# parity at 256), and taking it for 65-128-row prefill chunks made TTFT 1.11-1.25x faster (a
# 102-token multi-turn prompt, two ~45-token prompts, a 100-token prompt).
CALIBRATION_ROWS = (1, 2, 4, 8, 16, 32, 64, 128)
# Where int8 still wins at CALIBRATION_ROWS[-1] rows, one prefill-sized check: on CPUs without
# AVX512-BF16 a bf16 GEMM takes a slow path (AMD EPYC, AVX2: 36 ms for 128 rows of gate_up against
# 7.6 ms in the int8 kernel), and prefilling a 306-token prompt through dense bf16 took 4.6 s
# against 1.0 s in int8 (int8 4-6x as fast at 128 rows). Compute-bound there, so a few layers'
# copies time it. Int8 must win by a margin: on an AMX CPU it is 0.8-2.1x as fast at 128 rows but
# oneDNN's GEMM wins most shapes from ~512 rows, and prefilling 2000 tokens all in int8 took 740 ms
# against 607 ms with dense prefill chunks.
PREFILL_CALIBRATION_ROWS = 256
PREFILL_CALIBRATION_LAYERS = 2
PREFILL_INT8_MIN_SPEEDUP = 3.0
# From this many rows the median of 3 timed calls: the 16-64-row dense bf16 timings were ~12 of
# the ~15 s that calibration took at load on that CPU.
CALIBRATION_FEWER_REPEATS_ROWS = 16
ANY_ROWS = 1 << 62  # a row limit that every step is under
INT8_ALWAYS = ANY_ROWS  # int8_max_rows of a projection that uses int8 for every row count
# Dense weights on CPU go through the native dense_linear, whose rows do not depend on the batch,
# from dense_pack's layout: fp32 on AVX-512 CPUs, 1.1-6x MKL's speed at 1-1024 rows; bf16 on
# AVX512-BF16 CPUs, 1.0-1.3x oneDNN's at 128-2048 rows and 2.5-5x at 1-4 (2-core AVX512-BF16 EPYC,
# SmolLM2-135M's shapes). Decode and verification steps always take it; other steps (prefill
# chunks) too, except on AMX CPUs past AMX_DENSE_NATIVE_MAX_ROWS rows, where oneDNN's bf16 tile
# GEMM keeps them (not measured on AMX this stop; the row-major copy is then kept beside the
# packed one). Without AVX512-BF16, bf16 weights stay row-major and an fp32 GEMV (slower than
# oneDNN per row past a few rows) takes decode and verification steps and other steps up to
# GEMV_DENSE_NATIVE_MAX_ROWS rows.
AMX_DENSE_NATIVE_MAX_ROWS = 128
GEMV_DENSE_NATIVE_MAX_ROWS = 32
# The kernels a projection can take for a step (Projection.kernel), and the whole-step one.
INT8_KERNEL, NATIVE_DENSE_KERNEL, TORCH_DENSE_KERNEL, FUSED_STEP = "int8", "native dense", "torch dense", "fused"


class Projection:
    """y = x @ W^T, with W stored the way this machine reads it fastest.

    dense: W in the model dtype; fp32 pre-transposed [in, out] (``x @ W_t`` reads ~2x faster than
      F.linear on CPU), bf16 as [out, in] for F.linear (on AVX2 CPUs a bf16 ``x @ W_t`` takes a
      slow path: 170 ms instead of 3 ms for the LM head). On CPU with the native kernels: the
      batch-invariant ``dense_linear`` (see AMX_DENSE_NATIVE_MAX_ROWS).
    int8: weight-only int8, one scale per output row. Where the native kernels are built:
      on AMX and AVX512-VNNI CPUs a second copy of the weights in tile order (``packed``, the
      same size again) for every row count (activations as two int8 limbs, ~16 significant
      bits), elsewhere an AVX-512 or AVX2 GEMV; without them PyTorch's CPU int8-weight kernel
      (bf16 activations). 2-3x faster than fp32 for 1-8 rows.
    hybrid: both copies; int8 up to ``int8_max_rows`` rows (decode), dense above (prefill). The
      switch point depends on the CPU and the kernels (64 rows with AMX here, 8 with PyTorch's
      kernel on AVX512-BF16; on AVX2 the native int8 kernel beats the slow bf16 GEMM at every row
      count), so `calibrate_int8_max_rows` measures it at load.
    """

    __slots__ = ("dense", "dense_t", "dense_packed", "native_dense_max_rows", "q", "scales", "scales_f32", "packed",
                 "native", "int8_max_rows")

    def __init__(self, weight: torch.Tensor, dtype: torch.dtype, device, weight_format: str = "dense") -> None:
        weight = weight.to(device, torch.float32)
        self.dense = self.dense_t = self.dense_packed = self.native = None
        self.native_dense_max_rows = 0
        if weight_format != "int8":
            self._store_dense(weight.to(dtype))
        self.q = self.scales = self.scales_f32 = self.packed = None
        self.int8_max_rows = HYBRID_INT8_MAX_ROWS
        if weight_format in ("int8", "hybrid"):
            scales = (weight.abs().amax(dim=1) / 127.0).clamp(min=1e-12)
            self.q = (weight / scales[:, None]).round().clamp(-127, 127).to(torch.int8).contiguous()
            self.scales = scales.to(torch.bfloat16)
            self.scales_f32 = scales.contiguous()
            self.native = self.native or (kernels.load() if self.q.device.type == "cpu" else None)
            if self.native is not None:  # the tile layout of the AMX / VNNI paths (empty without them)
                self.packed = self.native.tile_pack(self.q)
            if weight_format == "int8":
                self.int8_max_rows = INT8_ALWAYS

    def __call__(self, x: torch.Tensor, decode_step: bool = False) -> torch.Tensor:
        """decode_step: the rows come from a decode or verification step (AttentionMetadata.decode_step)."""
        if self.kernel(x.shape[0], decode_step) == INT8_KERNEL:
            return self.int8(x)
        return self.dense_mm(x, decode_step)

    def kernel(self, rows: int, decode_step: bool = False) -> str:
        """Which kernel a step of `rows` rows takes: int8 up to int8_max_rows, else the dense copy's."""
        if self.q is not None and rows <= self.int8_max_rows:
            return INT8_KERNEL
        return self._dense_kernel(rows, decode_step)

    def _dense_kernel(self, rows: int, decode_step: bool) -> str:
        """The batch-invariant native kernel for every decode or verification step where it exists
        (whatever their number) and for other steps up to native_dense_max_rows rows; else PyTorch's."""
        if self.native_dense_max_rows > 0 and (decode_step or rows <= self.native_dense_max_rows):
            return NATIVE_DENSE_KERNEL
        return TORCH_DENSE_KERNEL

    def int8(self, x: torch.Tensor) -> torch.Tensor:
        if self.native is not None:
            return self.native.int8_linear(x, self.q, self.scales_f32, self.packed)
        y = torch._weight_int8pack_mm(x.to(torch.bfloat16), self.q, self.scales)
        return y if y.dtype == x.dtype else y.to(x.dtype)

    def _store_dense(self, w: torch.Tensor) -> None:
        """The dense copy: on CPU with the native kernels, in dense_pack's layout for the
        batch-invariant dense_linear (fp32 on AVX-512, bf16 on AVX512-BF16 CPUs); else as PyTorch
        reads it fastest."""
        cpu = w.device.type == "cpu"
        self.native = kernels.load() if cpu and w.dtype in (torch.float32, torch.bfloat16) else None
        packed = self.native.dense_pack(w) if self.native is not None else None
        if packed is not None and packed.numel():
            self.dense_packed, self.native_dense_max_rows = packed, ANY_ROWS
            if w.dtype == torch.bfloat16 and self.native.amx_attention():  # oneDNN's tiles for prefill chunks
                self.dense, self.native_dense_max_rows = w.contiguous(), AMX_DENSE_NATIVE_MAX_ROWS
        elif w.dtype == torch.float32 and cpu:
            self.dense_t = w.t().contiguous()
        else:
            self.dense = w.contiguous()
            if self.native is not None and w.dtype == torch.bfloat16:
                self.native_dense_max_rows = GEMV_DENSE_NATIVE_MAX_ROWS

    def dense_mm(self, x: torch.Tensor, decode_step: bool = False) -> torch.Tensor:
        """The dense product, on the kernel _dense_kernel picks."""
        if self._dense_kernel(x.shape[0], decode_step) == NATIVE_DENSE_KERNEL:
            if self.dense_packed is not None:
                return self.native.dense_linear(x, self.dense_packed, True)
            return self.native.dense_linear(x, self.dense, False)
        return x @ self.dense_t if self.dense_t is not None else F.linear(x, self.dense)


def _median_seconds(fn, repeats: int = 5) -> float:
    """The median of `repeats` timed calls after a warm-up call."""
    fn()  # warm-up: first calls pack weights / allocate
    times = []
    for _ in range(repeats):
        start = time.perf_counter()
        fn()
        times.append(time.perf_counter() - start)
    return sorted(times)[repeats // 2]  # the median resists a busy neighbour better than the mean


def _over_layers(method, column: list[Projection], x: torch.Tensor):
    return lambda: [method(proj, x) for proj in column]


@torch.inference_mode()
def calibrate_int8_max_rows(column: list[Projection], dtype: torch.dtype, device) -> int:
    """The largest row count (of CALIBRATION_ROWS) up to which the int8 kernel is at least as fast
    as the dense GEMM on this machine, for one projection shape (tens of ms at load on AVX-512 / AMX
    CPUs, seconds where the dense bf16 GEMM is a slow path). INT8_ALWAYS when
    int8 is also PREFILL_INT8_MIN_SPEEDUP times as fast at PREFILL_CALIBRATION_ROWS (then prefill
    chunks take it too).

    It times one pass over every layer's copy (``column``), as a forward pass reads them: timing
    one copy over and over measures weights hot in cache, where dense bf16 looks ~2x faster than
    it is when a step streams the whole model from memory (at 128 rows too: two or four copies
    read dense bf16 at 1.0-1.1x int8's speed, the whole column at 0.85-1.0x, on a VNNI EPYC)."""
    best, speedup = 0, 0.0
    for rows in CALIBRATION_ROWS:
        # Past 64 rows the whole column's dense timing costs seconds where bf16 takes a slow path:
        # int8 that won by PREFILL_INT8_MIN_SPEEDUP at the size before takes this one untimed.
        if rows <= 64 or speedup < PREFILL_INT8_MIN_SPEEDUP:
            speedup = _int8_speedup(column, rows, dtype, device)
        if speedup < 1.0:
            return best
        best = rows
    prefill_column = column[:PREFILL_CALIBRATION_LAYERS]
    if _int8_speedup(prefill_column, PREFILL_CALIBRATION_ROWS, dtype, device) >= PREFILL_INT8_MIN_SPEEDUP:
        return INT8_ALWAYS
    return best


# (shape, copies, dtype, device) -> int8_max_rows, measured once per process. Where int8 and dense
# are at parity for some size the measurement is a coin toss (down_proj at 128 rows on a VNNI EPYC
# came out 64 in two loads of four, 128 in the other two), and two engines that disagree prefill
# the same chunk with different numerics: speculative and plain greedy output then part at
# near-ties (bench spec's plain and speculative engines, tests). One measurement per shape keeps
# every engine of a process on the same switch points, and later loads skip the timing.
_CALIBRATIONS: dict[tuple, int] = {}


def _calibration(column: list[Projection], dtype: torch.dtype, device) -> int:
    """calibrate_int8_max_rows, once per projection shape on this machine: in this process, and
    across processes through the stored switch points (`switch_points`)."""
    key = (tuple(column[0].q.shape), len(column), dtype, str(device))
    if key not in _CALIBRATIONS:
        entry = switch_points.key(*key)
        rows = switch_points.get(entry)
        if rows is None:
            rows = calibrate_int8_max_rows(column, dtype, device)
            switch_points.put(entry, rows)
        _CALIBRATIONS[key] = rows
    return _CALIBRATIONS[key]


def _rows_label(int8_max_rows: int) -> str:
    return "any number of" if int8_max_rows == INT8_ALWAYS else str(int8_max_rows)


def _int8_speedup(column: list[Projection], rows: int, dtype: torch.dtype, device) -> float:
    """Dense time over int8 time for `rows` activation rows through the column's copies."""
    x = torch.randn(rows, column[0].q.shape[1], dtype=dtype, device=device)
    repeats = 5 if rows < CALIBRATION_FEWER_REPEATS_ROWS else 3
    int8_s = _median_seconds(_over_layers(Projection.int8, column, x), repeats)
    return _median_seconds(_over_layers(Projection.dense_mm, column, x), repeats) / int8_s


@dataclass
class LayerWeights:
    attn_norm: torch.Tensor
    qkv: Projection  # fused q|k|v: [H] -> [(nh + 2*nkv) * hd]
    bqkv: torch.Tensor | None
    o: Projection
    ffn_norm: torch.Tensor
    gate_up: Projection  # fused gate|up: [H] -> [2I]
    down: Projection


def rope_tables(head_dim: int, max_pos: int, theta: float, device) -> tuple[torch.Tensor, torch.Tensor]:
    inv_freq = 1.0 / (theta ** (torch.arange(0, head_dim, 2, dtype=torch.int64).float() / head_dim))
    freqs = torch.arange(max_pos, dtype=torch.float32)[:, None] * inv_freq[None, :]
    emb = torch.cat([freqs, freqs], dim=-1)
    return emb.cos().to(device), emb.sin().to(device)


def apply_rope(x: torch.Tensor, cos: torch.Tensor, signed_sin: torch.Tensor) -> torch.Tensor:
    """Hugging Face rotate-half RoPE with the sign folded into the table: rotate_half(x) * sin equals
    roll(x, half) * signed_sin, which takes one op instead of four. x [T, heads, hd], tables [T, 1, hd]."""
    return torch.addcmul(x * cos, x.roll(x.shape[-1] // 2, dims=-1), signed_sin)


class LlamaModel:
    def __init__(self, config: ModelConfig, weights: dict[str, torch.Tensor],
                 dtype: torch.dtype = torch.float32, device: str | torch.device = "cpu",
                 weight_format: str = "dense") -> None:
        if weight_format not in WEIGHT_FORMATS:
            raise ValueError(f"weight_format must be one of {WEIGHT_FORMATS}, got {weight_format!r}")
        self.config = config
        self.weight_format = weight_format
        self.dtype = dtype
        self.device = torch.device(device)
        c = config
        self.q_size = c.num_heads * c.head_dim
        self.kv_size = c.num_kv_heads * c.head_dim
        w = lambda name: weights[name].to(self.device, dtype)  # noqa: E731
        proj = lambda tensor: Projection(tensor, dtype, self.device, weight_format)  # noqa: E731
        self.embed = w("model.embed_tokens.weight")
        self.norm = w("model.norm.weight")
        head = "model.embed_tokens.weight" if c.tie_word_embeddings or "lm_head.weight" not in weights \
            else "lm_head.weight"
        self.lm_head = proj(weights[head])
        self.layers: list[LayerWeights] = []
        for i in range(c.num_layers):
            p = f"model.layers.{i}."
            qkv = torch.cat([weights[p + f"self_attn.{n}_proj.weight"] for n in "qkv"], dim=0)
            bias = None
            if p + "self_attn.q_proj.bias" in weights:
                bias = torch.cat([weights[p + f"self_attn.{n}_proj.bias"] for n in "qkv"]).to(self.device, dtype)
            gate_up = torch.cat([weights[p + "mlp.gate_proj.weight"], weights[p + "mlp.up_proj.weight"]], dim=0)
            self.layers.append(LayerWeights(
                attn_norm=w(p + "input_layernorm.weight"),
                qkv=proj(qkv),
                bqkv=bias,
                o=proj(weights[p + "self_attn.o_proj.weight"]),
                ffn_norm=w(p + "post_attention_layernorm.weight"),
                gate_up=proj(gate_up),
                down=proj(weights[p + "mlp.down_proj.weight"]),
            ))
        self.cos, sin = rope_tables(c.head_dim, c.max_position_embeddings, c.rope_theta, self.device)
        half = c.head_dim // 2
        self.signed_sin = torch.cat([-sin[:, :half], sin[:, half:]], dim=-1)
        self.native = kernels.load() if self.device.type == "cpu" else None
        # Prefill chunks of any length on a bf16 cache go to the native attention's AMX tiles.
        self.amx_attention = self.native is not None and self.native.amx_attention()
        self.batched_attention = self.device.type == "cuda"  # see BATCHED_ATTENTION_MAX_Q
        self.fused = self._fused_decoder() if weight_format != "dense" else None
        if weight_format == "hybrid" and self.device.type == "cpu":
            self._calibrate_hybrid()

    def _fused_decoder(self):
        """The native whole-step decoder over the int8 weights (None without the native kernels)."""
        if self.native is None:
            return None
        none = torch.empty(0)
        return self.native.FusedDecoder(
            [[lw.attn_norm, lw.ffn_norm, lw.bqkv if lw.bqkv is not None else none,
              *[t for proj in (lw.qkv, lw.o, lw.gate_up, lw.down) for t in (proj.q, proj.scales_f32, proj.packed)]]
             for lw in self.layers],
            self.config.num_heads, self.config.num_kv_heads, self.config.head_dim, self.config.rms_norm_eps)

    @property
    def fused_max_rows(self) -> int:
        """Up to how many tokens a step takes the fused int8 path: where every projection's int8 is
        calibrated faster, and at least NATIVE_ATTENTION_MAX_Q rows, because one native call for the
        whole step beats ~15 PyTorch ops per layer even where a lone dense GEMM would be faster
        (measured: a 24-row step 28-32 ms op by op with dense gate_up, ~12 ms fused)."""
        lw = self.layers[0]
        calibrated = min(lw.qkv.int8_max_rows, lw.o.int8_max_rows, lw.gate_up.int8_max_rows, lw.down.int8_max_rows)
        return max(calibrated, NATIVE_ATTENTION_MAX_Q)

    def _native_attention_fits(self, max_q_len: int, cache: KVCache) -> bool:
        """Whether the native attention takes a step whose longest sequence brings max_q_len tokens."""
        c = self.config
        return (self._native_rows(cache) and c.num_heads // c.num_kv_heads <= self.native.MAX_GROUP
                and (max_q_len <= NATIVE_ATTENTION_MAX_Q
                     or (cache.k.dtype == torch.bfloat16 and self.amx_attention)))

    def _calibrate_hybrid(self) -> None:
        """Measure where int8 stops paying, once per projection shape (every layer shares them)."""
        columns = list(zip(*[(lw.qkv, lw.o, lw.gate_up, lw.down) for lw in self.layers], strict=True))
        for name, column in zip(("qkv", "o", "gate_up", "down"), columns, strict=True):
            rows = _calibration(list(column), self.dtype, self.device)
            for proj in column:
                proj.int8_max_rows = rows
            log.info("hybrid weights: %s uses int8 up to %s rows", name, _rows_label(rows))
        # (A step that runs the fused int8 layers takes the int8 LM head whatever this says: see logits)
        self.lm_head.int8_max_rows = _calibration([self.lm_head], self.dtype, self.device)
        log.info("hybrid weights: lm_head uses int8 up to %s rows", _rows_label(self.lm_head.int8_max_rows))

    @property
    def num_layers(self) -> int:
        return self.config.num_layers

    def _attention(self, x: torch.Tensor, layer: int, lw: LayerWeights, cos: torch.Tensor, sin: torch.Tensor,
                   meta: AttentionMetadata, cache: KVCache) -> torch.Tensor:
        c = self.config
        decode = meta.decode_step
        qkv = lw.qkv(x, decode)
        if lw.bqkv is not None:
            qkv = qkv + lw.bqkv
        t, nh, nkv, hd = qkv.shape[0], c.num_heads, c.num_kv_heads, c.head_dim
        if self._native_rows(cache):  # RoPE and the K/V write in one native pass (q rotated in place)
            self.native.rope_and_store(qkv, cos, sin, *cache.layer_slots(layer), meta.slot_mapping, nh, nkv)
            q = qkv[:, : self.q_size].view(t, nh, hd)
        else:  # q and k are rotated together: one RoPE call over their heads side by side
            qk = apply_rope(qkv[:, : self.q_size + self.kv_size].view(t, nh + nkv, hd), cos, sin)
            q, k = qk[:, :nh], qk[:, nh:]
            cache.write(layer, meta.slot_mapping, k, qkv[:, self.q_size + self.kv_size:].view(t, nkv, hd))
        if self._native_attention_fits(meta.max_q_len, cache):
            # One call for every sequence, reading K/V in place (no gather, no per-sequence SDPA).
            info, slots = meta.kernel_args
            out = self.native.paged_attention(q, *cache.layer_slots(layer), info, slots, hd ** -0.5)
            return lw.o(out.reshape(t, self.q_size), decode)
        if self.batched_attention and len(meta.seqs) > 1 and meta.max_q_len <= BATCHED_ATTENTION_MAX_Q:
            return lw.o(self._batched_attention(q, layer, meta.padded, cache).to(x.dtype), decode)
        gqa = c.num_heads != c.num_kv_heads
        # Heads first once for the whole batch ([1, nh, T, hd]); each sequence takes a view of it.
        # Attention runs in the cache's dtype (fp32 on CPUs whose bf16 attention is slow).
        q_heads = q.transpose(0, 1).unsqueeze(0).to(cache.k.dtype)
        outs = []
        for sa in meta.seqs:
            keys, values = cache.gather_slots(layer, sa.slots)  # [L, nkv, hd]
            outs.append(F.scaled_dot_product_attention(
                q_heads[:, :, sa.q_start: sa.q_start + sa.q_len],
                keys.transpose(0, 1).unsqueeze(0), values.transpose(0, 1).unsqueeze(0),
                attn_mask=sa.mask, is_causal=sa.mask is None and sa.q_len > 1, enable_gqa=gqa)[0])
        out = (outs[0] if len(outs) == 1 else torch.cat(outs, dim=1)).transpose(0, 1).reshape(t, self.q_size)
        return lw.o(out if out.dtype == x.dtype else out.to(x.dtype), decode)

    def _batched_attention(self, q: torch.Tensor, layer: int, batch: PaddedBatch, cache: KVCache) -> torch.Tensor:
        """All sequences in one SDPA call over their padded, masked K/V: [T, nh * hd]."""
        c = self.config
        b, kv_max = batch.slots.shape
        k_slots, v_slots = cache.layer_slots(layer)
        keys = k_slots[batch.slots].transpose(1, 2)  # [B, nkv, kv_max, hd]
        values = v_slots[batch.slots].transpose(1, 2)
        q = q.to(cache.k.dtype)
        q_rows = q if batch.q_index is None else q.index_select(0, batch.q_index)
        q_heads = q_rows.view(b, -1, c.num_heads, c.head_dim).transpose(1, 2)  # [B, nh, q_max, hd]
        out = F.scaled_dot_product_attention(q_heads, keys, values, attn_mask=batch.mask,
                                             enable_gqa=c.num_heads != c.num_kv_heads)
        out = out.transpose(1, 2).reshape(-1, self.q_size)  # [B * q_max, nh * hd]
        return out if batch.out_index is None else out.index_select(0, batch.out_index)

    def hidden_states(self, input_ids: torch.Tensor, positions: torch.Tensor, meta: AttentionMetadata,
                      cache: KVCache, num_layers: int | None = None, fused_step: bool = False) -> torch.Tensor:
        """Run the first ``num_layers`` layers (all by default); returns the residual stream [T, H].
        fused_step: in one call of the fused int8 layers (`_fused_step` said so)."""
        eps = self.config.rms_norm_eps
        hidden = self.embed[input_ids]
        if fused_step:
            info, slots = meta.kernel_args
            return self.fused.forward(hidden, *cache.slot_views(), self.cos[positions], self.signed_sin[positions],
                                      meta.slot_mapping, info, slots, num_layers or self.num_layers)
        cos, sin = self.cos[positions], self.signed_sin[positions]  # fp32 [T, hd] for the native rows
        if not self._native_rows(cache):
            cos, sin = cos.unsqueeze(1).to(self.dtype), sin.unsqueeze(1).to(self.dtype)
        layers = self.layers[: num_layers or self.num_layers]
        x = self._rms_norm(hidden, layers[0].attn_norm, eps) if layers else hidden
        for i, lw in enumerate(layers):
            x = self._add_rms_norm(hidden, self._attention(x, i, lw, cos, sin, meta, cache), lw.ffn_norm, eps)
            delta = lw.down(self._swiglu(lw.gate_up(x, meta.decode_step)), meta.decode_step)
            if i + 1 < len(layers):
                x = self._add_rms_norm(hidden, delta, layers[i + 1].attn_norm, eps)
            else:
                hidden += delta
        return hidden

    def _fused_step(self, rows: int, max_q_len: int, decode_step: bool, cache: KVCache) -> bool:
        """Whether a step runs the fused int8 layers (and the int8 LM head): up to fused_max_rows
        rows, and every decode or verification step whatever its rows (meta.decode_step), so that a
        decoding sequence's rows keep their kernels as the batch around it grows: greedy speculation
        equals plain decoding at batch 16 too. (A step that mixes decode rows with a long prompt chunk
        is run as two: see decode_rows_need_own_pass.) On a 2-core AVX512-BF16 EPYC the fused int8 step
        costs what the op-by-op step (dense bf16 past 16 rows) does up to ~120 rows, and 1.08-1.14x
        its time at 16 sequences x 9-17 rows."""
        return (self.fused is not None and (rows <= self.fused_max_rows or decode_step)
                and self._native_attention_fits(max_q_len, cache))

    def _step_kernels(self, rows: int, max_q_len: int, decode_step: bool, logit_rows: int, cache: KVCache) -> tuple:
        """What decides a step's numerics row for row: the fused int8 layers, or the attention
        kernel, each projection's kernel and the LM head's."""
        if self._fused_step(rows, max_q_len, decode_step, cache):
            return (FUSED_STEP,)
        lw = self.layers[0]
        return (self._native_attention_fits(max_q_len, cache),
                *(proj.kernel(rows, decode_step) for proj in (lw.qkv, lw.o, lw.gate_up, lw.down)),
                self.lm_head.kernel(logit_rows, decode_step))

    def decode_rows_need_own_pass(self, meta: AttentionMetadata, cache: KVCache) -> bool:
        """Whether a step that mixes decoding sequences (SeqAttention.decodes) with prompt chunks
        would run the decoding rows on other kernels than a step of those sequences alone (a long
        chunk takes the dense weights, or PyTorch's attention). The runner then runs the two groups
        as two passes, so a sequence's tokens do not depend on which prompts arrive beside it:
        greedy output is the same whatever the traffic, and speculation stays equal to plain
        decoding. Only where the native kernels make rows batch-invariant (CPU)."""
        if self.native is None or meta.decode_step:
            return False
        decoding = [sa for sa in meta.seqs if sa.decodes]
        if not decoding:
            return False
        whole = self._step_kernels(meta.slot_mapping.numel(), meta.max_q_len, False,
                                   sum(sa.num_logits for sa in meta.seqs), cache)
        alone = self._step_kernels(sum(sa.q_len for sa in decoding), max(sa.q_len for sa in decoding), True,
                                   sum(sa.num_logits for sa in decoding), cache)
        return whole != alone

    def _native_rows(self, cache: KVCache) -> bool:
        """Whether the native kernels read and write this cache (RoPE + K/V write, attention)."""
        return self.native is not None and cache.k.device.type == "cpu" and cache.k.dtype in NATIVE_KV_DTYPES

    def _add_rms_norm(self, hidden: torch.Tensor, delta: torch.Tensor, weight: torch.Tensor,
                      eps: float) -> torch.Tensor:
        """hidden += delta in place (the residual stream), then the next RMSNorm of it."""
        if self.native is not None:
            return self.native.add_rms_norm(hidden, delta, weight, eps)
        hidden += delta
        return self._rms_norm(hidden, weight, eps)

    def _rms_norm(self, x: torch.Tensor, weight: torch.Tensor, eps: float) -> torch.Tensor:
        if self.native is not None:
            return self.native.rms_norm(x, weight, eps)
        return F.rms_norm(x, (x.shape[-1],), weight, eps)

    def _swiglu(self, gate_up: torch.Tensor) -> torch.Tensor:
        if self.native is not None:
            return self.native.swiglu(gate_up)
        gate, up = gate_up.chunk(2, dim=-1)
        return F.silu(gate) * up

    def logits(self, hidden: torch.Tensor, fused_step: bool = False, decode_step: bool = False) -> torch.Tensor:
        """fused_step: the step ran the fused int8 layers, so its rows take the int8 LM head too;
        decode_step: see Projection.__call__."""
        x = self._rms_norm(hidden, self.norm, self.config.rms_norm_eps)
        return (self.lm_head.int8(x) if fused_step else self.lm_head(x, decode_step)).float()

    @torch.inference_mode()
    def forward(self, input_ids: torch.Tensor, positions: torch.Tensor, meta: AttentionMetadata,
                cache: KVCache, logits_indices: torch.Tensor | None = None,
                num_layers: int | None = None) -> torch.Tensor:
        """Logits [M, V] for the flat tokens at ``logits_indices`` (all tokens when None)."""
        fused_step = self._fused_step(input_ids.shape[0], meta.max_q_len, meta.decode_step, cache)
        hidden = self.hidden_states(input_ids, positions, meta, cache, num_layers, fused_step)
        if logits_indices is not None:
            if logits_indices.numel() == 0:  # prefill chunks that end no prompt: no LM head at all
                return hidden.new_empty((0, self.config.vocab_size), dtype=torch.float32)
            hidden = hidden[logits_indices]
        return self.logits(hidden, fused_step, meta.decode_step)
