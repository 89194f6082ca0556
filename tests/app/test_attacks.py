"""Bad input, sent the way a careless or hostile client would, to every generation route and
to the model routes: each gets a structured 4xx (never a 500, never a trace) and leaves the
server's state as it was. docs/reliability.md lists these attacks with what they produced.

(Schemathesis adds generated cases on top of these: tests/test_fuzz.py.)"""

from __future__ import annotations

import json

import pytest

from tests.helpers import API, load_and_wait

KEY = "attack-key"


AUTH = {"Authorization": f"Bearer {KEY}"}


TINY_CONTEXT = 256


CAP = 16384  # TURSI_MAX_BODY_BYTES for these tests


ROUTES = {  # route -> a valid body for it
    f"{API}/generate": {"model": "tiny", "prompt": "hi", "max_tokens": 2},
    "/v1/completions": {"model": "tiny", "prompt": "hi", "max_tokens": 2},
    "/v1/chat/completions": {
        "model": "tiny",
        "max_tokens": 2,
        "messages": [{"role": "user", "content": "hi"}],
    },
}


@pytest.fixture
def client(make_app, chat_catalog):
    app = make_app(models_file=str(chat_catalog), api_keys=[KEY], max_body_bytes=CAP)
    client = app.test_client()
    assert load_and_wait(client, "tiny", headers=AUTH)["status"] == "loaded"
    return client


def post(client, route, data, content_type="application/json"):
    return client.post(route, data=data, content_type=content_type, headers=AUTH)


def refused(response, status, code):
    """A structured error (native or OpenAI shape) with this status and code, no trace."""
    text = response.get_data(as_text=True)
    assert "Traceback" not in text and 'File "' not in text
    assert response.status_code == status, text
    assert response.mimetype == "application/json"
    error = response.get_json()["error"]
    assert error["code"] == code and error["message"]
    return error


def still_serving(client):
    """Nothing an attack did changed the server: the model is loaded and answers."""
    for route, body in ROUTES.items():
        response = client.post(route, json=body, headers=AUTH)
        assert response.status_code == 200, response.get_data(as_text=True)


BODY_ATTACKS = {
    "not JSON": (b'{"model": "tiny", "prompt": ', 400, "invalid_request"),
    "empty body": (b"", 400, "invalid_request"),
    "a JSON array": (b"[1, 2]", 400, "invalid_request"),
    "JSON null": (b"null", 400, "invalid_request"),
    "invalid UTF-8": (b'{"model": "tiny", "prompt": "\xff\xfe\xfa"}', 400, "invalid_request"),
    "UTF-8 overlong encoding": (b'{"model": "tiny", "prompt": "\xc0\xaf"}', 400, "invalid_request"),
    "lone surrogate escape": (b'{"model": "tiny", "prompt": "a\\ud800b"}', 400, "invalid_request"),
    # the JSON parser decodes bytes with "surrogatepass": a surrogate's UTF-8 bytes, or a lone
    # one in a UTF-16 body, reach the strings too
    "surrogate bytes": (b'{"model": "tiny", "prompt": "a\xed\xa0\x80b"}', 400, "invalid_request"),
    "UTF-16 body with a lone surrogate": (
        '{"model": "tiny", "prompt": "a\ud800b"}'.encode("utf-16-le", "surrogatepass"),
        400,
        "invalid_request",
    ),
    "NaN": (b'{"model": "tiny", "prompt": "hi", "temperature": NaN}', 400, "invalid_request"),
    "Infinity": (b'{"model": "tiny", "prompt": "hi", "top_p": Infinity}', 400, "invalid_request"),
    "-Infinity": (
        b'{"model": "tiny", "prompt": "hi", "temperature": -Infinity}',
        400,
        "invalid_request",
    ),
    "1e999 (overflows to inf)": (
        b'{"model": "tiny", "prompt": "hi", "temperature": 1e999}',
        400,
        "invalid_request",
    ),
    "5000-digit integer": (
        b'{"model": "tiny", "prompt": "hi", "max_tokens": ' + b"9" * 5000 + b"}",
        400,
        "invalid_request",
    ),
    "nesting 100000 deep": (
        b'{"model": "tiny", "prompt": "hi", "stop": ' + b"[" * 100000 + b"]" * 100000 + b"}",
        413,
        "payload_too_large",
    ),
    "nesting 2000 deep": (
        b'{"model": "tiny", "x": ' + b"[" * 2000 + b"]" * 2000 + b"}",
        400,
        "invalid_request",
    ),
    "body over the cap": (
        b'{"model": "tiny", "prompt": "' + b"a" * CAP + b'"}',
        413,
        "payload_too_large",
    ),
    "unknown field": (
        b'{"model": "tiny", "prompt": "hi", "best_of_luck": 3}',
        400,
        "invalid_request",
    ),
    "model name with ..": (b'{"model": "../tiny", "prompt": "hi"}', 404, "model_not_found"),
    "model name as a path": (b'{"model": "/etc/passwd", "prompt": "hi"}', 404, "model_not_found"),
    "model name with a NUL": (b'{"model": "tiny\\u0000", "prompt": "hi"}', 404, "model_not_found"),
}


