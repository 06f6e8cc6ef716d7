"""Errors users can cause raise a named SpecacheError whose message says what is wrong and what
to do; a rejected request leaves the engine usable and every KV block free."""

from __future__ import annotations

import json
import shutil
from contextlib import contextmanager
from pathlib import Path

import pytest

from specache import LLM, SamplingParams
from specache.config import EngineConfig
from specache.errors import (
    ConfigError,
    InvalidPromptError,
    InvalidSamplingParamsError,
    ModelFormatError,
    ModelNotFoundError,
    PromptTooLongError,
    SpecacheError,
    UnsupportedModelError,
)
from specache.models.loader import default_gguf_path, load_model

# KV bytes per token of the tiny model: 2 (K, V) x 4 layers x 2 kv heads x 16 dims x 4 bytes.
TINY_KV_BYTES_PER_TOKEN = 1024


@pytest.fixture(scope="module")
def small_llm(tiny_model_dir):
    """max_model_len 64, and a KV budget of 6 blocks of 16 tokens."""
    return LLM(model=str(tiny_model_dir), dtype="float32", max_model_len=64,
               kv_cache_memory=6 * 16 * TINY_KV_BYTES_PER_TOKEN)


@pytest.fixture
def llm(small_llm):
    yield small_llm
    # still usable after whatever was rejected, and nothing leaked
    eng = small_llm.engine
    assert not eng.has_unfinished() and not eng.requests
    out = small_llm.generate("Hello", SamplingParams(max_tokens=3, temperature=0, ignore_eos=True))[0]
    assert len(out.token_ids) == 3
    assert eng.pool.all_free()


@contextmanager
def raises(exc, *words):
    """pytest.raises, plus: it is a SpecacheError and every key word is in its message (any case)."""
    with pytest.raises(exc) as info:
        yield info
    assert isinstance(info.value, SpecacheError)
    msg = str(info.value).lower()
    for w in words:
        assert w.lower() in msg, f"{w!r} not in message {msg!r}"


# ---------------------------------------------------------------- prompts


def test_empty_string_prompt(llm):
    with raises(InvalidPromptError, "empty"):
        llm.generate("", SamplingParams(max_tokens=2))
    with raises(InvalidPromptError, "empty"):
        llm.engine.add_request("")


def test_empty_token_list_prompt(llm):
    with raises(InvalidPromptError, "empty"):
        llm.engine.add_request([])
    with raises(InvalidPromptError, "empty"):
        llm.generate([[]], SamplingParams(max_tokens=2))


@pytest.mark.parametrize("ids", [[5, 49152], [-1, 3], [10**9]])
def test_token_ids_outside_the_vocabulary(llm, ids):
    with raises(InvalidPromptError, "vocabulary", "49152"):
        llm.generate([ids], SamplingParams(max_tokens=2))


@pytest.mark.parametrize("prompt", [None, 42, [1, "a"], [1.5], {"text": "x"}])
def test_prompt_of_the_wrong_type(llm, prompt):
    with raises(InvalidPromptError, "string", "token ids"):
        llm.engine.add_request(prompt)


def test_prompt_longer_than_max_model_len(llm):
    with raises(PromptTooLongError, "64", "max_model_len"):
        llm.generate([list(range(10, 74))], SamplingParams(max_tokens=1))
    with raises(PromptTooLongError, "max_model_len"):
        llm.generate("word " * 200, SamplingParams(max_tokens=1))


def test_prompt_just_under_max_model_len_is_served_to_the_length_limit(small_llm):
    # 56 prompt tokens + 4 reserved spec slots fit the 64-token window and the 96-token budget
    params = SamplingParams(max_tokens=50, temperature=0, ignore_eos=True)
    out = small_llm.generate([list(range(10, 66))], params)
    assert out[0].finish_reason == "length" and len(out[0].token_ids) == 64 - 56
    assert small_llm.engine.pool.all_free()


def test_prompt_plus_max_tokens_over_the_whole_kv_budget_is_rejected_up_front(tiny_model_dir):
    # 2 blocks of 16 tokens in all; max_model_len stays large, so only the KV budget can refuse
    llm = LLM(model=str(tiny_model_dir), dtype="float32", kv_cache_memory=2 * 16 * TINY_KV_BYTES_PER_TOKEN)
    assert llm.engine.pool.num_blocks == 2
    with raises(PromptTooLongError, "max_tokens", "kv-cache-memory"):
        llm.engine.add_request([5] * 10, SamplingParams(max_tokens=100))
    assert not llm.engine.has_unfinished() and not llm.engine.requests
    assert llm.engine.pool.all_free()
    out = llm.generate([[5] * 10], SamplingParams(max_tokens=5, temperature=0, ignore_eos=True))[0]
    assert len(out.token_ids) == 5 and llm.engine.pool.all_free()


# ---------------------------------------------------------------- sampling parameters


