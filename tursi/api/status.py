"""/status: server health and resource usage."""

from __future__ import annotations

import time

from flask import Blueprint, jsonify

from ..formatting import format_bytes, format_percent, format_uptime
from ..telemetry import system_memory
from . import no_query
from .state import current

bp = Blueprint("status", __name__)


def _memory(reading) -> dict[str, str]:
    return {
        "total": format_bytes(reading.total),
        "used": format_bytes(reading.used),
        "free": format_bytes(reading.free),
    }


@bp.get("/status")
def server_status():
    """Server health and resource usage.

    Request counts cover this worker process's /api/v1 and /v1 responses."""
    no_query()
    app = current()
    counts = app.manager.counts()
    gpu = app.gpu.read()
    gpu_usage = None
    if gpu is not None:
        gpu_usage = {
            **_memory(gpu),
            "utilization": format_percent(gpu.utilization) if gpu.utilization is not None else None,
        }
    return jsonify(
        {
            "status": "healthy",
            "uptime": format_uptime(time.monotonic() - app.started),
            "active_models": counts["loaded"],
            "memory_usage": _memory(system_memory()),
            "gpu_usage": gpu_usage,
            "requests": {
                "total": app.requests.total,
                "success": app.requests.success,
                "failed": app.requests.failed,
                "rate": f"{app.requests.rate_per_minute()}/minute",
            },
            "generations": {"running": counts["running"], "waiting": counts["waiting"]},
        }
    )
