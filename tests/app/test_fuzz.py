"""Property-based fuzzing of every route with schemathesis, against the app's own OpenAPI
document (GET /api/v1/openapi.json).

Schemathesis generates valid requests (positive mode) and invalid ones (negative mode:
wrong types, out-of-range numbers, unknown fields, bad path values, missing bodies, wrong
content types) from the document, in its three phases: the documented examples, coverage
(boundary values of every field, deterministic) and random fuzzing. Every answer must:

- not be a 5xx (no route may fail on any input; 503/504 cannot happen here: one model, a
  big queue, no deadline pressure, and each load is let finish before the next case);
- have a status, a media type, headers and (for JSON) a body that the document lists for
  that route: `status_code_conformance`, `content_type_conformance`,
  `response_headers_conformance`, `response_schema_conformance`;
- for event streams, carry frames whose JSON matches the documented frame schemas;
- never contain a Python traceback;
- and a route that needs the API key must refuse a request without it (`ignored_auth`).

test_fuzz_structured_outputs adds generated constraints (JSON schemas, regexes, choices,
grammars) that pass validation and reach the engine's compiler: each is answered or refused
with a 400.

The app runs the tiny models of conftest.py: "tiny" (a Llama with a chat template, so chat
completions succeed, preloaded) and "tiny-gpt2" (for load/unload). The built-in catalog
models are kept out of load/unload (see `steer`): a first load of the embedded model
converts a GGUF for ~25 s and "gpt2" reaches for the Hugging Face cache.
"""

from __future__ import annotations

import json
import re
import time
from collections import Counter

import pytest
import schemathesis
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st
from openapi_schema_validator import OAS30Validator
from schemathesis.checks import not_a_server_error
from schemathesis.specs.openapi.checks import (
    content_type_conformance,
    ignored_auth,
    response_headers_conformance,
    response_schema_conformance,
    status_code_conformance,
)

from tests.helpers import wait_preloaded, with_chat_template, write_catalog
from tursi import create_app

API = "/api/v1"


KEY = "fuzz-key"


AUTH = {"Authorization": f"Bearer {KEY}"}


MIN_CASES = 1000


# Catalog names that load/unload may not touch: the built-ins (slow or network-bound loads)
# and "tiny" (unloading it would turn every later generation into a 409).
GUARDED = {"smollm2-135m-instruct", "gpt2", "gpt2-medium", "tiny"}


TRACE = re.compile(r"Traceback \(most recent call last\)|File \"[^\"]+\", line \d+")


CASES: Counter = Counter()  # (operation label, generation mode) -> cases sent


STATUSES: Counter = Counter()  # (operation label, status) -> responses


CONFIG = schemathesis.Config.from_dict(
    {
        "seed": 20261125,  # reproducible: the same cases on every run
        "generation": {"mode": "all", "max-examples": 40, "database": "none"},
        "dictionaries": {
            "models": {"values": ["tiny", "tiny-gpt2", "smollm2-135m-instruct", "no-such-model"]},
            "max_tokens": {"values": [1, 2, 8]},
        },
        "parameters": {
            "body.model": {"dictionary": "models", "probability": 0.8},
            "path.name": {"dictionary": "models", "probability": 0.5},
            "path.model_id": {"dictionary": "models", "probability": 0.5},
            "body.max_tokens": {"dictionary": "max_tokens", "probability": 0.5},
        },
        "phases": {"stateful": {"enabled": False}},
        "auth": {"openapi": {"bearerAuth": {"bearer": KEY}}},
        "max-stream-events": 100,
    }
)


@pytest.fixture(scope="module")
def fuzz_app(tiny_models_dir, tmp_path_factory):
    root = tmp_path_factory.mktemp("fuzz")
    chat = with_chat_template(tiny_models_dir / "llama", root / "chat")
    catalog = write_catalog(
        root / "models.json",
        {
            "tiny": {"path": str(chat), "dtype": "float32"},
            "tiny-gpt2": {"path": str(tiny_models_dir / "gpt2"), "dtype": "float32"},
        },
    )
    app = create_app(
        {
            "preload": ["tiny"],
            "home": str(root / "home"),
            "models_file": str(catalog),
            "rate_limit": "1000000/minute",
            "max_tokens": 8,
            "api_keys": [KEY],
            "heartbeat_seconds": 0.5,
        }
    )
    app.config["TESTING"] = True
    manager = app.extensions["tursi"].manager
    wait_preloaded(manager, "tiny")
    yield app
    manager.shutdown()


