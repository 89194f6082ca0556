"""/generate: one generation, whole or streamed as server-sent events."""

from __future__ import annotations

from flask import Blueprint, jsonify

from . import json_body
from .jobs import submit_job
from .schemas import GenerateRequestSchema
from .state import current
from .streaming import NativeFrames, collect, done_payload, stream_response

bp = Blueprint("generation", __name__)


@bp.post("/generate")
def generate():
    """Generate text with a loaded model.

    The whole text as JSON, or with `stream: true` server-sent events as it is generated."""
    params = GenerateRequestSchema().load(json_body())
    worker = current().manager.worker(params["model"])
    job = submit_job(worker, params, params["prompt"], params["max_tokens"])
    prefix = params["prompt"] if params["return_full_text"] else ""
    if not params["stream"]:
        text, done = collect(job)
        return jsonify({"text": prefix + text, **done_payload(done)})
    return stream_response(job, NativeFrames(prefix))
