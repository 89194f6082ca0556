"""/generate: one generation, whole or streamed as server-sent events."""

from __future__ import annotations

from flask import Blueprint, jsonify

from . import json_body
from .schemas import SAMPLING_FIELDS, GenerateRequestSchema
from .state import current
from .streaming import NativeFrames, collect, done_payload, stream_response

bp = Blueprint("generation", __name__)


@bp.post("/generate")
def generate():
    """Generate text with a loaded model.

    The whole text as JSON, or with `stream: true` server-sent events as it is generated."""
    app = current()
    params = GenerateRequestSchema().load(json_body())
    worker = app.manager.worker(params["model"])
    job = worker.new_job(
        params["prompt"],
        max_tokens=params["max_tokens"],
        max_tokens_cap=app.settings.max_tokens,
        **{name: params[name] for name in SAMPLING_FIELDS},
    )
    worker.submit(job)
    prefix = params["prompt"] if params["return_full_text"] else ""
    if not params["stream"]:
        text, done = collect(job)
        return jsonify({"text": prefix + text, **done_payload(done)})
    return stream_response(job, NativeFrames(prefix), app.settings.heartbeat_seconds)
