"""API keys -> tenants. The tenant scopes the response cache and salts the prefix cache.

Keys come from a JSON file ``{"key": "tenant"}`` (``--api-keys FILE``) and/or the environment
variable ``SPECACHE_API_KEYS="key1=tenantA,key2=tenantB"``. With no key configured the server is
open and every request belongs to the single tenant ``default``.
"""

from __future__ import annotations

import hmac
import json
import os
from pathlib import Path

from specache.errors import ConfigError
from specache.server.errors import APIError

OPEN_TENANT = "default"


def load_api_keys(path: str | os.PathLike | None = None, env: str | None = None) -> dict[str, str]:
    keys: dict[str, str] = {}
    if path:
        try:
            data = json.loads(Path(path).read_text())
        except (OSError, ValueError) as e:
            raise ConfigError(
                f'cannot read API keys from {path}: {e}; expected JSON {{"key": "tenant"}}'
            ) from e
        if not isinstance(data, dict) or not all(
            isinstance(k, str) and isinstance(v, str) for k, v in data.items()
        ):
            raise ConfigError(f"{path} must hold a JSON object mapping API keys to tenant names")
        keys.update(data)
    raw = os.environ.get("SPECACHE_API_KEYS", "") if env is None else env
    for pair in filter(None, (p.strip() for p in raw.split(","))):
        key, _, tenant = pair.partition("=")
        keys[key.strip()] = tenant.strip() or key.strip()
    return keys


def tenant_for(authorization: str | None, keys: dict[str, str]) -> str:
    """The tenant of a request's ``Authorization: Bearer KEY`` header; APIError(401) if unknown."""
    if not keys:
        return OPEN_TENANT
    auth = authorization or ""
    key = auth[7:].strip() if auth[:7].lower() == "bearer " else ""
    # Compare against every key in constant time so response timing does not leak key prefixes.
    found = None
    for known, tenant in keys.items():
        if hmac.compare_digest(known.encode(), key.encode()):
            found = tenant
    if found is None:
        raise APIError(
            "invalid or missing API key; send 'Authorization: Bearer <key>'",
            401,
            "invalid_request_error",
            "invalid_api_key",
        )
    return found


def cache_salt(tenant: str) -> str | None:
    """Engine prefix-cache salt: None for the open tenant so warmup prompts (salt None) are shared."""
    return None if tenant == OPEN_TENANT else tenant
