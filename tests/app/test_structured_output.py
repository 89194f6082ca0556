"""Structured output, the request side: every way of asking (`structured_outputs` on both
APIs; OpenAI's `response_format` and vLLM's `guided_*` on /v1) loads as the engine's
Constraint, and every malformed or oversized ask is a 400 naming its field, before the
engine sees it (docs/structured-output.md).

The last tests send constrained requests through the engine (the tiny Llama: its random
weights make any text likely, so what comes out matches because of the constraint alone).
The official client against the embedded model: tests/server/test_structured_output.py."""

from __future__ import annotations

import json
import re

import jsonschema
import pytest

from tests.helpers import API, parse_sse, sse_data, wait_preloaded
from tursi import create_app
from tursi.api.jobs import sampling_params
from tursi.api.openai_schemas import ChatCompletionRequestSchema, CompletionRequestSchema
from tursi.api.schemas import GenerateRequestSchema
from tursi.api.structured_schemas import (
    MAX_CHOICE_CHARS,
    MAX_CHOICE_ITEMS,
    MAX_GRAMMAR_CHARS,
    MAX_REGEX_CHARS,
    MAX_SCHEMA_CHARS,
    MAX_SCHEMA_DEPTH,
)
from tursi.engine.jobs import Constraint

USER = [{"role": "user", "content": "lazy dog"}]
ROUTES = {  # route -> its schema and a body with everything but the constraint
    f"{API}/generate": (GenerateRequestSchema, {"prompt": "lazy dog"}),
    "/v1/completions": (CompletionRequestSchema, {"prompt": "lazy dog"}),
    "/v1/chat/completions": (ChatCompletionRequestSchema, {"messages": USER}),
}
OPENAI = [route for route in ROUTES if route.startswith("/v1")]

SCHEMA = {
    "type": "object",
    "properties": {"zeta": {"type": "integer"}, "alpha": {"type": "string"}},
    "required": ["zeta"],
}
SCHEMA_TEXT = '{"type":"object","properties":{"zeta":{"type":"integer"},"alpha":{"type":"string"}},"required":["zeta"]}'  # noqa: E501
GBNF = 'root ::= "yes" | "no"'
LARK = 'start: "yes" | "no"'

# structured_outputs (both APIs) -> the Constraint it loads as.
STRUCTURED = [
    ({"json": SCHEMA}, Constraint("json_schema", SCHEMA_TEXT)),
    ({"json": json.dumps(SCHEMA, indent=2)}, Constraint("json_schema", SCHEMA_TEXT)),
    ({"json_object": True}, Constraint("json_object")),
    ({"regex": "[0-9]{3}"}, Constraint("regex", "[0-9]{3}")),
    ({"choice": ["yes", "no"]}, Constraint("choice", ("yes", "no"))),
    ({"grammar": GBNF}, Constraint("grammar", GBNF)),  # converted by the engine
    ({"grammar": LARK}, Constraint("grammar", LARK)),
    ({"json": None, "regex": "a"}, Constraint("regex", "a")),  # null: not given
]
# /v1's other spellings -> the Constraint each loads as.
OPENAI_SPELLINGS = [
    ({"response_format": {"type": "text"}}, None),
    ({"response_format": {"type": "json_object"}}, Constraint("json_object")),
    (
        {
            "response_format": {
                "type": "json_schema",
                "json_schema": {"name": "n", "schema": SCHEMA, "strict": True, "description": "d"},
            }
        },
        Constraint("json_schema", SCHEMA_TEXT),
    ),
    (  # no schema: a JSON object, as json_object
        {"response_format": {"type": "json_schema", "json_schema": {"name": "n"}}},
        Constraint("json_object"),
    ),
    ({"guided_json": SCHEMA}, Constraint("json_schema", SCHEMA_TEXT)),
    ({"guided_json": json.dumps(SCHEMA)}, Constraint("json_schema", SCHEMA_TEXT)),
    ({"guided_regex": "[0-9]+"}, Constraint("regex", "[0-9]+")),
    ({"guided_choice": ["a", "b"]}, Constraint("choice", ("a", "b"))),
    ({"guided_grammar": GBNF}, Constraint("grammar", GBNF)),
    (  # one backend here, whichever is named
        {"guided_regex": "a", "guided_decoding_backend": "xgrammar"},
        Constraint("regex", "a"),
    ),
    ({"response_format": None, "guided_json": None, "structured_outputs": None}, None),
]


