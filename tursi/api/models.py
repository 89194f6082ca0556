"""/models: list, load, unload, metrics."""

from __future__ import annotations

import time
from typing import Any

from flask import Blueprint, jsonify

from ..engine.loading import LoadOptions
from ..engine.manager import ModelState
from ..formatting import format_bytes, format_percent, format_seconds, format_uptime, iso_utc
from . import json_body, no_query
from .schemas import LoadRequestSchema, UnloadRequestSchema
from .state import current

bp = Blueprint("models", __name__)


def model_view(state: ModelState) -> dict[str, Any]:
    view: dict[str, Any] = {"name": state.name, "status": state.status}
    if state.status == "loaded":
        options = state.options or LoadOptions()
        view.update(
            {
                "quantized": options.quantize,
                "bits": options.bits,
                "mode": options.mode,
                "dtype": state.dtype,
                "device": state.device,
                "memory_usage": format_bytes(state.memory_bytes or 0),
                "memory_bytes": state.memory_bytes,
                "uptime": format_uptime(time.monotonic() - (state.loaded_mono or time.monotonic())),
            }
        )
    elif state.status == "loading":
        progress = state.progress
        if progress is not None:
            view.update({"progress": round(progress.fraction, 3), "stage": progress.stage})
    elif state.status == "failed":
        view["error"] = state.error
    return view


@bp.get("/models")
def list_models():
    """Every catalog model and its status.

    Loaded models add their load settings, memory and uptime; loading ones how far the load
    got; failed ones the load error."""
    no_query()
    return jsonify({"models": [model_view(s) for s in current().manager.snapshots()]})


@bp.post("/models/<name>/load")
def load_model(name: str):
    """Load a model in the background.

    The body (optional) asks for quantization and a dtype. Poll GET /api/v1/models until the
    model is `loaded` (or `failed`)."""
    manager = current().manager
    manager.state(name)  # 404 before validating the body
    options = LoadOptions(**LoadRequestSchema().load(json_body(required=False)))
    ticket = manager.load(name, options)
    body: dict[str, Any] = {"status": ticket.status, "message": ticket.message}
    if ticket.estimated_seconds is not None:
        body["estimated_time"] = format_seconds(ticket.estimated_seconds)
    return jsonify(body), 202 if ticket.status == "loading" else 200


@bp.post("/models/<name>/unload")
def unload_model(name: str):
    """Unload a model and release its memory.

    Its running and queued generations end with `model_unloaded`."""
    UnloadRequestSchema().load(json_body(required=False))
    current().manager.unload(name)
    return jsonify({"status": "success", "message": "Model unloaded successfully"})


@bp.get("/models/<name>/metrics")
def model_metrics(name: str):
    """A model's counters (since the server started) and its current load."""
    no_query()
    state = current().manager.snapshot(name)
    stats = state.stats.snapshot()
    worker = state.worker if state.status == "loaded" else None
    running, waiting = worker.counts() if worker else (0, 0)
    metrics = {
        "requests_total": stats["requests_total"],
        "tokens_generated": stats["tokens_generated"],
        "average_generation_time": format_seconds(stats["average_generation_seconds"]),
        "memory_usage": format_bytes(state.memory_bytes) if state.memory_bytes else None,
        "load_time": iso_utc(state.loaded_at) if state.loaded_at else None,
        "error_rate": format_percent(stats["error_rate"]),
        "status": state.status,
        "load_duration": format_seconds(state.load_seconds) if state.load_seconds else None,
        "generations_running": running,
        "generations_waiting": waiting,
    }
    loaded = state.status == "loaded"
    options = (state.options or LoadOptions()) if loaded else None
    metrics.update(
        {
            "quantized": options.quantize if options else None,
            "bits": options.bits if options else None,
            "mode": options.mode if options else None,
            "dtype": state.dtype if loaded else None,
            "memory_bytes": state.memory_bytes if loaded else None,
        }
    )
    return jsonify({"name": name, "metrics": metrics})
