"""What the OpenAI-compatible routes accept of OpenAI's documented request fields: those that
change nothing are accepted and ignored, those the server cannot honour only at their
neutral value (else a 400 naming the field), `null` is every optional field's default,
chat messages carry text (and tool turns: tests/app/test_tools.py); GET /v1/models/{id};
`x-should-retry: false` on the errors a retry cannot fix, as the openai SDK reads it."""

from __future__ import annotations

import httpx2
import openai
import pytest

from tests.helpers import API, load_and_wait, with_chat_template, write_catalog
from tursi.api.errors import retryable
from tursi.api.openai_schemas import (
    ChatCompletionRequestSchema,
    CompletionRequestSchema,
    field_names,
)
from tursi.errors import TursiError

USER = [{"role": "user", "content": "lazy dog"}]
GREEDY = {"max_tokens": 4, "temperature": 0}

# Every field OpenAI documents for chat completions that does not change the output.
IGNORED_CHAT = {
    "user": "u-1",
    "metadata": {"team": "eval"},
    "store": True,
    "service_tier": "auto",
    "prompt_cache_key": "k",
    "prompt_cache_retention": "24h",
    "prompt_cache_options": {"ttl": "1h"},
    "safety_identifier": "s-1",
    "guided_decoding_backend": "xgrammar",
    "stream_options": {"include_usage": False, "include_obfuscation": True},
}
# The fields the server cannot honour, at their neutral values.
NEUTRAL_CHAT = {
    "functions": [],
    "function_call": "none",
    "modalities": ["text"],
    "reasoning_effort": "none",
    "verbosity": "medium",
    "audio": None,
    "prediction": None,
    "web_search_options": None,
    "moderation": None,
    "guided_whitespace_pattern": None,
}
# ... and a value each that would change the answer: refused by name.
REFUSED_CHAT = {
    "functions": [{"name": "f"}],
    "function_call": "auto",
    "modalities": ["text", "audio"],
    "reasoning_effort": "high",
    "verbosity": "low",
    "audio": {"voice": "alloy", "format": "wav"},
    "prediction": {"type": "content", "content": "x"},
    "web_search_options": {},
    "moderation": {"model": "omni-moderation-latest"},
    "guided_whitespace_pattern": "[ ]?",
}


@pytest.fixture
def chatty(make_app, tiny_models_dir, tmp_path):
    """A client with "chatty" (the tiny Llama with a chat template) loaded."""
    folder = with_chat_template(tiny_models_dir / "llama", tmp_path / "chatty")
    catalog = write_catalog(
        tmp_path / "models.json",
        {
            "chatty": {"path": str(folder), "dtype": "float32"},
            "other": {"path": str(tiny_models_dir / "gpt2"), "dtype": "float32"},
        },
    )
    app = make_app(models_file=str(catalog))
    client = app.test_client()
    assert load_and_wait(client, "chatty")["status"] == "loaded"
    return client


def chat(client, **body):
    return client.post("/v1/chat/completions", json={"model": "chatty", "messages": USER, **body})


def text_of(response):
    assert response.status_code == 200, response.get_data(as_text=True)
    return response.get_json()["choices"][0]["message"]["content"]


def test_the_lists_are_the_schemas():
    assert field_names(ChatCompletionRequestSchema, "ignored") == sorted(
        set(IGNORED_CHAT) - {"stream_options"}
    )
    assert field_names(ChatCompletionRequestSchema, "neutral") == sorted(NEUTRAL_CHAT)
    assert set(REFUSED_CHAT) == set(NEUTRAL_CHAT)
    assert field_names(CompletionRequestSchema, "ignored") == ["guided_decoding_backend", "user"]
    assert field_names(CompletionRequestSchema, "neutral") == [
        "guided_whitespace_pattern",
        "suffix",
    ]