def load(route, extra):
    schema, body = ROUTES[route]
    return schema().load({"model": "m", **body, **extra})


@pytest.mark.parametrize("route", ROUTES)
@pytest.mark.parametrize("extra, expected", STRUCTURED)
def test_structured_outputs_load_as_the_constraint(route, extra, expected):
    loaded = load(route, {"structured_outputs": extra})
    assert sampling_params(loaded).constraint == expected


@pytest.mark.parametrize("route", OPENAI)
@pytest.mark.parametrize("extra, expected", OPENAI_SPELLINGS)
def test_every_openai_spelling_loads_as_the_constraint(route, extra, expected):
    loaded = load(route, extra)
    assert sampling_params(loaded).constraint == expected
    assert not {key for key in loaded if key.startswith(("guided_", "response_format"))}


@pytest.mark.parametrize("route", ROUTES)
def test_no_constraint_by_default(route):
    assert sampling_params(load(route, {})).constraint is None


def test_a_schema_keeps_its_key_order_and_loses_its_spaces():
    """The order of `properties` is the order the output writes them in: kept. Spaces
    and indentation are not part of the schema: equal schemas give one text (one compiled
    grammar)."""
    ordered = {"type": "object", "properties": {"b": {}, "a": {}}}
    text = load(f"{API}/generate", {"structured_outputs": {"json": ordered}})["constraint"].value
    assert text == '{"type":"object","properties":{"b":{},"a":{}}}'
    spaced = json.dumps(ordered, indent=4)
    again = load(f"{API}/generate", {"structured_outputs": {"json": spaced}})["constraint"]
    assert again.value == text
    unicode = {"enum": ["café"]}  # sizes are counted in characters, not escapes
    loaded = load(f"{API}/generate", {"structured_outputs": {"json": unicode}})
    assert loaded["constraint"].value == '{"enum":["café"]}'


# --- 400s, through HTTP --------------------------------------------------------------------


@pytest.fixture(scope="module")
def client(chat_catalog, tmp_path_factory):
    """An app with "tiny" (the tiny Llama with a chat template) loaded; every route serves it."""
    root = tmp_path_factory.mktemp("structured")
    app = create_app(
        {
            "preload": ["tiny"],
            "home": str(root / "home"),
            "models_file": str(chat_catalog),
            "rate_limit": "1000000/minute",
        }
    )
    app.config["TESTING"] = True
    manager = app.extensions["tursi"].manager
    wait_preloaded(manager, "tiny")
    yield app.test_client()
    manager.shutdown()


def post(client, route, **extra):
    return client.post(route, json={"model": "tiny", **ROUTES[route][1], **extra})


def refused(response, path):
    """A 400 invalid_request whose details name the field at `path` (keys, outermost
    first); on /v1, OpenAI's `param` names the top-level field."""
    assert response.status_code == 400, response.get_data(as_text=True)
    assert response.headers["x-should-retry"] == "false"
    error = response.get_json()["error"]
    assert error["code"] == "invalid_request"
    assert path[0] in error["message"]
    problems = error["details"]["fields"]
    for key in path:
        assert key in problems, (path, error["details"])
        problems = problems[key]
    if "param" in error:
        assert error["param"] == path[0]
    return error


def nested(depth):
    schema: dict = {"type": "object"}
    for _ in range(depth - 1):
        schema = {"type": "object", "properties": {"x": schema}}
    return schema