CHAT = b'{"model": "tiny", "messages": [{"role": "user", "content": "hi"}]'


CHAT_ATTACKS = {
    "invalid UTF-8": (CHAT.replace(b'"hi"', b'"\xff\xfe"') + b"}", 400, "invalid_request"),
    "lone surrogate escape": (CHAT.replace(b'"hi"', b'"a\\udfffb"') + b"}", 400, "invalid_request"),
    "NaN": (CHAT + b', "temperature": NaN}', 400, "invalid_request"),
    "nesting 2000 deep": (
        CHAT + b', "x": ' + b"[" * 2000 + b"]" * 2000 + b"}",
        400,
        "invalid_request",
    ),
    "body over the cap": (
        CHAT.replace(b'"hi"', b'"' + b"a" * CAP + b'"') + b"}",
        413,
        "payload_too_large",
    ),
    "unknown field in a message": (
        CHAT.replace(b'"hi"', b'"hi", "mood": "angry"') + b"}",
        400,
        "invalid_request",
    ),
    "unknown role": (CHAT.replace(b'"user"', b'"root"') + b"}", 400, "invalid_request"),
    "content not a string": (CHAT.replace(b'"hi"', b'{"$gt": ""}') + b"}", 400, "invalid_request"),
    # tools (tursi.api.tools): what reaches the prompt and the grammar is bounded and checked
    "tool parameters nested 500 deep": (
        CHAT
        + b', "tools": [{"type": "function", "function": {"name": "f", "parameters": '
        + b'{"a": ' * 500
        + b"1"
        + b"}" * 500
        + b"}}]}",
        400,
        "invalid_request",
    ),
    "NaN in tool parameters": (
        CHAT + b', "tools": [{"type": "function", "function": {"name": "f", "parameters": '
        b'{"type": "object", "properties": {"a": {"maximum": NaN}}}}}]}',
        400,
        "invalid_request",
    ),
    "a tool name that would close the grammar's string": (
        CHAT + b', "tools": [{"type": "function", "function": {"name": "f\\" | /.*/"}}]}',
        400,
        "invalid_request",
    ),
    "a tool name with a newline": (
        CHAT + b', "tools": [{"type": "function", "function": {"name": "f\\nstart: x"}}]}',
        400,
        "invalid_request",
    ),
    "a tool name ending in a newline": (
        CHAT + b', "tools": [{"type": "function", "function": {"name": "f\\n"}}]}',
        400,
        "invalid_request",
    ),
    "tools not a list": (CHAT + b', "tools": {"type": "function"}}', 400, "invalid_request"),
    "tool_choice a number": (CHAT + b', "tool_choice": 1}', 400, "invalid_request"),
    "a tool result that answers no call": (
        CHAT.replace(b"}]", b'}, {"role": "tool", "tool_call_id": "x", "content": "y"}]') + b"}",
        400,
        "invalid_request",
    ),
    "a 1000-character tool call id": (
        CHAT.replace(
            b"}]",
            b'}, {"role": "assistant", "tool_calls": [{"id": "' + b"i" * 1000 + b'", "type": '
            b'"function", "function": {"name": "f", "arguments": "{}"}}]}]',
        )
        + b"}",
        400,
        "invalid_request",
    ),
}


@pytest.mark.parametrize("route", [f"{API}/generate", "/v1/completions"])
@pytest.mark.parametrize("attack", list(BODY_ATTACKS))
def test_body_attacks(client, route, attack):
    data, status, code = BODY_ATTACKS[attack]
    refused(post(client, route, data), status, code)


