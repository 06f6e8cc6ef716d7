"""Our model's logits equal transformers' on the same weights (fp32, max abs diff < 1e-4)."""

from __future__ import annotations

import json

import pytest
import torch

from specache.engine.runner import BatchItem, ModelRunner
from specache.engine.sequence import Sequence
from specache.kv.block_pool import BlockPool
from specache.kv.cache import KVCache
from specache.models.llama import LlamaModel
from specache.models.loader import load_model
from specache.sampling import SamplingParams

TOL = 1e-4
BLOCK = 4  # small blocks so sequences span many of them


def _setup(model_dir):
    from transformers import AutoModelForCausalLM

    loaded = load_model(str(model_dir))
    c = loaded.config
    model = LlamaModel(c, loaded.weights)
    pool = BlockPool(256, BLOCK)
    runner = ModelRunner(model, KVCache(c.num_layers, 256, BLOCK, c.num_kv_heads, c.head_dim))
    hf = AutoModelForCausalLM.from_pretrained(str(model_dir), dtype=torch.float32).eval()
    return runner, pool, hf


def _hf_logits(hf, ids: list[int]) -> torch.Tensor:
    with torch.no_grad():
        return hf(torch.tensor([ids])).logits[0].float()


def _seq(i: int, ids: list[int]) -> Sequence:
    return Sequence(i, str(i), 0, ids, SamplingParams(temperature=0))


def _grow(pool: BlockPool, seq: Sequence, n: int) -> None:
    need = pool.blocks_needed(n) - len(seq.block_table)
    if need > 0:
        seq.block_table += pool.allocate(need)


@pytest.mark.parametrize("fixture", ["tiny_model_dir", "tiny_qwen2_dir"])
def test_prefill_and_32_decode_steps_match_transformers(fixture, request):
    runner, pool, hf = _setup(request.getfixturevalue(fixture))
    prompt = torch.randint(0, 49152, (13,), generator=torch.Generator().manual_seed(1)).tolist()
    seq = _seq(0, prompt)
    _grow(pool, seq, len(prompt))
    logits = runner.run([BatchItem(seq, prompt, 0, len(prompt))])[0]
    ref = _hf_logits(hf, prompt)
    assert (logits - ref).abs().max().item() < TOL
    seq.num_computed = len(prompt)
    for _ in range(32):
        seq.append(int(logits[-1].argmax()))
        _grow(pool, seq, seq.num_tokens)
        logits = runner.run([BatchItem(seq, [seq.tokens[-1]], seq.num_tokens - 1, 1)])[0]
        seq.num_computed = seq.num_tokens
        ref = _hf_logits(hf, seq.tokens)[-1:]
        assert (logits - ref).abs().max().item() < TOL


ATTENTION_PATHS = ["native", "per-sequence", "batched"]


def _use_attention(model: LlamaModel, path: str, monkeypatch) -> list[int]:
    """Pin the attention path: the native kernel (where built), one SDPA per sequence, or one padded
    SDPA for the whole batch (CUDA's path, checked here on the CPU). Returns a count of the batched
    calls, so a test sees that its path ran."""
    if path != "native":
        model.native = None
    model.batched_attention = path == "batched"
    calls = [0]
    batched = model._batched_attention

    def counted(*args):
        calls[0] += 1
        return batched(*args)

    monkeypatch.setattr(model, "_batched_attention", counted)
    return calls


@pytest.mark.parametrize("path", ATTENTION_PATHS)
def test_mixed_batch_of_prefills_and_decodes_matches_transformers(tiny_model_dir, path, monkeypatch):
    """Sequences of different lengths, some prefilling (with a cached prefix) and some decoding."""
    runner, pool, hf = _setup(tiny_model_dir)
    batched_calls = _use_attention(runner.model, path, monkeypatch)
    gen = torch.Generator().manual_seed(2)
    prompts = [torch.randint(0, 49152, (n,), generator=gen).tolist() for n in (5, 17, 9, 30)]
    seqs = [_seq(i, p) for i, p in enumerate(prompts)]
    # First compute a prefix of each sequence alone, leaving a different remainder for each.
    done = [4, 16, 3, 11]
    for s, d in zip(seqs, done, strict=True):
        _grow(pool, s, s.num_tokens)
        runner.run([BatchItem(s, s.tokens[:d], 0, 0)])
    items = [BatchItem(s, s.tokens[d:], d, s.num_tokens - d) for s, d in zip(seqs, done, strict=True)]
    out = runner.run(items)
    for s, d, lg in zip(seqs, done, out, strict=True):
        ref = _hf_logits(hf, s.tokens)[d:]
        assert lg.shape == ref.shape
        assert (lg - ref).abs().max().item() < TOL
    assert (batched_calls[0] > 0) == (path == "batched")


