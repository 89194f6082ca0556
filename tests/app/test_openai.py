"""The OpenAI-compatible API (/v1) in-process on the tiny models: error shapes, validation,
/v1/models, the shared rate limit and a stream that fails half-way."""

from __future__ import annotations

import json
import threading
import time

import httpx2
import openai
import pytest

from tests.helpers import API, CHAT, OPENAI_ERROR_FIELDS, load_and_wait, sse_data


def assert_openai_error(response, status, type_, code):
    """A Flask test response is an OpenAI error object of exactly this shape; returns it."""
    assert response.status_code == status, response.get_data(as_text=True)
    assert response.mimetype == "application/json"
    body = response.get_json()
    assert list(body) == ["error"]
    error = body["error"]
    assert set(error) == OPENAI_ERROR_FIELDS
    assert error["type"] == type_
    assert error["code"] == code
    assert isinstance(error["message"], str) and error["message"]
    assert isinstance(error["details"], dict)
    assert error["param"] is None or isinstance(error["param"], str)
    return error


def completion_ok(client, **body):
    body.setdefault("model", "tiny")
    response = client.post("/v1/completions", json=body)
    assert response.status_code == 200, response.get_json()
    return response.get_json()


def test_completion_shape_and_defaults(tiny_client):
    # ignore_eos: a random tiny model may sample its end-of-text token before 16 tokens.
    body = completion_ok(tiny_client, prompt="lazy dog", ignore_eos=True)
    assert set(body) == {"id", "object", "created", "model", "choices", "usage"}
    assert body["object"] == "text_completion" and body["model"] == "tiny"
    assert body["choices"] == [
        {
            "index": 0,
            "text": body["choices"][0]["text"],
            "finish_reason": "length",
            "logprobs": None,
        }
    ]
    assert body["usage"]["completion_tokens"] == 16  # OpenAI's default max_tokens
    echoed = completion_ok(tiny_client, prompt="lazy dog", echo=True, max_tokens=16, temperature=0)
    plain = completion_ok(tiny_client, prompt="lazy dog", max_tokens=16, temperature=0)
    assert echoed["choices"][0]["text"] == "lazy dog" + plain["choices"][0]["text"]


def test_completion_matches_the_native_api(tiny_client):
    native = tiny_client.post(
        f"{API}/generate",
        json={
            "model": "tiny",
            "prompt": "jumps over",
            "max_tokens": 9,
            "temperature": 0,
            "return_full_text": False,
        },
    ).get_json()
    body = completion_ok(tiny_client, prompt=["jumps over"], max_tokens=9, temperature=0)
    assert body["choices"][0]["text"] == native["text"]
    assert body["usage"]["completion_tokens"] == native["tokens_generated"] == 9


def test_chat_on_a_model_without_chat_template(tiny_client):
    response = tiny_client.post(
        "/v1/chat/completions",
        json={"model": "tiny", "messages": [{"role": "user", "content": "hi"}]},
    )
    error = assert_openai_error(response, 400, "invalid_request_error", "invalid_request")
    assert "chat template" in error["message"]
    assert "/v1/completions" in error["message"]
    stream = tiny_client.post(
        "/v1/chat/completions",
        json={"model": "tiny", "messages": [{"role": "user", "content": "hi"}], "stream": True},
    )
    assert_openai_error(stream, 400, "invalid_request_error", "invalid_request")


