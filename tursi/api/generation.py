"""/generate: one generation, whole or streamed as server-sent events."""

from __future__ import annotations

from typing import Any

from flask import Blueprint, jsonify
from marshmallow import ValidationError

from . import load_body
from .jobs import submit
from .logprobs import TokenTexts, prompt_entries, token_entries
from .schemas import GenerateRequestSchema
from .state import current
from .streaming import NativeFrames, collect, done_payload, stream_response

bp = Blueprint("generation", __name__)


@bp.post("/generate")
def generate():
    """Generate text with a loaded model.

    The whole text as JSON, or with `stream: true` server-sent events as it is generated;
    with `logprobs` / `prompt_logprobs`, each token's log probability and the top
    alternatives."""
    params = load_body(GenerateRequestSchema)
    if params.get("n", 1) != 1:
        # One text per answer keeps the native shape (and its stream) as it is; several
        # choices are what /v1/completions is for.
        raise ValidationError("must be 1 on /api/v1/generate (use /v1/completions)", "n")
    worker = current().manager.worker(params["model"])
    submission = submit(worker, params, [params["prompt"]], params["max_tokens"])
    prefix = params["prompt"] if params["return_full_text"] else ""
    texts = TokenTexts(worker)
    if params["stream"]:
        return stream_response(
            submission, NativeFrames(prefix, texts, params["logprobs"] is not None)
        )
    (choice,) = collect(submission)
    body: dict[str, Any] = {"text": prefix + choice.text, **done_payload(choice.finished)}
    if params["logprobs"] is not None:
        body["logprobs"] = token_entries(choice.tokens, texts, with_id=True)
    if params["prompt_logprobs"] is not None and choice.prompt_logprobs is not None:
        body["prompt_logprobs"] = prompt_entries(choice.prompt_logprobs, texts)
    return jsonify(body)
