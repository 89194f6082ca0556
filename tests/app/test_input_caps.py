"""What one request may carry (issue 19): the text of a chat's messages, its content parts,
its messages, its prompt's tokens (TURSI_MAX_PROMPT_TOKENS), and lists refused by their
length before their items are looked at. Each is a 400 that names the field and the bound.

That these checks and the rest of a request's preparation leave the gevent hub free is
tested on a real server: tests/server/test_big_bodies.py."""

from __future__ import annotations

import pytest

from tests.helpers import API, load_and_wait
from tursi.api.openai_schemas import MAX_CHAT_CHARS, MAX_CONTENT_PARTS, MAX_MESSAGES

CHAT_ROUTES = ("/v1/chat/completions", f"{API}/tokenize", "/tokenize")


@pytest.fixture
def client(make_app, chat_catalog):
    client = make_app(models_file=str(chat_catalog)).test_client()
    assert load_and_wait(client, "tiny")["status"] == "loaded"
    return client


def post_messages(client, route, messages):
    body = {"model": "tiny", "messages": messages}
    if route == "/v1/chat/completions":
        body["max_tokens"] = 1
    return client.post(route, json=body)


def refused_field(response, field):
    """A 400 invalid_request naming `field`; its message."""
    assert response.status_code == 400, response.get_data(as_text=True)[:500]
    error = response.get_json()["error"]
    assert error["code"] == "invalid_request"
    (message,) = error["details"]["fields"][field]
    assert message in error["message"]
    return message


def user(content):
    return {"role": "user", "content": content}


@pytest.mark.parametrize("route", CHAT_ROUTES)
def test_chat_text_over_the_cap_is_refused_before_tokenizing(client, route):
    half = MAX_CHAT_CHARS // 2
    # the cap counts every message's text together: strings, parts and tool call arguments
    call = {"id": "c1", "type": "function", "function": {"name": "f", "arguments": "{}"}}
    over = [
        user("a" * half),
        user([{"type": "text", "text": "b" * (half - 2)}]),
        {"role": "assistant", "content": None, "tool_calls": [call]},
        user("c"),
    ]
    message = refused_field(post_messages(client, route, over), "messages")
    assert f"at most {MAX_CHAT_CHARS} characters" in message
    assert f"these have {MAX_CHAT_CHARS + 1}" in message

    at_cap = [*over[:3], user("")]  # exactly the cap: the template and the tokenizer judge it
    response = post_messages(client, route, at_cap)
    if route == "/v1/chat/completions":
        assert response.get_json()["error"]["code"] == "context_length_exceeded"
    else:
        assert response.status_code == 200
        assert response.get_json()["count"] > 256


@pytest.mark.parametrize("route", CHAT_ROUTES)
def test_content_parts_over_the_cap_are_refused(client, route):
    part = {"type": "text", "text": "x"}
    over = [user([part] * (MAX_CONTENT_PARTS // 2)), user([part] * (MAX_CONTENT_PARTS // 2 + 1))]
    message = refused_field(post_messages(client, route, over), "messages")
    assert f"at most {MAX_CONTENT_PARTS} content parts" in message
    assert f"these have {MAX_CONTENT_PARTS + 1}" in message

    over[1]["content"].pop()  # exactly the cap
    response = post_messages(client, route, over)
    if route == "/v1/chat/completions":
        assert response.status_code == 200 or (
            response.get_json()["error"]["code"] == "context_length_exceeded"
        )
    else:
        assert response.status_code == 200


def test_messages_over_the_cap_are_refused_by_their_count(client):
    # items that are not messages at all: the count is checked before any is loaded
    response = post_messages(client, "/v1/chat/completions", ["no message"] * (MAX_MESSAGES + 1))
    message = refused_field(response, "messages")
    assert message == f"Length must be between 1 and {MAX_MESSAGES}."


@pytest.mark.parametrize(
    "body, field, bound",
    [
        ({"stop": [1] * 17}, "stop", "Longer than maximum length 16."),  # 17 non-strings
        ({"stop_token_ids": ["x"] * 65}, "stop_token_ids", "Length must be between 0 and 64."),
    ],
)
def test_lists_over_their_bound_are_refused_by_their_length(client, body, field, bound):
    """Not by their items' errors: marshmallow loads every item before it checks a length."""
    response = client.post("/v1/completions", json={"model": "tiny", "prompt": "hi", **body})
    assert refused_field(response, field) == bound


def test_a_token_id_prompt_over_its_bound_is_refused_by_its_length(client):
    response = client.post("/v1/completions", json={"model": "tiny", "prompt": [-1] * 200_001})
    assert response.status_code == 400
    fields = response.get_json()["error"]["details"]["fields"]
    assert fields == {"prompt": {"0": ["Length must be between 1 and 200000."]}}


@pytest.mark.parametrize(
    "ids, index, expected",
    [
        ([1, 2, True], "2", "Not a valid integer."),
        ([1, -1, 2], "1", "Must be greater than or equal to 0 and less than or equal to "),
    ],
)
def test_token_ids_within_their_bound_are_checked_one_by_one(client, ids, index, expected):
    body = {"model": "tiny", "prompt": "hi", "stop_token_ids": ids}
    response = client.post(f"{API}/generate", json=body)
    assert response.status_code == 400
    (message,) = response.get_json()["error"]["details"]["fields"]["stop_token_ids"][index]
    assert message.startswith(expected)


PROMPTS = {  # route -> a body whose prompt has more than 4 tokens
    f"{API}/generate": {"prompt": "Once upon a time there was a server"},
    "/v1/completions": {"prompt": "Once upon a time there was a server"},
    "/v1/chat/completions": {"messages": [user("Once upon a time there was a server")]},
}


@pytest.fixture
def capped(make_app, chat_catalog):
    """A client whose app has TURSI_MAX_PROMPT_TOKENS=4."""
    client = make_app(models_file=str(chat_catalog), max_prompt_tokens=4).test_client()
    assert load_and_wait(client, "tiny")["status"] == "loaded"
    return client


@pytest.mark.parametrize("route", list(PROMPTS))
def test_max_prompt_tokens_caps_a_prompt(capped, route):
    response = capped.post(route, json={"model": "tiny", "max_tokens": 1, **PROMPTS[route]})
    assert response.status_code == 400, response.get_data(as_text=True)
    error = response.get_json()["error"]
    assert error["code"] == "invalid_request"
    assert error["details"]["max_prompt_tokens"] == 4
    assert error["details"]["prompt_tokens"] > 4
    assert "TURSI_MAX_PROMPT_TOKENS" in error["message"]


def test_max_prompt_tokens_lets_exactly_its_value_through(capped):
    body = {"model": "tiny", "max_tokens": 1}
    assert capped.post("/v1/completions", json={**body, "prompt": [5] * 4}).status_code == 200
    response = capped.post("/v1/completions", json={**body, "prompt": [5] * 5})
    assert response.get_json()["error"]["details"] == {"prompt_tokens": 5, "max_prompt_tokens": 4}
