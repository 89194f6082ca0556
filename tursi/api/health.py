"""Probes for load balancers and Kubernetes: /health (liveness) and /ready (readiness)."""

from __future__ import annotations

from flask import Blueprint, jsonify

from ..errors import NotReady
from . import no_query
from .state import current

bp = Blueprint("health", __name__)


@bp.get("/health")
def health():
    """Liveness: the process answers HTTP.

    Always open, never rate limited, no model involved."""
    no_query()
    return jsonify({"status": "ok"})


@bp.get("/ready")
def ready():
    """Readiness: every model in TURSI_PRELOAD is loaded.

    503 `not_ready` before, if a preload failed, and while the engine of one has failed, so
    a balancer sends no traffic to a worker that cannot serve it."""
    no_query()
    app = current()
    models = {name: app.manager.state(name).status for name in app.settings.preload}
    if any(status != "loaded" for status in models.values()):
        raise NotReady(
            "The preloaded models are not all loaded (GET /api/v1/models says why)",
            {"models": models},
            headers={"Retry-After": "5"},
        )
    return jsonify({"status": "ready", "models": models})
