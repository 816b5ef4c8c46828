"""Who may ask what: optional API keys for the public endpoints, the split of per-request policy overrides between
clients and operators, and the request body limit.

- API keys (off by default, and in the demo): when the ingress has any (`api_keys_sha256` in its user_config, or
  the keys themselves in RECSYS_API_KEYS, comma-separated), `/recommend` and `/events` need `X-API-Key`: 401
  without one, 403 with a wrong one. Only digests are kept and compared, in constant time; no key or token is ever
  logged (the proxy's access log is off and no error message repeats one).
- Overrides: a client may tune how its own list reads (`CLIENT_POLICY_FIELDS`), besides `k`, `context.page`,
  `request_id` (the exploration seed) and its own `filters`. Everything that protects the shop or sells (the
  out-of-stock filter, blocked brands and categories, sponsored items, exploration, quotas) is an operator's: a
  request that sets one needs the admin token, or gets a 403 naming the field.
- Bodies: at most `MAX_BODY_BYTES`, else 413 before the body is parsed; lists and strings inside have their own
  limits in `deployments.schemas` and `PolicyConfig`.
"""
from __future__ import annotations

import dataclasses
import hashlib
import hmac
import json
import os
from collections.abc import Iterable
from typing import Any

from fastapi import HTTPException

from training.request.policy_config import PolicyConfig

API_KEYS_ENV = "RECSYS_API_KEYS"
API_KEY_HEADER = "X-API-Key"
MAX_BODY_BYTES = 1 << 20  # 1 MiB: 10,000 events of ~100 bytes fit
CLIENT_POLICY_FIELDS = frozenset({"bought_down_sort", "bought_window_days", "brand_diversity", "max_brand_run"})
POLICY_FIELDS = frozenset(f.name for f in dataclasses.fields(PolicyConfig))


def digest(secret: str) -> str:
    return hashlib.sha256(secret.encode()).hexdigest()


def api_key_digests(configured: Iterable[str] | None, env: str | None = None) -> frozenset[str]:
    """The accepted keys' sha256 digests: the user_config's list plus the keys in the environment variable."""
    found = set()
    for d in configured or ():
        if not isinstance(d, str) or len(d) != 64 or any(c not in "0123456789abcdef" for c in d):
            raise ValueError("ingress user_config.api_keys_sha256: a list of lowercase hex sha256 digests")
        found.add(d)
    raw = os.environ.get(API_KEYS_ENV, "") if env is None else env
    found.update(digest(k.strip()) for k in raw.split(",") if k.strip())
    return frozenset(found)


def check_api_key(given: str | None, digests: frozenset[str]) -> None:
    """Nothing to check when no keys are configured; else 401 without a key and 403 with one not configured."""
    if not digests:
        return
    if not given:
        raise HTTPException(401, f"send an API key in the {API_KEY_HEADER} header")
    mine = digest(given)
    if not any(hmac.compare_digest(mine, d) for d in digests):
        raise HTTPException(403, "API key refused")


def operator_fields(overrides: dict[str, Any] | None) -> list[str]:
    """The override fields of a request that only an operator may set (unknown names are left to the policy's own
    validation, a 422 naming them)."""
    return sorted((set(overrides or {}) & POLICY_FIELDS) - CLIENT_POLICY_FIELDS)


def forbidden(fields: list[str]) -> HTTPException:
    """403 naming every operator-only field the request set without the admin token."""
    return HTTPException(403, detail=[{"loc": ["body", "policy", f], "type": "forbidden",
                                       "msg": f"policy.{f} is an operator's setting: send the admin token "
                                              "('Authorization: Bearer <token>') or leave it out; clients may set "
                                              f"{sorted(CLIENT_POLICY_FIELDS)}"} for f in fields])


class BodyLimit:
    """ASGI middleware: 413 for a body over `max_bytes`, by its Content-Length or, for a streamed body without one,
    as soon as the bytes received pass the limit (such a body is read ahead, never more than the limit, then handed
    on)."""

    def __init__(self, app: Any, max_bytes: int = MAX_BODY_BYTES) -> None:
        self.app, self.max_bytes = app, max_bytes

    async def _refuse(self, send: Any) -> None:
        body = json.dumps({"detail": f"request body over {self.max_bytes} bytes"}).encode()
        await send({"type": "http.response.start", "status": 413,
                    "headers": [(b"content-type", b"application/json"), (b"content-length", str(len(body)).encode())]})
        await send({"type": "http.response.body", "body": body})

    async def __call__(self, scope: dict, receive: Any, send: Any) -> None:
        if scope["type"] != "http":
            return await self.app(scope, receive, send)
        length = dict(scope.get("headers") or ()).get(b"content-length")
        if length is not None:
            if not length.isdigit() or int(length) > self.max_bytes:
                return await self._refuse(send)
            return await self.app(scope, receive, send)
        parts, seen = [], 0
        while True:  # streamed: read ahead up to the limit
            message = await receive()
            if message["type"] != "http.request":
                return await self.app(scope, receive, send)  # the client left: let the app see it
            seen += len(message.get("body", b""))
            if seen > self.max_bytes:
                return await self._refuse(send)
            parts.append(message.get("body", b""))
            if not message.get("more_body", False):
                break
        replayed = False

        async def replay() -> dict:
            nonlocal replayed
            if not replayed:
                replayed = True
                return {"type": "http.request", "body": b"".join(parts), "more_body": False}
            return await receive()
        await self.app(scope, replay, send)
