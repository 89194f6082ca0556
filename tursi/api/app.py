"""The app factory's body: one Flask app with its engine, extensions and blueprints."""

from __future__ import annotations

import logging

from flask import Flask

from ..config import Settings
from ..engine import allocator
from ..engine.catalog import Catalog
from ..engine.manager import ModelManager
from ..engine.speculation import SpeculationSettings
from ..engine.worker import BatchLimits
from ..telemetry import process_rss
from . import accounting, auth, bodies, lifecycle, limits, token_budget
from .history import ServerHistory
from .state import AppState


def build_app(settings: Settings) -> Flask:
    """Build the app for `settings` (tursi.create_app resolves them from the environment)."""
    from . import init_app as init_blueprints

    logging.basicConfig(
        level=settings.log_level.upper(), format="%(asctime)s %(levelname)s %(name)s: %(message)s"
    )
    allocator.tune()  # before any model is loaded (docs/reliability.md#memory)
    app = Flask("tursi", static_folder=None)  # no /static route: nothing to serve there
    app.config["MAX_CONTENT_LENGTH"] = settings.max_body_bytes
    app.wsgi_app = bodies.with_deadline(app.wsgi_app, settings.body_timeout)
    app.json.sort_keys = False
    manager = ModelManager(
        Catalog.load(settings.models_file),
        settings.home,
        settings.max_gpu_memory,
        settings.allow_downloads,
        BatchLimits(
            settings.max_batch,
            settings.max_queue,
            settings.request_timeout,
            settings.step_timeout,
            settings.max_prompt_tokens,
            settings.prefix_cache_bytes(),
            settings.kv_cache_bytes(),
            SpeculationSettings(settings.speculative, settings.speculative_tokens),
        ),
        settings.max_memory,
        settings.keep_alive,
        settings.run_dir or None,
    )
    state = AppState(settings, manager)
    state.attach(app)
    # The other workers of the server read these counts and this worker's resident memory
    # from its report (/status).
    manager.report_extra = lambda: {"requests": state.requests.snapshot(), "rss": process_rss()}
    state.history = ServerHistory(manager, state.gpu)
    manager.tick_hooks.append(state.history.tick)
    # Hook order matters. before_request hooks run in the order registered: a draining
    # worker refuses first (lifecycle), then the rate limit (limits: before auth, so failed
    # logins spend the budget too), then the API key (auth). The request accounting wraps
    # the whole WSGI app, so responses refused by those hooks are timed and counted too, and
    # its after_request hook, registered first, runs last: it sees the final response.
    accounting.init_app(app, state)
    lifecycle.init_app(app, state)
    limiter = limits.init_app(app, settings.rate_limit, settings.ratelimit_storage_uri)
    # Charged by the generation routes (tursi.api.jobs), in the request limit's storage.
    token_budget.init_app(app, settings.token_rate_limit, limiter.storage)
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
                *token_budget.HEADERS,
                "Retry-After",
            ],
            max_age=600,
        )
    auth.init_app(app, settings.all_api_keys(), settings.cors_origins)
    init_blueprints(app)
    manager.start(settings.preload)
    return app
