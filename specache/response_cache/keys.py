"""Cache keys: normalised messages + the sampling params that change the output.

Two hashes per request:
- exact key: tenant, model, every normalised message, output-affecting params;
- partition: tenant, model, earlier turns (everything but the last user message) and params.
  A semantic hit must share the partition, so "and in French?" after two different
  conversations never matches, and a 10-token answer is never served for a 500-token request.
"""

from __future__ import annotations

import hashlib
import json
import unicodedata
from typing import Any

# Params that do not change the text of the answer (transport / accounting only).
_IGNORED_PARAMS = frozenset({"stream", "stream_options", "user", "metadata", "store", "timeout"})
# Params that only matter when sampling; under greedy decoding they are noise in the key.
_SAMPLING_ONLY = frozenset({"top_p", "top_k", "min_p", "seed", "typical_p"})


def normalise_text(text: str) -> str:
    """NFC + collapsed whitespace: formatting noise must not split the key."""
    return " ".join(unicodedata.normalize("NFC", text).split())


def message_text(message: dict[str, Any]) -> str:
    """Text of one OpenAI message; content may be a string or a list of typed parts."""
    content = message.get("content")
    if content is None:
        return ""
    if isinstance(content, str):
        return content
    if isinstance(content, list):
        parts = [
            p.get("text", "") for p in content if isinstance(p, dict) and p.get("type", "text") == "text"
        ]
        return "\n".join(parts)
    return str(content)


def normalise_messages(messages: list[dict[str, Any]]) -> list[dict[str, Any]]:
    out = []
    for m in messages:
        item: dict[str, Any] = {"role": str(m.get("role", "")), "content": normalise_text(message_text(m))}
        for extra in ("name", "tool_calls", "tool_call_id"):
            if m.get(extra) is not None:
                item[extra] = m[extra]
        out.append(item)
    return out


def effective_temperature(params: dict[str, Any], default: float = 1.0) -> float:
    t = params.get("temperature")
    return default if t is None else float(t)


def output_params(params: dict[str, Any], default_temperature: float = 1.0) -> dict[str, Any]:
    """The subset of params that can change the generated text, in canonical form."""
    temp = effective_temperature(params, default_temperature)
    out: dict[str, Any] = {}
    for k, v in params.items():
        if k in _IGNORED_PARAMS or v is None:
            continue
        if temp == 0.0 and k in _SAMPLING_ONLY:
            continue
        if k == "stop" and isinstance(v, str):
            v = [v]
        out[k] = v
    out["temperature"] = temp
    if out.get("n", 1) == 1:
        out.pop("n", None)
    return out


def _digest(obj: Any) -> str:
    blob = json.dumps(obj, sort_keys=True, ensure_ascii=False, separators=(",", ":"), default=str)
    return hashlib.sha256(blob.encode("utf-8")).hexdigest()


def last_user_index(messages: list[dict[str, Any]]) -> int:
    for i in range(len(messages) - 1, -1, -1):
        if messages[i].get("role") == "user":
            return i
    return len(messages) - 1


def exact_key(tenant: str, model: str, messages: list[dict[str, Any]], params: dict[str, Any]) -> str:
    return _digest(["exact-v1", tenant, model, normalise_messages(messages), output_params(params)])


def partition_key(tenant: str, model: str, messages: list[dict[str, Any]], params: dict[str, Any]) -> str:
    """Hash of everything except the last user message's text (the part compared semantically)."""
    norm = normalise_messages(messages)
    i = last_user_index(norm)
    context = norm[:i] + [{"role": norm[i]["role"], "content": "<query>"}] + norm[i + 1 :]
    return _digest(["part-v1", tenant, model, context, output_params(params)])


def semantic_text(messages: list[dict[str, Any]]) -> str:
    """The text we embed: the last user message."""
    return normalise_text(message_text(messages[last_user_index(messages)]))


def tag_hash(value: str) -> str:
    """Short hex digest used as a TAG value in stores: no escaping pitfalls in query syntax."""
    return hashlib.sha256(value.encode("utf-8")).hexdigest()[:32]
