"""/generate: one generation, whole or streamed as server-sent events."""
from __future__ import annotations

from flask import Blueprint, Response, jsonify, request

from ..schemas import GenerateRequestSchema
from ..state import current
from ..streaming import collect, done_payload, relay
from . import json_body

bp = Blueprint("generation", __name__)


@bp.post("/generate")
def generate():
    app = current()
    params = GenerateRequestSchema().load(json_body())
    worker = app.manager.worker(params["model"])
    job = worker.new_job(
        params["prompt"], max_tokens=params["max_tokens"], max_tokens_cap=app.settings.max_tokens,
        temperature=params["temperature"], top_p=params["top_p"], stop=params["stop"],
        seed=params["seed"], ignore_eos=params["ignore_eos"])
    worker.submit(job)
    prefix = params["prompt"] if params["return_full_text"] else ""
    if not params["stream"]:
        text, done = collect(job)
        return jsonify({"text": prefix + text, **done_payload(done)})
    environ = request.environ

    def on_end(ok: bool) -> None:
        environ["tursi.stream_ok"] = ok

    frames = relay(job, prefix, app.settings.heartbeat_seconds, on_end)
    return Response(frames, mimetype="text/event-stream",
                    headers={"Cache-Control": "no-cache", "X-Accel-Buffering": "no"})
