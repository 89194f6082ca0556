"""HTTP layer: thin blueprints under /api/v1 that validate with schemas and call the engine."""

from __future__ import annotations

import json
import re
from collections.abc import Callable
from typing import Any

from flask import Flask, current_app, request
from marshmallow import Schema

from ..errors import InvalidRequest
from ..threads import off_hub
from .auth import API_PREFIX, OPENAI_PREFIX


def load_body(schema: type[Schema], required: bool = True) -> dict[str, Any]:
    """The request's JSON object loaded by `schema`; a clear 400 for anything else (no body
    is {} when optional).

    The body is read here: I/O, which the gevent hub is for. Parsing, checking and loading
    it cost as much as it is long (a 1 MB body can hold 40,000 content parts), so they run
    off the hub (tursi.threads.off_hub), with the size caps first: /health and the other
    requests' streams go on meanwhile."""
    if not required and not request.get_data(cache=True):
        return schema().load({})
    if not request.is_json:
        raise InvalidRequest(
            "The body must be JSON, sent with 'Content-Type: application/json'",
            {"content_type": request.content_type},
        )
    raw = request.get_data(cache=True)
    return off_hub(_load, raw, current_app.json.loads, schema)


def _load(raw: bytes, loads: Callable[[bytes], Any], schema: type[Schema]) -> dict[str, Any]:
    """Off the hub: no request context here, only the body's bytes and the app's parser."""
    try:
        data = loads(raw)
    except RecursionError:
        raise InvalidRequest("The body is nested too deeply") from None
    except ValueError:  # not JSON, or not UTF-8
        raise InvalidRequest("The body is not valid JSON") from None
    if not isinstance(data, dict):
        raise InvalidRequest("The body must be a JSON object", {"type": type(data).__name__})
    where = _lone_surrogate(data) if _may_hold_surrogates(raw) else None
    if where is not None:
        raise InvalidRequest(
            f"The body is not valid Unicode: {where} holds a lone surrogate "
            "escape (\\ud800-\\udfff)",
            {"field": where},
        )
    return schema().load(data)


def _may_hold_surrogates(raw: bytes) -> bool:
    """Whether the body, once parsed, can hold a lone surrogate: from a `\\udXXX` escape, or
    from surrogate bytes, which the parser decodes with "surrogatepass" (UTF-8's ED A0..BF,
    any UTF-16 or UTF-32 body). Only then must every string be looked at: most bodies are
    UTF-8 with neither, and finding that takes two searches of the bytes."""
    if json.detect_encoding(raw) not in ("utf-8", "utf-8-sig"):
        return True
    if b"\\u" not in raw and b"\xed" not in raw:  # memchr-fast; the pattern is not
        return False
    return _SURROGATE.search(raw) is not None


_SURROGATE = re.compile(rb"\\u[dD][89abcdefABCDEF]|\xed[\xa0-\xbf]")


def _lone_surrogate(data: Any) -> str | None:
    """The path of the first string (key or value) with a lone UTF-16 surrogate, which JSON
    escapes allow but no text can hold (the tokenizers refuse it); None when there is none."""
    stack: list[tuple[str, Any]] = [("", data)]
    while stack:
        path, value = stack.pop()
        if isinstance(value, str):
            if not value.isascii():
                try:
                    value.encode("utf-8")
                except UnicodeEncodeError:
                    return path
        elif isinstance(value, dict):
            for key, item in value.items():
                name = f"{path}.{key}" if path else str(key)
                stack.append((name, key))
                stack.append((name, item))
        elif isinstance(value, list):
            stack.extend((f"{path}[{index}]", item) for index, item in enumerate(value))
    return None


def no_query() -> None:
    """Endpoints that take no query parameters reject them rather than ignore them."""
    from .schemas import EmptyQuerySchema

    EmptyQuerySchema().load(request.args.to_dict())


def init_app(app: Flask) -> None:
    from . import (
        console,
        errors,
        generation,
        health,
        models,
        openai_compat,
        openapi,
        prometheus,
        status,
        tokenize,
    )

    errors.init_app(app)
    for module in (health, prometheus, console):
        app.register_blueprint(module.bp)
    app.register_blueprint(tokenize.compat_bp)
    for module in (models, generation, status, tokenize):
        app.register_blueprint(module.bp, url_prefix=API_PREFIX)
    app.register_blueprint(openai_compat.bp, url_prefix=OPENAI_PREFIX)
    openapi.init_app(app)
