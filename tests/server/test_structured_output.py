"""Structured output end to end: the official `openai` client (plain HTTP for the native
route) against real gunicorn serving the embedded SmolLM2-135M-Instruct.

- Twenty JSON schemas: nested objects, arrays, enums, bounded numbers, required and
  optional fields, `$ref`s; raw ones through `response_format` json_schema, pydantic
  models through `client.chat.completions.parse` and `.stream`. Each is asked streamed and
  not, and every answer parses and validates (jsonschema; pydantic for the models).
- Regexes and choice lists on both APIs (/api/v1/generate, /v1/completions and
  /v1/chat/completions), streamed and not: every output matches.

Every request is sent once, together, by the `answers` fixture (the continuous batch serves
them side by side, which keeps this module to one batch's time), greedy, with bounded
strings and arrays so that every structure fits its max_tokens; each test checks its own.
"""

from __future__ import annotations

import json
import re
from collections.abc import Callable
from concurrent.futures import ThreadPoolExecutor
from enum import Enum
from functools import partial
from typing import Literal

import jsonschema
import openai
import pytest
import requests
from pydantic import BaseModel, Field

from tests.helpers import EMBEDDED, embedded_server, parse_sse

MODEL = EMBEDDED
MAX_TOKENS = 256  # greedy JSON for these schemas is well under it
SYSTEM = "You are a helpful assistant. Answer in JSON."


def short(**extra) -> dict:
    return {"type": "string", "minLength": 1, "maxLength": 24, **extra}


RAW_SCHEMAS = {  # id -> (prompt, JSON schema)
    "person": (
        "Describe a fictional person: name and age.",
        {
            "type": "object",
            "properties": {
                "name": short(),
                "age": {"type": "integer", "minimum": 0, "maximum": 120},
            },
            "required": ["name", "age"],
            "additionalProperties": False,
        },
    ),
    "nested-address": (
        "Give the address of a bakery in Paris.",
        {
            "type": "object",
            "properties": {
                "shop": short(),
                "address": {
                    "type": "object",
                    "properties": {
                        "street": short(),
                        "city": short(),
                        "postcode": {"type": "string", "pattern": "[0-9]{5}"},
                    },
                    "required": ["street", "city", "postcode"],
                    "additionalProperties": False,
                },
            },
            "required": ["shop", "address"],
            "additionalProperties": False,
        },
    ),
    "string-array": (
        "List a few tags for a blog post about gardening.",
        {
            "type": "object",
            "properties": {
                "tags": {"type": "array", "items": short(), "minItems": 1, "maxItems": 4}
            },
            "required": ["tags"],
            "additionalProperties": False,
        },
    ),
    "enum": (
        "What is the sentiment of: 'I loved this film'?",
        {
            "type": "object",
            "properties": {"sentiment": {"enum": ["positive", "negative", "neutral"]}},
            "required": ["sentiment"],
            "additionalProperties": False,
        },
    ),
    "bounded-numbers": (
        "Report today's weather in Oslo.",
        {
            "type": "object",
            "properties": {
                "temperature_c": {"type": "number", "minimum": -50, "maximum": 60},
                "humidity_percent": {"type": "integer", "minimum": 0, "maximum": 100},
            },
            "required": ["temperature_c", "humidity_percent"],
            "additionalProperties": False,
        },
    ),
    "optional-fields": (
        "Give a film's title, and its year if you know it.",
        {
            "type": "object",
            "properties": {
                "title": short(),
                "year": {"type": "integer", "minimum": 1900, "maximum": 2030},
                "director": short(),
            },
            "required": ["title"],
            "additionalProperties": False,
        },
    ),
    "booleans-and-enum": (
        "Describe a product in a shop's stock.",
        {
            "type": "object",
            "properties": {
                "in_stock": {"type": "boolean"},
                "category": {"enum": ["food", "tools", "clothes", "toys"]},
                "quantity": {"type": "integer", "minimum": 0, "maximum": 1000},
            },
            "required": ["in_stock", "category", "quantity"],
            "additionalProperties": False,
        },
    ),
    "array-of-objects": (
        "List up to three fruits and their prices in euros.",
        {
            "type": "object",
            "properties": {
                "items": {
                    "type": "array",
                    "minItems": 1,
                    "maxItems": 3,
                    "items": {
                        "type": "object",
                        "properties": {
                            "name": short(),
                            "price": {"type": "number", "minimum": 0, "maximum": 100},
                        },
                        "required": ["name", "price"],
                        "additionalProperties": False,
                    },
                }
            },
            "required": ["items"],
            "additionalProperties": False,
        },
    ),
    "deep-nesting": (
        "Describe a company and its chief executive.",
        {
            "type": "object",
            "properties": {
                "company": {
                    "type": "object",
                    "properties": {
                        "name": short(),
                        "ceo": {
                            "type": "object",
                            "properties": {
                                "name": short(),
                                "age": {"type": "integer", "minimum": 18, "maximum": 99},
                            },
                            "required": ["name", "age"],
                            "additionalProperties": False,
                        },
                    },
                    "required": ["name", "ceo"],
                    "additionalProperties": False,
                }
            },
            "required": ["company"],
            "additionalProperties": False,
        },
    ),
    "top-level-array": (
        "Give four lucky numbers between 1 and 100.",
        {
            "type": "array",
            "items": {"type": "integer", "minimum": 1, "maximum": 100},
            "minItems": 3,
            "maxItems": 5,
        },
    ),
    "nullable-anyof": (
        "Give a player's nickname (or null) and score.",
        {
            "type": "object",
            "properties": {
                "nickname": {"anyOf": [short(), {"type": "null"}]},
                "score": {"type": "integer", "minimum": 0, "maximum": 999},
            },
            "required": ["nickname", "score"],
            "additionalProperties": False,
        },
    ),
    "refs": (
        "Give the start and end points of a line on a grid.",
        {
            "$defs": {
                "point": {
                    "type": "object",
                    "properties": {
                        "x": {"type": "integer", "minimum": -99, "maximum": 99},
                        "y": {"type": "integer", "minimum": -99, "maximum": 99},
                    },
                    "required": ["x", "y"],
                    "additionalProperties": False,
                }
            },
            "type": "object",
            "properties": {"start": {"$ref": "#/$defs/point"}, "end": {"$ref": "#/$defs/point"}},
            "required": ["start", "end"],
            "additionalProperties": False,
        },
    ),
    "string-pattern": (
        "When was the first moon landing? Give the date and the event.",
        {
            "type": "object",
            "properties": {
                "date": {"type": "string", "pattern": "^[0-9]{4}-[0-9]{2}-[0-9]{2}$"},
                "event": short(),
            },
            "required": ["date", "event"],
            "additionalProperties": False,
        },
    ),
    "const-and-number-enum": (
        "Give a config with version 2 and a log level from 1 to 3.",
        {
            "type": "object",
            "properties": {"version": {"const": 2}, "level": {"enum": [1, 2, 3]}},
            "required": ["version", "level"],
            "additionalProperties": False,
        },
    ),
}