@pytest.mark.parametrize(
    "path, body, param",
    [
        ("/v1/completions", {"model": "tiny"}, "prompt"),
        ("/v1/completions", {"prompt": "hi"}, "model"),
        ("/v1/completions", {"model": "tiny", "prompt": ""}, "prompt"),
        ("/v1/completions", {"model": "tiny", "prompt": []}, "prompt"),
        ("/v1/completions", {"model": "tiny", "prompt": ["a", ""]}, "prompt"),
        ("/v1/completions", {"model": "tiny", "prompt": ["a", 1]}, "prompt"),
        ("/v1/completions", {"model": "tiny", "prompt": [[1], []]}, "prompt"),
        ("/v1/completions", {"model": "tiny", "prompt": [-1]}, "prompt"),
        ("/v1/completions", {"model": "tiny", "prompt": [True]}, "prompt"),
        ("/v1/completions", {"model": "tiny", "prompt": ["a"] * 65}, "prompt"),
        ("/v1/completions", {"model": "tiny", "prompt": "hi", "temperature": 5}, "temperature"),
        ("/v1/completions", {"model": "tiny", "prompt": "hi", "top_p": 0}, "top_p"),
        ("/v1/completions", {"model": "tiny", "prompt": "hi", "max_tokens": 0}, "max_tokens"),
        ("/v1/completions", {"model": "tiny", "prompt": "hi", "n": 17}, "n"),
        ("/v1/completions", {"model": "tiny", "prompt": "hi", "n": 0}, "n"),
        ("/v1/completions", {"model": "tiny", "prompt": "hi", "min_p": 1.5}, "min_p"),
        (
            "/v1/completions",
            {"model": "tiny", "prompt": "hi", "presence_penalty": 2.5},
            "presence_penalty",
        ),
        (
            "/v1/completions",
            {"model": "tiny", "prompt": "hi", "frequency_penalty": -2.1},
            "frequency_penalty",
        ),
        ("/v1/completions", {"model": "tiny", "prompt": "hi", "logprobs": 6}, "logprobs"),
        ("/v1/completions", {"model": "tiny", "prompt": "hi", "logprobs": True}, "logprobs"),
        ("/v1/completions", {"model": "tiny", "prompt": "hi", "best_of": 17}, "best_of"),
        ("/v1/completions", {"model": "tiny", "prompt": "hi", "best_of": 2, "n": 3}, "best_of"),
        (
            "/v1/completions",
            {"model": "tiny", "prompt": "hi", "best_of": 2, "stream": True},
            "best_of",
        ),
        ("/v1/completions", {"model": "tiny", "prompt": "hi", "suffix": "x"}, "suffix"),
        ("/v1/completions", {"model": "tiny", "prompt": "hi", "seed": 2**63}, "seed"),
        ("/v1/completions", {"model": "tiny", "prompt": "hi", "seed": -(2**63) - 1}, "seed"),
        (
            "/v1/completions",
            {"model": "tiny", "prompt": "hi", "logit_bias": {"x": 5}},
            "logit_bias",
        ),
        (
            "/v1/completions",
            {"model": "tiny", "prompt": "hi", "logit_bias": {"-1": 5}},
            "logit_bias",
        ),
        (
            "/v1/completions",
            {"model": "tiny", "prompt": "hi", "logit_bias": {"1": 100.5}},
            "logit_bias",
        ),
        (
            "/v1/completions",
            {"model": "tiny", "prompt": "hi", "logit_bias": {str(i): 1 for i in range(1025)}},
            "logit_bias",
        ),
        (
            "/v1/completions",
            {"model": "tiny", "prompt": "hi", "stop_token_ids": [-1]},
            "stop_token_ids",
        ),
        (
            "/v1/completions",
            {"model": "tiny", "prompt": "hi", "stop_token_ids": list(range(65))},
            "stop_token_ids",
        ),
        (
            "/v1/completions",
            {"model": "tiny", "prompt": "hi", "prompt_logprobs": 1},
            "prompt_logprobs",
        ),
        ("/v1/completions", {"model": "tiny", "prompt": "hi", "metadata": {}}, "metadata"),
        ("/v1/completions", {"model": "tiny", "prompt": "hi", "stop": [""]}, "stop"),
        ("/v1/completions", {"model": "tiny", "prompt": "hi", "stream": "sometimes"}, "stream"),
        ("/v1/completions", {"model": "tiny", "prompt": "hi", "made_up": 1}, "made_up"),
        ("/v1/chat/completions", {"model": "tiny"}, "messages"),
        ("/v1/chat/completions", {"model": "tiny", "messages": []}, "messages"),
        (
            "/v1/chat/completions",
            {"model": "tiny", "messages": [{"role": "robot", "content": "x"}]},
            "messages",
        ),
        ("/v1/chat/completions", {"model": "tiny", "messages": [{"role": "user"}]}, "messages"),
        ("/v1/chat/completions", {"model": "tiny", "messages": CHAT, "n": 17}, "n"),
        ("/v1/chat/completions", {"model": "tiny", "messages": CHAT, "logprobs": 1}, "logprobs"),
        (
            "/v1/chat/completions",
            {"model": "tiny", "messages": CHAT, "top_logprobs": 2},
            "top_logprobs",
        ),
        (
            "/v1/chat/completions",
            {"model": "tiny", "messages": CHAT, "logprobs": False, "top_logprobs": 0},
            "top_logprobs",
        ),
        (
            "/v1/chat/completions",
            {"model": "tiny", "messages": CHAT, "logprobs": True, "top_logprobs": 21},
            "top_logprobs",
        ),
        (
            "/v1/chat/completions",
            {"model": "tiny", "messages": CHAT, "response_format": {"type": "json"}},
            "response_format",
        ),
        ("/v1/chat/completions", {"model": "tiny", "messages": CHAT, "echo": True}, "echo"),
        ("/v1/chat/completions", {"model": "tiny", "messages": CHAT, "best_of": 1}, "best_of"),
        (
            "/v1/chat/completions",
            {"model": "tiny", "messages": CHAT, "max_completion_tokens": 0},
            "max_completion_tokens",
        ),
    ],
)
def test_validation_errors_name_the_param(tiny_client, path, body, param):
    error = assert_openai_error(
        tiny_client.post(path, json=body), 400, "invalid_request_error", "invalid_request"
    )
    assert error["param"] == param
    assert param in error["details"]["fields"]
    assert param in error["message"]


