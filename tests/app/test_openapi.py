"""The OpenAPI document (/api/v1/openapi.json) and Swagger UI (/docs).

The document must be valid, list every route, describe every request field, and describe
the real responses: each call below is validated against the schema documented for its
route and status. (tests/server/test_openapi.py renders /docs in headless Chromium.)
"""

import json
import re
import time

import pytest
from apispec_webframeworks.flask import FlaskPlugin
from openapi_schema_validator import OAS30Validator
from openapi_spec_validator import validate as validate_spec

from tests.helpers import ROOT, parse_sse, with_chat_template, write_catalog
from tursi import __version__
from tursi.api import gunicorn_errors
from tursi.api.auth import is_api_path
from tursi.api.errors import _HTTP_CODES
from tursi.api.openai_schemas import (
    ChatCompletionRequestSchema,
    CompletionRequestSchema,
    ContentPartSchema,
    MessageSchema,
    StreamOptionsSchema,
)
from tursi.api.openapi import OPERATIONS, documented_rules
from tursi.api.response_schemas import ERROR_CODES
from tursi.api.schemas import GenerateRequestSchema, LoadRequestSchema
from tursi.api.structured_schemas import (
    JsonSchemaFormatSchema,
    ResponseFormatSchema,
    StructuredOutputsSchema,
)
from tursi.api.tokenize_schemas import (
    CompatDetokenizeRequestSchema,
    CompatTokenizeRequestSchema,
    DetokenizeRequestSchema,
    TokenizeRequestSchema,
)
from tursi.errors import TursiError

API = "/api/v1"


SPEC_URL = f"{API}/openapi.json"


def get_spec(client, **kwargs):
    response = client.get(SPEC_URL, **kwargs)
    assert response.status_code == 200, response.get_data(as_text=True)
    return response.get_json()


def test_document_is_valid_openapi(client):
    spec = get_spec(client)
    validate_spec(spec)
    assert spec["openapi"].startswith("3.0")
    assert (spec["info"]["title"], spec["info"]["version"]) == ("Tursi", __version__)
    bearer = spec["components"]["securitySchemes"]["bearerAuth"]
    assert (bearer["type"], bearer["scheme"]) == ("http", "bearer")
    assert spec["security"] == [{"bearerAuth": []}]
    assert spec["paths"]["/health"]["get"]["security"] == []
    assert {} in spec["paths"]["/metrics"]["get"]["security"]
    assert client.get(SPEC_URL + "?x=1").status_code == 400


def test_document_is_built_once_per_app(app, client):
    get_spec(client)
    built = app.extensions["tursi.openapi"]
    get_spec(client)
    assert app.extensions["tursi.openapi"] is built


def test_every_route_is_documented_and_every_path_is_a_route(app, client):
    spec = get_spec(client)
    routes = {}
    for rule in documented_rules(app):
        assert rule.endpoint in OPERATIONS, f"{rule.rule}: add it to tursi.api.openapi"
        methods = {m.lower() for m in rule.methods - {"HEAD", "OPTIONS"}}
        routes.setdefault(FlaskPlugin.flaskpath2openapi(rule.rule), set()).update(methods)
    assert {path: set(item) - {"parameters"} for path, item in spec["paths"].items()} == routes
    every_rule = {rule.endpoint for rule in app.url_map.iter_rules()}
    assert every_rule - {rule.endpoint for rule in documented_rules(app)} == {"swagger_ui.show"}
    for path, method, operation in operations(spec):
        assert operation["summary"] and operation["tags"], (method, path)
        assert "500" in operation["responses"]
    name = spec["paths"]["/api/v1/models/{name}/load"]["parameters"][0]
    assert (name["name"], name["in"], name["required"]) == ("name", "path", True)
    assert name["schema"]["pattern"]


def operations(spec):
    return [
        (path, method, operation)
        for path, item in spec["paths"].items()
        for method, operation in item.items()
        if method != "parameters"
    ]


def test_every_error_code_is_documented():
    codes = set()
    classes = [TursiError]
    while classes:
        cls = classes.pop()
        codes.add(cls.code)
        classes.extend(cls.__subclasses__())
    codes |= set(_HTTP_CODES.values()) | set(gunicorn_errors.CODES.values())
    assert codes | {gunicorn_errors.OTHER} <= set(ERROR_CODES)
    for doc in OPERATIONS.values():
        for listed in doc.errors.values():
            assert set(listed) <= set(ERROR_CODES)