def test_fields_that_change_nothing_are_accepted_and_change_nothing(chatty):
    plain = text_of(chat(chatty, **GREEDY))
    assert text_of(chat(chatty, **GREEDY, **IGNORED_CHAT)) == plain
    assert text_of(chat(chatty, **GREEDY, **NEUTRAL_CHAT)) == plain
    response = chatty.post(
        "/v1/completions",
        json={"model": "chatty", "prompt": "lazy dog", "user": "u", "suffix": "", **GREEDY},
    )
    assert response.status_code == 200, response.get_json()


@pytest.mark.parametrize("name", sorted(REFUSED_CHAT))
def test_fields_that_would_change_the_answer_are_refused_by_name(chatty, name):
    response = chat(chatty, **GREEDY, **{name: REFUSED_CHAT[name]})
    assert response.status_code == 400
    assert response.headers["x-should-retry"] == "false"
    error = response.get_json()["error"]
    assert error["param"] == name and name in error["message"]
    assert "not supported" in error["message"]


@pytest.mark.parametrize(
    "path, body",
    [
        (f"{API}/generate", {"prompt": "lazy dog"}),
        ("/v1/completions", {"prompt": "lazy dog"}),
        ("/v1/chat/completions", {"messages": USER}),
    ],
)
def test_null_is_the_default_of_every_optional_field(chatty, path, body):
    schema = {
        f"{API}/generate": "GenerateRequest",
        "/v1/completions": "CompletionRequest",
        "/v1/chat/completions": "ChatCompletionRequest",
    }[path]
    document = chatty.get(f"{API}/openapi.json").get_json()["components"]["schemas"][schema]
    optional = set(document["properties"]) - set(document["required"])
    nulls = dict.fromkeys(optional - {"max_tokens", "temperature"})
    response = chatty.post(path, json={"model": "chatty", **body, **GREEDY, **nulls})
    assert response.status_code == 200, response.get_data(as_text=True)
    plain = chatty.post(path, json={"model": "chatty", **body, **GREEDY})
    assert (
        response.get_json()["usage" if path != f"{API}/generate" else "text"]
        == (plain.get_json()["usage" if path != f"{API}/generate" else "text"])
    )


@pytest.mark.parametrize(
    "message",
    [
        {"role": "developer", "content": "be brief"},
        {"role": "system", "content": [{"type": "text", "text": "be brief"}], "name": "sys"},
        {
            "role": "user",
            "content": [{"type": "text", "text": "hi", "prompt_cache_breakpoint": {}}],
        },
        {"role": "assistant", "content": "hello", "name": "bot", "tool_calls": None},
    ],
)
def test_text_messages_in_every_shape_the_spec_gives_them(chatty, message):
    assert text_of(chat(chatty, **GREEDY, messages=[message, *USER]))


@pytest.mark.parametrize(
    "message, words",
    [
        ({"role": "function", "content": "42", "name": "f"}, "use tools"),
        (
            {"role": "user", "content": [{"type": "image_url", "image_url": {"url": "x"}}]},
            '"image_url"',
        ),
        ({"role": "assistant", "content": "x", "refusal": "no"}, "refusal"),
    ],
)
def test_messages_that_carry_more_than_text_are_refused(chatty, message, words):
    response = chat(chatty, **GREEDY, messages=[message])
    assert response.status_code == 400
    error = response.get_json()["error"]
    assert error["param"] == "messages" and words in error["message"]


def test_token_ids_outside_the_vocabulary_are_400s(chatty):
    for body in (
        {"prompt": [[1, 2], [10**6]]},
        {"prompt": "x", "logit_bias": {"1000000": 1}},
        {"prompt": "x", "stop_token_ids": [10**6]},
    ):
        response = chatty.post("/v1/completions", json={"model": "chatty", **body})
        assert response.status_code == 400, body
        assert response.headers["x-should-retry"] == "false"


# --- /v1/models/{id} ------------------------------------------------------------------------


