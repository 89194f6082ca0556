"""/status: server health and resource usage."""

from __future__ import annotations

import time

from flask import Blueprint, jsonify

from ..formatting import format_bytes, format_percent, format_uptime
from ..telemetry import system_memory
from . import no_query
from .history import INTERVAL
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

    Request counts cover the /api/v1 and /v1 responses of every worker of the server;
    active models are those loaded on every worker, generations those of all workers."""
    no_query()
    app = current()
    models, extras = app.manager.views_and_extras()
    requests = [extra["requests"] for extra in extras]
    # this worker's reading is fresh; a worker that has not reported it yet counts as 0
    rss = sum(extra.get("rss", 0) for extra in extras)
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
            "active_models": sum(m.status == "loaded" for m in models),
            "memory_usage": _memory(system_memory()),
            "process_memory": {"rss": format_bytes(rss), "rss_bytes": rss},
            "gpu_usage": gpu_usage,
            "requests": {
                "total": sum(r["total"] for r in requests),
                "success": sum(r["success"] for r in requests),
                "failed": sum(r["failed"] for r in requests),
                "rate": f"{sum(r['rate'] for r in requests)}/minute",
            },
            "generations": {
                "running": sum(m.running for m in models),
                "waiting": sum(m.waiting for m in models),
            },
        }
    )


@bp.get("/status/history")
def history():
    """The whole server every few seconds over the last minutes (the console's charts):
    request and token rates, generations running and waiting, memory, GPU."""
    no_query()
    app = current()
    app.manager.start_housekeeping()  # sampling runs there; it starts with a first load too
    return jsonify({"interval_seconds": INTERVAL, "samples": app.history.samples()})
