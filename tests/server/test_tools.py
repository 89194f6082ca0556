"""Tool calling end to end (docs/tools.md): the official `openai` client against a real
gunicorn serving the embedded SmolLM2, whose chat template ignores `tools` (the fallback
prompt tells it the call format; the grammar holds its calls to their functions' schemas).

Acceptance of issue 15: with tool_choice required or a named function, 20 prompts give calls
whose arguments validate (jsonschema) against the function's parameters; a whole round trip
(call -> tool message -> final answer) works, streamed and not; with auto, any call the model
makes is valid. Cheap: short max_tokens, requests sent together (the engine batches them)."""

from __future__ import annotations

import json
from concurrent.futures import ThreadPoolExecutor
from typing import Literal

import jsonschema
import openai
import pydantic
import pytest

from tests.server.test_openai import MODEL, base_url, oai, server  # noqa: F401 (fixtures)

WEATHER = {
    "name": "get_weather",
    "description": "The current weather in a city",
    "parameters": {
        "type": "object",
        "properties": {
            "city": {"type": "string", "maxLength": 30},
            "unit": {"type": "string", "enum": ["celsius", "fahrenheit"]},
        },
        "required": ["city"],
    },
}
FUNCTIONS = [
    WEATHER,
    {
        "name": "get_time",
        "description": "The current time in a time zone",
        "parameters": {
            "type": "object",
            "properties": {"timezone": {"type": "string", "maxLength": 30}},
            "required": ["timezone"],
        },
    },
    {
        "name": "convert_currency",
        "description": "Convert money between currencies",
        "parameters": {
            "type": "object",
            "properties": {
                "amount": {"type": "integer", "minimum": 0, "maximum": 1000000},
                "from_currency": {"type": "string", "pattern": "^[A-Z]{3}$"},
                "to_currency": {"type": "string", "pattern": "^[A-Z]{3}$"},
            },
            "required": ["amount", "from_currency", "to_currency"],
        },
    },
    {
        "name": "set_thermostat",
        "description": "Set the home thermostat",
        "parameters": {
            "type": "object",
            "properties": {
                "temperature": {"type": "integer", "minimum": 10, "maximum": 30},
                "mode": {"type": "string", "enum": ["heat", "cool", "off"]},
            },
            "required": ["temperature", "mode"],
        },
    },
]
TOOLS = [{"type": "function", "function": function} for function in FUNCTIONS]
SCHEMAS = {function["name"]: function["parameters"] for function in FUNCTIONS}

# 20 prompts, each offered its function and the next one (short prompts: the embedded model
# reads the tools' schemas in every prompt); tool_choice "required", or the function named.
PROMPTS = [
    ("What's the weather like in Paris?", "get_weather", False),
    ("Is it raining in London right now?", "get_weather", True),
    ("What time is it in Tokyo?", "get_time", False),
    ("Tell me the current time in New York.", "get_time", True),
    ("How much is 100 US dollars in euros?", "convert_currency", False),
    ("Convert 250 GBP to JPY.", "convert_currency", True),
    ("Set the heating to 21 degrees.", "set_thermostat", False),
    ("Turn the air conditioning on at 19 degrees.", "set_thermostat", True),
    ("Should I take an umbrella in Berlin today?", "get_weather", True),
    ("What is the temperature in Rome in fahrenheit?", "get_weather", False),
    ("What time is it in Sydney?", "get_time", True),
    ("I have 40 CHF, how many dollars is that?", "convert_currency", True),
    ("It's too cold in here.", "set_thermostat", True),
    ("Is it sunny in Madrid?", "get_weather", False),
    ("Is it late in Moscow now?", "get_time", False),
    ("Change 5000 yen into euros.", "convert_currency", False),
    ("Switch the thermostat off.", "set_thermostat", False),
    ("Weather forecast for Lisbon, please.", "get_weather", True),
    ("Tell me a joke.", "get_time", True),  # no tool fits: still a valid call
    ("Hello!", "set_thermostat", False),
]
NAMES = [function["name"] for function in FUNCTIONS]


def offered(name: str) -> list[dict]:
    """The function `name` and the next one."""
    at = NAMES.index(name)
    return [TOOLS[at], TOOLS[(at + 1) % len(TOOLS)]]


def assert_valid(call, names=tuple(SCHEMAS)):
    assert call.type == "function" and call.id.startswith("call_")
    assert call.function.name in names
    jsonschema.validate(json.loads(call.function.arguments), SCHEMAS[call.function.name])