@pytest.mark.parametrize(
    "name, schema",
    [
        ("LoadRequest", LoadRequestSchema),
        ("GenerateRequest", GenerateRequestSchema),
        ("CompletionRequest", CompletionRequestSchema),
        ("ChatCompletionRequest", ChatCompletionRequestSchema),
        ("Message", MessageSchema),
        ("ContentPart", ContentPartSchema),
        ("StreamOptions", StreamOptionsSchema),
        ("StructuredOutputs", StructuredOutputsSchema),
        ("ResponseFormat", ResponseFormatSchema),
        ("JsonSchemaFormat", JsonSchemaFormatSchema),
        ("TokenizeRequest", TokenizeRequestSchema),
        ("DetokenizeRequest", DetokenizeRequestSchema),
        ("CompatTokenizeRequest", CompatTokenizeRequestSchema),
        ("CompatDetokenizeRequest", CompatDetokenizeRequestSchema),
    ],
)
def test_request_schemas_are_complete_and_strict(client, name, schema):
    documented = get_spec(client)["components"]["schemas"][name]
    fields = schema().fields
    assert set(documented["properties"]) == {f.data_key or key for key, f in fields.items()}
    required = {f.data_key or key for key, f in fields.items() if f.required}
    assert set(documented.get("required", [])) == required
    assert documented["additionalProperties"] is False
    for name, field in documented["properties"].items():  # null: every optional's default
        options = [field, *field.get("anyOf", [])]
        assert any(option.get("nullable") for option in options) is (name not in required), name


def test_request_schema_details(client):
    spec = get_spec(client)
    schemas = spec["components"]["schemas"]
    top_p = schemas["GenerateRequest"]["properties"]["top_p"]
    assert (top_p["minimum"], top_p["exclusiveMinimum"], top_p["maximum"]) == (0, True, 1)
    assert "exclusiveMaximum" not in top_p
    native = schemas["GenerateRequest"]["properties"]
    for name, low, high, default in [
        ("min_p", 0, 1, 0),
        ("presence_penalty", -2, 2, 0),
        ("frequency_penalty", -2, 2, 0),
        ("logprobs", 0, 20, None),
        ("prompt_logprobs", 0, 20, None),
        ("n", 1, 1, 1),  # several choices: /v1/completions
        ("seed", -(2**63), 2**63 - 1, None),
    ]:
        field = native[name]
        assert (field["minimum"], field["maximum"], field["default"]) == (low, high, default)
    chat = schemas["ChatCompletionRequest"]["properties"]
    assert chat["logit_bias"]["maxProperties"] == 1024
    assert chat["logit_bias"]["additionalProperties"] == {
        "type": "number",
        "minimum": -100,
        "maximum": 100,
    }
    assert (chat["top_logprobs"]["minimum"], chat["top_logprobs"]["maximum"]) == (0, 20)
    assert chat["function_call"]["enum"] == ["none"]
    assert [option.get("enum") for option in chat["tool_choice"]["anyOf"]] == [
        ["none", "auto", "required"],
        None,  # {"type": "function", "function": {"name"}}
    ]
    assert chat["audio"]["enum"] == [None]
    assert "accepted, ignored" in chat["metadata"]["description"]
    assert [option.get("type") for option in chat["stop"]["anyOf"]] == ["string", "array"]
    completion = schemas["CompletionRequest"]["properties"]
    assert (completion["logprobs"]["maximum"], completion["max_tokens"]["minimum"]) == (5, 0)
    assert (completion["n"]["maximum"], completion["best_of"]["maximum"]) == (16, 16)
    validator = body_validator(spec, {"$ref": "#/components/schemas/CompletionRequest"})
    for ok in (
        {"model": "m", "prompt": "x"},
        {"model": "m", "prompt": ["x", "y"], "stop": None, "n": None},
        {"model": "m", "prompt": [1, 2, 3]},
        {"model": "m", "prompt": [[1, 2], [3]], "echo": True, "logprobs": 5, "max_tokens": 0},
        {"model": "m", "prompt": "x", "stream_options": None, "stop": "a"},
        {"model": "m", "prompt": "x", "logit_bias": {"50256": -100}, "seed": -1},
        {"model": "m", "prompt": "x", "structured_outputs": {"json": {"type": "object"}}},
        {"model": "m", "prompt": "x", "structured_outputs": {"json": '{"type": "object"}'}},
        {"model": "m", "prompt": "x", "structured_outputs": {"choice": ["a", "b"]}},
        {"model": "m", "prompt": "x", "response_format": {"type": "json_object"}},
        {"model": "m", "prompt": "x", "guided_regex": "[0-9]+", "response_format": None},
        {
            "model": "m",
            "prompt": "x",
            "response_format": {
                "type": "json_schema",
                "json_schema": {"name": "n", "schema": {"type": "object"}, "strict": True},
            },
        },
    ):
        validator.validate(ok)
    for bad in (
        {"model": "m", "prompt": []},
        {"model": "m", "prompt": ""},
        {"model": "m", "prompt": [[1], [-1]]},
        {"model": "m", "prompt": "x", "stream_options": {"other": 1}},
        {"model": "m", "prompt": "x", "tools": []},  # a chat field
        {"model": "m", "prompt": "x", "logprobs": 6},
        {"model": "m", "prompt": "x", "suffix": "s"},
        {"model": "m", "prompt": "x", "logit_bias": {"1": 101}},
        {"model": "m", "prompt": "x", "structured_outputs": {}},
        {"model": "m", "prompt": "x", "structured_outputs": {"regex": "a", "choice": ["a"]}},
        {"model": "m", "prompt": "x", "structured_outputs": {"json_object": False}},
        {"model": "m", "prompt": "x", "structured_outputs": {"choice": []}},
        {"model": "m", "prompt": "x", "structured_outputs": {"json": 5}},
        {"model": "m", "prompt": "x", "response_format": {"type": "xml"}},
        {"model": "m", "prompt": "x", "guided_whitespace_pattern": " "},
    ):
        assert not validator.is_valid(bad), bad


