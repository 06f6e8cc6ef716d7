"""Cache policy: whether a request may be looked up / stored, and with which TTL.

Order of the rules is the order of precedence: an explicit client bypass wins, then rules that
protect correctness (sampling, never-cache tags, PII), then freshness.
"""

from __future__ import annotations

import re
from dataclasses import dataclass

from specache.response_cache.config import CacheConfig, CacheRequest
from specache.response_cache.keys import effective_temperature, message_text
from specache.response_cache.pii import find_pii

_TIME_SENSITIVE = re.compile(
    r"\b(?:today|tonight|tomorrow|yesterday|right now|currently|at the moment|this (?:week|month|morning"
    r"|evening|year)|latest|most recent|breaking|live score|current (?:price|rate|weather|time|date|news"
    r"|score|status|value|exchange|president|prime minister|ceo|version|events?)|stock price|share price"
    r"|exchange rate|weather|forecast|news|what time is it|now)\b",
    re.IGNORECASE,
)


@dataclass(frozen=True)
class Decision:
    lookup: bool
    store: bool
    ttl_s: float
    bypass_reason: str | None = None


def is_time_sensitive(text: str) -> bool:
    return _TIME_SENSITIVE.search(text) is not None


def _all_text(req: CacheRequest) -> str:
    return "\n".join(message_text(m) for m in req.messages)


def _ttl(config: CacheConfig, req: CacheRequest, tags: set[str], time_sensitive: bool) -> float:
    ttl = req.ttl_s if req.ttl_s is not None else config.default_ttl_s
    for tag in tags:
        if tag in config.tag_ttl_s:
            ttl = min(ttl, config.tag_ttl_s[tag])
    if time_sensitive:
        ttl = min(ttl, config.time_sensitive_ttl_s)
    return ttl


def decide(config: CacheConfig, req: CacheRequest) -> Decision:
    """Apply the rules; a bypass skips both lookup and store."""
    tags = {t.lower() for t in req.tags}

    def bypass(reason: str) -> Decision:
        return Decision(lookup=False, store=False, ttl_s=0.0, bypass_reason=reason)

    if req.mode == "bypass":
        return bypass("client")
    if not config.cache_sampled and effective_temperature(req.params) > 0.0:
        return bypass("sampled")
    blocked = sorted(tags & config.never_cache_tags)
    if blocked:
        return bypass(f"tag:{blocked[0]}")
    text = _all_text(req)
    if config.pii_bypass:
        pii = find_pii(text)
        if pii:
            return bypass(f"pii:{pii}")
    time_sensitive = is_time_sensitive(text)
    if time_sensitive and config.time_sensitive == "bypass":
        return bypass("time_sensitive")
    ttl = _ttl(config, req, tags, time_sensitive)
    # refresh: regenerate (no lookup) but overwrite the entry with the fresh answer.
    return Decision(
        lookup=req.mode != "refresh",
        store=True,
        ttl_s=ttl,
        bypass_reason="refresh" if req.mode == "refresh" else None,
    )