BIG_SCHEMA = {"type": "object", "description": "d" * MAX_SCHEMA_CHARS}
BAD_STRUCTURED = [
    ({}, "_schema"),
    ({"json": None}, "_schema"),  # null is "not given": nothing is
    ({"regex": "a", "choice": ["a"]}, "choice"),  # the second one given is named
    ({"json_object": True, "json": SCHEMA}, "json_object"),
    ({"json": 5}, "json"),
    ({"json": [SCHEMA]}, "json"),
    ({"json": True}, "json"),
    ({"json": "not json"}, "json"),
    ({"json": "[1, 2]"}, "json"),
    ({"json": '{"type": NaN}'}, "json"),
    ({"json": "[" * 5000 + "]" * 5000}, "json"),
    ({"json": '{"maximum": 1' + "0" * 5000 + "}"}, "json"),
    ({"json": nested(MAX_SCHEMA_DEPTH + 1)}, "json"),
    ({"json": BIG_SCHEMA}, "json"),
    ({"json": json.dumps(BIG_SCHEMA)}, "json"),
    ({"json_object": False}, "json_object"),
    ({"json_object": "yes"}, "json_object"),
    ({"regex": ""}, "regex"),
    ({"regex": 5}, "regex"),
    ({"regex": "a" * (MAX_REGEX_CHARS + 1)}, "regex"),
    ({"choice": []}, "choice"),
    ({"choice": "yes"}, "choice"),
    ({"choice": [""]}, "choice"),
    ({"choice": [1]}, "choice"),
    ({"choice": ["x"] * (MAX_CHOICE_ITEMS + 1)}, "choice"),
    ({"choice": ["x" * (MAX_CHOICE_CHARS + 1)]}, "choice"),
    ({"grammar": ""}, "grammar"),
    ({"grammar": ["start: 'a'"]}, "grammar"),
    ({"grammar": "x" * (MAX_GRAMMAR_CHARS + 1)}, "grammar"),
    ({"structural_tag": "{}"}, "structural_tag"),  # vLLM's; not supported: unknown
    ({"disable_any_whitespace": True, "regex": "a"}, "disable_any_whitespace"),
]


@pytest.mark.parametrize("route", ROUTES)
@pytest.mark.parametrize("extra, key", BAD_STRUCTURED, ids=lambda v: str(v)[:40])
def test_bad_structured_outputs_are_400s_naming_the_key(client, route, extra, key):
    refused(post(client, route, structured_outputs=extra), ["structured_outputs", key])


@pytest.mark.parametrize("route", ROUTES)
@pytest.mark.parametrize("value", ["json", ["json"], 1, True])
def test_structured_outputs_must_be_an_object(client, route, value):
    refused(post(client, route, structured_outputs=value), ["structured_outputs"])


JSON_SCHEMA_FORMAT = {"type": "json_schema", "json_schema": {"name": "n", "schema": SCHEMA}}
BAD_OPENAI = [
    ({"response_format": {"type": "xml"}}, ["response_format", "type"]),
    ({"response_format": {"type": "structural_tag"}}, ["response_format", "type"]),
    ({"response_format": {}}, ["response_format", "type"]),
    ({"response_format": "json_object"}, ["response_format"]),
    ({"response_format": {"type": "json_schema"}}, ["response_format", "json_schema"]),
    (
        {"response_format": {"type": "json_object", "json_schema": {"name": "n"}}},
        ["response_format", "json_schema"],
    ),
    (
        {"response_format": {"type": "json_schema", "json_schema": {"schema": SCHEMA}}},
        ["response_format", "json_schema", "name"],
    ),
    (
        {"response_format": {"type": "json_schema", "json_schema": {"name": "n", "schema": 1}}},
        ["response_format", "json_schema", "schema"],
    ),
    (
        {"response_format": {**JSON_SCHEMA_FORMAT, "strict": True}},  # strict is json_schema's
        ["response_format", "strict"],
    ),
    ({"guided_json": "{"}, ["guided_json"]),
    ({"guided_json": 3}, ["guided_json"]),
    ({"guided_regex": ""}, ["guided_regex"]),
    ({"guided_choice": []}, ["guided_choice"]),
    ({"guided_grammar": 1}, ["guided_grammar"]),
    ({"guided_whitespace_pattern": "[ ]*"}, ["guided_whitespace_pattern"]),
    # Two ways to ask in one request: the second is named.
    (
        {"structured_outputs": {"regex": "a"}, "response_format": {"type": "json_object"}},
        ["response_format"],
    ),
    ({"structured_outputs": {"regex": "a"}, "guided_regex": "a"}, ["guided_regex"]),
    ({"response_format": JSON_SCHEMA_FORMAT, "guided_json": SCHEMA}, ["guided_json"]),
    ({"guided_regex": "a", "guided_choice": ["a"]}, ["guided_choice"]),
    ({"guided_json": SCHEMA, "guided_grammar": LARK}, ["guided_grammar"]),
]


@pytest.mark.parametrize("route", OPENAI)
@pytest.mark.parametrize("extra, path", BAD_OPENAI, ids=lambda v: str(v)[:50])
def test_bad_openai_spellings_are_400s_naming_the_field(client, route, extra, path):
    refused(post(client, route, **extra), path)


