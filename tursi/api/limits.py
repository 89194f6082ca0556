"""Rate limits with flask-limiter, keyed by API key (else client address).

One budget per client covers both APIs (/api/v1 and /v1); other routes (/health, /ready,
/metrics, /docs) are not limited. Headers X-RateLimit-Limit / -Remaining / -Reset go on
every API response; over the limit the answer is 429 with the error body and Retry-After.
"""

from __future__ import annotations

import hashlib

from flask import Flask, Response, current_app, g, request
from flask_limiter import Limiter

from .accounting import outcome
from .auth import authenticated_key, is_api_path


def rate_limit_key() -> str:
    key = authenticated_key(current_app)
    if key is not None:
        # The key itself never goes to the limiter's storage (Redis etc.), only a digest.
        return "key:" + hashlib.sha256(key).hexdigest()[:32]
    return "addr:" + (request.remote_addr or "unknown")


def _request_identifier() -> str:
    """Unrouted API paths (404/405) count and carry headers too."""
    return request.endpoint or "api.unrouted"


def _not_api() -> bool:
    return not is_api_path(request.path)


def _retry_after_only_where_it_means_something(response: Response) -> Response:
    """flask-limiter puts Retry-After on every response, over any value a 503 set. Keep its
    value on its own 429, restore the one an error set (a 503, the token budget's 429),
    drop it elsewhere (request_exceeds_token_limit: no wait helps)."""
    own = g.get("retry_after")
    if own is not None:
        response.headers["Retry-After"] = own
    elif outcome().error_code != "rate_limit_exceeded":
        response.headers.pop("Retry-After", None)
    return response


def init_app(app: Flask, rate_limit: str, storage_uri: str) -> Limiter:
    app.config.setdefault("RATELIMIT_HEADERS_ENABLED", True)
    # Registered before the limiter so that it runs after the limiter's header injection.
    app.after_request(_retry_after_only_where_it_means_something)
    limiter = Limiter(
        key_func=rate_limit_key,
        # One budget per client across all routes (not one per route, as default_limits gives).
        application_limits=[rate_limit],
        request_identifier=_request_identifier,
        storage_uri=storage_uri,
        strategy="fixed-window",
    )
    limiter.request_filter(_not_api)
    limiter.init_app(app)
    return limiter
