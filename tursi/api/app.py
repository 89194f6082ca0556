"""The app factory's body: one Flask app with its engine, extensions and blueprints."""

from __future__ import annotations

import logging
from typing import Any

from flask import Flask, Response, request

from ..config import Settings
from ..engine.catalog import Catalog
from ..engine.manager import ModelManager
from ..engine.worker import BatchLimits
from . import auth, lifecycle, limits
from .state import AppState


def build_app(settings: Settings) -> Flask:
    """Build the app for `settings` (tursi.create_app resolves them from the environment)."""
    from . import init_app as init_blueprints

    logging.basicConfig(
        level=settings.log_level.upper(), format="%(asctime)s %(levelname)s %(name)s: %(message)s"
    )
    app = Flask("tursi", static_folder=None)  # no /static route: nothing to serve there
    app.config["MAX_CONTENT_LENGTH"] = settings.max_body_bytes
    app.json.sort_keys = False
    manager = ModelManager(
        Catalog.load(settings.models_file),
        settings.home,
        settings.max_gpu_memory,
        settings.allow_downloads,
        BatchLimits(
            settings.max_batch, settings.max_queue, settings.request_timeout, settings.step_timeout
        ),
        settings.max_memory,
        settings.keep_alive,
    )
    state = AppState(settings, manager)
    state.attach(app)
    lifecycle.init_app(app, state)
    limits.init_app(app, settings.rate_limit, settings.ratelimit_storage_uri)
    if settings.cors_origins:  # off unless configured: no Access-Control-* headers at all
        from flask_cors import CORS

        CORS(
            app,
            origins=settings.cors_origins,
            allow_headers=["Authorization", "Content-Type"],
            expose_headers=[
                "X-RateLimit-Limit",
                "X-RateLimit-Remaining",
                "X-RateLimit-Reset",
                "Retry-After",
            ],
            max_age=600,
        )
    auth.init_app(app, settings.all_api_keys())
    init_blueprints(app)
    _count_requests(app, state)
    for name in settings.preload:
        manager.preload(name)
    return app


def _count_requests(app: Flask, state: Any) -> None:
    """Every API response counts once: streams when they end, with their outcome."""

    @app.after_request
    def _count(response: Response) -> Response:
        if not auth.is_api_path(request.path):
            return response
        if response.is_streamed and response.status_code < 400:
            environ = request.environ
            response.call_on_close(
                lambda: state.requests.record(environ.get("tursi.stream_ok", False))
            )
        else:
            state.requests.record(response.status_code < 400)
        return response
