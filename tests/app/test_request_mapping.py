"""One mapping from request fields to engine objects: the fields of
tursi.engine.jobs.SamplingParams are the sampling keys that both APIs' schemas accept, and a
request's values reach the job's params and its TokenChooser unchanged, on /api/v1/generate,
/v1/completions and /v1/chat/completions."""

from dataclasses import fields

import pytest

import tursi.engine.scheduler as scheduler_module
from tests.helpers import API, ROUTE_REQUESTS, load_and_wait, with_chat_template, write_catalog
from tursi.api.jobs import sampling_params
from tursi.api.openai_schemas import ChatCompletionRequestSchema, CompletionRequestSchema
from tursi.api.schemas import GenerateRequestSchema, SamplingSchema
from tursi.engine.jobs import Constraint, GenerationParams, SamplingParams

SAMPLING_FIELDS = {field.name for field in fields(SamplingParams)}

# One value per field, none of them a default of either API; the logprobs fields are each
# API's own (OpenAI's map onto the engine's: OPENAI_LOGPROBS). `constraint` is sent as
# `structured_outputs` (REQUEST_KEYS); its regex never writes the stop string "zzz".
VALUES = {
    "temperature": 0.5,
    "top_p": 0.8,
    "top_k": 5,
    "min_p": 0.05,
    "repetition_penalty": 1.25,
    "presence_penalty": 0.5,
    "frequency_penalty": -0.5,
    "logit_bias": {"5": -100, "7": 2.5},
    "stop": ["zzz"],
    "stop_token_ids": [3, 4],
    "seed": -(2**63),
    "ignore_eos": True,
    "logprobs": 2,
    "prompt_logprobs": 1,
    "constraint": {"regex": "[a-y ]+"},
    "speculative": False,  # not the default
}
REQUEST_KEYS = {"constraint": "structured_outputs"}
LOADED = {"logit_bias": {5: -100.0, 7: 2.5}, "constraint": Constraint("regex", "[a-y ]+")}
EXPECTED = SamplingParams(**{**VALUES, **LOADED, "logprobs": 2, "prompt_logprobs": None})
NATIVE_EXPECTED = SamplingParams(**{**VALUES, **LOADED})
SHARED = {
    REQUEST_KEYS.get(k, k): v for k, v in VALUES.items() if k not in ("logprobs", "prompt_logprobs")
}

MESSAGES = [{"role": "user", "content": "lazy dog"}]
# Each route's schema and a body with everything but the sampling fields.
ROUTES = {
    f"{API}/generate": (GenerateRequestSchema, {"prompt": "lazy dog"}),
    "/v1/completions": (CompletionRequestSchema, {"prompt": "lazy dog"}),
    "/v1/chat/completions": (ChatCompletionRequestSchema, {"messages": MESSAGES}),
}
# Each route's way of asking for 2 top alternatives per output token (and, natively, 1 per
# prompt token): the engine's logprobs = 2 for all three.
LOGPROBS = {
    f"{API}/generate": ({"logprobs": 2, "prompt_logprobs": 1}, NATIVE_EXPECTED),
    "/v1/completions": ({"logprobs": 2}, EXPECTED),
    "/v1/chat/completions": ({"logprobs": True, "top_logprobs": 2}, EXPECTED),
}


def test_the_sampling_schema_declares_exactly_the_dataclass_fields():
    assert set(VALUES) == SAMPLING_FIELDS  # the test's values cover every field
    assert set(SamplingSchema().fields) == SAMPLING_FIELDS
    assert SAMPLING_FIELDS <= set(GenerateRequestSchema().fields)


@pytest.mark.parametrize("path", ROUTES)
def test_every_request_schema_maps_its_sampling_values_to_sampling_params(path):
    schema, body = ROUTES[path]
    assert issubclass(schema, SamplingSchema)
    logprobs, expected = LOGPROBS[path]
    loaded = schema().load({"model": "m", **body, **SHARED, **logprobs})
    assert SAMPLING_FIELDS <= set(loaded)  # every field, with the engine's meaning
    assert sampling_params(loaded) == expected


@pytest.mark.parametrize(
    "body, logprobs, prompt_logprobs",
    [
        ({}, None, None),
        ({"logprobs": 0}, 0, None),
        ({"logprobs": 5, "echo": True}, 5, 5),  # echo scores the prompt too
        ({"logprobs": None, "echo": True}, None, None),
        ({"echo": True, "max_tokens": 0, "logprobs": 1}, 1, 1),  # lm-eval's loglikelihood
    ],
)
def test_completion_logprobs_map_to_the_engine(body, logprobs, prompt_logprobs):
    loaded = CompletionRequestSchema().load({"model": "m", "prompt": "x", **body})
    params = sampling_params(loaded)
    assert (params.logprobs, params.prompt_logprobs) == (logprobs, prompt_logprobs)