def body_validator(spec, schema):
    """A validator of `schema` (a piece of `spec`) whose #/components/... refs resolve."""
    return OAS30Validator({"allOf": [schema], "components": spec["components"]})


class Checker:
    """Calls routes and checks each answer against the document: its status is documented
    for the route, its media type too, and a JSON body matches that response's schema."""

    def __init__(self, client, headers=None):
        self.client = client
        self.spec = get_spec(client, headers=headers)
        self.adapter = client.application.url_map.bind("localhost")
        self.seen = set()

    def __call__(self, method, url, status, code=None, **kwargs):
        response = getattr(self.client, method)(url, **kwargs)
        body = response.get_data(as_text=True)
        rule, _ = self.adapter.match(url.split("?")[0], method=method.upper(), return_rule=True)
        path = FlaskPlugin.flaskpath2openapi(rule.rule)
        documented = self.spec["paths"][path][method]["responses"]
        assert response.status_code in _as_tuple(status), (
            method,
            url,
            response.status_code,
            body[:500],
        )
        key = str(response.status_code)
        assert key in documented, f"{method} {url}: {key} is not documented"
        content = documented[key]["content"]
        assert response.mimetype in content, (method, url, response.mimetype)
        if response.mimetype == "application/json":
            body_validator(self.spec, content["application/json"]["schema"]).validate(
                json.loads(body)
            )
        headers = documented[key].get("headers", {})
        for name, header in headers.items():
            if "$ref" in header:
                header = self.spec["components"]["headers"][header["$ref"].split("/")[-1]]
            if header["required"]:
                assert name in response.headers, (method, url, name)
        refused_early = response.status_code == 503 and "shutting_down" in body
        if is_api_path(url) and not refused_early:  # documented, and on every API response
            for name in ("X-RateLimit-Limit", "X-RateLimit-Remaining", "X-RateLimit-Reset"):
                assert name in headers and name in response.headers, (method, url, name)
        if code is not None:
            assert json.loads(body)["error"]["code"] == code, body
        self.seen.add((method, path, key))
        response.close()
        response.body_text = body
        return response

    def frames(self, name, payload):
        body_validator(self.spec, {"$ref": f"#/components/schemas/{name}"}).validate(payload)

    def error(self, response, openai=False):
        """An error outside any route (404, 405) still matches the error schema."""
        name = "OpenAIError" if openai else "Error"
        self.frames(name, response.get_json())


def _as_tuple(status):
    return status if isinstance(status, tuple) else (status,)