def test_unknown_model_and_not_loaded_model(tiny_client):
    error = assert_openai_error(
        tiny_client.post("/v1/completions", json={"model": "gpt-5", "prompt": "hi"}),
        404,
        "invalid_request_error",
        "model_not_found",
    )
    assert "tiny" in error["details"]["available_models"]
    assert_openai_error(
        tiny_client.post("/v1/completions", json={"model": "tiny-gpt2", "prompt": "hi"}),
        409,
        "invalid_request_error",
        "model_not_loaded",
    )


@pytest.mark.parametrize(
    "method, path",
    [
        ("get", "/v1/engines"),
        ("post", "/v1/embeddings"),
        ("get", "/v1"),
    ],
)
def test_unknown_v1_paths_are_openai_404s(client, method, path):
    response = getattr(client, method)(path)
    assert_openai_error(response, 404, "invalid_request_error", "not_found")
    assert "<html" not in response.get_data(as_text=True).lower()


def test_wrong_method_and_bad_body_are_openai_errors(client):
    error = assert_openai_error(
        client.get("/v1/completions"), 405, "invalid_request_error", "method_not_allowed"
    )
    assert "POST" in error["details"]["allowed_methods"]
    assert_openai_error(
        client.post("/v1/completions", data="{", content_type="application/json"),
        400,
        "invalid_request_error",
        "invalid_request",
    )
    assert_openai_error(
        client.post("/v1/completions", data="[]", content_type="application/json"),
        400,
        "invalid_request_error",
        "invalid_request",
    )


