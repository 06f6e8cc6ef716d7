"""Prefix-cache persistence and warmup, so a restart is not a cache stampede.

On shutdown the radix tree's entries (token ids, tenant salt) and the KV of their blocks are
written to DIR as safetensors + a JSON manifest naming the model fingerprint, block size and
KV layout. On start they are read back only if all of that matches; a missing, corrupt,
truncated or other-model file logs one warning and the engine starts cold. It never crashes
and never serves KV computed by another model.
"""

from __future__ import annotations

import json
import logging
import os
import tempfile
from pathlib import Path

import torch
from safetensors.torch import load_file, save_file

log = logging.getLogger(__name__)

MANIFEST = "prefix-cache.json"
TENSORS = "prefix-cache.safetensors"
FORMAT_VERSION = 1


def _layout(engine) -> dict:
    c = engine.model_config
    return {"fingerprint": engine.loaded.fingerprint, "block_size": engine.pool.block_size,
            "num_layers": c.num_layers, "num_kv_heads": c.num_kv_heads, "head_dim": c.head_dim,
            "kv_dtype": str(engine.cache.k.dtype), "format": FORMAT_VERSION}


def save_prefix_cache(engine, directory: str | os.PathLike) -> int:
    """Write every cached prefix and its KV blocks; returns the number of blocks saved."""
    tree = engine.prefix_cache
    if tree is None:
        return 0
    entries, block_index = [], {}
    for salt, tokens, blocks in tree.iter_entries():
        for b in blocks:
            block_index.setdefault(b, len(block_index))
        entries.append({"salt": salt, "tokens": list(tokens), "blocks": [block_index[b] for b in blocks]})
    if not block_index:
        return 0
    out = Path(directory)
    out.mkdir(parents=True, exist_ok=True)
    k, v = engine.cache.read_blocks(list(block_index))
    # Write both files under temporary names, then rename: a crash never leaves a half pair.
    with tempfile.TemporaryDirectory(dir=out) as tmp:
        save_file({"k": k.contiguous(), "v": v.contiguous()}, str(Path(tmp) / TENSORS))
        (Path(tmp) / MANIFEST).write_text(json.dumps({**_layout(engine), "entries": entries}))
        os.replace(Path(tmp) / TENSORS, out / TENSORS)
        os.replace(Path(tmp) / MANIFEST, out / MANIFEST)
    log.info("saved %d prefix-cache blocks (%d entries) to %s", len(block_index), len(entries), out)
    return len(block_index)


def load_prefix_cache(engine, directory: str | os.PathLike) -> int:
    """Restore saved prefixes into the tree; returns blocks restored (0 and a warning on any problem)."""
    if engine.prefix_cache is None:
        return 0
    path = Path(directory)
    if not (path / MANIFEST).exists():
        log.info("no saved prefix cache in %s: starting cold", path)
        return 0
    try:
        manifest = json.loads((path / MANIFEST).read_text())
        problem = _incompatibility(manifest, _layout(engine))
        if problem:
            log.warning("prefix cache in %s not used: %s; starting cold", path, problem)
            return 0
        tensors = load_file(str(path / TENSORS))
        return _restore(engine, manifest["entries"], tensors["k"], tensors["v"])
    except Exception as e:  # corrupt JSON, truncated safetensors, wrong shapes: start cold, never crash
        log.warning("prefix cache in %s is unreadable (%s: %s); starting cold", path, type(e).__name__, e)
        return 0


def _incompatibility(manifest: dict, layout: dict) -> str | None:
    for key, want in layout.items():
        if manifest.get(key) != want:
            return f"{key} is {manifest.get(key)!r}, this engine has {want!r}"
    return None


def _restore(engine, entries: list[dict], k: torch.Tensor, v: torch.Tensor) -> int:
    tree, pool, bs = engine.prefix_cache, engine.pool, engine.pool.block_size
    expected = (k.shape[0], k.shape[2], k.shape[3], k.shape[4])
    if expected != (engine.model_config.num_layers, bs, engine.model_config.num_kv_heads,
                    engine.model_config.head_dim) or k.shape != v.shape:
        raise ValueError(f"saved KV has shape {tuple(k.shape)}")
    restored = 0
    for e in entries:
        tokens, saved = e["tokens"], e["blocks"]
        if len(tokens) != len(saved) * bs or any(not 0 <= i < k.shape[1] for i in saved):
            raise ValueError("an entry's tokens and blocks disagree")
        # The sentinel token lets the match cover the entry's last full block too.
        have = tree.match_prefix(tokens + [0], e["salt"]).block_ids
        missing = saved[len(have):]
        if len(missing) > pool.num_free:
            log.warning("prefix cache restore stopped: the KV pool is full")
            break
        new = pool.allocate(len(missing))
        idx = torch.tensor(missing, dtype=torch.long)
        engine.cache.write_blocks(new, k[:, idx], v[:, idx])
        tree.insert(tokens, list(have) + new, e["salt"])
        pool.free(new)  # the tree holds its own reference now
        restored += len(new)
    log.info("restored %d prefix-cache blocks", restored)
    return restored


def warmup(engine, prompts: list[str | list[dict]], cache_salt=None) -> int:
    """Prefill common prompts (system prompts, few-shot headers) so the first users hit the cache.

    A prompt given as chat messages goes through the chat template without the generation
    prompt, so it is a prefix of every later conversation that starts the same way.
    """
    from specache.sampling import SamplingParams

    params = SamplingParams(max_tokens=1, temperature=0)
    texts = [p if isinstance(p, str) else engine.tokenizer.apply_chat_template(p, add_generation_prompt=False)
             for p in prompts]
    ids = [engine.add_request(t, params, cache_salt=cache_salt) for t in texts]
    pending = set(ids)
    while pending:
        for out in engine.step():
            if out.finished:
                pending.discard(out.request_id)
    return len(ids)


def read_warmup_file(path: str | os.PathLike) -> list[str | list[dict]]:
    """One prompt per line: plain text (with \\n for newlines) or a JSON list of chat messages."""
    prompts: list[str | list[dict]] = []
    for line in Path(path).read_text().splitlines():
        if not line.strip():
            continue
        if line.lstrip().startswith("["):
            try:
                prompts.append(json.loads(line))
                continue
            except json.JSONDecodeError:
                pass
        prompts.append(line.replace("\\n", "\n"))
    return prompts