@pytest.mark.parametrize("attack", list(CHAT_ATTACKS))
def test_chat_body_attacks(client, attack):
    data, status, code = CHAT_ATTACKS[attack]
    refused(post(client, "/v1/chat/completions", data), status, code)


@pytest.mark.parametrize("route", list(ROUTES))
@pytest.mark.parametrize(
    "content_type",
    ["text/plain", "application/x-www-form-urlencoded", "multipart/form-data; boundary=x", None],
)
def test_wrong_content_types(client, route, content_type):
    error = refused(
        post(client, route, json.dumps(ROUTES[route]), content_type), 400, "invalid_request"
    )
    assert error["details"]["content_type"] == content_type


@pytest.mark.parametrize("route", list(ROUTES))
def test_a_prompt_over_the_context_names_the_token_counts(client, route):
    body = dict(ROUTES[route])
    long_text = "The quick brown fox jumps over the lazy dog. " * 60
    if "messages" in body:
        body["messages"] = [{"role": "user", "content": long_text}]
    else:
        body["prompt"] = long_text
    error = refused(client.post(route, json=body, headers=AUTH), 400, "context_length_exceeded")
    assert error["details"]["context_length"] == TINY_CONTEXT
    assert error["details"]["prompt_tokens"] > TINY_CONTEXT
    assert str(error["details"]["prompt_tokens"]) in error["message"]


@pytest.mark.parametrize("route", [f"{API}/generate", "/v1/completions"])
def test_stop_lists(client, route):
    body = ROUTES[route]
    assert client.post(route, json={**body, "stop": []}, headers=AUTH).status_code == 200
    huge = refused(
        client.post(route, json={**body, "stop": ["x"] * 2000}, headers=AUTH),
        400,
        "invalid_request",
    )
    assert "stop" in huge["details"]["fields"]
    for bad in ([""], ["x" * 257], [None], [["nested"]], {"a": "b"}):
        error = refused(
            client.post(route, json={**body, "stop": bad}, headers=AUTH), 400, "invalid_request"
        )
        assert "stop" in error["details"]["fields"]


def deep_schema(depth):
    schema: dict = {"type": "string"}
    for _ in range(depth):
        schema = {"type": "array", "items": schema}
    return schema


# Hostile `structured_outputs` (every route takes them), each a 400: refused by the
# request's schema (shape, size, depth: the message names the field), or only by compiling
# it (tursi.engine.constraints: malformed, unsupported, unsatisfiable).
SHAPE_ATTACKS = {
    "schema nested 100 deep": {"json": deep_schema(100)},
    "schema text nested 6000 deep": {"json": "[" * 6000 + "]" * 6000},
    "schema text with NaN": {"json": '{"type": "number", "maximum": NaN}'},
    "schema text with a 5000-digit integer": {"json": '{"maximum": ' + "9" * 5000 + "}"},
    "schema text truncated": {"json": '{"type": "object", "properties": {'},
    "regex of 9000 characters": {"regex": "a" * 9000},
    "2000 choices": {"choice": ["a"] * 2000},
    "an empty choice": {"choice": ["yes", ""]},
    "two constraints": {"regex": "a", "grammar": "start: 'a'"},
    "json_object false": {"json_object": False},
}
COMPILE_ATTACKS = {
    "regex that does not parse": {"regex": "(a|b"},
    "regex with a backreference": {"regex": "(a)\\1"},
    "regex with a lookahead": {"regex": "(?=a)a"},
    "schema of an unknown type": {"json": {"type": "nonsense"}},
    "schema with a remote $ref": {"json": {"$ref": "http://169.254.169.254/latest/meta-data"}},
    "schema with a missing $ref": {"json": {"$ref": "#/$defs/nope"}},
    "schema with an unsupported keyword (not)": {"json": {"not": {"type": "string"}}},
    "schema with an unknown format": {"json": {"type": "string", "format": "weird"}},
    "unsatisfiable schema (minimum > maximum)": {
        "json": {"type": "integer", "minimum": 5, "maximum": 1}
    },
    "unsatisfiable schema (string and integer)": {
        "json": {"allOf": [{"type": "string"}, {"type": "integer"}]}
    },
    "schema with a pattern that does not parse": {"json": {"type": "string", "pattern": "("}},
    "Lark with an undefined rule": {"grammar": "start: foo"},
    "Lark that does not parse": {"grammar": "start: )("},
    "GBNF with an undefined rule": {"grammar": "root ::= foo"},
    "GBNF that does not parse": {"grammar": 'root ::= "abc'},
    "GBNF without a root rule": {"grammar": 'answer ::= "yes"'},
}