def test_models_lists_only_loaded_models(client):
    def ids():
        response = client.get("/v1/models")
        assert response.status_code == 200
        body = response.get_json()
        assert body["object"] == "list"
        return [m["id"] for m in body["data"]]

    assert ids() == []
    load_and_wait(client, "tiny")
    assert ids() == ["tiny"]
    entry = client.get("/v1/models").get_json()["data"][0]
    assert entry["object"] == "model" and entry["owned_by"] == "tursi"
    assert abs(entry["created"] - time.time()) < 120
    assert client.post(f"{API}/models/tiny/unload").status_code == 200
    assert ids() == []
    assert_openai_error(
        client.get("/v1/models?all=1"), 400, "invalid_request_error", "invalid_request"
    )


def test_v1_needs_the_api_key(make_app):
    client = make_app(api_keys=["k1"]).test_client()
    for method, path in [
        ("get", "/v1/models"),
        ("post", "/v1/completions"),
        ("post", "/v1/chat/completions"),
        ("get", "/v1/nothing"),
    ]:
        response = getattr(client, method)(path, headers={"Authorization": "Bearer nope"})
        error = assert_openai_error(response, 401, "authentication_error", "unauthorized")
        assert "nope" not in error["message"]
        assert response.headers["WWW-Authenticate"].startswith("Bearer")
    assert client.get("/v1/models", headers={"Authorization": "Bearer k1"}).status_code == 200


def test_rate_limit_is_shared_with_the_native_api(make_app):
    client = make_app(rate_limit="3/minute").test_client()
    responses = [client.get(f"{API}/status"), client.get(f"{API}/models"), client.get("/v1/models")]
    assert [r.status_code for r in responses] == [200, 200, 200]
    assert [r.headers["X-RateLimit-Remaining"] for r in responses] == ["2", "1", "0"]
    assert all(r.headers["X-RateLimit-Limit"] == "3" for r in responses)

    limited = client.post("/v1/completions", json={"model": "tiny", "prompt": "hi"})
    error = assert_openai_error(limited, 429, "rate_limit_error", "rate_limit_exceeded")
    assert "3 per 1 minute" in error["message"]
    assert limited.headers["X-RateLimit-Limit"] == "3"
    assert limited.headers["X-RateLimit-Remaining"] == "0"
    assert "X-RateLimit-Reset" in limited.headers
    assert 0 < int(limited.headers["Retry-After"]) <= 60
    # The native API is out of budget too, with its own error shape.
    native = client.get(f"{API}/status")
    assert native.status_code == 429
    assert set(native.get_json()["error"]) == {"code", "message", "details"}
    assert client.get("/v1/models").status_code == 429


def test_v1_requests_use_up_the_native_budget(make_app):
    client = make_app(rate_limit="2/minute").test_client()
    assert client.get("/v1/models").status_code == 200
    assert client.get("/v1/models").status_code == 200
    assert client.get(f"{API}/status").status_code == 429