def openai_client(app, requests=None):
    """The openai SDK over WSGI, in-process; `requests` (a list) records each request."""
    hooks = {"request": [requests.append]} if requests is not None else {}
    http = httpx2.Client(
        transport=httpx2.WSGITransport(app=app), base_url="http://tursi", event_hooks=hooks
    )
    return openai.OpenAI(
        base_url="http://tursi/v1", api_key="none", max_retries=2, http_client=http
    )


def test_models_retrieve(chatty):
    app = chatty.application
    with openai_client(app) as client:
        model = client.models.retrieve("chatty")
        assert (model.id, model.object, model.owned_by) == ("chatty", "model", "tursi")
        assert model.created > 0
        listed = client.models.list().data
        assert [m.model_dump() for m in listed] == [model.model_dump()]
        for name in ("other", "nope", "org/model"):  # not loaded, not in the catalog, any id
            with pytest.raises(openai.NotFoundError) as raised:
                client.models.retrieve(name)
            assert raised.value.code == "model_not_found"
            assert raised.value.body["details"]["available_models"] == ["chatty"]


# --- x-should-retry ---------------------------------------------------------------------------


def every_error_class():
    found, classes = [], [TursiError]
    while classes:
        cls = classes.pop()
        found.append(cls)
        classes.extend(cls.__subclasses__())
    return found


FINAL = {
    400: "every 400",
    401: "unauthorized",
    404: "model_not_found",
    409: "model_not_loaded, model_conflict",
    499: "client_disconnected (nobody reads it)",
    504: "request_timeout",
    507: "insufficient_memory",
}


@pytest.mark.parametrize("cls", every_error_class(), ids=lambda cls: cls.code)
@pytest.mark.parametrize("prefix", ["/v1", API])
def test_should_retry_follows_whether_a_retry_can_help(make_app, cls, prefix):
    """Every error a retry cannot fix says so, on both APIs; 429s (but a request over the
    whole token budget), 503s, 500s and load_in_progress do not."""
    expected_final = (
        cls.status in FINAL and cls.code != "load_in_progress"
    ) or cls.code == "request_exceeds_token_limit"
    assert retryable(cls.status, cls.code) is not expected_final
    app = make_app()

    def fail():
        error = cls.__new__(cls)
        TursiError.__init__(error, "m")
        raise error

    app.add_url_rule(f"{prefix}/fail", "fail", fail)
    response = app.test_client().get(f"{prefix}/fail")
    assert response.status_code == cls.status
    assert (response.headers.get("x-should-retry") == "false") is expected_final


@pytest.mark.parametrize("status", [403, 405, 413])
def test_http_errors_are_final(status):
    assert not retryable(status, "http_error")
    assert retryable(429, "rate_limit_exceeded") and retryable(503, "overloaded")


def test_the_sdk_does_not_retry_what_cannot_succeed(chatty):
    """max_retries=2: without the header the SDK would send each of these three times."""
    requests = []
    with openai_client(chatty.application, requests) as client:
        with pytest.raises(openai.ConflictError) as raised:  # 409, retried by default
            client.completions.create(model="other", prompt="hi")
        assert raised.value.code == "model_not_loaded"
        assert len(requests) == 1
        with pytest.raises(openai.BadRequestError):
            client.completions.create(model="chatty", prompt="hi", n=17)
        assert len(requests) == 2
    for response in (
        chatty.post("/v1/completions", json={"model": "other", "prompt": "hi"}),
        chatty.post(f"{API}/generate", json={"model": "other", "prompt": "hi"}),  # native too
        chatty.get("/v1/nothing"),
        chatty.put("/v1/models"),
    ):
        assert response.headers["x-should-retry"] == "false", response.status_code
    assert "x-should-retry" not in chatty.get("/v1/models").headers  # successes: none


def test_rate_limited_and_loading_answers_stay_retryable(make_app):
    client = make_app(rate_limit="1/minute").test_client()
    assert client.get("/v1/models").status_code == 200
    limited = client.get("/v1/models")
    assert limited.status_code == 429 and "x-should-retry" not in limited.headers