@pytest.mark.parametrize("path", ATTENTION_PATHS)
def test_a_batch_of_decodes_over_scattered_blocks_matches_transformers(tiny_model_dir, path, monkeypatch):
    runner, pool, hf = _setup(tiny_model_dir)
    batched_calls = _use_attention(runner.model, path, monkeypatch)
    gen = torch.Generator().manual_seed(4)
    seqs = [_seq(i, torch.randint(0, 49152, (n,), generator=gen).tolist()) for i, n in enumerate((3, 22, 9, 14))]
    for _ in range(pool.blocks_needed(22 + 8)):  # one block each in turn: the sequences' blocks interleave
        for s in seqs:
            if len(s.block_table) < pool.blocks_needed(s.num_tokens + 8):
                s.block_table += pool.allocate(1)
    logits = runner.run([BatchItem(s, s.tokens, 0, 1) for s in seqs])
    for s in seqs:
        s.num_computed = s.num_tokens
    for _ in range(3):
        for s, lg in zip(seqs, logits, strict=True):
            s.append(int(lg[-1].argmax()))
        logits = runner.run([BatchItem(s, [s.tokens[-1]], s.num_tokens - 1, 1) for s in seqs])
        for s, lg in zip(seqs, logits, strict=True):
            s.num_computed = s.num_tokens
            assert (lg - _hf_logits(hf, s.tokens)[-1:]).abs().max().item() < TOL
    assert (batched_calls[0] > 0) == (path == "batched")


def _prefill_then_decode(model: LlamaModel, prompt: list[int], steps: int,
                         forced: list[int] | None = None) -> tuple[list[torch.Tensor], list[int]]:
    """Logits of the prompt's last token and of `steps` decode steps (one row each), feeding the
    greedy tokens or, when given, the `forced` ones (so two models see the same inputs)."""
    c = model.config
    pool = BlockPool(64, BLOCK)
    runner = ModelRunner(model, KVCache(c.num_layers, 64, BLOCK, c.num_kv_heads, c.head_dim))
    seq = _seq(0, prompt)
    _grow(pool, seq, len(prompt))
    rows = [runner.run([BatchItem(seq, prompt, 0, 1)])[0][-1]]
    seq.num_computed = len(prompt)
    for i in range(steps):
        seq.append(forced[i] if forced else int(rows[-1].argmax()))
        _grow(pool, seq, seq.num_tokens)
        rows.append(runner.run([BatchItem(seq, [seq.tokens[-1]], seq.num_tokens - 1, 1)])[0][-1])
    return rows, seq.output_ids


def test_int8_and_hybrid_weights_stay_close_to_dense_and_hybrid_prefill_is_exact(tiny_model_dir):
    """int8 logits track fp32 within a few percent of their spread, fed the same tokens; hybrid
    prefills a prompt longer than its int8 steps (above 64 rows, the fused step's floor) with the
    dense weights, so its prompt logits are closer than int8's. (The switch point is set as
    calibrated on a CPU whose dense GEMM wins at prefill sizes: on an AVX2 CPU with bf16 weights
    int8 wins everywhere and hybrid prefills in int8 too.)"""
    loaded = load_model(str(tiny_model_dir))
    prompt = torch.randint(0, 49152, (70,), generator=torch.Generator().manual_seed(3)).tolist()
    dense, tokens = _prefill_then_decode(LlamaModel(loaded.config, loaded.weights), prompt, 8)
    prefill_error = {}
    for fmt in ("int8", "hybrid"):
        model = LlamaModel(loaded.config, loaded.weights, weight_format=fmt)
        if fmt == "hybrid":
            for proj in _projections(model):
                proj.int8_max_rows = 64
        quant, _ = _prefill_then_decode(model, prompt, 8, forced=tokens)
        assert all(row.dtype == torch.float32 for row in quant)  # int8 weights keep fp32 activations
        for q, d in zip(quant, dense, strict=True):
            assert (q - d).abs().max().item() < 0.05 * (d.max() - d.min()).item()
        prefill_error[fmt] = (quant[0] - dense[0]).abs().max().item()
    assert prefill_error["hybrid"] < prefill_error["int8"]


def _projections(model: LlamaModel) -> list:
    return [model.lm_head] + [p for lw in model.layers for p in (lw.qkv, lw.o, lw.gate_up, lw.down)]


