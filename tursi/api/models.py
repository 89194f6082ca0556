"""/models: list, load, unload, metrics."""

from __future__ import annotations

import time
from typing import Any

from flask import Blueprint, jsonify

from ..engine.loading import LoadOptions
from ..engine.views import ModelView
from ..formatting import format_bytes, format_percent, format_seconds, format_uptime, iso_utc
from ..telemetry import summarize
from . import load_body, no_query
from .schemas import LoadRequestSchema, UnloadRequestSchema
from .state import current

bp = Blueprint("models", __name__)


def model_view(model: ModelView) -> dict[str, Any]:
    view: dict[str, Any] = {"name": model.name, "status": model.status}
    if model.status == "loaded":
        options = model.options or LoadOptions()
        view.update(
            {
                "quantized": options.quantize,
                "bits": options.bits,
                "mode": options.mode,
                "dtype": model.dtype,
                "device": model.device,
                "memory_usage": format_bytes(model.memory_bytes or 0),
                "memory_bytes": model.memory_bytes,
                "uptime": format_uptime(time.time() - (model.loaded_at or time.time())),
            }
        )
    elif model.status == "loading":
        if model.progress is not None:
            view.update({"progress": model.progress, "stage": model.stage})
    elif model.status == "failed":
        view["error"] = model.error
    if model.workers is not None:
        view["workers"] = model.workers
    return view


@bp.get("/models")
def list_models():
    """Every catalog model and its status.

    Loaded models add their load settings, memory and uptime; loading ones how far the load
    got; failed ones the load error. With several workers: the whole server (loaded once
    every worker has it), with each worker's status and memory summed over the copies."""
    no_query()
    return jsonify({"models": [model_view(m) for m in current().manager.views()]})


@bp.post("/models/<name>/load")
def load_model(name: str):
    """Load a model in the background.

    The body (optional) asks for quantization and a dtype. Poll GET /api/v1/models until the
    model is `loaded` (or `failed`)."""
    manager = current().manager
    manager.state(name)  # 404 before validating the body
    options = LoadOptions(**load_body(LoadRequestSchema, required=False))
    ticket = manager.load(name, options)
    body: dict[str, Any] = {"status": ticket.status, "message": ticket.message}
    if ticket.estimated_seconds is not None:
        body["estimated_time"] = format_seconds(ticket.estimated_seconds)
    return jsonify(body), 202 if ticket.status == "loading" else 200


@bp.post("/models/<name>/unload")
def unload_model(name: str):
    """Unload a model and release its memory.

    Its running and queued generations end with `model_unloaded`."""
    load_body(UnloadRequestSchema, required=False)
    current().manager.unload(name)
    return jsonify({"status": "success", "message": "Model unloaded successfully"})


@bp.get("/models/<name>/metrics")
def model_metrics(name: str):
    """A model's counters (since the server started) and its current load."""
    no_query()
    model = current().manager.view(name)
    stats = summarize(model.totals)
    loaded = model.status == "loaded"
    metrics = {
        "requests_total": stats["requests_total"],
        "tokens_generated": stats["tokens_generated"],
        "average_generation_time": format_seconds(stats["average_generation_seconds"]),
        "memory_usage": format_bytes(model.memory_bytes) if model.memory_bytes else None,
        "load_time": iso_utc(model.loaded_at) if model.loaded_at else None,
        "error_rate": format_percent(stats["error_rate"]),
        "status": model.status,
        "load_duration": format_seconds(model.load_seconds) if model.load_seconds else None,
        "generations_running": model.running if loaded else 0,
        "generations_waiting": model.waiting if loaded else 0,
        "prefix_cache": {
            "prompt_tokens": stats["prefix_prompt_tokens"],
            "cached_tokens": stats["prefix_cached_tokens"],
            "hit_rate": format_percent(stats["prefix_hit_rate"]),
            "bytes": stats["prefix_cache_bytes"],
            "evictions": stats["prefix_evictions"],
        },
        "speculative": {
            "drafted_tokens": stats["drafted_tokens"],
            "accepted_tokens": stats["accepted_tokens"],
            "acceptance_rate": format_percent(stats["acceptance_rate"]),
        },
        "kv_cache": {
            "budget_bytes": stats["kv_cache_budget_bytes"],
            "reserved_bytes": stats["kv_cache_reserved_bytes"],
            "used_bytes": stats["kv_cache_used_bytes"],
        },
    }
    options = (model.options or LoadOptions()) if loaded else None
    metrics.update(
        {
            "quantized": options.quantize if options else None,
            "bits": options.bits if options else None,
            "mode": options.mode if options else None,
            "dtype": model.dtype if loaded else None,
            "memory_bytes": model.memory_bytes if loaded else None,
        }
    )
    return jsonify({"name": name, "metrics": metrics})
