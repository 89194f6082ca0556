"""The tokenizer routes: /api/v1/tokenize and /detokenize, and the root /tokenize and
/detokenize with vLLM's and llama.cpp's field names. Token ids are checked against the
model's own tokenizer, loaded with transformers from the same folder (not through Tursi)."""

from __future__ import annotations

import pytest
from transformers import AutoTokenizer

from tests.helpers import (
    API,
    CHAT_TEMPLATE,
    assert_error,
    load_and_wait,
    with_chat_template,
    write_catalog,
)

TEXT = "The quick brown fox jumps over the lazy dog"
MESSAGES = [{"role": "user", "content": "lazy dog"}]


@pytest.fixture
def folder(tiny_models_dir, tmp_path):
    return with_chat_template(tiny_models_dir / "llama", tmp_path / "chatty")


@pytest.fixture
def reference(folder):
    return AutoTokenizer.from_pretrained(folder)


@pytest.fixture
def app(make_app, folder, tiny_models_dir, tmp_path):
    catalog = write_catalog(
        tmp_path / "models.json",
        {
            "chatty": {"path": str(folder), "dtype": "float32"},
            "other": {"path": str(tiny_models_dir / "gpt2"), "dtype": "float32"},
        },
    )
    return make_app(models_file=str(catalog))


@pytest.fixture
def client(app):
    client = app.test_client()
    assert load_and_wait(client, "chatty")["status"] == "loaded"
    return client


def post(client, path, **body):
    return client.post(path, json=body)


def ok(response):
    assert response.status_code == 200, response.get_data(as_text=True)
    return response.get_json()


def test_native_tokenize_text(client, reference):
    body = ok(post(client, f"{API}/tokenize", model="chatty", text=TEXT))
    expected = reference(TEXT)["input_ids"]
    assert body == {"tokens": expected, "count": len(expected), "context_length": 256}
    plain = ok(post(client, f"{API}/tokenize", model="chatty", text=TEXT, add_special_tokens=False))
    assert plain["tokens"] == reference(TEXT, add_special_tokens=False)["input_ids"]
    assert ok(post(client, f"{API}/tokenize", model="chatty", text=""))["count"] <= 1


def test_native_tokenize_messages_through_the_chat_template(client, reference):
    assert reference.chat_template == CHAT_TEMPLATE
    body = ok(post(client, f"{API}/tokenize", model="chatty", messages=MESSAGES))
    rendered = "user: lazy dog\nassistant:"
    assert body["tokens"] == reference(rendered, add_special_tokens=False)["input_ids"]
    bare = ok(
        post(
            client,
            f"{API}/tokenize",
            model="chatty",
            messages=MESSAGES,
            add_generation_prompt=False,
        )
    )
    assert bare["tokens"] == reference("user: lazy dog\n", add_special_tokens=False)["input_ids"]
    # The count is the prompt a chat completion sends.
    completion = ok(
        post(client, "/v1/chat/completions", model="chatty", messages=MESSAGES, max_tokens=1)
    )
    assert completion["usage"]["prompt_tokens"] == body["count"]


def test_native_detokenize_round_trips(client, reference):
    ids = reference(TEXT, add_special_tokens=False)["input_ids"]
    assert ok(post(client, f"{API}/detokenize", model="chatty", tokens=ids)) == {
        "text": reference.decode(ids)
    }
    assert ok(post(client, f"{API}/detokenize", model="chatty", tokens=[])) == {"text": ""}


@pytest.mark.parametrize(
    "path, body, field",
    [
        (f"{API}/tokenize", {"model": "chatty"}, "text"),
        (f"{API}/tokenize", {"model": "chatty", "text": "a", "messages": MESSAGES}, "messages"),
        (f"{API}/tokenize", {"text": "a"}, "model"),
        (f"{API}/tokenize", {"model": "chatty", "text": 5}, "text"),
        (f"{API}/tokenize", {"model": "chatty", "prompt": "a"}, "prompt"),
        (f"{API}/detokenize", {"model": "chatty", "tokens": [-1]}, "tokens"),
        (f"{API}/detokenize", {"model": "chatty", "tokens": "1 2"}, "tokens"),
        (f"{API}/detokenize", {"model": "chatty"}, "tokens"),
        ("/tokenize", {"prompt": "a", "content": "b"}, "content"),
        (
            "/tokenize",
            {"content": "b", "add_special": True, "add_special_tokens": True},
            "add_special",
        ),
        ("/tokenize", {"text": "a"}, "text"),
        ("/detokenize", {"tokens": [1.5]}, "tokens"),
    ],
)
def test_invalid_bodies_are_400s_naming_the_field(client, path, body, field):
    error = assert_error(client.post(path, json=body), 400, "invalid_request")
    assert field in error["details"]["fields"], error