def test_hybrid_verification_step_gets_each_rows_decode_logits(tiny_model_dir, monkeypatch, fresh_switch_points):
    """A step on the fused int8 layers takes the int8 LM head whatever the head's own calibration
    (forced to 8 rows here): a 17-row step (K = 16 drafts) gives, row for row, the logits of
    decoding those tokens one at a time, so greedy speculation equals plain decoding on hybrid."""
    from specache.models import llama

    if llama.kernels.load() is None:
        pytest.skip("the fused int8 path needs the native kernels")
    monkeypatch.setattr(llama, "calibrate_int8_max_rows", lambda *args: 8)  # forced, not measured
    loaded = load_model(str(tiny_model_dir))
    model = LlamaModel(loaded.config, loaded.weights, weight_format="hybrid")
    assert model.lm_head.int8_max_rows == 8  # a 17-row step is past the head's own switch point
    prompt = torch.randint(0, 49152, (20,), generator=torch.Generator().manual_seed(5)).tolist()
    decoded, tokens = _prefill_then_decode(model, prompt, 17)
    c = model.config
    pool = BlockPool(64, BLOCK)
    runner = ModelRunner(model, KVCache(c.num_layers, 64, BLOCK, c.num_kv_heads, c.head_dim))
    seq = _seq(0, prompt)
    _grow(pool, seq, len(prompt) + 17)
    runner.run([BatchItem(seq, prompt, 0, 1)])
    verified = runner.run([BatchItem(seq, tokens, len(prompt), 17)])[0]  # the 17 decoded tokens at once
    for i in range(17):
        assert torch.equal(verified[i], decoded[i + 1])


@pytest.mark.parametrize(("weight_format", "dtype"), [("hybrid", torch.bfloat16), ("dense", torch.bfloat16),
                                                   ("dense", torch.float32)])
def test_decoding_rows_beside_a_long_prompt_chunk_keep_their_logits(tiny_model_dir, weight_format, dtype,
                                                                     monkeypatch, fresh_switch_points):
    """A step that mixes a decoding sequence (one decode row, or five verification rows) with a
    300-token prompt chunk gives each of them, bit for bit, the logits of a step without the other.
    In one pass the chunk would take the decoding rows to PyTorch's attention (and, on hybrid
    weights, off the fused int8 layers onto the dense ones), so a request's greedy text would
    depend on which prompts arrived beside it."""
    from specache.models import llama

    if llama.kernels.load() is None:
        pytest.skip("batch-invariant rows need the native kernels")
    # hybrid: int8 up to 8 rows, as calibrated on a CPU whose dense GEMM wins prefill chunks
    monkeypatch.setattr(llama, "calibrate_int8_max_rows", lambda *args: 8)
    loaded = load_model(str(tiny_model_dir))
    model = LlamaModel(loaded.config, loaded.weights, dtype=dtype, weight_format=weight_format)
    c = model.config
    pool = BlockPool(128, BLOCK)
    runner = ModelRunner(model, KVCache(c.num_layers, 128, BLOCK, c.num_kv_heads, c.head_dim, dtype=dtype))
    generator = torch.Generator().manual_seed(6)
    prompt_a, prompt_b = (torch.randint(0, 49152, (n,), generator=generator).tolist() for n in (60, 300))
    a, b = _seq(0, prompt_a), _seq(1, prompt_b)
    _grow(pool, a, 65)
    _grow(pool, b, 300)
    runner.run([BatchItem(a, prompt_a, 0, 1)])
    chunk_alone = runner.run([BatchItem(b, prompt_b, 0, 1)])[0]
    for rows in ([7], [7, 8, 9, 10, 11]):
        alone = runner.run([BatchItem(a, rows, 60, len(rows), num_draft=len(rows) - 1)])[0]
        mixed = runner.run([BatchItem(a, rows, 60, len(rows), num_draft=len(rows) - 1),
                            BatchItem(b, prompt_b, 0, 1)])
        assert torch.equal(mixed[0], alone)
        assert torch.equal(mixed[1], chunk_alone)


def test_hybrid_calibrated_for_int8_everywhere_prefills_exactly_as_int8(tiny_model_dir):
    """Where calibration keeps int8 for every row count (CPUs whose bf16 GEMM is a slow path), a
    hybrid model's prefill runs the int8 weights: its logits are the int8 model's, bit for bit."""
    from specache.models.llama import INT8_ALWAYS

    loaded = load_model(str(tiny_model_dir))
    prompt = torch.randint(0, 49152, (70,), generator=torch.Generator().manual_seed(4)).tolist()
    int8, tokens = _prefill_then_decode(LlamaModel(loaded.config, loaded.weights, weight_format="int8"), prompt, 3)
    hybrid = LlamaModel(loaded.config, loaded.weights, weight_format="hybrid")
    for proj in _projections(hybrid):
        proj.int8_max_rows = INT8_ALWAYS
    got, _ = _prefill_then_decode(hybrid, prompt, 3, forced=tokens)
    assert all(torch.equal(g, i) for g, i in zip(got, int8, strict=True))