@pytest.fixture(scope="module")
def fuzz_schema(fuzz_app):
    response = fuzz_app.test_client().get(f"{API}/openapi.json", headers=AUTH)
    assert response.status_code == 200
    document = response.get_json()
    # Loaded from the dict (not from_wsgi) so that GET /api/v1/openapi.json, the route that
    # served the document, is fuzzed too (schemathesis leaves that route out otherwise).
    schema = schemathesis.openapi.from_dict(document, config=CONFIG)
    schema.app = fuzz_app
    return schema


@pytest.fixture(scope="module")
def frame_validators(fuzz_schema):
    components = fuzz_schema.raw_schema["components"]

    def validator(name):
        return OAS30Validator({"$ref": f"#/components/schemas/{name}", "components": components})

    return {
        name: validator(name)
        for name in (
            "GenerateTextEvent",
            "GeneratePromptLogprobsEvent",
            "GenerateDone",
            "Error",
            "CompletionChunk",
            "ChatCompletionChunk",
            "OpenAIError",
        )
    }


schema = schemathesis.pytest.from_fixture("fuzz_schema")


def steer(case):
    """Keep load/unload away from the guarded catalog names (see GUARDED)."""
    if case.operation.path.endswith(("/load", "/unload")):
        name = (case.path_parameters or {}).get("name")
        if isinstance(name, str) and name in GUARDED:
            case.path_parameters["name"] = "tiny-gpt2"


def check_no_traceback(ctx, response, case):
    text = response.content.decode("utf-8", "replace")
    assert not TRACE.search(text), f"a traceback in the body: {text[:2000]}"
    for name, values in response.headers.items():
        assert not any(TRACE.search(value) for value in values), name


def sse_frames(text):
    """[(event, data)] of an event stream; comment lines skipped."""
    frames = []
    for block in text.split("\n\n"):
        event, data = None, []
        for line in block.split("\n"):
            if line.startswith(":") or not line:
                continue
            field, _, value = line.partition(":")
            value = value.removeprefix(" ")
            if field == "event":
                event = value
            elif field == "data":
                data.append(value)
            else:
                raise AssertionError(f"unexpected SSE line {line!r}")
        if data:
            frames.append((event, "\n".join(data)))
    return frames


def make_stream_check(validators):
    def check_stream_frames(ctx, response, case):
        """Every frame of a stream is one the document describes; it ends as documented."""
        media = response.headers.get("content-type", [""])[0]
        if not media.startswith("text/event-stream"):
            return
        frames = sse_frames(response.content.decode("utf-8"))
        assert frames, "an empty stream"
        if case.operation.path == f"{API}/generate":
            names = [event for event, _ in frames]
            assert set(names[:-1]) <= {"text", "prompt_logprobs"}, names
            assert names.count("prompt_logprobs") <= 1 and names[-1] in ("done", "error"), names
            kinds = {
                "text": "GenerateTextEvent",
                "prompt_logprobs": "GeneratePromptLogprobsEvent",
                "done": "GenerateDone",
                "error": "Error",
            }
            for event, data in frames:
                validators[kinds[event]].validate(json.loads(data))
        else:
            chunk = (
                "ChatCompletionChunk"
                if case.operation.path.endswith("/chat/completions")
                else "CompletionChunk"
            )
            assert frames[-1] == (None, "[DONE]"), frames[-1]
            for event, data in frames[:-1]:
                assert event is None
                payload = json.loads(data)
                validators["OpenAIError" if "error" in payload else chunk].validate(payload)

    return check_stream_frames


CHECKS = [
    not_a_server_error,
    status_code_conformance,
    content_type_conformance,
    response_headers_conformance,
    response_schema_conformance,
    ignored_auth,
]


@schema.parametrize()
def test_fuzz(case, frame_validators):
    steer(case)
    mode = case.meta.generation.mode.value if case.meta else "explicit"
    CASES[case.operation.label, mode] += 1
    response = case.call_and_validate(
        checks=CHECKS, additional_checks=[check_no_traceback, make_stream_check(frame_validators)]
    )
    STATUSES[case.operation.label, response.status_code] += 1
    if case.operation.path.endswith("/load"):
        settle(case)


def settle(case):
    """A load runs in the background: let it end before the next case, so that no case
    meets a model mid-load (generate would answer 503 model_loading, by design)."""
    manager = case.operation.schema.app.extensions["tursi"].manager
    deadline = time.monotonic() + 30
    while any(state.status == "loading" for state in manager.states()):
        assert time.monotonic() < deadline, "a load did not finish in 30 s"
        time.sleep(0.01)