class City(BaseModel):
    name: str = Field(max_length=30)
    country: str = Field(max_length=30)
    population_millions: int = Field(ge=0, le=40)


class Book(BaseModel):
    title: str = Field(max_length=40)
    author: str = Field(max_length=30)
    year: int = Field(ge=1000, le=2030)
    genres: list[Literal["fiction", "science", "history", "poetry"]] = Field(max_length=3)


class Customer(BaseModel):
    name: str = Field(max_length=30)
    email: str = Field(max_length=40)


class Item(BaseModel):
    sku: str = Field(max_length=10)
    quantity: int = Field(ge=1, le=10)


class Order(BaseModel):
    order_id: int = Field(ge=1, le=99999)
    customer: Customer
    items: list[Item] = Field(min_length=1, max_length=3)


class Profile(BaseModel):
    username: str = Field(max_length=20)
    bio: str | None = Field(default=None, max_length=40)
    age: int | None = Field(default=None, ge=13, le=120)


class Priority(str, Enum):
    low = "low"
    medium = "medium"
    high = "high"


class Ticket(BaseModel):
    summary: str = Field(max_length=50)
    priority: Priority
    blocking: bool


class Rating(BaseModel):
    stars: int = Field(ge=1, le=5)
    verdict: Literal["buy", "skip"]


MODELS = {  # id -> (prompt, pydantic model)
    "pydantic-city": ("Describe Paris.", City),
    "pydantic-book": ("Describe a famous novel.", Book),
    "pydantic-order": ("Make up a small online order.", Order),
    "pydantic-optional": ("Make up a user profile.", Profile),
    "pydantic-enum": ("File a bug ticket: the login page is down.", Ticket),
    "pydantic-rating": ("Rate a cheap umbrella that broke on day one.", Rating),
}
assert len(RAW_SCHEMAS) + len(MODELS) == 20

