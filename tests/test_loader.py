"""GGUF -> Hugging Face layout: config keys, tensor names, tied embeddings, llama.cpp's q/k row
permutation undone exactly, one-time idempotent conversion, and the `specache convert` CLI."""

from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path

import gguf
import numpy as np
import pytest
import torch
from hypothesis import given, settings
from hypothesis import strategies as st

from specache.errors import ModelFormatError
from specache.models import loader
from specache.models.loader import (
    MANIFEST,
    convert_gguf,
    file_fingerprint,
    gguf_config,
    gguf_weights,
    hf_name_for_gguf,
    load_hf_dir,
    unpermute_rope_rows,
)

DIMS = dict(vocab=64, hidden=32, inter=48, layers=2, heads=4, kv_heads=2)  # head_dim 8


def llama_cpp_permute(w: np.ndarray, n_head: int) -> np.ndarray:
    """What llama.cpp's convert_hf_to_gguf.py does to q_proj / k_proj rows (LlamaModel.permute)."""
    rows = w.shape[0]
    return w.reshape(n_head, 2, rows // n_head // 2, *w.shape[1:]).swapaxes(1, 2).reshape(w.shape)


def hf_weights(seed: int = 0, tied: bool = False, vocab: int = DIMS["vocab"]) -> dict[str, np.ndarray]:
    rng = np.random.default_rng(seed)
    h, i, hd = DIMS["hidden"], DIMS["inter"], DIMS["hidden"] // DIMS["heads"]
    r = lambda *s: rng.standard_normal(s).astype(np.float32)  # noqa: E731
    w = {"model.embed_tokens.weight": r(vocab, h), "model.norm.weight": r(h)}
    if not tied:
        w["lm_head.weight"] = r(vocab, h)
    for layer in range(DIMS["layers"]):
        p = f"model.layers.{layer}."
        w |= {p + "input_layernorm.weight": r(h), p + "post_attention_layernorm.weight": r(h),
              p + "self_attn.q_proj.weight": r(DIMS["heads"] * hd, h),
              p + "self_attn.k_proj.weight": r(DIMS["kv_heads"] * hd, h),
              p + "self_attn.v_proj.weight": r(DIMS["kv_heads"] * hd, h),
              p + "self_attn.o_proj.weight": r(h, DIMS["heads"] * hd),
              p + "mlp.gate_proj.weight": r(i, h), p + "mlp.up_proj.weight": r(i, h),
              p + "mlp.down_proj.weight": r(h, i)}
    return w


GGUF_NAME = {  # written out by hand (not via the loader's table) so the mapping itself is tested
    "model.embed_tokens.weight": "token_embd.weight", "model.norm.weight": "output_norm.weight",
    "lm_head.weight": "output.weight", "input_layernorm.weight": "attn_norm.weight",
    "post_attention_layernorm.weight": "ffn_norm.weight", "self_attn.q_proj.weight": "attn_q.weight",
    "self_attn.k_proj.weight": "attn_k.weight", "self_attn.v_proj.weight": "attn_v.weight",
    "self_attn.o_proj.weight": "attn_output.weight", "mlp.gate_proj.weight": "ffn_gate.weight",
    "mlp.up_proj.weight": "ffn_up.weight", "mlp.down_proj.weight": "ffn_down.weight",
}


def gguf_name(hf: str) -> str:
    if hf in GGUF_NAME:
        return GGUF_NAME[hf]
    _, _, layer, rest = hf.split(".", 3)
    return f"blk.{layer}.{GGUF_NAME[rest]}"


def write_gguf(path: Path, weights: dict[str, np.ndarray], arch: str = "llama",
               quantize: tuple[str, ...] = (), extra_tensors: dict[str, np.ndarray] | None = None,
               vocab_size: bool = True, tokens: list[str] | None = None) -> Path:
    w = gguf.GGUFWriter(str(path), arch)
    w.add_block_count(DIMS["layers"])
    w.add_embedding_length(DIMS["hidden"])
    w.add_feed_forward_length(DIMS["inter"])
    w.add_head_count(DIMS["heads"])
    w.add_head_count_kv(DIMS["kv_heads"])
    w.add_rope_freq_base(50000.0)
    w.add_layer_norm_rms_eps(1e-6)
    w.add_context_length(256)
    if vocab_size:
        w.add_vocab_size(DIMS["vocab"])
    if tokens is not None:
        w.add_token_list(tokens)
    w.add_bos_token_id(1)
    w.add_eos_token_id(2)
    for hf, arr in weights.items():
        if hf.endswith("q_proj.weight") and arch == "llama":
            arr = llama_cpp_permute(arr, DIMS["heads"])
        elif hf.endswith("k_proj.weight") and arch == "llama":
            arr = llama_cpp_permute(arr, DIMS["kv_heads"])
        if any(hf.endswith(q) for q in quantize):
            w.add_tensor(gguf_name(hf), gguf.quants.quantize(arr, gguf.GGMLQuantizationType.Q8_0),
                         raw_dtype=gguf.GGMLQuantizationType.Q8_0)
        else:
            w.add_tensor(gguf_name(hf), arr)
    for name, arr in (extra_tensors or {}).items():
        w.add_tensor(name, arr)
    w.write_header_to_file()
    w.write_kv_data_to_file()
    w.write_tensors_to_file()
    w.close()
    return path


def read(path: Path):
    reader = gguf.GGUFReader(str(path))
    config = gguf_config(reader, name="tiny")
    return config, gguf_weights(reader, config, progress=False)


# ---------------------------------------------------------------- config and weights


def test_gguf_config_reads_the_llama_keys(tmp_path):
    config, _ = read(write_gguf(tmp_path / "t.gguf", hf_weights()))
    assert config.arch == "llama" and config.name == "tiny"
    assert (config.vocab_size, config.hidden_size, config.intermediate_size) == (64, 32, 48)
    assert (config.num_layers, config.num_heads, config.num_kv_heads, config.head_dim) == (2, 4, 2, 8)
    assert config.rope_theta == 50000.0 and config.rms_norm_eps == pytest.approx(1e-6)
    assert config.max_position_embeddings == 256
    assert config.bos_token_id == 1 and config.eos_token_ids == [2]
    assert not config.tie_word_embeddings and not config.attention_bias


def test_vocab_size_falls_back_to_the_token_list(tmp_path):
    tokens = [f"t{i}" for i in range(64)]
    path = write_gguf(tmp_path / "t.gguf", hf_weights(), vocab_size=False, tokens=tokens)
    config, _ = read(path)
    assert config.vocab_size == 64


def test_gguf_weights_are_the_original_hf_weights_exactly(tmp_path):
    ref = hf_weights(seed=1)
    _, weights = read(write_gguf(tmp_path / "t.gguf", ref))
    assert set(weights) == set(ref)
    for name, arr in ref.items():
        assert weights[name].dtype == torch.float32
        assert torch.equal(weights[name], torch.from_numpy(arr)), name
        weights[name].add_(0)  # writable (copied out of the memory map)


def test_quantized_tensors_dequantize_and_unpermute(tmp_path):
    ref = hf_weights(seed=2)
    quantized = ("q_proj.weight", "k_proj.weight", "up_proj.weight")
    path = write_gguf(tmp_path / "q8.gguf", ref, quantize=quantized)
    _, weights = read(path)
    for name, arr in ref.items():
        got = weights[name].numpy()
        assert got.shape == arr.shape
        if name.endswith(quantized):
            # Q8_0: 8-bit per 32-value block; a row permutation gone wrong would be off by O(1)
            assert np.abs(got - arr).max() < 0.02 * np.abs(arr).max(), name
        else:
            assert np.array_equal(got, arr), name


def test_tied_embeddings_are_detected_by_the_missing_output_tensor(tmp_path):
    config, weights = read(write_gguf(tmp_path / "tied.gguf", hf_weights(tied=True)))
    assert config.tie_word_embeddings and "lm_head.weight" not in weights
    assert config.to_hf_dict()["tie_word_embeddings"] is True
    config, weights = read(write_gguf(tmp_path / "untied.gguf", hf_weights(tied=False)))
    assert not config.tie_word_embeddings and "lm_head.weight" in weights


def test_non_llama_architectures_are_not_unpermuted(tmp_path):
    ref = hf_weights(seed=3)
    _, weights = read(write_gguf(tmp_path / "qwen.gguf", ref, arch="qwen2"))  # written unpermuted
    for name, arr in ref.items():
        assert np.array_equal(weights[name].numpy(), arr), name


def test_unknown_tensors_are_skipped_with_a_warning(tmp_path, caplog):
    extra = {"rope_freqs.weight": np.ones(4, np.float32)}
    path = write_gguf(tmp_path / "t.gguf", hf_weights(), extra_tensors=extra)
    with caplog.at_level("WARNING"):
        _, weights = read(path)
    assert "rope_freqs.weight" in caplog.text
    assert not any("rope" in k for k in weights)


def test_gguf_missing_a_required_key_is_a_format_error(tmp_path):
    w = gguf.GGUFWriter(str(tmp_path / "bare.gguf"), "llama")
    w.add_block_count(1)
    w.add_tensor("token_embd.weight", np.ones((4, 8), np.float32))
    w.write_header_to_file()
    w.write_kv_data_to_file()
    w.write_tensors_to_file()
    w.close()
    with pytest.raises(ModelFormatError, match="head_count"):
        gguf_config(gguf.GGUFReader(str(tmp_path / "bare.gguf")), name="bare")


# ---------------------------------------------------------------- names and the permutation


@pytest.mark.parametrize(("gguf_n", "hf"), [
    ("token_embd.weight", "model.embed_tokens.weight"),
    ("output_norm.weight", "model.norm.weight"),
    ("output.weight", "lm_head.weight"),
    ("blk.0.attn_norm.weight", "model.layers.0.input_layernorm.weight"),
    ("blk.11.ffn_norm.weight", "model.layers.11.post_attention_layernorm.weight"),
    ("blk.3.attn_q.weight", "model.layers.3.self_attn.q_proj.weight"),
    ("blk.3.attn_k.weight", "model.layers.3.self_attn.k_proj.weight"),
    ("blk.3.attn_v.weight", "model.layers.3.self_attn.v_proj.weight"),
    ("blk.3.attn_q.bias", "model.layers.3.self_attn.q_proj.bias"),
    ("blk.3.attn_output.weight", "model.layers.3.self_attn.o_proj.weight"),
    ("blk.29.ffn_gate.weight", "model.layers.29.mlp.gate_proj.weight"),
    ("blk.29.ffn_up.weight", "model.layers.29.mlp.up_proj.weight"),
    ("blk.29.ffn_down.weight", "model.layers.29.mlp.down_proj.weight"),
    ("rope_freqs.weight", None),
    ("blk.0.attn_qkv.weight", None),
    ("blk.0", None),
    ("block.0.attn_q.weight", None),
])
def test_gguf_to_hf_name_mapping(gguf_n, hf):
    assert hf_name_for_gguf(gguf_n) == hf


@settings(max_examples=60, deadline=None)
@given(n_heads=st.integers(1, 8), half=st.integers(1, 8), cols=st.integers(1, 6), seed=st.integers(0, 2**16))
def test_unpermute_inverts_llama_cpp_permute(n_heads, half, cols, seed):
    w = np.random.default_rng(seed).standard_normal((n_heads * 2 * half, cols)).astype(np.float32)
    assert np.array_equal(unpermute_rope_rows(llama_cpp_permute(w, n_heads), n_heads), w)
    assert np.array_equal(llama_cpp_permute(unpermute_rope_rows(w, n_heads), n_heads), w)
    b = w[:, 0].copy()  # 1-D (a bias) works too
    assert np.array_equal(unpermute_rope_rows(llama_cpp_permute(b, n_heads), n_heads), b)


def test_unpermute_direction_on_a_named_example():
    # llama.cpp interleaves the two rotate-half halves of each head: [a0 b0 a1 b1] -> HF [a0 a1 b0 b1]
    rows = np.array(["a0", "b0", "a1", "b1", "c0", "d0", "c1", "d1"])
    assert unpermute_rope_rows(rows, 2).tolist() == ["a0", "a1", "b0", "b1", "c0", "c1", "d0", "d1"]


def _rope(x: np.ndarray, pos: int, interleaved: bool, theta: float = 10000.0) -> np.ndarray:
    d = x.shape[-1]
    ang = pos * theta ** (-np.arange(0, d, 2) / d)
    cos, sin = np.cos(ang), np.sin(ang)
    if interleaved:  # llama.cpp's "normal" mode: pairs (2i, 2i+1)
        a, b = x[..., 0::2], x[..., 1::2]
        out = np.empty_like(x)
        out[..., 0::2], out[..., 1::2] = a * cos - b * sin, a * sin + b * cos
        return out
    a, b = x[..., : d // 2], x[..., d // 2:]  # HF rotate-half: pairs (i, i + d/2)
    return np.concatenate([a * cos - b * sin, a * sin + b * cos], axis=-1)


def test_unpermuted_weights_with_rotate_half_give_llama_cpp_attention_scores():
    """The reason for the unpermute: HF rotate-half RoPE on the unpermuted weights must give the same
    q.k scores as llama.cpp's interleaved RoPE on the GGUF weights."""
    rng = np.random.default_rng(0)
    heads, kv_heads, hd, hidden = 4, 2, 8, 32
    wq_g = rng.standard_normal((heads * hd, hidden))
    wk_g = rng.standard_normal((kv_heads * hd, hidden))
    x1, x2 = rng.standard_normal(hidden), rng.standard_normal(hidden)
    wq_h, wk_h = unpermute_rope_rows(wq_g, heads), unpermute_rope_rows(wk_g, kv_heads)
    for p1, p2 in [(0, 0), (3, 1), (17, 5)]:
        for h in range(heads):
            kvh = h // (heads // kv_heads)
            qs, ks = slice(h * hd, (h + 1) * hd), slice(kvh * hd, (kvh + 1) * hd)
            s_gguf = _rope(wq_g[qs] @ x1, p1, True) @ _rope(wk_g[ks] @ x2, p2, True)
            s_hf = _rope(wq_h[qs] @ x1, p1, False) @ _rope(wk_h[ks] @ x2, p2, False)
            assert s_hf == pytest.approx(s_gguf, rel=1e-9, abs=1e-9)
            wrong = _rope(wq_g[qs] @ x1, p1, False) @ _rope(wk_g[ks] @ x2, p2, False)
            if p1 != p2:  # without the unpermute the scores differ (so the check has teeth)
                assert wrong != pytest.approx(s_gguf, rel=1e-6)


# ---------------------------------------------------------------- conversion


@pytest.fixture
def no_tokenizer(monkeypatch):
    """convert_gguf builds the tokenizer with transformers from GGUF vocab; a tiny GGUF has none."""
    calls = []
    monkeypatch.setattr(loader, "_save_gguf_tokenizer", lambda src, out: calls.append(out))
    return calls


def _fail(*args, **kwargs):
    raise AssertionError("convert_gguf re-read a GGUF it had already converted")


def test_convert_writes_a_hf_dir_once_and_again_when_the_source_changes(tmp_path, monkeypatch, no_tokenizer):
    ref = hf_weights(seed=4, tied=True)
    src = write_gguf(tmp_path / "t.gguf", ref)
    out = tmp_path / "models" / "tiny"
    assert convert_gguf(src, out, progress=False) == out
    manifest = json.loads((out / MANIFEST).read_text())
    assert manifest["source_fingerprint"] == file_fingerprint(src)
    cfg = json.loads((out / "config.json").read_text())
    assert cfg["model_type"] == "llama" and cfg["num_key_value_heads"] == 2 and cfg["tie_word_embeddings"]
    from safetensors.torch import load_file

    saved = load_file(str(out / "model.safetensors"))
    assert set(saved) == set(ref) and all(torch.equal(saved[k], torch.from_numpy(v)) for k, v in ref.items())

    with monkeypatch.context() as m:  # same source: returns at once, without reading the GGUF
        m.setattr(loader, "_open_gguf", _fail)
        assert convert_gguf(src, out, progress=False) == out
    assert json.loads((out / MANIFEST).read_text()) == manifest

    ref2 = hf_weights(seed=5, tied=True)
    write_gguf(src, ref2)  # the source changed: convert again
    convert_gguf(src, out, progress=False)
    assert json.loads((out / MANIFEST).read_text())["source_fingerprint"] == file_fingerprint(src)
    assert torch.equal(load_file(str(out / "model.safetensors"))["model.norm.weight"],
                       torch.from_numpy(ref2["model.norm.weight"]))
    assert [p.name for p in out.parent.iterdir()] == ["tiny"]  # no temp dirs left behind


def test_a_failed_convert_leaves_no_half_directory(tmp_path, monkeypatch):
    src = write_gguf(tmp_path / "t.gguf", hf_weights())
    out = tmp_path / "models" / "tiny"

    def boom(src, out):
        raise RuntimeError("disk full")

    monkeypatch.setattr(loader, "_save_gguf_tokenizer", boom)
    with pytest.raises(RuntimeError, match="disk full"):
        convert_gguf(src, out, progress=False)
    assert not out.exists()
    assert list(out.parent.iterdir()) == []


def test_a_gguf_path_resolves_to_a_converted_dir_under_specache_home(tmp_path, monkeypatch, no_tokenizer):
    monkeypatch.setenv("SPECACHE_HOME", str(tmp_path / "home"))
    src = write_gguf(tmp_path / "Tiny-Model.gguf", hf_weights())
    out = loader.resolve_model_path(src)
    assert out.parent == tmp_path / "home" / "models"
    assert out.name == f"tiny-model-{file_fingerprint(src)}"
    assert (out / MANIFEST).exists() and (out / "config.json").exists()


def test_converted_dir_loads_with_the_same_weights(tmp_path, no_tokenizer, tiny_model_dir):
    import shutil

    ref = hf_weights(seed=6, vocab=64)
    out = convert_gguf(write_gguf(tmp_path / "t.gguf", ref), tmp_path / "conv", progress=False)
    shutil.copy(tiny_model_dir / "tokenizer.json", out / "tokenizer.json")
    loaded = load_hf_dir(out)
    assert loaded.config.num_kv_heads == 2 and loaded.config.head_dim == 8
    assert loaded.fingerprint == file_fingerprint(tmp_path / "t.gguf")
    for name, arr in ref.items():
        assert torch.equal(loaded.weights[name], torch.from_numpy(arr)), name


# ---------------------------------------------------------------- the real default model


@pytest.fixture(scope="module")
def converted_default() -> Path:
    out = loader.default_model_dir()
    if not (out / MANIFEST).exists():
        pytest.skip("the default model is not converted yet (run `specache convert --default` once)")
    return out


@pytest.mark.real
def test_convert_of_the_default_model_is_idempotent(converted_default, monkeypatch):
    src = loader.default_gguf_path()
    before = (converted_default / MANIFEST).read_text()
    weights_mtime = (converted_default / "model.safetensors").stat().st_mtime_ns
    monkeypatch.setattr(loader, "_open_gguf", _fail)
    assert convert_gguf(src, converted_default, progress=False) == converted_default
    assert (converted_default / MANIFEST).read_text() == before
    assert json.loads(before)["source_fingerprint"] == file_fingerprint(src)
    assert (converted_default / "model.safetensors").stat().st_mtime_ns == weights_mtime


@pytest.mark.real
def test_default_model_config_matches_the_gguf(converted_default):
    config = gguf_config(gguf.GGUFReader(str(loader.default_gguf_path())), name="x")
    saved = json.loads((converted_default / "config.json").read_text())
    assert (config.num_layers, config.hidden_size, config.num_heads, config.num_kv_heads) == (30, 576, 9, 3)
    assert config.vocab_size == 49152 and config.tie_word_embeddings
    assert saved["num_hidden_layers"] == 30 and saved["num_key_value_heads"] == 3


@pytest.mark.real
def test_cli_convert_default_prints_the_path(converted_default):
    exe = Path(sys.executable).parent / "specache"
    cmd = [str(exe)] if exe.exists() else [sys.executable, "-m", "specache.cli"]
    before = (converted_default / MANIFEST).read_text()
    res = subprocess.run([*cmd, "convert", "--default"], capture_output=True, text=True, timeout=120)
    assert res.returncode == 0, res.stderr
    assert Path(res.stdout.strip().splitlines()[-1]) == converted_default
    assert (converted_default / MANIFEST).read_text() == before


def test_cli_convert_of_a_missing_file_is_a_clean_error(tmp_path):
    exe = Path(sys.executable).parent / "specache"
    cmd = [str(exe)] if exe.exists() else [sys.executable, "-m", "specache.cli"]
    res = subprocess.run([*cmd, "convert", str(tmp_path / "missing.gguf"), "--out", str(tmp_path / "o")],
                         capture_output=True, text=True, timeout=120)
    assert res.returncode == 2
    assert "error:" in res.stderr and "missing.gguf" in res.stderr and "Traceback" not in res.stderr
