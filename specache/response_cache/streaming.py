"""Streaming helpers: replay a cached answer as chunks; record a streamed miss and store it only
when the stream completes (a client disconnect or error must never leave a truncated answer)."""

from __future__ import annotations

import re
from collections.abc import Callable, Iterator
from typing import Any

_PIECE = re.compile(r"\S+\s*|\s+")


def stream_chunks(response: dict[str, Any], max_chars: int = 24) -> Iterator[str]:
    """Split the cached text into word-aligned chunks of at most ~max_chars characters."""
    text = str(response.get("text", ""))
    buf = ""
    for piece in _PIECE.findall(text):
        if buf and len(buf) + len(piece) > max_chars:
            yield buf
            buf = ""
        buf += piece
    if buf:
        yield buf


class StreamRecorder:
    """Collects deltas of a streamed generation; `complete()` stores, `abort()` drops."""

    def __init__(self, store_fn: Callable[[dict[str, Any]], bool]):
        self._store_fn = store_fn
        self._parts: list[str] = []
        self.done = False

    def append(self, delta: str) -> None:
        if self.done:
            raise RuntimeError("StreamRecorder already completed or aborted")
        self._parts.append(delta)

    @property
    def text(self) -> str:
        return "".join(self._parts)

    def complete(
        self, finish_reason: str = "stop", usage: dict[str, Any] | None = None, **extra: Any
    ) -> bool:
        """Store the whole answer; returns whether it was stored. Errored streams are not cached."""
        if self.done:
            return False
        self.done = True
        if finish_reason in ("error", "abort", "cancelled"):
            return False
        payload: dict[str, Any] = {"text": self.text, "finish_reason": finish_reason, **extra}
        if usage is not None:
            payload["usage"] = usage
        return self._store_fn(payload)

    def abort(self) -> None:
        self.done = True
        self._parts.clear()