REGEXES = {  # id -> (prompt, pattern the whole output matches)
    "date": ("The date of the first moon landing, as YYYY-MM-DD:", r"[0-9]{4}-[0-9]{2}-[0-9]{2}"),
    "weekday": ("The day after Monday is", r"(Mon|Tues|Wednes|Thurs|Fri|Satur|Sun)day"),
    "phone": ("A phone number:", r"\+[0-9]{1,3} [0-9]{3} [0-9]{4}"),
    "name": ("The name of a city:", r"[A-Z][a-z]{2,12}( [A-Z][a-z]{2,12})?"),
}
CHOICES = {  # id -> (prompt, the choices)
    "sentiment": ("The sentiment of 'what a lovely day' is", ["positive", "negative", "neutral"]),
    "capital": ("The capital of France is", ["Paris", "London", "Berlin", "Madrid"]),
    "yes-no": ("Is the sky blue? Answer yes or no.", ["yes", "no"]),
}


# --- the requests ------------------------------------------------------------------------


def messages(prompt: str) -> list[dict]:
    return [{"role": "system", "content": SYSTEM}, {"role": "user", "content": prompt}]


def chat(oai, prompt: str, stream: bool, **extra) -> tuple[str, str]:
    """(content, finish_reason) of a greedy chat completion, streamed or not."""
    create = oai.chat.completions.create
    body = {"model": MODEL, "messages": messages(prompt), "temperature": 0, **extra}
    body.setdefault("max_tokens", MAX_TOKENS)
    if not stream:
        choice = create(**body).choices[0]
        return choice.message.content, choice.finish_reason
    text, reason = "", None
    for chunk in create(stream=True, **body):
        for choice in chunk.choices:
            text += choice.delta.content or ""
            reason = choice.finish_reason or reason
    return text, reason


def completion(oai, prompt: str, stream: bool, **extra) -> tuple[str, str]:
    body = {"model": MODEL, "prompt": prompt, "temperature": 0, "max_tokens": 64, **extra}
    if not stream:
        choice = oai.completions.create(**body).choices[0]
        return choice.text, choice.finish_reason
    text, reason = "", None
    for chunk in oai.completions.create(stream=True, **body):
        for choice in chunk.choices:
            text += choice.text
            reason = choice.finish_reason or reason
    return text, reason


def native(base: str, prompt: str, stream: bool, constraint: dict) -> tuple[str, str]:
    body = {
        "model": MODEL,
        "prompt": prompt,
        "temperature": 0,
        "max_tokens": 64,
        "return_full_text": False,
        "stream": stream,
        "structured_outputs": constraint,
    }
    response = requests.post(f"{base}/generate", json=body, timeout=300, stream=stream)
    assert response.status_code == 200, response.text
    if not stream:
        answer = response.json()
        return answer["text"], answer["finish_reason"]
    frames = parse_sse(response.iter_lines(decode_unicode=True))
    text = "".join(data["text"] for event, data in frames if event == "text")
    (done,) = [data for event, data in frames if event == "done"]
    return text, done["finish_reason"]


def parsed(oai, model: type[BaseModel], prompt: str, stream: bool) -> tuple[str, str, object]:
    """(content, finish_reason, message.parsed) through the client's pydantic helpers."""
    body = {
        "model": MODEL,
        "messages": messages(prompt),
        "response_format": model,
        "temperature": 0,
        "max_tokens": MAX_TOKENS,
    }
    if stream:
        with oai.chat.completions.stream(**body) as events:
            for _ in events:
                pass
            final = events.get_final_completion()
    else:
        final = oai.chat.completions.parse(**body)
    choice = final.choices[0]
    return choice.message.content, choice.finish_reason, choice.message.parsed


def json_schema_format(name: str, schema: dict) -> dict:
    return {"type": "json_schema", "json_schema": {"name": name, "schema": schema, "strict": True}}


def requests_to_send(oai, base: str) -> dict[tuple, Callable[[], tuple]]:
    """Every request of the module: (kind, id, route, stream) -> a call."""
    calls: dict[tuple, Callable[[], tuple]] = {}
    for stream in (False, True):
        for name, (prompt, schema) in RAW_SCHEMAS.items():
            fmt = json_schema_format(name, schema)
            calls["schema", name, "chat", stream] = partial(
                chat, oai, prompt, stream, response_format=fmt
            )
        for name, (prompt, model) in MODELS.items():
            calls["model", name, "chat", stream] = partial(parsed, oai, model, prompt, stream)
        for kind, cases in (("regex", REGEXES), ("choice", CHOICES)):
            for name, (prompt, value) in cases.items():
                constraint = {kind: value}
                calls[kind, name, "native", stream] = partial(
                    native, base, prompt, stream, constraint
                )
                calls[kind, name, "completions", stream] = partial(
                    completion, oai, prompt, stream, extra_body={"structured_outputs": constraint}
                )
                calls[kind, name, "chat", stream] = partial(
                    chat, oai, prompt, stream, max_tokens=64, extra_body={f"guided_{kind}": value}
                )
    return calls