def ask(oai, question, name, named):  # noqa: F811
    tools = offered(name)
    tool_choice = {"type": "function", "function": {"name": name}} if named else "required"
    answer = oai.chat.completions.create(
        model=MODEL,
        messages=[{"role": "user", "content": question}],
        tools=tools,
        tool_choice=tool_choice,
        parallel_tool_calls=False,
        temperature=0,
        max_tokens=60,
    ).choices[0]
    return answer, [name] if named else [tool["function"]["name"] for tool in tools]


def test_required_and_named_choices_give_valid_calls(oai):  # noqa: F811
    with ThreadPoolExecutor(8) as pool:
        answers = list(pool.map(lambda prompt: ask(oai, *prompt), PROMPTS))
    for (question, _, _), (answer, names) in zip(PROMPTS, answers, strict=True):
        assert answer.finish_reason == "tool_calls", (question, answer)
        assert answer.message.content is None
        (call,) = answer.message.tool_calls  # parallel_tool_calls false: exactly one
        assert_valid(call, names)


def test_parallel_calls_are_each_valid(oai):  # noqa: F811
    answer = oai.chat.completions.create(
        model=MODEL,
        messages=[{"role": "user", "content": "Weather in Oslo and the time in Lima?"}],
        tools=TOOLS[:2],
        tool_choice="required",
        temperature=0,
        max_tokens=80,
    ).choices[0]
    assert answer.message.tool_calls and answer.finish_reason in ("tool_calls", "length")
    for call in answer.message.tool_calls:
        assert_valid(call)


def test_auto_calls_are_valid(oai):  # noqa: F811
    answers = oai.chat.completions.create(
        model=MODEL,
        messages=[{"role": "user", "content": "What's the weather in Madrid?"}],
        tools=TOOLS[:2],
        n=6,
        seed=15,
        temperature=1.0,
        max_tokens=40,
    ).choices
    for answer in answers:
        if answer.message.content is not None:
            assert "<tool_call>" not in answer.message.content
        for call in answer.message.tool_calls or []:
            assert_valid(call)


def streamed(oai, **request):  # noqa: F811
    """A streamed answer as the client rebuilds it (its stream helper)."""
    with oai.chat.completions.stream(**request) as stream:
        return stream.get_final_completion().choices[0]


@pytest.mark.parametrize("stream", [False, True], ids=["whole", "streamed"])
def test_a_round_trip(oai, stream):  # noqa: F811
    """The model calls get_weather; the caller runs it and sends the result back (the
    assistant message as the client rebuilt it, streamed or not); the model answers from
    it."""
    send = streamed if stream else (lambda oai, **r: oai.chat.completions.create(**r).choices[0])
    asked = [{"role": "user", "content": "What's the weather in Paris?"}]
    request = {
        "model": MODEL,
        "tools": TOOLS[:2],
        "parallel_tool_calls": False,  # the model would go on calling until max_tokens
        "temperature": 0,
        "max_tokens": 40,
    }
    called = send(oai, messages=asked, tool_choice="required", **request)
    assert called.finish_reason == "tool_calls"
    for call in called.message.tool_calls:
        assert_valid(call)
    result = {"temperature": 21, "unit": "celsius", "sky": "sunny"}
    history = [
        *asked,
        called.message.model_dump(exclude_none=True),
        *[
            {"role": "tool", "tool_call_id": made.id, "content": json.dumps(result)}
            for made in called.message.tool_calls
        ],
    ]
    answer = send(oai, messages=history, **request)  # tool_choice auto
    assert answer.finish_reason in ("stop", "length") and not answer.message.tool_calls
    assert answer.message.content.strip() and "<tool_call>" not in answer.message.content


class Reminder(pydantic.BaseModel):
    """Set a reminder."""

    text: str = pydantic.Field(max_length=30)
    minutes: int = pydantic.Field(ge=1, le=600)
    priority: Literal["low", "high"]


def test_pydantic_tools_parse(oai):  # noqa: F811
    """openai.pydantic_function_tool: a strict function from a pydantic model; parse() reads
    the call's arguments back into the model."""
    answer = oai.chat.completions.parse(
        model=MODEL,
        messages=[{"role": "user", "content": "Remind me to call mum in an hour."}],
        tools=[openai.pydantic_function_tool(Reminder)],
        tool_choice="required",
        parallel_tool_calls=False,
        temperature=0,
        max_tokens=80,
    ).choices[0]
    (call,) = answer.message.tool_calls[:1]
    assert isinstance(call.function.parsed_arguments, Reminder)