@pytest.mark.parametrize(("kwargs", "words"), [
    (dict(max_tokens=0), ("max_tokens", "positive")),
    (dict(max_tokens=-3), ("max_tokens", "positive")),
    (dict(max_tokens=2.0), ("max_tokens", "integer")),
    (dict(temperature=-0.1), ("temperature", ">= 0")),
    (dict(temperature=float("nan")), ("temperature",)),
    (dict(temperature=float("inf")), ("temperature", "finite")),
    (dict(top_p=0), ("top_p", "(0, 1]")),
    (dict(top_p=1.5), ("top_p", "(0, 1]")),
    (dict(top_p=float("nan")), ("top_p",)),
    (dict(top_k=-2), ("top_k", "-1")),
    (dict(top_k=2.5), ("top_k", "integer")),
    (dict(min_p=1.5), ("min_p",)),
    (dict(repetition_penalty=0), ("repetition_penalty", "[0.01, 100.0]")),
    (dict(repetition_penalty=5e-324), ("repetition_penalty", "[0.01, 100.0]")),
    (dict(repetition_penalty=1e9), ("repetition_penalty", "[0.01, 100.0]")),
    (dict(repetition_penalty=float("nan")), ("repetition_penalty",)),
    (dict(presence_penalty=3), ("presence_penalty", "[-2, 2]")),
    (dict(frequency_penalty=-2.5), ("frequency_penalty", "[-2, 2]")),
    (dict(n=0), ("n must be", "positive")),
    (dict(logprobs=21), ("logprobs",)),
])
def test_bad_sampling_params(llm, kwargs, words):
    with raises(InvalidSamplingParamsError, *words):
        SamplingParams(**kwargs)
    # the same value set after construction is caught when the request is added
    p = SamplingParams(max_tokens=2)
    for k, v in kwargs.items():
        setattr(p, k, v)
    with raises(InvalidSamplingParamsError, *words):
        llm.engine.add_request("Hello", p)


def test_boundary_sampling_params_are_accepted(llm):
    for p in [SamplingParams(temperature=0), SamplingParams(top_p=1.0), SamplingParams(top_k=-1),
              SamplingParams(min_p=1.0), SamplingParams(presence_penalty=2, frequency_penalty=-2),
              SamplingParams(repetition_penalty=0.01), SamplingParams(repetition_penalty=100.0)]:
        p.max_tokens = 2
        assert len(llm.generate("Hello", p)[0].token_ids) <= 2


@pytest.mark.parametrize("temperature", [1e-300, 5e-324, 1e-6])
def test_a_vanishing_temperature_is_greedy_not_nan(llm, temperature):
    """Found by the API fuzzer: logits / 1e-300 overflow to inf and NaN probabilities used to fail
    the whole batch. Below 1e-5 the request is greedy, batched beside a normal one."""
    greedy = llm.generate("Hello", SamplingParams(max_tokens=4, temperature=0, ignore_eos=True))[0]
    tiny, normal = llm.generate(["Hello", "Hi"], [SamplingParams(max_tokens=4, temperature=temperature,
                                                                ignore_eos=True),
                                                 SamplingParams(max_tokens=4, temperature=0.8, seed=1)])
    assert tiny.token_ids == greedy.token_ids
    assert normal.token_ids


def test_a_rejected_prompt_in_a_batch_leaves_nothing_behind(tiny_model_dir):
    llm = LLM(model=str(tiny_model_dir), dtype="float32", kv_cache_memory="4MiB")
    with raises(InvalidPromptError, "empty"):
        llm.generate(["Hello", ""], SamplingParams(max_tokens=2))
    assert not llm.engine.has_unfinished() and not llm.engine.requests


# ---------------------------------------------------------------- model files


@pytest.fixture
def cache_home(tmp_path, monkeypatch):
    """Anything a test would convert goes under tmp, never into the user's cache."""
    home = tmp_path / "specache-home"
    monkeypatch.setenv("SPECACHE_HOME", str(home))
    return home


def test_unknown_model_path(cache_home, tmp_path):
    with raises(ModelNotFoundError, "does not exist", "gguf"):
        load_model(tmp_path / "no-such-model")
    with raises(ModelNotFoundError):
        LLM(model=str(tmp_path / "no-such-model.gguf"))
    assert ModelNotFoundError.status_code == 404


def test_a_file_that_is_neither_gguf_nor_safetensors(cache_home, tmp_path):
    bad = tmp_path / "notes.txt"
    bad.write_text("just some text, not a model\n" * 10)
    with raises(ModelFormatError, "neither a gguf"):
        load_model(bad)
    named = tmp_path / "fake.gguf"  # the extension does not fool it
    named.write_bytes(b"\x00" * 64)
    with raises(ModelFormatError, "gguf"):
        load_model(named)


@pytest.mark.parametrize("size", [8, 4096, 1 << 20])
def test_a_truncated_gguf(cache_home, tmp_path, size):
    src = default_gguf_path()
    trunc = tmp_path / "truncated.gguf"
    with open(src, "rb") as f:
        trunc.write_bytes(f.read(size))
    with raises(ModelFormatError, "truncated", "again"):
        load_model(trunc)
    assert not (cache_home / "models").exists() or not any((cache_home / "models").iterdir())


def test_a_directory_without_config_json(cache_home, tmp_path):
    d = tmp_path / "empty-model"
    d.mkdir()
    with raises(ModelFormatError, "config.json"):
        load_model(d)