def openai_payloads(text):
    return [line[len("data: ") :] for line in text.splitlines() if line.startswith("data: ")]


@pytest.fixture
def catalog(tiny_models_dir, tmp_path):
    """ "chatty" (tiny Llama with a chat template), "other" (tiny GPT-2), "broken" (no files)."""
    folder = with_chat_template(tiny_models_dir / "llama", tmp_path / "chatty")
    return str(
        write_catalog(
            tmp_path / "models.json",
            {
                "chatty": {"path": str(folder), "dtype": "float32"},
                "other": {"path": str(tiny_models_dir / "gpt2"), "dtype": "float32"},
                "broken": {"path": str(tmp_path / "missing")},
            },
        )
    )


def wait_for(check, status, name, timeout=60):
    deadline = time.monotonic() + timeout
    while True:
        models = check("get", f"{API}/models", 200).get_json()["models"]
        entry = next(m for m in models if m["name"] == name)
        if entry["status"] in status:
            return entry
        assert time.monotonic() < deadline, entry
        time.sleep(0.02)


def test_responses_match_the_document(make_app, catalog):
    app = make_app(models_file=catalog, preload=["broken"])
    check = Checker(app.test_client())
    # Probes, status, the document itself.
    check("get", "/health", 200)
    check("get", "/health?verbose=1", 400)
    check("get", "/ready", 503)  # "broken" is loading or failed
    assert wait_for(check, ("failed",), "broken")["error"]
    check("get", "/ready", 503, "not_ready")
    check("get", f"{API}/status", 200)
    check("get", f"{API}/status?x=1", 400)
    check("get", SPEC_URL, 200)
    check("get", f"{API}/models?x=1", 400)
    assert check("get", "/metrics", 200).body_text.startswith("#")
    check("get", "/v1/models", 200)
    check("get", f"{API}/status/history", 200)
    check("get", f"{API}/status/history?x=1", 400)
    check("get", "/console", 200)
    check("get", "/console/console.js", 200)
    check("get", "/console/nope.js", 404, "not_found")

    # Loading, loaded, conflicts.
    check("post", f"{API}/models/nope/load", 404)
    check("post", f"{API}/models/chatty/load", 400, json={"quantize": False, "bits": 8})
    check("post", f"{API}/models/chatty/load", 400, json={"unknown": 1})
    check("post", f"{API}/models/chatty/load", 400, data="x", content_type="text/plain")
    check(
        "post",
        f"{API}/models/chatty/load",
        400,
        "unsupported_quantization",
        json={"quantize": True, "bits": 4, "mode": "static"},
    )
    check("post", f"{API}/models/chatty/load", 202)
    check("post", f"{API}/models/chatty/unload", (409, 200))  # load_in_progress, unless done
    check("post", f"{API}/generate", (503, 409, 200), json={"model": "chatty", "prompt": "a"})
    check("get", f"{API}/models", 200)
    wait_for(check, ("loaded", "not_loaded"), "chatty")
    check("post", f"{API}/models/chatty/load", (200, 202))
    wait_for(check, ("loaded",), "chatty")
    check("post", f"{API}/models/chatty/load", 200)
    check("post", f"{API}/models/chatty/load", 409, "model_conflict", json={"dtype": "float16"})
    check("get", f"{API}/models", 200)
    check("get", f"{API}/models/chatty/metrics", 200)
    check("get", f"{API}/models/other/metrics", 200)
    check("get", f"{API}/models/nope/metrics", 404)
    check("get", f"{API}/models/chatty/metrics?x=1", 400)
    check("get", "/v1/models", 200)
    check("get", "/v1/models/chatty", 200)
    check("get", "/v1/models/other", 404, "model_not_found")  # in the catalog, not loaded
    check("get", "/v1/models/chatty?x=1", 400)
    check("get", f"{API}/status", 200)

    # Tokenizer routes.
    for url, body in (
        (f"{API}/tokenize", {"model": "chatty", "text": "Once upon"}),
        (f"{API}/tokenize", {"model": "chatty", "messages": [{"role": "user", "content": "a"}]}),
        (f"{API}/detokenize", {"model": "chatty", "tokens": [1, 2]}),
        ("/tokenize", {"content": "Once upon", "with_pieces": True}),
        ("/tokenize", {"model": "chatty", "prompt": "Once upon"}),
        ("/detokenize", {"tokens": [1, 2]}),
    ):
        check("post", url, 200, json=body)
        check("post", url, 400, json={**body, "made_up": 1})
        check("post", url, 404, json={**body, "model": "nope"})
        check("post", url, 409, json={**body, "model": "other"})
    check("post", f"{API}/detokenize", 400, json={"model": "chatty", "tokens": [10**9]})

    # Native generation: whole, streamed, refused.
    gen = {"model": "chatty", "prompt": "Once upon a time", "max_tokens": 5, "temperature": 0}
    check("post", f"{API}/generate", 200, json=gen)
    check(
        "post",
        f"{API}/generate",
        200,
        json={**gen, "return_full_text": False, "seed": 1, "stop": ["x"], "top_k": 5},
    )
    events = parse_sse(
        check("post", f"{API}/generate", 200, json={**gen, "stream": True}).body_text.splitlines()
    )
    assert [kind for kind, _ in events][-1] == "done"
    for kind, payload in events:
        check.frames({"text": "GenerateTextEvent", "done": "GenerateDone"}[kind], payload)
    scored = {**gen, "logprobs": 2, "prompt_logprobs": 1, "return_full_text": False}
    body = check("post", f"{API}/generate", 200, json=scored).get_json()
    assert len(body["logprobs"]) == 5 and body["prompt_logprobs"][0] is None
    events = parse_sse(
        check(
            "post", f"{API}/generate", 200, json={**scored, "stream": True}
        ).body_text.splitlines()
    )
    assert "prompt_logprobs" in [kind for kind, _ in events]
    frames = {
        "text": "GenerateTextEvent",
        "done": "GenerateDone",
        "prompt_logprobs": "GeneratePromptLogprobsEvent",
    }
    for kind, payload in events:
        check.frames(frames[kind], payload)
    check("post", f"{API}/generate", 400, json={**gen, "temperature": 3})
    check(
        "post",
        f"{API}/generate",
        400,
        "context_length_exceeded",
        json={**gen, "prompt": "x " * 400},
    )
    check("post", f"{API}/generate", 400, data="[1]", content_type="application/json")
    check("post", f"{API}/generate", 404, json={**gen, "model": "nope"})
    check("post", f"{API}/generate", 409, json={**gen, "model": "other"})
    check(
        "post", f"{API}/generate", 413, "payload_too_large", json={**gen, "prompt": "x" * 1_100_000}
    )

    # OpenAI-compatible generation.
    completion = {"model": "chatty", "prompt": "Once", "max_tokens": 4, "temperature": 0}
    check("post", "/v1/completions", 200, json=completion)
    check(
        "post",
        "/v1/completions",
        200,
        json={**completion, "prompt": ["Once"], "echo": True, "stop": "x", "temperature": None},
    )
    chat = {
        "model": "chatty",
        "max_tokens": 4,
        "temperature": 0,
        "messages": [{"role": "user", "content": [{"type": "text", "text": "hi"}]}],
    }
    check("post", "/v1/chat/completions", 200, json=chat)
    scored_completion = {
        **completion,
        "prompt": [[1, 2, 3], [4, 5]],
        "n": 2,
        "logprobs": 3,
        "echo": True,
    }
    check("post", "/v1/completions", 200, json={**scored_completion, "max_tokens": 0})
    check("post", "/v1/completions", 200, json={**completion, "best_of": 2, "logprobs": None})
    scored_chat = {**chat, "n": 2, "logprobs": True, "top_logprobs": 3, "seed": -1}
    assert check("post", "/v1/chat/completions", 200, json=scored_chat).get_json()["choices"][1]
    for url, body, chunk in (
        ("/v1/completions", completion, "CompletionChunk"),
        ("/v1/chat/completions", chat, "ChatCompletionChunk"),
        ("/v1/completions", scored_completion, "CompletionChunk"),
        ("/v1/chat/completions", scored_chat, "ChatCompletionChunk"),
    ):
        stream = {**body, "stream": True, "stream_options": {"include_usage": True}}
        payloads = openai_payloads(check("post", url, 200, json=stream).body_text)
        assert payloads[-1] == "[DONE]"
        for payload in payloads[:-1]:
            check.frames(chunk, json.loads(payload))
        check("post", url, 400, json={**body, "n": 17})
        check("post", url, 404, json={**body, "model": "nope"})
        check("post", url, 409, json={**body, "model": "other"})
        check("post", url, 413, json={**body, "user": "x" * 1_100_000})

    # Unloading.
    check("post", f"{API}/models/chatty/unload", 400, data="1", content_type="application/json")
    check("post", f"{API}/models/nope/unload", 404)
    check("post", f"{API}/models/chatty/unload", 200)
    check("post", f"{API}/models/chatty/unload", 409, "model_not_loaded")
    check("get", f"{API}/models/chatty/metrics", 200)

    # Outside any route: 404 and 405 bodies.
    check.error(check.client.get(f"{API}/nothing"))
    check.error(check.client.delete(f"{API}/status"))
    check.error(check.client.get("/v1/nothing"), openai=True)
    check.error(check.client.put("/v1/models"), openai=True)

    # Draining (SIGTERM): everything but /health and /metrics is refused.
    app.extensions["tursi"].draining = True
    check("get", f"{API}/models", 503, "shutting_down")
    check("post", "/v1/completions", 503, "shutting_down", json=completion)
    check("get", "/ready", 503, "shutting_down")
    check("get", "/health", 200)
    check("get", "/metrics", 200)

    statuses = {(method, path): set() for path, method, _ in operations(check.spec)}
    for method, path, status in check.seen:
        statuses[(method, path)].add(status)
    assert all(statuses.values()), [op for op, seen in statuses.items() if not seen]