@pytest.mark.parametrize("attack", [*SHAPE_ATTACKS, *COMPILE_ATTACKS])
def test_structured_output_attacks(client, attack):
    for route, body in ROUTES.items():
        constraint = {**SHAPE_ATTACKS, **COMPILE_ATTACKS}[attack]
        response = client.post(route, json={**body, "structured_outputs": constraint}, headers=AUTH)
        error = refused(response, 400, "invalid_request")
        if attack in SHAPE_ATTACKS:
            assert "structured_outputs" in error["details"]["fields"], (route, error)
    still_serving(client)


# Constraints that compile but could make each step's mask expensive, or never let the
# output end: each gets an answer (cut by max_tokens) or a 400, never a 500 or a hang.
HEAVY_CONSTRAINTS = {
    "nested counted repetition": {"regex": "a{1000}{1000}"},
    "100000 of anything": {"regex": "[\\s\\S]{100000}"},
    "catastrophic-backtracking shape": {"regex": "(x+x+)+y"},
    "a schema that refers to itself": {"json": {"$ref": "#"}},
    "an enum of 1000 strings": {"json": {"enum": [f"value {i}" for i in range(1000)]}},
    "left-recursive GBNF": {"grammar": 'root ::= root "a" | "a"'},
}


@pytest.mark.parametrize("attack", list(HEAVY_CONSTRAINTS))
def test_heavy_constraints_answer_or_refuse(client, attack):
    for route, body in ROUTES.items():
        response = client.post(
            route, json={**body, "structured_outputs": HEAVY_CONSTRAINTS[attack]}, headers=AUTH
        )
        text = response.get_data(as_text=True)
        assert response.status_code in (200, 400), (route, text[:500])
        assert "Traceback" not in text
    still_serving(client)


@pytest.mark.parametrize(
    "name, status, code",
    [
        ("..", 404, "model_not_found"),
        (".", 404, "model_not_found"),
        ("%2E%2E", 404, "model_not_found"),
        ("tiny.", 404, "model_not_found"),
        ("tiny%00", 404, "model_not_found"),
        ("x" * 5000, 404, "model_not_found"),
        ("a/b", 404, "not_found"),
        ("../..", 404, "not_found"),
        ("..%2F..%2Fetc%2Fpasswd", 404, "not_found"),
        ("%2Fetc%2Fpasswd", 404, "not_found"),
    ],
)
@pytest.mark.parametrize(
    "method, action", [("post", "load"), ("post", "unload"), ("get", "metrics")]
)
def test_model_names_are_catalog_names_only(client, name, status, code, method, action):
    """A model name never reaches the file system: it is looked up in the catalog or the
    route does not match."""
    response = getattr(client, method)(f"{API}/models/{name}/{action}", headers=AUTH)
    refused(response, status, code)
    still_serving(client)


@pytest.mark.parametrize(
    "header",
    [
        "Bearer",
        "Bearer ",
        "Bearer\tattack-key",
        "attack-key",
        "Basic YXR0YWNrLWtleQ==",
        "Bearer attack-key extra",
        "Bearer attack-key\x00",
        "Bearer attack-keyattack-key",
        "Bearer ATTACK-KEY",
        "Bearer attack-ke",
        "Bearer " + "k" * 100_000,
        "Bearer attack-k\u00e9y",
        "Bearer attack-key, Bearer attack-key",
        "Token attack-key",
    ],
)
def test_malformed_bearer_values_are_401(client, header):
    response = client.get(f"{API}/status", headers={"Authorization": header})
    error = refused(response, 401, "unauthorized")
    assert response.headers["WWW-Authenticate"] == 'Bearer realm="tursi"'
    assert KEY not in response.get_data(as_text=True)  # nothing presented is echoed
    assert error["details"] == {}


def test_the_server_serves_after_every_attack(client):
    for attack, (data, status, _) in BODY_ATTACKS.items():
        for route in (f"{API}/generate", "/v1/completions"):
            assert post(client, route, data).status_code == status, attack
    for attack, (data, status, _) in CHAT_ATTACKS.items():
        assert post(client, "/v1/chat/completions", data).status_code == status, attack
    still_serving(client)