def test_chat_stream_frames_in_process(make_app, tiny_models_dir, tmp_path):
    """A chat stream's frames: a role chunk first, content deltas, a finish chunk, [DONE].
    The tiny tokenizer gets a chat template in a copy of the model."""
    from tests.helpers import with_chat_template, write_catalog

    folder = with_chat_template(tiny_models_dir / "llama", tmp_path / "chatty")
    catalog = write_catalog(
        tmp_path / "models.json", {"chatty": {"path": str(folder), "dtype": "float32"}}
    )
    client = make_app(models_file=str(catalog)).test_client()
    assert load_and_wait(client, "chatty")["status"] == "loaded"

    body = {
        "model": "chatty",
        "messages": [{"role": "user", "content": "lazy dog"}],
        "max_tokens": 6,
        "temperature": 0,
    }
    whole = client.post("/v1/chat/completions", json=body)
    assert whole.status_code == 200, whole.get_json()
    whole = whole.get_json()
    assert whole["choices"][0]["message"]["role"] == "assistant"
    assert whole["usage"]["completion_tokens"] == 6
    # The rendered template is the prompt: "user: lazy dog\nassistant:".
    native = client.post(
        f"{API}/generate",
        json={
            "model": "chatty",
            "prompt": "user: lazy dog\nassistant:",
            "max_tokens": 6,
            "temperature": 0,
            "return_full_text": False,
        },
    ).get_json()
    assert whole["choices"][0]["message"]["content"] == native["text"]
    assert whole["usage"]["prompt_tokens"] > 5

    response = client.post("/v1/chat/completions", json={**body, "stream": True})
    assert response.mimetype == "text/event-stream"
    payloads = sse_data(response.get_data(as_text=True))
    response.close()
    assert payloads[-1] == "[DONE]"
    chunks = [json.loads(p) for p in payloads[:-1]]
    assert chunks[0]["choices"][0]["delta"] == {"role": "assistant", "content": ""}
    assert all(c["object"] == "chat.completion.chunk" for c in chunks)
    assert chunks[-1]["choices"][0] == {
        "index": 0,
        "delta": {},
        "finish_reason": "length",
        "logprobs": None,
    }
    text = "".join(c["choices"][0]["delta"].get("content", "") for c in chunks)
    assert text == whole["choices"][0]["message"]["content"]
    # Content parts are joined; `max_completion_tokens` wins over `max_tokens`.
    parts = client.post(
        "/v1/chat/completions",
        json={
            **body,
            "max_completion_tokens": 3,
            "messages": [
                {
                    "role": "user",
                    "content": [{"type": "text", "text": "lazy "}, {"type": "text", "text": "dog"}],
                }
            ],
        },
    )
    assert parts.status_code == 200, parts.get_json()
    assert parts.get_json()["usage"]["completion_tokens"] == 3
    assert whole["choices"][0]["message"]["content"].startswith(
        parts.get_json()["choices"][0]["message"]["content"]
    )


def test_stream_failing_midway_ends_with_an_error_frame_then_done(app, tiny_client, slow_steps):
    response = tiny_client.post(
        "/v1/completions",
        json={
            "model": "tiny",
            "prompt": "lazy dog",
            "max_tokens": 250,
            "temperature": 0,
            "stream": True,
            "stream_options": {"include_usage": True},
        },
    )
    assert response.status_code == 200
    frames = iter(response.response)
    first = next(frames)
    assert first.startswith(b"data: {")  # generating
    assert tiny_client.post(f"{API}/models/tiny/unload").status_code == 200
    rest = (first + b"".join(frames)).decode()
    response.close()
    payloads = sse_data(rest)
    assert payloads[-1] == "[DONE]"
    error = json.loads(payloads[-2])
    assert list(error) == ["error"]
    assert set(error["error"]) == OPENAI_ERROR_FIELDS
    assert error["error"]["code"] == "model_unloaded"
    assert error["error"]["type"] == "server_error"
    chunks = [json.loads(p) for p in payloads[:-2]]
    assert chunks and all(c["object"] == "text_completion" for c in chunks)
    # No finish chunk and no usage chunk: the generation did not finish.
    assert all(c["choices"] and c["choices"][0]["finish_reason"] is None for c in chunks)


def test_openai_client_raises_on_a_failed_stream(app, tiny_client, slow_steps):
    """The same failure through the openai package (over WSGI, in-process): it raises."""
    http = httpx2.Client(transport=httpx2.WSGITransport(app=app), base_url="http://tursi")
    with openai.OpenAI(
        base_url="http://tursi/v1", api_key="none", max_retries=0, http_client=http
    ) as client:
        stream = client.completions.create(
            model="tiny", prompt="lazy dog", max_tokens=250, temperature=0, stream=True
        )
        first = next(iter(stream))
        assert first.choices[0].finish_reason is None
        unloaded = threading.Thread(
            target=lambda: app.test_client().post(f"{API}/models/tiny/unload")
        )
        unloaded.start()
        with pytest.raises(openai.APIError) as raised:
            for _ in stream:
                pass
        unloaded.join(30)
        assert raised.value.code == "model_unloaded"
        assert raised.value.type == "server_error"
