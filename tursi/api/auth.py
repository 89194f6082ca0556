"""Bearer API keys (constant-time compare; keys are never logged).

With keys configured, every route needs one (/ready and /docs included) except /health
(liveness probes) and /metrics, which checks for itself (open to loopback scrapers, see
tursi.api.prometheus)."""

from __future__ import annotations

import hmac
import logging

from flask import Flask, request

from ..errors import Unauthorized

log = logging.getLogger(__name__)

API_PREFIX = "/api/v1"
OPENAI_PREFIX = "/v1"
# Liveness and scraping: answered without an API key (/metrics checks for itself) and still
# answered while a worker drains (tursi.api.lifecycle).
OPEN_PATHS = ("/health", "/metrics")
# Served at the root because vLLM's and llama.cpp's servers do (tursi.api.tokenize): API
# routes all the same (key, rate limit, accounting).
ROOT_API_PATHS = ("/tokenize", "/detokenize")


def _under(path: str, prefix: str) -> bool:
    return path == prefix or path.startswith(prefix + "/")


def is_openai_path(path: str) -> bool:
    return _under(path, OPENAI_PREFIX)


def is_api_path(path: str) -> bool:
    """A route of the native API (/api/v1), the OpenAI-compatible one (/v1) or the
    root tokenizer routes."""
    return _under(path, API_PREFIX) or is_openai_path(path) or path in ROOT_API_PATHS


def unauthorized() -> Unauthorized:
    return Unauthorized(
        "A valid API key is required: send 'Authorization: Bearer <key>'",
        headers={"WWW-Authenticate": 'Bearer realm="tursi"'},
    )


def bearer_token() -> str | None:
    header = request.headers.get("Authorization", "")
    scheme, _, token = header.partition(" ")
    if scheme.lower() != "bearer" or not token.strip():
        return None
    return token.strip()


def key_is_valid(token: str | None, keys: list[bytes]) -> bool:
    """Compare against every key, in time that does not depend on where they differ."""
    if token is None:
        return False
    presented = token.encode("utf-8", "surrogateescape")
    found = False
    for key in keys:
        found |= hmac.compare_digest(presented, key)
    return found


def init_app(app: Flask, keys: list[str]) -> None:
    encoded = [key.encode("utf-8") for key in keys]
    app.extensions["tursi.api_keys"] = encoded
    if not encoded:
        log.warning(
            "no API keys configured (TURSI_API_KEYS / TURSI_API_KEY_FILE): "
            "the API is open to anyone who can reach it"
        )
        return
    log.info("API key authentication on (%d keys)", len(encoded))

    @app.before_request
    def _require_key() -> None:
        # CORS preflights carry no credentials by design; they get headers, never data.
        if request.path in OPEN_PATHS or request.method == "OPTIONS":
            return
        if not key_is_valid(bearer_token(), encoded):
            raise unauthorized()


def authenticated_key(app: Flask) -> str | None:
    """The caller's API key when it is a valid one (used to key rate limits), else None."""
    token = bearer_token()
    keys = app.extensions.get("tursi.api_keys") or []
    return token if keys and key_is_valid(token, keys) else None
