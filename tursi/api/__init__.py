"""HTTP layer: thin blueprints under /api/v1 that validate with schemas and call the engine."""

from __future__ import annotations

from typing import Any

from flask import Flask, request
from werkzeug.exceptions import BadRequest

from ..errors import InvalidRequest
from .auth import API_PREFIX, OPENAI_PREFIX


def json_body(required: bool = True) -> dict[str, Any]:
    """The request's JSON object; a clear 400 for anything else (no body is {} when optional)."""
    if not required and not request.get_data(cache=True):
        return {}
    if not request.is_json:
        raise InvalidRequest(
            "The body must be JSON, sent with 'Content-Type: application/json'",
            {"content_type": request.content_type},
        )
    try:
        data = request.get_json()
    except BadRequest:
        raise InvalidRequest("The body is not valid JSON") from None
    except RecursionError:
        raise InvalidRequest("The body is nested too deeply") from None
    if not isinstance(data, dict):
        raise InvalidRequest("The body must be a JSON object", {"type": type(data).__name__})
    where = _lone_surrogate(data)
    if where is not None:
        raise InvalidRequest(
            f"The body is not valid Unicode: {where} holds a lone surrogate "
            "escape (\\ud800-\\udfff)",
            {"field": where},
        )
    return data


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
    for module in (health, prometheus):
        app.register_blueprint(module.bp)
    app.register_blueprint(tokenize.compat_bp)
    for module in (models, generation, status, tokenize):
        app.register_blueprint(module.bp, url_prefix=API_PREFIX)
    app.register_blueprint(openai_compat.bp, url_prefix=OPENAI_PREFIX)
    openapi.init_app(app)
