"""OpenAI-compatible routes under /v1: models, completions and chat completions.

They share the engine, API keys and rate limits with /api/v1; only the request and response
shapes differ (OpenAI's, including its SSE chunks ending with `data: [DONE]`:
tursi.api.openai_responses), and errors are OpenAI error objects (tursi.api.errors).
"""

from __future__ import annotations

from flask import Blueprint, jsonify

from ..errors import InvalidRequest, ModelNotFound
from ..threads import off_hub
from . import load_body, no_query
from .jobs import Submission, sampling_params, submit
from .logprobs import TokenTexts
from .openai_responses import Completion, CompletionFrames, best_of
from .openai_schemas import (
    OPENAI_COMPLETION_DEFAULT_MAX_TOKENS,
    ChatCompletionRequestSchema,
    CompletionRequestSchema,
)
from .state import current
from .streaming import collect, stream_response
from .tools import chat_prompt, constraint, tools_refused

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

    `prompt` is a string, a list of token ids, or a list of either; each gets `n` choices
    (or the best `n` of `best_of`), numbered prompt by prompt. `stream: true` answers
    OpenAI's SSE chunks."""
    params = load_body(CompletionRequestSchema)
    worker = current().manager.worker(params["model"])
    max_tokens = params["max_tokens"]
    if max_tokens is None:
        max_tokens = OPENAI_COMPLETION_DEFAULT_MAX_TOKENS
    n, best = params["n"], params.get("best_of")
    ranked = best is not None and best > n
    asked: dict[str, int] = {}  # what the engine must compute that the client did not ask
    if ranked and params["logprobs"] is None:  # ranking needs each choice's logprob sum
        asked["logprobs"] = 0
    if max_tokens == 0 and params["prompt_logprobs"] is None:  # echo alone: the engine
        asked["prompt_logprobs"] = 0  # runs a job that generates nothing only to score
    submission = submit(
        worker,
        params,
        params["prompts"],
        max_tokens,
        n=best if ranked else n,
        sampling=sampling_params(params, **asked),
    )
    texts = TokenTexts(worker)
    echoes = None
    if params["echo"]:  # token-id prompts decoded off the hub: they can be long
        echoes = off_hub(_echoes, texts, params["prompts"])
    completion = Completion(params, submission, texts, chat=False, echoes=echoes)
    if ranked:  # never streamed (the schema refuses best_of with stream)
        return jsonify(completion.whole(best_of(collect(submission), n, best)))
    return _respond(submission, completion)


@bp.post("/chat/completions")
def chat_completions():
    """OpenAI-compatible chat completion.

    The messages go through the model's chat template (a model without one answers 400);
    `n` choices; `stream: true` answers OpenAI's SSE chunks. With `tools`, the model may call
    them (tool_choice), its calls held valid by a grammar and answered as `tool_calls`
    (tursi.api.tools, docs/tools.md)."""
    params = load_body(ChatCompletionRequestSchema)
    worker = current().manager.worker(params["model"])
    tools = params["tools"]
    messages = params["messages"]
    sampling = None
    if tools is not None:
        if tools.choice == "auto" and params["constraint"] is not None:
            raise InvalidRequest(
                'tool_choice "auto" cannot be combined with a structured output constraint '
                "(response_format, structured_outputs, guided_*): send one or the other",
                {"fields": {"tool_choice": ["cannot be combined with structured output"]}},
            )
        # required or a named function: the answer is calls, held to their own grammar
        sampling = sampling_params(params, constraint=constraint(tools))
    try:
        submission = submit(
            worker,
            params,
            [lambda worker: chat_prompt(worker, messages, tools)],
            params["max_tokens"],
            chat=True,
            sampling=sampling,
        )
    except InvalidRequest as exc:
        if tools is not None and exc.details.get("kind") == "grammar":
            raise tools_refused(exc) from None
        raise
    completion = Completion(
        params, submission, TokenTexts(worker), chat=True, tools=tools is not None
    )
    return _respond(submission, completion)


def _echoes(texts: TokenTexts, prompts: list[str | list[int]]) -> list[str]:
    return [p if isinstance(p, str) else texts.decode(p) for p in prompts]


def _respond(submission: Submission, completion: Completion):
    if completion.stream:
        return stream_response(submission, CompletionFrames(completion))
    return jsonify(completion.whole(collect(submission)))
