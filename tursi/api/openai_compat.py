"""OpenAI-compatible routes under /v1: models, completions and chat completions.

They share the engine, API keys and rate limits with /api/v1; only the request and response
shapes differ (OpenAI's, including its SSE chunks ending with `data: [DONE]`), and errors
are OpenAI error objects (tursi.api.errors).
"""

from __future__ import annotations

import json
import time
import uuid
from typing import Any

from flask import Blueprint, jsonify

from ..engine.jobs import Finished, GenerationJob
from ..errors import ModelNotFound, TursiError
from . import json_body, no_query
from .errors import openai_error_body
from .jobs import submit_job
from .openai_schemas import (
    OPENAI_COMPLETION_DEFAULT_MAX_TOKENS,
    ChatCompletionRequestSchema,
    CompletionRequestSchema,
)
from .state import current
from .streaming import collect, stream_response

bp = Blueprint("openai", __name__)


@bp.get("/models")
def list_models():
    """The models that can serve requests now (loaded ones), as OpenAI lists them."""
    no_query()
    return jsonify({"object": "list", "data": [model_object(state) for state in _loaded()]})


@bp.get("/models/<path:model_id>")
def retrieve_model(model_id: str):
    """One loaded model, as OpenAI describes it (`client.models.retrieve`).

    A model that is not loaded, or not in the catalog, is OpenAI's 404 model_not_found."""
    no_query()
    loaded = _loaded()
    for state in loaded:
        if state.name == model_id:
            return jsonify(model_object(state))
    raise ModelNotFound(model_id, [state.name for state in loaded])


def _loaded() -> list:
    return [state for state in current().manager.snapshots() if state.status == "loaded"]


def model_object(state) -> dict:
    return {
        "id": state.name,
        "object": "model",
        "created": int(state.loaded_at or 0),
        "owned_by": "tursi",
    }


@bp.post("/completions")
def completions():
    """OpenAI-compatible text completion.

    `prompt` is a string or a list of one string; `stream: true` answers OpenAI's SSE
    chunks."""
    params = CompletionRequestSchema().load(json_body())
    worker = current().manager.worker(params["model"])
    max_tokens = params["max_tokens"] or OPENAI_COMPLETION_DEFAULT_MAX_TOKENS
    job = submit_job(worker, params, params["prompt"], max_tokens)
    echo = params["prompt"] if params["echo"] else ""
    return _respond(job, Completion(params, chat=False), echo)


@bp.post("/chat/completions")
def chat_completions():
    """OpenAI-compatible chat completion.

    The messages go through the model's chat template (a model without one answers 400);
    `stream: true` answers OpenAI's SSE chunks."""
    params = ChatCompletionRequestSchema().load(json_body())
    worker = current().manager.worker(params["model"])
    prompt = worker.chat_prompt(params["messages"])
    job = submit_job(worker, params, prompt, params["max_tokens"], chat=True)
    return _respond(job, Completion(params, chat=True), "")


def _respond(job: GenerationJob, completion: Completion, echo: str):
    if completion.stream:
        return stream_response(job, CompletionFrames(completion, job, echo))
    text, done = collect(job)
    return jsonify(completion.whole(echo + text, done, len(job.prompt_ids)))


class Completion:
    """The response objects of one completion (chat or not), whole or as stream chunks."""

    def __init__(self, params: dict[str, Any], chat: bool):
        self.chat = chat
        self.model = params["model"]
        self.stream = params["stream"]
        self.include_usage = bool((params.get("stream_options") or {}).get("include_usage"))
        self.id = ("chatcmpl-" if chat else "cmpl-") + uuid.uuid4().hex
        self.created = int(time.time())

    def _envelope(self, choices: list[dict[str, Any]], whole: bool) -> dict[str, Any]:
        if self.chat:
            object_ = "chat.completion" if whole else "chat.completion.chunk"
        else:
            object_ = "text_completion"
        return {
            "id": self.id,
            "object": object_,
            "created": self.created,
            "model": self.model,
            "choices": choices,
        }

    def whole(self, text: str, done: Finished, prompt_tokens: int) -> dict[str, Any]:
        choice: dict[str, Any] = {"index": 0}
        if self.chat:
            choice["message"] = {"role": "assistant", "content": text}
        else:
            choice["text"] = text
        choice.update({"finish_reason": done.finish_reason, "logprobs": None})
        body = self._envelope([choice], whole=True)
        body["usage"] = usage(prompt_tokens, done.tokens_generated)
        return body

    def chunk(
        self, text: str | None = None, finish_reason: str | None = None, role: bool = False
    ) -> dict[str, Any]:
        choice: dict[str, Any] = {"index": 0}
        if self.chat:
            delta: dict[str, Any] = {"role": "assistant"} if role else {}
            if text is not None:
                delta["content"] = text
            choice["delta"] = delta
        else:
            choice["text"] = text or ""
        choice.update({"finish_reason": finish_reason, "logprobs": None})
        return self._envelope([choice], whole=False)

    def usage_chunk(self, prompt_tokens: int, completion_tokens: int) -> dict[str, Any]:
        """The last chunk when stream_options.include_usage: no choices, the usage."""
        return {**self._envelope([], whole=False), "usage": usage(prompt_tokens, completion_tokens)}


def usage(prompt_tokens: int, completion_tokens: int) -> dict[str, int]:
    return {
        "prompt_tokens": prompt_tokens,
        "completion_tokens": completion_tokens,
        "total_tokens": prompt_tokens + completion_tokens,
    }


def data(payload: dict[str, Any] | str) -> str:
    text = payload if isinstance(payload, str) else json.dumps(payload, ensure_ascii=False)
    return f"data: {text}\n\n"


DONE = data("[DONE]")


class CompletionFrames:
    """OpenAI's stream: `data: {chunk}` frames, a last chunk with the finish_reason, a usage
    chunk when stream_options.include_usage, then `data: [DONE]`. An error after the stream
    started is one `data: {"error": ...}` frame (the openai client raises it), then [DONE]."""

    def __init__(self, completion: Completion, job: GenerationJob, echo: str):
        self.completion, self.job, self.echo = completion, job, echo

    def start(self) -> list[str]:
        if self.completion.chat:
            return [data(self.completion.chunk("", role=True))]
        return [data(self.completion.chunk(self.echo))] if self.echo else []

    def text(self, text: str) -> str:
        return data(self.completion.chunk(text))

    def done(self, done: Finished) -> list[str]:
        frames = [data(self.completion.chunk(finish_reason=done.finish_reason))]
        if self.completion.include_usage:
            frames.append(
                data(self.completion.usage_chunk(len(self.job.prompt_ids), done.tokens_generated))
            )
        return frames + [DONE]

    def error(self, error: TursiError) -> list[str]:
        return [
            data(openai_error_body(error.status, error.code, error.message, error.details)),
            DONE,
        ]
