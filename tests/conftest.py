"""Shared fixtures: tiny random-weight models (real tokenizer) and the real default model."""

from __future__ import annotations

import shutil
from pathlib import Path

import pytest
import torch

TOKENIZER_FILES = ("tokenizer.json", "tokenizer_config.json", "chat_template.jinja")


def default_model_dir() -> Path:
    from specache.models.loader import resolve_model_path

    return resolve_model_path(None)  # converts the shipped GGUF on first use


def make_tiny_model(out: Path, arch: str = "llama", seed: int = 0, **overrides) -> Path:
    """A random-weight HF model dir with the real SmolLM2 tokenizer (so text round-trips)."""
    from transformers import LlamaConfig, LlamaForCausalLM, Qwen2Config, Qwen2ForCausalLM

    torch.manual_seed(seed)
    common = dict(vocab_size=49152, hidden_size=64, intermediate_size=128, num_hidden_layers=4,
                  num_attention_heads=4, num_key_value_heads=2, max_position_embeddings=2048,
                  rope_theta=10000.0, rms_norm_eps=1e-6, initializer_range=0.08, eos_token_id=2,
                  bos_token_id=1, tie_word_embeddings=False)
    common.update(overrides)
    if arch == "qwen2":
        model = Qwen2ForCausalLM(Qwen2Config(**common))
    else:
        model = LlamaForCausalLM(LlamaConfig(**common))
    model.save_pretrained(str(out), safe_serialization=True)
    src = default_model_dir()
    for name in TOKENIZER_FILES:
        if (src / name).exists():
            shutil.copy(src / name, out / name)
    return out


@pytest.fixture(scope="session", autouse=True)
def session_switch_points(tmp_path_factory):
    """Hybrid switch points measured in this test session only (servers the tests start share
    them): never read from an earlier session, which tests that force a measurement would see
    instead of their own."""
    from specache.models import switch_points

    with pytest.MonkeyPatch.context() as mp:
        mp.setenv(switch_points.PATH_ENV, str(tmp_path_factory.mktemp("switch-points") / "switch-points.json"))
        yield


@pytest.fixture
def fresh_switch_points(monkeypatch, tmp_path) -> Path:
    """No switch point measured yet, in this process or on disk: the next hybrid load measures."""
    from specache.models import llama, switch_points

    monkeypatch.setattr(llama, "_CALIBRATIONS", {})
    file = tmp_path / "switch-points.json"
    monkeypatch.setenv(switch_points.PATH_ENV, str(file))
    return file


@pytest.fixture(scope="session")
def tiny_model_dir(tmp_path_factory) -> Path:
    return make_tiny_model(tmp_path_factory.mktemp("tiny-llama"))


@pytest.fixture(scope="session")
def tiny_qwen2_dir(tmp_path_factory) -> Path:
    return make_tiny_model(tmp_path_factory.mktemp("tiny-qwen2"), arch="qwen2")


@pytest.fixture(scope="session")
def real_model_dir() -> Path:
    return default_model_dir()


@pytest.fixture(scope="session")
def tiny_llm(tiny_model_dir):
    from specache import LLM

    return LLM(model=str(tiny_model_dir), dtype="float32", kv_cache_memory="64MiB")


@pytest.fixture(scope="session")
def real_llm(real_model_dir):
    from specache import LLM

    return LLM(model=str(real_model_dir), dtype="float32", kv_cache_memory="512MiB")