def test_auth_and_rate_limit_responses_match_the_document(make_app):
    key = {"Authorization": "Bearer k1"}
    check = Checker(make_app(api_keys=["k1"], rate_limit="5/minute").test_client(), key)
    check("get", "/health", 200)
    check("get", "/metrics", 200)  # loopback: open
    remote = {"REMOTE_ADDR": "10.1.2.3"}
    check("get", "/metrics", 401, environ_base=remote)
    check("get", "/metrics", 200, environ_base=remote, headers=key)
    check("get", "/ready", 401)
    check("get", "/ready", 200, headers=key)
    check("get", f"{API}/models", 401)
    check("get", "/v1/models", 401)
    check("post", "/v1/completions", 401, json={"model": "x", "prompt": "y"})
    check("get", SPEC_URL, 401)
    assert check.client.get("/docs/").status_code == 401
    for _ in range(5):  # the key's budget: the document, then these
        response = check("get", f"{API}/status", (200, 429), headers=key)
    assert response.status_code == 429
    assert int(response.headers["Retry-After"]) >= 0
    check("get", "/v1/models", 429, headers=key)


def test_docs_page_uses_only_local_assets(client):
    assert client.get("/docs").status_code in (301, 308)
    page = client.get("/docs/")
    assert page.status_code == 200 and page.mimetype == "text/html"
    html = page.get_data(as_text=True)
    assert not re.search(r"(?:src|href)=[\"']?(?:https?:)?//", html)
    assert SPEC_URL in html
    assets = re.findall(r"(?:src|href)=\"(/docs/[^\"]+)\"", html)
    assert "/docs/swagger-ui-bundle.js" in assets and "/docs/swagger-ui.css" in assets
    for asset in assets:
        response = client.get(asset)
        assert response.status_code == 200, asset
        assert response.get_data(), asset
        response.close()
    bundle = client.get("/docs/swagger-ui-bundle.js")
    assert "javascript" in bundle.mimetype and b"SwaggerUIBundle" in bundle.get_data()
    bundle.close()


def test_every_code_gunicorn_errors_sends_is_documented(client):
    sent = {*gunicorn_errors.CODES.values(), gunicorn_errors.OTHER}
    assert sent <= set(ERROR_CODES)
    spec = client.get("/api/v1/openapi.json").get_json()
    schemas = spec["components"]["schemas"]
    detail = schemas["Error"]["properties"]["error"]  # gunicorn writes the native body
    detail = schemas[detail["$ref"].split("/")[-1]] if "$ref" in detail else detail
    assert sent <= set(detail["properties"]["code"]["enum"])
    rows = set(
        re.findall(r"^\| (\d{3}) \| `([a-z_]+)` \|", (ROOT / "docs" / "api.md").read_text(), re.M)
    )
    assert {(str(status), code) for status, code in gunicorn_errors.CODES.items()} <= rows