def test_token_ids_outside_the_vocabulary(client, reference):
    for path in (f"{API}/detokenize", "/detokenize"):
        response = post(client, path, model="chatty", tokens=[1, len(reference)])
        error = assert_error(response, 400, "invalid_request")
        assert error["details"]["token_id"] == len(reference)
        assert response.headers["x-should-retry"] == "false"


def test_unknown_and_unloaded_models(client):
    for path, body in (
        (f"{API}/tokenize", {"text": "a"}),
        (f"{API}/detokenize", {"tokens": [1]}),
        ("/tokenize", {"prompt": "a"}),
        ("/detokenize", {"tokens": [1]}),
    ):
        assert_error(post(client, path, model="nope", **body), 404, "model_not_found")
        assert_error(post(client, path, model="other", **body), 409, "model_not_loaded")


def test_vllm_names(client, reference):
    body = ok(post(client, "/tokenize", model="chatty", prompt=TEXT))
    expected = reference(TEXT)["input_ids"]
    assert body == {"tokens": expected, "count": len(expected), "max_model_len": 256}
    plain = ok(post(client, "/tokenize", model="chatty", prompt=TEXT, add_special_tokens=False))
    assert plain["tokens"] == reference(TEXT, add_special_tokens=False)["input_ids"]
    chat = ok(post(client, "/tokenize", model="chatty", messages=MESSAGES))
    rendered = "user: lazy dog\nassistant:"
    assert chat["tokens"] == reference(rendered, add_special_tokens=False)["input_ids"]
    ids = plain["tokens"]
    text = reference.decode(ids)
    assert ok(post(client, "/detokenize", model="chatty", tokens=ids)) == {
        "prompt": text,
        "content": text,
    }


def test_llama_cpp_names(client, reference):
    """llama.cpp's /tokenize: {content, add_special (default false), with_pieces}."""
    plain = ok(post(client, "/tokenize", content=TEXT))
    assert plain["tokens"] == reference(TEXT, add_special_tokens=False)["input_ids"]
    special = ok(post(client, "/tokenize", content=TEXT, add_special=True))
    assert special["tokens"] == reference(TEXT)["input_ids"]
    pieces = ok(post(client, "/tokenize", content=TEXT, with_pieces=True))["tokens"]
    assert [piece["id"] for piece in pieces] == plain["tokens"]
    assert "".join(piece["piece"] for piece in pieces) == reference.decode(plain["tokens"])
    assert ok(post(client, "/detokenize", tokens=plain["tokens"]))["content"] == TEXT


def test_non_utf8_pieces_are_bytes(client, reference):
    """A byte-level token holding part of a character: llama.cpp gives its bytes."""
    ids = reference("é€", add_special_tokens=False)["input_ids"]
    pieces = ok(post(client, "/tokenize", content="é€", with_pieces=True))["tokens"]
    raw = b""
    for piece in pieces:
        value = piece["piece"]
        raw += bytes(value) if isinstance(value, list) else value.encode()
    assert raw.decode() == "é€"
    assert [piece["id"] for piece in pieces] == ids


def test_root_routes_need_a_model_unless_exactly_one_is_loaded(app):
    client = app.test_client()
    error = assert_error(post(client, "/tokenize", prompt="a"), 400, "invalid_request")
    assert error["details"]["loaded_models"] == [] and "model" in error["details"]["fields"]
    assert load_and_wait(client, "chatty")["status"] == "loaded"
    assert ok(post(client, "/tokenize", prompt="a"))["count"] >= 1
    assert load_and_wait(client, "other")["status"] == "loaded"
    error = assert_error(post(client, "/detokenize", tokens=[1]), 400, "invalid_request")
    assert sorted(error["details"]["loaded_models"]) == ["chatty", "other"]
    assert ok(post(client, "/detokenize", model="other", tokens=[1]))["prompt"] is not None


def test_keys_and_rate_limits_cover_the_root_routes(make_app):
    client = make_app(api_keys=["k1"]).test_client()
    for path in ("/tokenize", "/detokenize", f"{API}/tokenize", f"{API}/detokenize"):
        assert_error(client.post(path, json={}), 401, "unauthorized")
    client = make_app(api_keys=["k1"], rate_limit="2/minute").test_client()
    key = {"Authorization": "Bearer k1"}
    first = client.post("/tokenize", json={"prompt": "a"}, headers=key)
    assert first.status_code == 400 and first.headers["X-RateLimit-Remaining"] == "1"
    assert client.post("/detokenize", json={"tokens": []}, headers=key).status_code == 400
    limited = client.get(f"{API}/status", headers=key)
    assert_error(limited, 429, "rate_limit_exceeded")