def test_hybrid_calibration_picks_a_switch_point_per_projection(tiny_model_dir):
    from specache.models.llama import CALIBRATION_ROWS, INT8_ALWAYS

    loaded = load_model(str(tiny_model_dir))
    model = LlamaModel(loaded.config, loaded.weights, weight_format="hybrid")
    assert all(p.int8_max_rows in (0, *CALIBRATION_ROWS, INT8_ALWAYS) for p in _projections(model))
    # every layer shares the measurement of its shape
    assert len({lw.gate_up.int8_max_rows for lw in model.layers}) == 1


def test_hybrid_calibration_is_measured_once_per_shape_in_a_process(tiny_model_dir, monkeypatch,
                                                                     fresh_switch_points):
    """Where int8 and dense are at parity the measurement is a coin toss; two engines of a process
    that disagreed would prefill the same chunk with different numerics (greedy speculative output
    left plain output in bench spec). Every engine reuses the first measurement of each shape."""
    from specache.models import llama

    calls = []
    outcomes = iter(range(1, 1000))  # each measurement different, as noise can make them

    def measure(column, dtype, device):
        calls.append(tuple(column[0].q.shape))
        return next(outcomes)

    monkeypatch.setattr(llama, "calibrate_int8_max_rows", measure)
    loaded = load_model(str(tiny_model_dir))
    first = LlamaModel(loaded.config, loaded.weights, weight_format="hybrid")
    second = LlamaModel(loaded.config, loaded.weights, weight_format="hybrid")
    assert [p.int8_max_rows for p in _projections(second)] == [p.int8_max_rows for p in _projections(first)]
    assert len(calls) == len(set(calls)) == 5  # qkv, o, gate_up, down and the LM head, once each


def _counting_measurements(monkeypatch) -> list:
    """Replaces the timing with a fixed answer per shape (so a test runs in milliseconds) and
    records each measurement."""
    from specache.models import llama

    calls = []

    def measure(column, dtype, device):
        calls.append(tuple(column[0].q.shape))
        return 16 if column[0].q.shape[0] > 1000 else 4

    monkeypatch.setattr(llama, "calibrate_int8_max_rows", measure)
    return calls


def test_hybrid_switch_points_are_kept_on_disk_for_the_next_process(tiny_model_dir, monkeypatch,
                                                                    fresh_switch_points):
    """~3 s of a 5 s load on the real model, and a coin toss at parity: measured once per machine."""
    from specache.models import llama

    calls = _counting_measurements(monkeypatch)
    loaded = load_model(str(tiny_model_dir))
    first = [p.int8_max_rows for p in _projections(LlamaModel(loaded.config, loaded.weights, weight_format="hybrid"))]
    assert len(calls) == 5 and len(json.loads(fresh_switch_points.read_text())) == 5
    monkeypatch.setattr(llama, "_CALIBRATIONS", {})  # what a new process starts with
    second = LlamaModel(loaded.config, loaded.weights, weight_format="hybrid")
    assert len(calls) == 5  # read from the file, not measured
    assert [p.int8_max_rows for p in _projections(second)] == first


@pytest.mark.parametrize("case", ["corrupt", "not a table", "recalibrate", "other machine", "unwritable"])
def test_hybrid_switch_points_are_measured_again_when_the_file_cannot_be_used(
        tiny_model_dir, monkeypatch, fresh_switch_points, caplog, case):
    from specache import kernels
    from specache.models import llama, switch_points

    calls = _counting_measurements(monkeypatch)
    loaded = load_model(str(tiny_model_dir))
    LlamaModel(loaded.config, loaded.weights, weight_format="hybrid")
    monkeypatch.setattr(llama, "_CALIBRATIONS", {})
    if case == "corrupt":
        fresh_switch_points.write_text('{"half a fi')
    elif case == "not a table":
        fresh_switch_points.write_text('{"x": "sixteen"}')
    elif case == "recalibrate":
        monkeypatch.setenv(switch_points.RECALIBRATE_ENV, "1")
    elif case == "other machine":
        monkeypatch.setattr(kernels, "machine_identity", lambda: "another CPU")
    else:  # a file where its directory should be
        monkeypatch.setenv(switch_points.PATH_ENV, str(fresh_switch_points / "switch-points.json"))
    with caplog.at_level("WARNING", logger="specache.models.switch_points"):
        model = LlamaModel(loaded.config, loaded.weights, weight_format="hybrid")
    assert len(calls) == 10  # measured again, and the model loads all the same
    assert model.layers[0].gate_up.int8_max_rows == 4
    if case in ("corrupt", "not a table", "unwritable"):
        assert "switch points" in caplog.text
    if case in ("corrupt", "not a table"):  # rewritten whole
        assert len(json.loads(fresh_switch_points.read_text())) == 5


