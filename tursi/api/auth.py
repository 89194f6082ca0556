"""Bearer API keys (constant-time compare; keys are never logged; UTF-8 keys work).

With keys configured, every route and every method needs one (/ready, /docs and OPTIONS
included) except /health (liveness probes), /metrics, which checks for itself (open to
loopback scrapers, see tursi.api.prometheus), the console's page, script and style sheet
(they hold no data: the page asks for a key and sends it with every API call, see
tursi.api.console), and the CORS preflights of configured origins."""

from __future__ import annotations

import hmac
import logging
import re

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
# The console's files (tursi.api.console): no data in them, so no key to fetch them (any
# other name under it is a 404 either way).
CONSOLE_PREFIX = "/console"


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


def bearer_token() -> bytes | None:
    """The token of `Authorization: Bearer <token>`, as the bytes the client sent. A WSGI
    server hands header values over as latin-1 text (PEP 3333), one character per byte, so
    encoding them back as latin-1 gives the bytes on the wire: a key sent as UTF-8 compares
    equal to the configured key encoded as UTF-8. Only ASCII blanks are trimmed (str.strip()
    would also eat \\x85 and \\xa0, which end many UTF-8 characters)."""
    header = request.headers.get("Authorization", "")
    scheme, _, token = header.partition(" ")
    token = token.strip(_BLANKS)
    if scheme.lower() != "bearer" or not token:
        return None
    try:
        return token.encode("latin-1")
    except UnicodeEncodeError:  # no WSGI server hands this over: no key matches it
        return None


_BLANKS = " \t"
# No HTTP client can send these in a header value (gunicorn refuses them: 400).
_UNSENDABLE = re.compile(r"[\x00-\x08\x0a-\x1f\x7f]")


def key_is_valid(token: bytes | None, keys: list[bytes]) -> bool:
    """Compare against every key, in time that does not depend on where they differ."""
    if token is None:
        return False
    found = False
    for key in keys:
        found |= hmac.compare_digest(token, key)
    return found


def encode_keys(keys: list[str]) -> list[bytes]:
    """The configured keys as the bytes a client sends: UTF-8 (surrogateescape gives back
    the exact bytes of an environment variable that is not UTF-8). A key no client could
    send is refused at start, without echoing it."""
    for number, key in enumerate(keys, 1):
        if _UNSENDABLE.search(key):
            raise ValueError(
                f"API key #{number} (TURSI_API_KEYS, then TURSI_API_KEY_FILE) holds a control "
                "character, which no HTTP client can send in a header: remove it"
            )
    return [key.encode("utf-8", "surrogateescape") for key in keys]


def is_cors_preflight(origins: list[str]) -> bool:
    """An OPTIONS request a browser sends before a cross-origin call, from one of the
    configured origins (TURSI_CORS_ORIGINS: exact origins, compared without case as
    flask-cors does, or `*`): it carries no credentials by design, and flask-cors answers
    it with headers only."""
    origin = request.headers.get("Origin", "").lower()
    return (
        request.method == "OPTIONS"
        and "Access-Control-Request-Method" in request.headers
        and bool(origin)
        and any(allowed == "*" or allowed.lower() == origin for allowed in origins)
    )


def init_app(app: Flask, keys: list[str], cors_origins: list[str]) -> None:
    encoded = encode_keys(keys)
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
        # OPTIONS needs a key like any method (its Allow header tells which routes exist),
        # but a CORS preflight from a configured origin: it gets headers, never data.
        if request.path in OPEN_PATHS or is_cors_preflight(cors_origins):
            return
        if request.method in ("GET", "HEAD") and _under(request.path, CONSOLE_PREFIX):
            return
        if not key_is_valid(bearer_token(), encoded):
            raise unauthorized()


def authenticated_key(app: Flask) -> bytes | None:
    """The caller's API key when it is a valid one (used to key rate limits), else None."""
    token = bearer_token()
    keys = app.extensions.get("tursi.api_keys") or []
    return token if keys and key_is_valid(token, keys) else None
