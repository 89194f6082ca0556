"""Tursi: a model server. ``create_app`` builds one WSGI app; nothing runs at import time."""
from __future__ import annotations

import logging
from typing import Any, Mapping

from flask import Flask, Response, request

from .config import Settings

__version__ = "0.1.0"
__all__ = ["create_app", "Settings", "__version__"]


def create_app(config: Settings | Mapping[str, Any] | None = None) -> Flask:
    """Build the app. `config` is a Settings, or overrides (field -> value) on the environment's."""
    from . import api, auth, lifecycle, limits
    from .engine.catalog import Catalog
    from .engine.manager import ModelManager
    from .engine.worker import BatchLimits
    from .state import AppState

    settings = config if isinstance(config, Settings) else Settings.from_env().merged(config)
    logging.basicConfig(level=settings.log_level.upper(),
                        format="%(asctime)s %(levelname)s %(name)s: %(message)s")
    app = Flask(__name__, static_folder=None)  # no /static route: nothing to serve there
    app.config["MAX_CONTENT_LENGTH"] = settings.max_body_bytes
    app.json.sort_keys = False
    manager = ModelManager(Catalog.load(settings.models_file), settings.home,
                           settings.max_gpu_memory, settings.allow_downloads,
                           BatchLimits(settings.max_batch, settings.max_queue,
                                       settings.request_timeout),
                           settings.max_memory, settings.keep_alive)
    state = AppState(settings, manager)
    state.attach(app)
    lifecycle.init_app(app, state)
    limits.init_app(app, settings.rate_limit, settings.ratelimit_storage_uri)
    if settings.cors_origins:  # off unless configured: no Access-Control-* headers at all
        from flask_cors import CORS
        CORS(app, origins=settings.cors_origins, allow_headers=["Authorization", "Content-Type"],
             expose_headers=["X-RateLimit-Limit", "X-RateLimit-Remaining", "X-RateLimit-Reset",
                             "Retry-After"], max_age=600)
    auth.init_app(app, settings.all_api_keys())
    api.init_app(app)
    _count_requests(app, state)
    for name in settings.preload:
        manager.preload(name)
    return app


def _count_requests(app: Flask, state: Any) -> None:
    """Every API response counts once: streams when they end, with their outcome."""
    from .auth import is_api_path

    @app.after_request
    def _count(response: Response) -> Response:
        if not is_api_path(request.path):
            return response
        if response.is_streamed and response.status_code < 400:
            environ = request.environ
            response.call_on_close(
                lambda: state.requests.record(environ.get("tursi.stream_ok", False)))
        else:
            state.requests.record(response.status_code < 400)
        return response
