"""One mapping from request fields to engine objects: the fields of
tursi.engine.jobs.SamplingParams are the sampling keys that both APIs' schemas accept, and a
request's values reach the job's params and its TokenChooser unchanged, on /api/v1/generate,
/v1/completions and /v1/chat/completions."""

from dataclasses import fields

import pytest

import tursi.engine.scheduler as scheduler_module
from tests.helpers import API, load_and_wait, with_chat_template, write_catalog
from tursi.api.jobs import sampling_params
from tursi.api.openai_schemas import ChatCompletionRequestSchema, CompletionRequestSchema
from tursi.api.schemas import GenerateRequestSchema, SamplingSchema
from tursi.engine.jobs import GenerationParams, SamplingParams

SAMPLING_FIELDS = {field.name for field in fields(SamplingParams)}

# One value per field, none of them a default of either API.
VALUES = {
    "temperature": 0.5,
    "top_p": 0.8,
    "top_k": 5,
    "repetition_penalty": 1.25,
    "stop": ["zzz"],
    "seed": 7,
    "ignore_eos": True,
}
EXPECTED = SamplingParams(**VALUES)

MESSAGES = [{"role": "user", "content": "lazy dog"}]
# Each route's schema and a body with everything but the sampling fields.
ROUTES = {
    f"{API}/generate": (GenerateRequestSchema, {"prompt": "lazy dog"}),
    "/v1/completions": (CompletionRequestSchema, {"prompt": "lazy dog"}),
    "/v1/chat/completions": (ChatCompletionRequestSchema, {"messages": MESSAGES}),
}


def test_the_sampling_schema_declares_exactly_the_dataclass_fields():
    assert set(VALUES) == SAMPLING_FIELDS  # the test's values cover every field
    assert set(SamplingSchema().fields) == SAMPLING_FIELDS


@pytest.mark.parametrize("path", ROUTES)
def test_every_request_schema_maps_its_sampling_values_to_sampling_params(path):
    schema, body = ROUTES[path]
    assert issubclass(schema, SamplingSchema)
    assert sampling_params(schema().load({"model": "m", **body, **VALUES})) == EXPECTED


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
    body = {"model": "chatty", **ROUTES[path][1], **VALUES, "max_tokens": 3, "stream": stream}
    response = chatty_client.post(path, json=body)
    assert response.status_code == 200, response.get_data(as_text=True)
    response.get_data()  # a stream runs to its end
    response.close()
    # ignore_eos: three tokens, three choices, each by a chooser built from the same params.
    assert chooser_params == [GenerationParams.of(EXPECTED, 3)] * 3
