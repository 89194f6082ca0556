"""Graceful shutdown: on SIGTERM a worker drains.

gunicorn stops accepting connections and gives in-flight requests `graceful_timeout`
seconds (TURSI_GRACEFUL_TIMEOUT). Tursi adds what gunicorn cannot know: from the signal on,
new requests that still reach the worker (on kept-alive connections) get
`503 shutting_down` with `Connection: close`, /ready says 503, and the generations already
running finish normally.
"""

from __future__ import annotations

import logging
import signal
from typing import Any

from flask import Flask, request

from ..errors import ShuttingDown
from .auth import OPEN_PATHS

log = logging.getLogger(__name__)


def init_app(app: Flask, state: Any) -> None:
    @app.before_request
    def _refuse_while_draining() -> None:
        if state.draining and request.path not in OPEN_PATHS:  # liveness, scraping
            raise ShuttingDown(
                "The server is shutting down; retry on another instance",
                headers={"Connection": "close", "Retry-After": "1"},
            )


def drain(app: Flask) -> None:
    app.extensions["tursi"].draining = True


def drain_on_sigterm(worker: Any) -> None:
    """gunicorn post_worker_init hook: SIGTERM first drains the app, then lets gunicorn's
    own handler stop the worker (it waits for in-flight requests)."""
    app = worker.wsgi
    stop = worker.handle_exit

    def handle_exit(sig: int, frame: Any) -> None:
        log.info("SIGTERM: draining (new requests get 503, in-flight ones finish)")
        drain(app)
        stop(sig, frame)

    worker.handle_exit = handle_exit
    signal.signal(signal.SIGTERM, handle_exit)