@pytest.fixture(scope="module")
def server(embedded_home, tmp_path_factory):
    log = tmp_path_factory.mktemp("structured") / "gunicorn.log"
    with embedded_server(embedded_home, log) as srv:
        yield srv


@pytest.fixture(scope="module")
def oai(server):
    base = f"http://127.0.0.1:{server.port}/v1"
    with openai.OpenAI(base_url=base, api_key="unused", max_retries=0, timeout=300) as client:
        yield client


@pytest.fixture(scope="module")
def answers(server, oai):
    """Every request's answer (or the exception it raised), sent 16 at a time."""
    calls = requests_to_send(oai, server.url)

    def run(call):
        try:
            return call()
        except Exception as exc:  # reported by the test that owns the request
            return exc

    with ThreadPoolExecutor(max_workers=16) as pool:
        results = pool.map(run, calls.values())
        return dict(zip(calls, results, strict=True))


def answer(answers, key) -> tuple:
    result = answers[key]
    if isinstance(result, Exception):
        raise result
    return result


# --- the checks --------------------------------------------------------------------------

STREAMED = pytest.mark.parametrize("stream", [False, True], ids=["whole", "streamed"])


@STREAMED
@pytest.mark.parametrize("name", RAW_SCHEMAS)
def test_json_schema_answers_parse_and_validate(answers, name, stream):
    text, reason = answer(answers, ("schema", name, "chat", stream))
    assert reason == "stop", text
    jsonschema.validate(json.loads(text), RAW_SCHEMAS[name][1])


@STREAMED
@pytest.mark.parametrize("name", MODELS)
def test_pydantic_models_through_parse(answers, name, stream):
    text, reason, value = answer(answers, ("model", name, "chat", stream))
    model = MODELS[name][1]
    assert reason == "stop", text
    assert isinstance(value, model)
    assert model.model_validate_json(text) == value
    jsonschema.validate(json.loads(text), model.model_json_schema())


ROUTES = pytest.mark.parametrize("route", ["native", "completions", "chat"])


@STREAMED
@ROUTES
@pytest.mark.parametrize("name", REGEXES)
def test_regex_outputs_match(answers, name, route, stream):
    text, reason = answer(answers, ("regex", name, route, stream))
    assert re.fullmatch(REGEXES[name][1], text), text
    assert reason == "stop"


@STREAMED
@ROUTES
@pytest.mark.parametrize("name", CHOICES)
def test_choice_outputs_are_one_of_the_choices(answers, name, route, stream):
    text, reason = answer(answers, ("choice", name, route, stream))
    assert text in CHOICES[name][1]
    assert reason == "stop"


def test_json_object_mode(oai):
    for stream in (False, True):
        text, reason = chat(
            oai,
            "Describe a cat as a JSON object.",
            stream,
            response_format={"type": "json_object"},
            max_tokens=MAX_TOKENS,
        )
        if reason == "stop":
            assert isinstance(json.loads(text), dict), text
        else:  # a free-form object may run past max_tokens: then it is cut, as documented
            assert reason == "length" and text.startswith("{"), text


def test_sampled_choices_each_match(oai):
    """n sampled choices, each its own constrained row."""
    pattern = REGEXES["date"][1]
    reply = oai.completions.create(
        model=MODEL,
        prompt="Some dates: ",
        n=4,
        temperature=1.0,
        max_tokens=32,
        extra_body={"guided_regex": pattern},
    )
    assert len(reply.choices) == 4
    for choice in reply.choices:
        assert re.fullmatch(pattern, choice.text), choice.text
        assert choice.finish_reason == "stop"


def test_max_tokens_inside_a_structure_is_length(oai):
    """A structure cut by max_tokens: finish_reason "length", and parse refuses it."""
    with pytest.raises(openai.LengthFinishReasonError):
        oai.chat.completions.parse(
            model=MODEL, messages=messages("Describe Paris."), response_format=City, max_tokens=3
        )


def test_bad_constraints_are_400s_naming_the_field(oai):
    with pytest.raises(openai.BadRequestError) as raised:
        oai.chat.completions.create(
            model=MODEL,
            messages=messages("hi"),
            response_format={"type": "json_object"},
            extra_body={"guided_regex": "[0-9]+"},
        )
    assert raised.value.param == "guided_regex"
    with pytest.raises(openai.BadRequestError) as raised:  # found by the engine's compiler
        oai.completions.create(
            model=MODEL, prompt="hi", extra_body={"structured_outputs": {"regex": "(unclosed"}}
        )
    assert raised.value.status_code == 400