def test_fuzz_case_count(fuzz_app):
    """Runs after test_fuzz: enough cases, over every operation of the document, in both
    modes."""
    if not CASES:
        pytest.skip("test_fuzz did not run")
    total = sum(CASES.values())
    per_operation = Counter()
    for (label, _), count in CASES.items():
        per_operation[label] += count
    print(f"\nfuzz: {total} cases")
    for label, count in sorted(per_operation.items()):
        statuses = sorted((status, n) for (op, status), n in STATUSES.items() if op == label)
        print(f"  {label}: {count} cases, statuses {statuses}")
    assert total >= MIN_CASES
    document = fuzz_app.test_client().get(f"{API}/openapi.json", headers=AUTH).get_json()
    methods = {"get", "post", "put", "patch", "delete", "head", "options"}
    operations = {
        f"{method.upper()} {path}"
        for path, item in document["paths"].items()
        for method in item
        if method in methods
    }
    assert set(per_operation) == operations
    assert {mode for _, mode in CASES} >= {"positive", "negative"}


# --- structured output: constraints that reach the engine ---------------------------------
# The document says what shape a constraint has, not what makes one compile, so few of the
# cases above get past validation into the engine. These do: random JSON schemas (as
# objects and as text), regexes, choice lists and grammars, sent to every generation route.
# Each must be answered (200) or refused (400), whatever the compiler makes of it.

SCHEMA_KEYWORDS = st.sampled_from(
    [
        "type", "properties", "items", "enum", "const", "minimum", "maximum", "pattern",
        "required", "anyOf", "allOf", "oneOf", "$ref", "$defs", "minLength", "maxLength",
        "minItems", "maxItems", "additionalProperties", "format", "not", "multipleOf",
    ]
)  # fmt: skip
JSON_TYPES = st.sampled_from(["string", "integer", "number", "object", "array", "boolean", "null"])
JSON_LEAVES = (
    st.none()
    | st.booleans()
    | st.integers(-(10**6), 10**6)
    | st.floats(allow_nan=False, allow_infinity=False)
    | st.text(max_size=8)
    | JSON_TYPES
)
SCHEMAS = st.recursive(
    st.dictionaries(SCHEMA_KEYWORDS, JSON_LEAVES, max_size=4),
    lambda inner: st.dictionaries(
        SCHEMA_KEYWORDS,
        inner
        | st.lists(inner, max_size=3)
        | st.dictionaries(st.text(max_size=5), inner, max_size=3),
        max_size=4,
    ),
    max_leaves=10,
)
REGEXES = st.text(alphabet="ab01.*+?|()[]{}^$\\-,3 \n", max_size=30)
RULE_PARTS = st.sampled_from(
    ['"a"', '"b"', "x", "start", "/[0-9]+/", "%json {}", '"a"*', '(x | "b")', "x?", "("]
)
LARK = st.lists(RULE_PARTS, min_size=1, max_size=4).map(
    lambda parts: "start: " + " ".join(parts) + '\nx: "c" | start\n'
)
GBNF = st.lists(RULE_PARTS, min_size=1, max_size=4).map(
    lambda parts: "root ::= " + " ".join(parts).replace("start", "root") + '\nx ::= "c" | root\n'
)
CONSTRAINTS = st.one_of(
    SCHEMAS.map(lambda schema: {"json": schema}),
    SCHEMAS.map(lambda schema: {"json": json.dumps(schema)}),
    st.just({"json_object": True}),
    REGEXES.map(lambda regex: {"regex": regex}),
    st.lists(st.text(max_size=10), max_size=5).map(lambda choice: {"choice": choice}),
    (LARK | GBNF | st.text(max_size=40)).map(lambda grammar: {"grammar": grammar}),
)
GENERATION_BODIES = {
    f"{API}/generate": {"prompt": "hi"},
    "/v1/completions": {"prompt": "hi"},
    "/v1/chat/completions": {"messages": [{"role": "user", "content": "hi"}]},
}


@settings(
    max_examples=200,
    deadline=None,
    derandomize=True,  # the same cases on every run
    suppress_health_check=[HealthCheck.too_slow, HealthCheck.data_too_large],
)
@given(route=st.sampled_from(sorted(GENERATION_BODIES)), constraint=CONSTRAINTS)
def test_fuzz_structured_outputs(fuzz_app, route, constraint):
    body = {"model": "tiny", "max_tokens": 2, "structured_outputs": constraint}
    response = fuzz_app.test_client().post(
        route, json={**body, **GENERATION_BODIES[route]}, headers=AUTH
    )
    text = response.get_data(as_text=True)
    assert response.status_code in (200, 400), text[:1000]
    assert not TRACE.search(text), text[:1000]
    if response.status_code == 400:
        assert response.get_json()["error"]["code"] == "invalid_request"
