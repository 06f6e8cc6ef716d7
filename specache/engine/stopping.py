"""Stop conditions: EOS / stop token ids, max_tokens, context length, stop strings."""

from __future__ import annotations

from specache.engine.sequence import Sequence


def token_stop_reason(seq: Sequence, token: int, eos_ids: set[int], max_model_len: int) -> str | None:
    p = seq.params
    if token in p.stop_token_ids or (token in eos_ids and not p.ignore_eos):
        return "stop"
    if len(seq.output_ids) >= p.max_tokens or seq.num_tokens >= max_model_len:
        return "length"
    return None


def find_stop_string(text: str, stops: list[str], search_from: int) -> int | None:
    """Index where the earliest stop string starts at or after ``search_from``, else None."""
    best = None
    for s in stops:
        i = text.find(s, max(0, search_from - len(s) + 1))
        if i != -1 and (best is None or i < best):
            best = i
    return best


def held_back(text: str, stops: list[str]) -> int:
    """Characters at the end of ``text`` that could still grow into a stop string (not streamed yet)."""
    hold = 0
    for s in stops:
        for n in range(min(len(s) - 1, len(text)), 0, -1):
            if text.endswith(s[:n]):
                hold = max(hold, n)
                break
    return hold