@pytest.mark.parametrize(
    "extra",
    [
        {"response_format": {"type": "json_object"}},
        {"guided_regex": "a"},
        {"guided_decoding_backend": "xgrammar"},
    ],
)
def test_the_native_route_takes_structured_outputs_only(client, extra):
    (name,) = extra
    error = refused(post(client, f"{API}/generate", **extra), [name])
    assert "Unknown field" in error["message"]


def test_a_text_response_format_beside_another_source_is_not_two(client):
    response = post(
        client, "/v1/completions", response_format={"type": "text"}, guided_regex="a", max_tokens=1
    )
    assert response.status_code == 200, response.get_data(as_text=True)


# --- through the engine (the tiny model) -------------------------------------------------

CHOICES = ["alpha", "beta", "gamma delta"]
PATTERN = r"(yes|no)-[0-9]{2}"
COLOURS = {
    "type": "object",
    "properties": {
        "colour": {"enum": ["red", "green", "blue"]},
        "count": {"type": "integer", "minimum": 0, "maximum": 9},
        "ok": {"type": "boolean"},
    },
    "required": ["colour", "count", "ok"],
    "additionalProperties": False,
}
ASKS = {  # a constraint, its spelling per API, and how to check an output
    "regex": (
        {"structured_outputs": {"regex": PATTERN}},
        {"guided_regex": PATTERN},
        lambda text: re.fullmatch(PATTERN, text),
    ),
    "choice": (
        {"structured_outputs": {"choice": CHOICES}},
        {"guided_choice": CHOICES},
        lambda text: text in CHOICES,
    ),
    "json_schema": (
        {"structured_outputs": {"json": COLOURS}},
        {
            "response_format": {
                "type": "json_schema",
                "json_schema": {"name": "c", "schema": COLOURS},
            }
        },
        lambda text: jsonschema.validate(json.loads(text), COLOURS) is None,
    ),
}


def texts(route, response, stream):
    """Each choice's text, and its finish_reason."""
    assert response.status_code == 200, response.get_data(as_text=True)
    if route == f"{API}/generate":
        if not stream:
            body = response.get_json()
            return {0: (body["text"], body["finish_reason"])}
        frames = parse_sse(response.get_data(as_text=True).split("\n"))
        text = "".join(data["text"] for event, data in frames if event == "text")
        done = [data for event, data in frames if event == "done"]
        return {0: (text, done[0]["finish_reason"])}
    key = "message" if route.endswith("chat/completions") else None
    if not stream:
        return {
            choice["index"]: (
                choice["message"]["content"] if key else choice["text"],
                choice["finish_reason"],
            )
            for choice in response.get_json()["choices"]
        }
    found: dict[int, tuple[str, str | None]] = {}
    for data in sse_data(response.get_data(as_text=True))[:-1]:
        for choice in json.loads(data)["choices"]:
            text, reason = found.get(choice["index"], ("", None))
            piece = (choice["delta"].get("content") or "") if key else choice["text"]
            found[choice["index"]] = (text + piece, choice["finish_reason"] or reason)
    return found


@pytest.mark.parametrize("stream", [False, True])
@pytest.mark.parametrize("route", ROUTES)
@pytest.mark.parametrize("kind", ASKS)
def test_every_output_matches_its_constraint(client, kind, route, stream):
    """Sampled (temperature 1) from a random model: only the constraint makes it match;
    /v1 asks for three choices, each constrained on its own."""
    native, openai_spelling, matches = ASKS[kind]
    extra = native if route == f"{API}/generate" else openai_spelling
    body = {"max_tokens": 48, "temperature": 1.0, "stream": stream, **extra}
    if route != f"{API}/generate":
        body["n"] = 3
    if route == f"{API}/generate":
        body["return_full_text"] = False
    choices = texts(route, post(client, route, **body), stream)
    assert len(choices) == (1 if route == f"{API}/generate" else 3)
    for text, reason in choices.values():
        assert reason == "stop", (text, reason)
        assert matches(text), text


@pytest.mark.parametrize("route", ROUTES)
def test_max_tokens_inside_a_structure_ends_with_length(client, route):
    """The output stops where max_tokens falls, a prefix of a match: finish_reason
    "length" says it is cut (docs/structured-output.md)."""
    extra = {"structured_outputs": {"json": COLOURS}, "max_tokens": 2}
    if route == f"{API}/generate":
        extra["return_full_text"] = False
    ((text, reason),) = texts(route, post(client, route, **extra), False).values()
    assert reason == "length"
    assert '{"colour":"'.startswith(text) or text.startswith('{"colour":"'), text