def _copy(src: Path, dst: Path) -> Path:
    shutil.copytree(src, dst)
    return dst


def test_a_corrupt_safetensors_file(tiny_model_dir, tmp_path):
    d = _copy(tiny_model_dir, tmp_path / "m")
    (d / "model.safetensors").write_bytes(b"\x07garbage" * 100)
    with raises(ModelFormatError, "corrupt", "model.safetensors"):
        load_model(d)


def test_a_truncated_safetensors_file(tiny_model_dir, tmp_path):
    d = _copy(tiny_model_dir, tmp_path / "m")
    f = d / "model.safetensors"
    data = f.read_bytes()
    f.write_bytes(data[: len(data) // 2])
    with raises(ModelFormatError, "corrupt"):
        load_model(d)


def test_a_directory_with_config_but_no_weights(tiny_model_dir, tmp_path):
    d = _copy(tiny_model_dir, tmp_path / "m")
    (d / "model.safetensors").unlink()
    with raises(ModelFormatError, "safetensors"):
        load_model(d)


def test_missing_weight_tensors(tiny_model_dir, tmp_path):
    from safetensors.torch import load_file, save_file

    d = _copy(tiny_model_dir, tmp_path / "m")
    w = load_file(str(d / "model.safetensors"))
    del w["model.layers.2.mlp.up_proj.weight"]
    save_file(w, str(d / "model.safetensors"))
    with raises(ModelFormatError, "model.layers.2.mlp.up_proj.weight", "again"):
        load_model(d)


@pytest.mark.parametrize("text", ["{not json", json.dumps({"model_type": "llama", "vocab_size": 5}),
                                  json.dumps([1, 2])])
def test_a_corrupt_config_json(tiny_model_dir, tmp_path, text):
    d = _copy(tiny_model_dir, tmp_path / "m")
    (d / "config.json").write_text(text)
    with raises(ModelFormatError, "config.json"):
        load_model(d)


def test_an_unsupported_architecture(tiny_model_dir, tmp_path):
    d = _copy(tiny_model_dir, tmp_path / "m")
    cfg = json.loads((d / "config.json").read_text())
    (d / "config.json").write_text(json.dumps({**cfg, "model_type": "gpt2"}))
    with raises(UnsupportedModelError, "gpt2", "llama"):
        load_model(d)


@pytest.mark.parametrize("damage", ["missing", "corrupt"])
def test_a_missing_or_corrupt_tokenizer(tiny_model_dir, tmp_path, damage):
    d = _copy(tiny_model_dir, tmp_path / "m")
    if damage == "missing":
        (d / "tokenizer.json").unlink()
    else:
        (d / "tokenizer.json").write_text("not a tokenizer")
    with raises(ModelFormatError, "tokenizer"):
        load_model(d)


# ---------------------------------------------------------------- engine configuration


@pytest.mark.parametrize(("kwargs", "words"), [
    (dict(block_size=0), ("block_size", "positive")),
    (dict(max_num_seqs=0), ("max_num_seqs", "positive")),
    (dict(max_num_batched_tokens=-1), ("max_num_batched_tokens", "positive")),
    (dict(kv_cache_memory=0), ("kv_cache", "positive")),
    (dict(kv_cache_memory="-1GiB"), ("kv_cache", "positive")),
    (dict(max_model_len=1), ("max_model_len",)),
    (dict(num_spec_tokens=17), ("num_spec_tokens", "16")),
    (dict(num_spec_tokens=-1), ("num_spec_tokens",)),
    (dict(dtype="float8"), ("dtype", "float32")),
    (dict(kv_cache_dtype="int3"), ("dtype",)),
    (dict(weight_format="int4"), ("weight_format", "int8")),
])
def test_bad_engine_config(kwargs, words):
    with raises(ConfigError, *words):
        EngineConfig(device="cpu", **kwargs)


@pytest.mark.parametrize("kwargs", [dict(kv_cache_memory="lots"), dict(device="tpu")])
def test_unparsable_engine_config_values(kwargs):
    with raises(ConfigError):
        EngineConfig(**kwargs)


def test_bad_engine_config_through_llm(tiny_model_dir):
    with raises(ConfigError, "max_num_seqs"):
        LLM(model=str(tiny_model_dir), dtype="float32", max_num_seqs=0)


def test_kv_budget_below_one_block_is_a_config_error(tiny_model_dir):
    with raises(ConfigError, "kv_cache_memory"):
        LLM(model=str(tiny_model_dir), dtype="float32", kv_cache_memory=1000)


def test_kv_budget_below_one_block_is_refused_by_name(tiny_model_dir):
    with raises(SpecacheError, "kv_cache_memory", "raise"):
        LLM(model=str(tiny_model_dir), dtype="float32", kv_cache_memory=1000)


def test_every_error_is_a_specache_error_with_a_status_code():
    for cls in (InvalidPromptError, PromptTooLongError, InvalidSamplingParamsError, ModelNotFoundError,
                ModelFormatError, UnsupportedModelError, ConfigError):
        assert issubclass(cls, SpecacheError)
        assert cls.status_code in (400, 404)
        assert cls.error_type
