"""Tokenizer routes: text or chat messages to token ids, and back, with a loaded model's
tokenizer; so that a client can count a prompt against the context before it sends it.

Under /api/v1 with Tursi's names; at the root, /tokenize and /detokenize with the names
vLLM's and llama.cpp's servers use (tools call those paths). All of them need the API key
and share the rate limit of the other API routes (tursi.api.auth.is_api_path).
"""

from __future__ import annotations

from typing import Any

from flask import Blueprint, jsonify

from ..engine.worker import ModelWorker
from ..errors import InvalidRequest
from ..threads import off_hub
from . import load_body
from .state import current
from .tokenize_schemas import (
    CompatDetokenizeRequestSchema,
    CompatTokenizeRequestSchema,
    DetokenizeRequestSchema,
    TokenizeRequestSchema,
)
from .tools import chat_prompt

bp = Blueprint("tokenize", __name__)  # /api/v1
compat_bp = Blueprint("tokenize_compat", __name__)  # the root: vLLM's and llama.cpp's paths


@bp.post("/tokenize")
def tokenize():
    """Tokenize text, or chat messages through the model's chat template.

    `text` is tokenized as a prompt is (special tokens added unless add_special_tokens is
    false); `messages` are rendered with the chat template first (with the assistant's
    generation prompt unless add_generation_prompt is false). The answer has the ids, their
    count and the model's context length."""
    data = load_body(TokenizeRequestSchema)
    worker = current().manager.worker(data["model"])
    ids = off_hub(_token_ids, worker, data)
    return jsonify({"tokens": ids, "count": len(ids), "context_length": worker.context_length})


@bp.post("/detokenize")
def detokenize():
    """The text of token ids.

    Ids outside the model's vocabulary are a 400."""
    data = load_body(DetokenizeRequestSchema)
    worker = current().manager.worker(data["model"])
    return jsonify({"text": off_hub(worker.detokenize, data["tokens"])})


@compat_bp.post("/tokenize")
def compat_tokenize():
    """Tokenize, with vLLM's and llama.cpp's field names.

    vLLM's {model, prompt | messages, add_special_tokens, add_generation_prompt} or
    llama.cpp's {content, add_special, with_pieces}; `model` may be left out when exactly
    one model is loaded. Answers {tokens, count, max_model_len}; with `with_pieces` each
    token is {id, piece}."""
    data = load_body(CompatTokenizeRequestSchema)
    worker = _worker(data["model"])
    ids, tokens = off_hub(_compat_tokens, worker, data)
    return jsonify({"tokens": tokens, "count": len(ids), "max_model_len": worker.context_length})


@compat_bp.post("/detokenize")
def compat_detokenize():
    """The text of token ids, with vLLM's and llama.cpp's field names.

    {model?, tokens}: the text is both `prompt` (vLLM's name) and `content` (llama.cpp's)."""
    data = load_body(CompatDetokenizeRequestSchema)
    text = off_hub(_worker(data["model"]).detokenize, data["tokens"])
    return jsonify({"prompt": text, "content": text})


# Rendering, tokenizing and detokenizing cost as much as the text is long: the routes run
# them off the gevent hub (tursi.threads.off_hub).


def _compat_tokens(worker: ModelWorker, data: dict[str, Any]) -> tuple[list[int], list[Any]]:
    """The ids, and the tokens as answered: the ids, or {id, piece} with_pieces."""
    ids = _token_ids(worker, data)
    if not data["with_pieces"]:
        return ids, ids
    texts = worker.token_texts(ids)
    return ids, [{"id": i, "piece": _piece(raw)} for i, (_, raw) in zip(ids, texts, strict=True)]


def _token_ids(worker: ModelWorker, data: dict[str, Any]) -> list[int]:
    special = data["add_special_tokens"]
    if data["messages"] is not None:
        text = chat_prompt(worker, data["messages"], None, data["add_generation_prompt"])
        return worker.tokenize(text, add_special_tokens=bool(special))
    return worker.tokenize(data["text"], add_special_tokens=special is not False)


def _piece(raw: bytes) -> str | list[int]:
    """A token's text as llama.cpp gives it: a string, or its bytes when they are not UTF-8
    on their own (half of a character)."""
    try:
        return raw.decode("utf-8")
    except UnicodeDecodeError:
        return list(raw)


def _worker(name: str | None) -> ModelWorker:
    """The named model's worker; without a name, the one loaded model's (a 400 unless
    exactly one is loaded)."""
    manager = current().manager
    if name is None:
        loaded = [state.name for state in manager.snapshots() if state.status == "loaded"]
        if len(loaded) != 1:
            raise InvalidRequest(
                f"Name the model: {len(loaded)} models are loaded",
                {
                    "fields": {"model": ["required unless exactly one model is loaded"]},
                    "loaded_models": loaded,
                },
            )
        name = loaded[0]
    return manager.worker(name)