@pytest.mark.parametrize("int8_wins_up_to,prefill_speedup,expected",
                         [(0, 9.0, 0), (4, 9.0, 4), (64, 9.0, 64), (256, 2.5, 128), (256, 3.0, "always")])
def test_hybrid_calibration_switches_at_the_first_loss_and_keeps_int8_for_prefill_where_it_wins_by_far(
        tiny_model_dir, monkeypatch, int8_wins_up_to, prefill_speedup, expected):
    from specache.models import llama

    loaded = load_model(str(tiny_model_dir))
    model = LlamaModel(loaded.config, loaded.weights, weight_format="int8")
    asked = []

    def int8_speedup(column, rows, dtype, device):
        asked.append((rows, len(column)))
        if rows == llama.PREFILL_CALIBRATION_ROWS:
            return prefill_speedup
        return 1.2 if rows <= int8_wins_up_to else 0.9

    monkeypatch.setattr(llama, "_int8_speedup", int8_speedup)
    column = [lw.gate_up for lw in model.layers]
    got = llama.calibrate_int8_max_rows(column, torch.float32, "cpu")
    assert got == (llama.INT8_ALWAYS if expected == "always" else expected)
    # the prefill-sized check only where int8 won every decode size, on a few layers' copies
    prefill_checks = [n for rows, n in asked if rows == llama.PREFILL_CALIBRATION_ROWS]
    wins_every_size = int8_wins_up_to >= llama.CALIBRATION_ROWS[-1]
    assert prefill_checks == ([min(len(column), llama.PREFILL_CALIBRATION_LAYERS)] if wins_every_size else [])


def test_hybrid_calibration_does_not_time_large_sizes_where_int8_already_wins_by_far(tiny_model_dir, monkeypatch):
    """Where dense bf16 takes a slow path (int8 3x+ as fast at 64 rows), timing the whole column at
    128 rows would add seconds to every load: that size is taken untimed."""
    from specache.models import llama

    loaded = load_model(str(tiny_model_dir))
    model = LlamaModel(loaded.config, loaded.weights, weight_format="int8")
    asked = []

    def int8_speedup(column, rows, dtype, device):
        asked.append(rows)
        return 4.0 if rows <= 64 else 2.0  # the prefill-sized check: not by far

    monkeypatch.setattr(llama, "_int8_speedup", int8_speedup)
    assert llama.calibrate_int8_max_rows([lw.gate_up for lw in model.layers], torch.float32, "cpu") == 128
    assert asked == [r for r in llama.CALIBRATION_ROWS if r <= 64] + [llama.PREFILL_CALIBRATION_ROWS]


def test_decode_steps_are_told_apart_from_prefill():
    """AttentionMetadata.decode_step: every sequence brings at most K + 1 tokens after cached ones.
    A batch of short fresh prompts is prefill (it keeps the calibrated prefill kernels)."""
    from specache.engine.runner import build_metadata
    from specache.models.llama import VERIFY_MAX_Q

    pool = BlockPool(64, BLOCK)
    a, b = _seq(0, list(range(30))), _seq(1, list(range(10)))
    _grow(pool, a, 60)
    _grow(pool, b, 60)

    def decode_step(*items: BatchItem) -> bool:
        return build_metadata(list(items), BLOCK, torch.device("cpu"))[2].decode_step

    assert not decode_step(BatchItem(b, b.prompt_ids, 0, 1))  # a 10-token prompt, nothing cached
    assert decode_step(BatchItem(a, [1], 30, 1), BatchItem(b, [2], 10, 1))
    assert decode_step(BatchItem(a, list(range(VERIFY_MAX_Q)), 30, VERIFY_MAX_Q))  # K = 16 drafts
    assert not decode_step(BatchItem(a, list(range(VERIFY_MAX_Q + 1)), 30, 1))  # a prompt chunk
    assert not decode_step(BatchItem(a, [1], 30, 1), BatchItem(b, b.prompt_ids, 0, 1))  # mixed