@pytest.mark.parametrize(
    "body, logprobs",
    [
        ({}, None),
        ({"logprobs": False}, None),
        ({"logprobs": True}, 0),  # the chosen token's logprob, no alternatives
        ({"logprobs": True, "top_logprobs": 0}, 0),
        ({"logprobs": True, "top_logprobs": 20}, 20),
        ({"logprobs": True, "top_logprobs": None}, 0),
        ({"logprobs": None, "top_logprobs": None}, None),
    ],
)
def test_chat_logprobs_map_to_the_engine(body, logprobs):
    loaded = ChatCompletionRequestSchema().load({"model": "m", "messages": MESSAGES, **body})
    params = sampling_params(loaded)
    assert (params.logprobs, params.prompt_logprobs) == (logprobs, None)
    assert "top_logprobs" not in loaded


@pytest.mark.parametrize("path", ROUTES)
def test_null_is_every_optional_fields_default(path):
    """`null` for any optional field loads as if the field were absent (StrictSchema)."""
    schema, body = ROUTES[path]
    plain = schema().load({"model": "m", **body})
    optional = [
        field.data_key or name for name, field in schema().fields.items() if not field.required
    ]
    assert {"n", "stream", "seed", "top_k", "logprobs", "stop", "max_tokens"} <= set(optional)
    assert schema().load({"model": "m", **body, **dict.fromkeys(optional)}) == plain


@pytest.mark.parametrize(
    "path, defaults",
    [
        (f"{API}/generate", SamplingParams(temperature=0.7, top_p=0.9)),  # the spec's example
        ("/v1/completions", SamplingParams()),  # OpenAI's
        ("/v1/chat/completions", SamplingParams()),
    ],
)
def test_each_api_has_its_own_defaults(path, defaults):
    schema, body = ROUTES[path]
    assert sampling_params(schema().load({"model": "m", **body})) == defaults


@pytest.fixture
def chooser_params(monkeypatch):
    """The params of every TokenChooser the scheduler chooses tokens with."""
    seen: list[SamplingParams] = []
    real = scheduler_module.choose_tokens

    def recording(logits, choosers):
        seen.extend(chooser.params for chooser in choosers)
        return real(logits, choosers)

    monkeypatch.setattr(scheduler_module, "choose_tokens", recording)
    return seen


@pytest.fixture
def chatty_client(make_app, tiny_models_dir, tmp_path):
    """A client with "chatty" loaded: the tiny Llama with a chat template, so that one model
    serves all three routes."""
    folder = with_chat_template(tiny_models_dir / "llama", tmp_path / "chatty")
    catalog = write_catalog(
        tmp_path / "models.json", {"chatty": {"path": str(folder), "dtype": "float32"}}
    )
    client = make_app(models_file=str(catalog)).test_client()
    assert load_and_wait(client, "chatty")["status"] == "loaded"
    return client


@pytest.mark.parametrize("stream", [False, True])
@pytest.mark.parametrize("path", ROUTES)
def test_request_values_reach_the_token_chooser(chatty_client, chooser_params, path, stream):
    logprobs, expected = LOGPROBS[path]
    body = {"model": "chatty", **ROUTES[path][1], **SHARED, **logprobs}
    body.update(max_tokens=3, stream=stream)
    response = chatty_client.post(path, json=body)
    assert response.status_code == 200, response.get_data(as_text=True)
    response.get_data()  # a stream runs to its end
    response.close()
    # ignore_eos: three tokens, three choices, each by a chooser built from the same params.
    assert chooser_params == [GenerationParams.of(expected, 3)] * 3


@pytest.mark.parametrize("field", ["cache_prompt", "speculative"])
@pytest.mark.parametrize("route", list(ROUTE_REQUESTS))
@pytest.mark.parametrize("bad", ["false", 0, 1, [], {}])
def test_the_boolean_extensions_refuse_anything_but_a_boolean(
    chat_client, submitted, field, route, bad
):
    """cache_prompt (the prefix cache) and speculative (speculative decoding): a 400 naming
    the field, before anything reaches the engine."""
    body = {"model": "tiny", **ROUTE_REQUESTS[route], field: bad}
    response = chat_client.post(route, json=body)
    assert response.status_code == 400, response.get_data(as_text=True)
    error = response.get_json()["error"]
    assert error["code"] == "invalid_request"
    assert field in error["details"]["fields"]
    assert field in error["message"]
    if route.startswith("/v1"):  # OpenAI's error object names the parameter
        assert error["param"] == field and error["type"] == "invalid_request_error"
    assert submitted == []  # refused before anything reached the engine
