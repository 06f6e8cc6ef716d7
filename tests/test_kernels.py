"""The native CPU kernels against PyTorch references: int8 GEMV, paged attention, the fused step."""

from __future__ import annotations

import os

import pytest
import torch
import torch.nn.functional as F
from test_model_parity import _prefill_then_decode

from specache import kernels
from specache.models.llama import AttentionMetadata, LlamaModel, SeqAttention
from specache.models.loader import load_model


@pytest.fixture(scope="module")
def native():
    if os.environ.get(kernels.DISABLE_ENV, "") not in ("", "0"):
        pytest.skip(f"{kernels.DISABLE_ENV} is set")
    module = kernels.load()
    assert module is not None, "the native kernels must build here (gcc and ninja are installed by make)"
    return module


def _quantize(w: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    scale = w.abs().amax(dim=1) / 127.0
    return (w / scale[:, None]).round().clamp(-127, 127).to(torch.int8), scale


@pytest.mark.parametrize("rows", [1, 2, 3, 4, 5, 8, 13])
@pytest.mark.parametrize("n,k", [(64, 64), (37, 577), (960, 576), (8, 15)])
def test_int8_linear_matches_float64(native, rows, n, k):
    torch.manual_seed(rows * 1000 + n + k)
    q, scale = _quantize(torch.randn(n, k))
    x = torch.randn(rows, k)
    expected = x.double() @ (q.double() * scale.double()[:, None]).t()
    got = native.int8_linear(x, q, scale)
    assert got.dtype == torch.float32 and got.shape == (rows, n)
    torch.testing.assert_close(got.double(), expected, rtol=1e-5, atol=1e-4)
    got_bf16 = native.int8_linear(x.bfloat16(), q, scale)  # bf16 in, bf16 out, fp32 inside
    assert got_bf16.dtype == torch.bfloat16
    expected_bf16 = x.bfloat16().double() @ (q.double() * scale.double()[:, None]).t()
    torch.testing.assert_close(got_bf16.double(), expected_bf16, rtol=1e-2, atol=2e-2)


def test_int8_linear_rows_do_not_depend_on_the_batch(native):
    """The AVX-512 / AVX2 GEMV (no packed copy: CPUs without AMX) sums each row in the same order whatever
    the batch, so verifying K drafts in one pass gives the logits of decoding them one at a time."""
    q, scale = _quantize(torch.randn(300, 576))
    x = torch.randn(7, 576)
    together = native.int8_linear(x, q, scale)
    for i in range(7):
        assert torch.equal(native.int8_linear(x[i: i + 1], q, scale)[0], together[i])


def _dense_layouts(native, w: torch.Tensor) -> list[tuple[torch.Tensor, bool]]:
    """(weights, packed) for every path dense_linear has on this CPU for w's dtype: the row-major
    GEMV (bf16 only), and dense_pack's layout where it returns one (fp32 on AVX-512, bf16 on
    AVX512-BF16)."""
    packed = native.dense_pack(w)
    layouts = [(w, False)] if w.dtype == torch.bfloat16 else []
    return layouts + ([(packed, True)] if packed.numel() else [])


@pytest.mark.parametrize("rows", [1, 2, 3, 7, 8, 9, 17, 40])
@pytest.mark.parametrize("n,k", [(64, 64), (960, 576), (48, 38), (37, 577)])
def test_dense_linear_matches_float64(native, rows, n, k):
    torch.manual_seed(rows * 1000 + n + k)
    w = torch.randn(n, k) / k ** 0.5
    x = torch.randn(rows, k)
    for weights, packed in _dense_layouts(native, w):  # fp32: fp32 products, fp32 sums
        got = native.dense_linear(x, weights, packed)
        assert got.dtype == torch.float32 and got.shape == (rows, n)
        torch.testing.assert_close(got.double(), x.double() @ w.double().t(), rtol=1e-5, atol=1e-5)
    w = w.bfloat16()
    for weights, packed in _dense_layouts(native, w):
        # the packed bf16 path multiplies bf16 pairs (x rounded to bf16), the GEMV fp32 x
        expected = x.bfloat16().double() @ w.double().t() if packed else x.double() @ w.double().t()
        got = native.dense_linear(x, weights, packed)
        assert got.dtype == torch.float32 and got.shape == (rows, n)
        torch.testing.assert_close(got.double(), expected, rtol=1e-5, atol=1e-5)
        got_bf16 = native.dense_linear(x.bfloat16(), weights, packed)  # bf16 in and out, fp32 sums
        assert got_bf16.dtype == torch.bfloat16
        torch.testing.assert_close(got_bf16.double(), x.bfloat16().double() @ w.double().t(), rtol=8e-3, atol=1e-3)


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
def test_dense_linear_rows_do_not_depend_on_the_batch(native, dtype):
    """Each output is one fp32 sum in a fixed order whatever the number of rows, unlike PyTorch's
    GEMMs (MKL's fp32 rows differ in the last bit between 1 and 64 rows, oneDNN's bf16 ones now and
    then): a verification step's rows then get the values their one-row decode steps would."""
    torch.manual_seed(0)
    w = (torch.randn(576, 1536) * 0.02).to(dtype)
    x = torch.randn(64, 1536).to(dtype)
    for weights, packed in _dense_layouts(native, w):
        together = native.dense_linear(x, weights, packed)
        for rows in (1, 2, 5, 8, 9, 17):
            assert torch.equal(native.dense_linear(x[:rows], weights, packed), together[:rows])
        for i in range(0, 64, 7):
            assert torch.equal(native.dense_linear(x[i: i + 1], weights, packed)[0], together[i])


def test_dense_pack_leaves_unpackable_shapes_alone(native):
    for dtype in (torch.float32, torch.bfloat16):
        assert native.dense_pack(torch.randn(15, 64).to(dtype)).numel() == 0  # outputs not a multiple of 16
    assert native.dense_pack(torch.randn(16, 63).bfloat16()).numel() == 0  # an odd number of bf16 inputs
    assert native.dense_linear(torch.randn(0, 64), torch.randn(16, 64).bfloat16()).shape == (0, 16)


def test_int8_linear_rejects_bad_shapes(native):
    q, scale = _quantize(torch.randn(16, 32))
    with pytest.raises(RuntimeError, match="shapes"):
        native.int8_linear(torch.randn(2, 31), q, scale)
    with pytest.raises(RuntimeError, match="dtypes"):
        native.int8_linear(torch.randn(2, 32), q.float(), scale)


def _reference_attention(q, k_slots, v_slots, seqs):
    """SDPA per sequence over gathered slots, causal with an offset (what the model did before)."""
    nh, nkv = q.shape[1], k_slots.shape[1]
    out = torch.empty_like(q, dtype=torch.float32)
    for q_start, q_len, slots in seqs:
        kv_len = len(slots)
        keys = k_slots[slots].float().transpose(0, 1).repeat_interleave(nh // nkv, 0)
        values = v_slots[slots].float().transpose(0, 1).repeat_interleave(nh // nkv, 0)
        mask = torch.arange(kv_len)[None, :] <= torch.arange(kv_len - q_len, kv_len)[:, None]
        queries = q[q_start: q_start + q_len].float().transpose(0, 1)
        out[q_start: q_start + q_len] = F.scaled_dot_product_attention(
            queries, keys, values, attn_mask=mask).transpose(0, 1)
    return out


def _rounds_to_bf16(native, group: int, d: int) -> bool:
    """Whether a bf16 cache's attention rounds the queries and probabilities to bf16 here: the
    AVX512-BF16 register path (head_dim 64 with up to 8 heads per KV head, 128 with up to 4) and the
    AMX prefill path (head_dim a multiple of 32). On other CPUs the generic path widens to fp32."""
    register_path = native.BF16_DOT_PRODUCTS and (d == 64 and group <= 8 or d == 128 and group <= 4)
    return register_path or (native.amx_attention() and d % 32 == 0)


@pytest.mark.parametrize("cache_dtype", [torch.float32, torch.bfloat16])
@pytest.mark.parametrize("nh,nkv,d", [(6, 2, 40), (9, 3, 64), (8, 2, 128), (4, 4, 64)])  # generic and register paths
def test_paged_attention_matches_sdpa_on_a_mixed_batch(native, cache_dtype, nh, nkv, d):
    torch.manual_seed(1)
    num_slots = 1024
    k_slots = torch.randn(num_slots, nkv, d).to(cache_dtype)
    v_slots = torch.randn(num_slots, nkv, d).to(cache_dtype)
    perm = torch.randperm(num_slots)
    # (q_len, kv_len): decode, verification of drafts, a chunk after a prefix, a whole short prompt;
    # then prefill chunks (from 32 tokens on AMX tiles with a bf16 cache): a prompt that is not a
    # multiple of 16, a 40-token chunk after 80 cached tokens, a longer prompt
    shapes = [(1, 1), (1, 130), (5, 77), (12, 200), (3, 3), (37, 37), (40, 120), (70, 70)]
    seqs, offset, used = [], 0, 0
    for q_len, kv_len in shapes:
        seqs.append((offset, q_len, perm[used: used + kv_len]))  # scattered, non-contiguous slots
        offset += q_len
        used += kv_len
    q = torch.randn(offset, nh, d)
    meta = AttentionMetadata(slot_mapping=torch.zeros(offset, dtype=torch.long),
                             seqs=[SeqAttention(s, n, slots, None) for s, n, slots in seqs])
    info, slots = meta.kernel_args
    got = native.paged_attention(q, k_slots, v_slots, info, slots, d ** -0.5)
    if cache_dtype == torch.float32 or not _rounds_to_bf16(native, nh // nkv, d):
        # fp32 arithmetic on the cache's values (a bf16 cache without AVX512-BF16: each key and value
        # widened exactly), so as tight as fp32
        torch.testing.assert_close(got, _reference_attention(q, k_slots, v_slots, seqs), rtol=1e-4, atol=1e-5)
    else:  # bf16 dot products: the scaled queries and the probabilities are rounded to bf16
        scale = d ** -0.5
        rounded_q = (q * scale).bfloat16().float() / scale
        torch.testing.assert_close(got, _reference_attention(rounded_q, k_slots, v_slots, seqs), rtol=1e-2, atol=5e-3)


def test_kernel_args_cover_contiguous_and_scattered_slots():
    meta = AttentionMetadata(slot_mapping=torch.tensor([5, 9]),
                             seqs=[SeqAttention(0, 1, slice(16, 22), None),
                                   SeqAttention(1, 1, torch.tensor([40, 41, 8, 9]), None)])
    info, slots = meta.kernel_args
    assert info.tolist() == [[0, 1, 6, 0], [1, 1, 4, 6]]
    assert slots.tolist() == [16, 17, 18, 19, 20, 21, 40, 41, 8, 9]


def _decode_logits(model: LlamaModel, prompt: list[int], steps: int) -> list[torch.Tensor]:
    """A 20-token prefill then greedy single-token steps (both on the fused path when it is there)."""
    return _prefill_then_decode(model, prompt, steps)[0]


@pytest.mark.parametrize("fixture", ["tiny_model_dir", "tiny_qwen2_dir"])  # qwen2: qkv bias
def test_fused_int8_step_matches_the_op_by_op_int8_model(native, fixture, request):
    loaded = load_model(str(request.getfixturevalue(fixture)))
    prompt = torch.randint(0, 49152, (20,), generator=torch.Generator().manual_seed(5)).tolist()
    fused_model = LlamaModel(loaded.config, loaded.weights, weight_format="int8")
    assert fused_model.fused is not None
    op_by_op = LlamaModel(loaded.config, loaded.weights, weight_format="int8")
    op_by_op.fused = None  # same int8 weights, one PyTorch op (and native GEMV) at a time
    fused_rows = _decode_logits(fused_model, prompt, 12)
    reference = _decode_logits(op_by_op, prompt, 12)
    for got, want in zip(fused_rows, reference, strict=True):  # measured: ~4e-5 of the spread
        assert (got - want).abs().max().item() < 1e-4 * (want.max() - want.min()).item()


def test_without_native_kernels_the_model_falls_back_to_pytorch(tiny_model_dir, monkeypatch):
    monkeypatch.setenv(kernels.DISABLE_ENV, "1")
    kernels.load.cache_clear()
    try:
        assert kernels.load() is None
        loaded = load_model(str(tiny_model_dir))
        model = LlamaModel(loaded.config, loaded.weights, weight_format="hybrid")
        assert model.fused is None and model.native is None
        prompt = list(range(100, 120))
        fallback = _decode_logits(model, prompt, 4)
    finally:
        monkeypatch.delenv(kernels.DISABLE_ENV)
        kernels.load.cache_clear()
    native_rows = _decode_logits(LlamaModel(loaded.config, loaded.weights, weight_format="hybrid"), prompt, 4)
    for got, want in zip(native_rows, fallback, strict=True):  # bf16 activations in the fallback's int8 kernel
        assert (got - want).abs().max().item() < 0.02 * (want.max() - want.min()).item()


def _packed_or_skip(native, q: torch.Tensor) -> torch.Tensor:
    packed = native.tile_pack(q)
    if packed.numel() == 0:
        pytest.skip("this CPU has neither AMX-INT8 nor AVX512-VNNI")
    return packed


def _limb_bound(x: torch.Tensor, q: torch.Tensor, scale: torch.Tensor) -> torch.Tensor:
    """The worst-case error of the two-limb activations: each element is off by at most
    max|row| / 64516, times the weights' absolute row sums (plus fp32 rounding of the sums)."""
    row_err = x.double().abs().amax(dim=1, keepdim=True) / 64516
    return row_err * (q.double().abs() * scale.double()[:, None]).sum(dim=1)[None, :] + 1e-5


def test_tile_path_matches_float64_and_is_batch_invariant(native):
    """With a packed copy every row count runs on AMX or AVX512-VNNI (int8 weights x two int8 limbs
    of each activation row), within the limbs' error bound of float64, and a row's result is
    bit-for-bit the same whatever its batch (greedy spec == plain on int8 weights)."""
    torch.manual_seed(7)
    x = torch.randn(40, 576)
    x[3] = 0.0  # an all-zero row
    x[5, 7] = 40.0  # an outlier: the limbs scale per row
    for n in (16, 80, 96, 112):  # 1, 5, 6, 7 output blocks: odd AMX pairs, partial VNNI groups
        q, scale = _quantize(torch.randn(n, 576))
        packed = _packed_or_skip(native, q)
        expected = x.double() @ (q.double() * scale.double()[:, None]).t()
        bound = _limb_bound(x, q, scale)
        for rows in (1, 2, 3, 4, 5, 8, 9, 16, 17, 40):  # every VNNI pass shape; several 16-row AMX tiles
            got = native.int8_linear(x[:rows], q, scale, packed)
            assert ((got.double() - expected[:rows]).abs() <= bound[:rows]).all()
        assert torch.equal(native.int8_linear(x[3:4], q, scale, packed), torch.zeros(1, n))
        broken = x[:2].clone()
        broken[1, 9] = float("nan")  # a NaN activation is not hidden: its row comes out NaN
        got = native.int8_linear(broken, q, scale, packed)
        assert got[1].isnan().all() and torch.equal(got[0], native.int8_linear(x[:1], q, scale, packed)[0])
    together = native.int8_linear(x, q, scale, packed)  # 40 rows: three tiles
    for i in range(40):
        assert torch.equal(native.int8_linear(x[i: i + 1], q, scale, packed)[0], together[i])
        assert torch.equal(native.int8_linear(x.roll(-i, 0)[:5], q, scale, packed)[0], together[i])


def test_tile_prefill_sized_path_matches_and_agrees_with_the_decode_path(native):
    """Prefill-sized row counts (on AMX above 64 rows the work goes in units of 512 rows x 256
    outputs: every 16-row tail, an odd output-block count and a second unit in both directions),
    fp32 and bf16 activations. A row's result is still bit-for-bit the one-row (decode) result."""
    torch.manual_seed(8)
    x = torch.randn(600, 576)
    for n in (48, 272):  # 3 output blocks; 17 blocks = two column units, the last one odd
        q, scale = _quantize(torch.randn(n, 576))
        packed = _packed_or_skip(native, q)
        expected = x.double() @ (q.double() * scale.double()[:, None]).t()
        bound = _limb_bound(x, q, scale)
        for rows in (65, 79, 80, 96, 97, 600):
            got = native.int8_linear(x[:rows], q, scale, packed)
            assert ((got.double() - expected[:rows]).abs() <= bound[:rows]).all()
            got_bf16 = native.int8_linear(x[:rows].bfloat16(), q, scale, packed)  # bf16 in and out
            assert got_bf16.dtype == torch.bfloat16
            expected_bf16 = x[:rows].bfloat16().double() @ (q.double() * scale.double()[:, None]).t()
            torch.testing.assert_close(got_bf16.double(), expected_bf16, rtol=1e-2, atol=2e-2)
        together = native.int8_linear(x, q, scale, packed)
        for i in (0, 15, 16, 31, 64, 511, 512, 599):
            assert torch.equal(native.int8_linear(x[i: i + 1], q, scale, packed)[0], together[i])


def test_argmax_rows_matches_torch_including_ties_and_tails(native):
    torch.manual_seed(9)
    for n in (1, 7, 16, 17, 49152):
        x = torch.randn(13, n)
        x[3] = 0.0  # all tied: the first index
        x[4, n // 2:] = x[4].max() + 1  # a tied run: its first index
        x[5] = float("-inf")
        assert torch.equal(native.argmax_rows(x), x.argmax(dim=-1))
    with pytest.raises(RuntimeError, match="argmax_rows"):
        native.argmax_rows(torch.randn(2, 3).bfloat16())


def test_tile_pack_leaves_untileable_shapes_alone(native):
    q, _ = _quantize(torch.randn(24, 40))  # N % 16 and K % 64 both off
    assert native.tile_pack(q).numel() == 0


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
def test_row_ops_match_pytorch(native, dtype):
    torch.manual_seed(3)
    x, weight = torch.randn(37, 576).to(dtype), torch.randn(576).to(dtype)
    tol = dict(rtol=1e-5, atol=1e-5) if dtype == torch.float32 else dict(rtol=2e-2, atol=2e-2)
    torch.testing.assert_close(native.rms_norm(x, weight, 1e-5),
                               F.rms_norm(x.float(), (576,), weight.float(), 1e-5).to(dtype), **tol)
    gate_up = (torch.randn(5, 2 * 1537) * 6).to(dtype)  # large |x|: both sigmoid branches; a scalar tail
    gate, up = gate_up.float().chunk(2, dim=-1)
    torch.testing.assert_close(native.swiglu(gate_up), (F.silu(gate) * up).to(dtype), **tol)
    with pytest.raises(RuntimeError, match="swiglu"):
        native.swiglu(torch.randn(2, 3))
    hidden, delta = x.clone(), torch.randn(37, 576).to(dtype)
    normed = native.add_rms_norm(hidden, delta, weight, 1e-5)
    summed = (x + delta).float()  # in place, rounded to the dtype as PyTorch's add rounds it
    torch.testing.assert_close(hidden.float(), summed, rtol=0, atol=0)
    torch.testing.assert_close(normed, F.rms_norm(summed, (576,), weight.float(), 1e-5).to(dtype), **tol)


@pytest.mark.parametrize("dtype, cache_dtype", [(torch.float32, torch.float32), (torch.bfloat16, torch.bfloat16),
                                                (torch.bfloat16, torch.float32)])
def test_rope_and_store_matches_pytorch(native, dtype, cache_dtype):
    """RoPE on q and k (q in place) and the K/V write into scattered cache slots, against
    apply_rope + index_copy_ on the same rows."""
    from specache.models.llama import apply_rope, rope_tables

    torch.manual_seed(4)
    nh, nkv, hd, t = 9, 3, 64, 7
    qkv = torch.randn(t, (nh + 2 * nkv) * hd).to(dtype)
    cos_table, sin_table = rope_tables(hd, 64, 10000.0, "cpu")
    signed_sin = torch.cat([-sin_table[:, : hd // 2], sin_table[:, hd // 2:]], dim=-1)
    positions, slots = torch.tensor([0, 1, 2, 9, 10, 40, 63]), torch.tensor([5, 3, 17, 0, 8, 30, 31])
    cos, sin = cos_table[positions], signed_sin[positions]
    rotated = apply_rope(qkv.float()[:, : (nh + nkv) * hd].view(t, nh + nkv, hd), cos[:, None], sin[:, None])
    k_slots, v_slots = torch.zeros(32, nkv, hd, dtype=cache_dtype), torch.zeros(32, nkv, hd, dtype=cache_dtype)
    got = qkv.clone()
    native.rope_and_store(got, cos, sin, k_slots, v_slots, slots, nh, nkv)
    tol = dict(rtol=1e-5, atol=1e-5) if dtype == cache_dtype == torch.float32 else dict(rtol=1e-2, atol=1e-2)
    torch.testing.assert_close(got[:, : nh * hd].float(), rotated[:, :nh].reshape(t, -1), **tol)
    torch.testing.assert_close(k_slots[slots].float(), rotated[:, nh:], **tol)
    torch.testing.assert_close(v_slots[slots].float(), qkv[:, (nh + nkv) * hd:].float().view(t, nkv, hd), **tol)
    assert torch.equal(got[:, nh * hd:], qkv[:, nh * hd:])  # k and v stay as they were in the rows
    with pytest.raises(RuntimeError, match="outside the cache"):
        native.rope_and_store(qkv.clone(), cos, sin, k_slots, v_slots, slots + 32, nh, nkv)


def _dequantized(weights: dict[str, torch.Tensor]) -> dict[str, torch.Tensor]:
    """The int8 model's weights as dense fp32 (quantize, dequantize per output row, as Projection does)."""
    projections = ("q_proj", "k_proj", "v_proj", "o_proj", "gate_proj", "up_proj", "down_proj", "lm_head")
    out = {}
    for name, w in weights.items():
        if any(p in name for p in projections) and name.endswith("weight"):
            q, scale = _quantize(w.float())
            w = q.float() * scale[:, None]
        out[name] = w
    return out


def _mixed_step(model: LlamaModel, cache_dtype: torch.dtype, num_layers: int | None) -> torch.Tensor:
    """A prefill of two sequences, then one step mixing a decode, a 4-token verification after a
    cached prefix and a fresh 5-token prompt; the second step's logits for every new token."""
    from specache.engine.runner import BatchItem, build_metadata
    from specache.engine.sequence import Sequence
    from specache.kv.cache import KVCache
    from specache.sampling import SamplingParams

    c = model.config
    cache = KVCache(c.num_layers, 16, 4, c.num_kv_heads, c.head_dim, dtype=cache_dtype)
    gen = torch.Generator().manual_seed(11)
    ids = [torch.randint(0, c.vocab_size, (n,), generator=gen).tolist() for n in (13, 11, 5)]
    seqs = [Sequence(i, str(i), 0, tokens, SamplingParams()) for i, tokens in enumerate(ids)]
    for seq, blocks in zip(seqs, ([0, 2, 1, 7], [4, 5, 6], [9, 3]), strict=True):  # scattered and contiguous
        seq.block_table = blocks

    def run(items: list[BatchItem]) -> torch.Tensor:
        input_ids, positions, meta, logits_idx = build_metadata(items, 4, torch.device("cpu"))
        return model.forward(input_ids, positions, meta, cache, logits_idx, num_layers)

    run([BatchItem(seqs[0], ids[0][:12], 0, 1), BatchItem(seqs[1], ids[1][:7], 0, 1)])
    return run([BatchItem(seqs[0], ids[0][12:], 12, 1), BatchItem(seqs[1], ids[1][7:], 7, 4),
                BatchItem(seqs[2], ids[2], 0, 5)])


@pytest.mark.parametrize("cache_dtype", [torch.float32, torch.bfloat16])
@pytest.mark.parametrize("num_layers", [None, 2])  # all layers, and a layer-skip draft's first two
def test_fused_step_matches_pytorch_on_the_same_dequantized_weights(native, tmp_path_factory, monkeypatch,
                                                                    cache_dtype, num_layers):
    """An independent reference: PyTorch's own ops (SDPA, F.rms_norm, dense fp32 matmuls) on the
    dequantized int8 weights, kernels off. head_dim 64 takes the register-resident attention."""
    from conftest import make_tiny_model

    model_dir = make_tiny_model(tmp_path_factory.mktemp("tiny-hd64"), hidden_size=256, intermediate_size=512,
                                num_attention_heads=4, num_key_value_heads=2, num_hidden_layers=3)
    loaded = load_model(str(model_dir))
    fused_model = LlamaModel(loaded.config, loaded.weights, weight_format="int8")
    assert fused_model.fused is not None
    got = _mixed_step(fused_model, cache_dtype, num_layers)
    monkeypatch.setenv(kernels.DISABLE_ENV, "1")
    kernels.load.cache_clear()
    try:
        reference_model = LlamaModel(loaded.config, _dequantized(loaded.weights))
        assert reference_model.native is None
        want = _mixed_step(reference_model, cache_dtype, num_layers)
    finally:
        monkeypatch.delenv(kernels.DISABLE_ENV)
        kernels.load.cache_clear()
    assert got.shape == want.shape == (10, loaded.config.vocab_size)
    # bf16-rounded activations into the int8 matmuls (and a bf16 cache) are the only differences;
    # with a bf16 cache the attention's dot products also round the queries and probabilities to
    # bf16 (measured: 0.68% / 1.02% of the spread for fp32 / bf16 caches; 0.80% for bf16 before)
    spread = (want.max(dim=-1).values - want.min(dim=-1).values)[:, None]
    assert ((got - want).abs() / spread).max().item() < (0.01 if cache_dtype == torch.float32 else 0.015)


def test_verification_steps_stay_on_the_row_attention_kernel(native):
    """Prefill chunks from AMX_ATTENTION_MIN_ROWS new tokens go to the tile-unit attention, which
    rounds differently from the row kernel; a verification step (at most MAX_SPEC_TOKENS drafts + 1
    rows per sequence) must stay below it, or greedy speculative output could leave plain output."""
    from specache.config import MAX_SPEC_TOKENS

    assert MAX_SPEC_TOKENS + 1 < native.AMX_ATTENTION_MIN_ROWS


@pytest.mark.parametrize("cache_dtype", [torch.float32, torch.bfloat16])
def test_attention_rows_do_not_depend_on_the_rows_beside_them(native, cache_dtype):
    """A verification step's rows come out bit for bit as the same tokens decoded one at a time,
    whatever else the step holds: greedy speculative output equals plain output only if they do."""
    torch.manual_seed(3)
    nh, nkv, d, context, new = 9, 3, 64, 300, 17
    k_slots = torch.randn(512, nkv, d).to(cache_dtype)
    v_slots = torch.randn(512, nkv, d).to(cache_dtype)
    slots = torch.randperm(512)[:context]
    q = torch.randn(new, nh, d)

    def attend(rows: slice, kv_len: int, others: int = 0) -> torch.Tensor:
        # `others`: unrelated decode sequences in the same step, ahead of this one
        seqs = [SeqAttention(i, 1, slots[:50 + i], None) for i in range(others)]
        seqs.append(SeqAttention(others, rows.stop - rows.start, slots[:kv_len], None))
        step_q = torch.cat([torch.randn(others, nh, d), q[rows]])
        meta = AttentionMetadata(slot_mapping=torch.zeros(len(step_q), dtype=torch.long), seqs=seqs)
        return native.paged_attention(step_q, k_slots, v_slots, *meta.kernel_args, d ** -0.5)[others:]

    start = context - new
    verify = attend(slice(0, new), context, others=3)
    for i in range(new):
        assert torch.equal(attend(slice(i, i + 1), start + i + 1, others=i % 3), verify[i: i + 1])


def test_int8_linear_takes_zero_rows(native):
    q, scale = _quantize(torch.randn(64, 576))
    packed = native.tile_pack(q)
    for x in (torch.randn(0, 576), torch.randn(0, 576).bfloat16()):
        y = native.int8_linear(x, q, scale, packed)
        assert y.shape == (0, 64) and y.dtype == x.dtype


def test_dense_linear_rejects_what_is_not_packed(native):
    w = torch.randn(32, 64)
    if native.dense_pack(w).numel() == 0:
        pytest.skip("no packed dense path on this CPU")
    with pytest.raises(RuntimeError, match="dense_pack's layout"):
        native.dense_linear(torch.randn(2, 64), torch.randn(24, 64), True)  # 24 outputs: never packed
    with pytest.raises(RuntimeError, match="fp32 or bf16"):
        native.dense_linear(torch.randn(2, 64).half(), native.dense_pack(w), True)
