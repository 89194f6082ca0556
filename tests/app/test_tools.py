"""Tool calling through /v1/chat/completions (tursi.api.tools, docs/tools.md), in process,
on tiny random models with a long context: "toolful" has a chat template that renders tools
(they reach the prompt through it), "plain" one that ignores them (the fallback prompt).

What the request may carry and the 400s; tool_choice "none" changes nothing; tool turns
render the same for chat and /api/v1/tokenize. With the engine's constrained decoding: the
answers of tool_choice required / a named function are valid calls (jsonschema), whatever
the random model would have written; auto's calls too; a stream's deltas rebuild the
non-streamed answer, for the openai SDK too."""

from __future__ import annotations

import json

import httpx2
import jsonschema
import openai
import pytest

from tests.helpers import API, CHAT_TEMPLATE, build_llama, load_and_wait, sse_data, write_catalog
from tests.openai_spec import validator
from tursi import create_app

# Renders tools and tool turns, as the templates of models trained on calls do.
TOOL_TEMPLATE = (
    "{% if tools %}tools: {% for t in tools %}{{ t.function.name }}"
    "{{ t.function.parameters | tojson }} {% endfor %}\n{% endif %}"
    "{% for m in messages %}{{ m.role }}: {{ m.content }}"
    "{% for c in m.tool_calls or [] %}<tool_call>{{ c.function | tojson }}</tool_call>"
    "{% endfor %}\n{% endfor %}{% if add_generation_prompt %}assistant:{% endif %}"
)
WEATHER = {
    "name": "get_weather",
    "description": "The weather in a city",
    "parameters": {
        "type": "object",
        "properties": {
            "city": {"type": "string", "maxLength": 6},
            "unit": {"enum": ["c", "f"]},
        },
        "required": ["city", "unit"],
    },
}
LEVEL = {
    "name": "set_level",
    "parameters": {
        "type": "object",
        "properties": {
            "level": {"type": "integer", "minimum": 1, "maximum": 9},
            "loud": {"type": "boolean"},
            "tags": {"type": "array", "items": {"enum": ["a", "b"]}, "maxItems": 2},
        },
        "required": ["level"],
    },
}
TOOLS = [{"type": "function", "function": WEATHER}, {"type": "function", "function": LEVEL}]
SCHEMAS = {"get_weather": WEATHER["parameters"], "set_level": LEVEL["parameters"]}
USER = [{"role": "user", "content": "lazy dog"}]
CALLED = {
    "id": "call_1",
    "type": "function",
    "function": {"name": "get_weather", "arguments": '{"city": "Paris", "unit": "c"}'},
}
HISTORY = [
    *USER,
    {"role": "assistant", "content": None, "tool_calls": [CALLED]},
    {"role": "tool", "tool_call_id": "call_1", "content": "sunny"},
]


@pytest.fixture(scope="module")
def app(tmp_path_factory):
    root = tmp_path_factory.mktemp("tools")
    models = {}
    for name, template in (("toolful", TOOL_TEMPLATE), ("plain", CHAT_TEMPLATE)):
        folder = build_llama(root / name, max_position_embeddings=4096)
        config_path = folder / "tokenizer_config.json"
        config = json.loads(config_path.read_text())
        config_path.write_text(json.dumps({**config, "chat_template": template}))
        models[name] = {"path": str(folder), "dtype": "float32"}
    catalog = write_catalog(root / "models.json", models)
    app = create_app(
        {
            "preload": [],
            "home": str(root / "home"),
            "models_file": str(catalog),
            "rate_limit": "100000/minute",
        }
    )
    app.config["TESTING"] = True
    client = app.test_client()
    for name in models:
        assert load_and_wait(client, name)["status"] == "loaded"
    yield app
    app.extensions["tursi"].manager.shutdown()


@pytest.fixture
def client(app):
    return app.test_client()


def chat(client, model="toolful", **body):
    body = {"model": model, "messages": USER, "max_tokens": 4, "temperature": 0, **body}
    return client.post("/v1/chat/completions", json=body)


def ok(response):
    assert response.status_code == 200, response.get_data(as_text=True)
    return response.get_json()


def deep(levels: int) -> dict:
    schema: dict = {"type": "object"}
    for _ in range(levels):
        schema = {"type": "object", "properties": {"a": schema}}
    return schema


def tool(name="f", **function):
    return {"type": "function", "function": {"name": name, **function}}


@pytest.mark.parametrize(
    "body, param, words",
    [
        ({"tools": [{"type": "custom", "custom": {"name": "f"}}]}, "tools", '"function" tools'),
        ({"tools": [tool("get weather")]}, "tools", "letters, digits"),
        ({"tools": [tool("f" * 65)]}, "tools", "1 to 64"),
        ({"tools": [tool(), tool()]}, "tools", "unique: f"),
        ({"tools": [tool(parameters={"type": "array"})]}, "tools", '"type": "object"'),
        ({"tools": [tool(parameters=[1])]}, "tools", "mapping"),
        ({"tools": [tool(parameters=deep(40))]}, "tools", "nested at most 64"),
        ({"tools": [tool(description=7)]}, "tools", "Not a valid string"),
        ({"tools": [tool(), tool("g")] * 65}, "tools", "Longer than maximum length 128"),
        ({"tool_choice": "required"}, "tool_choice", "needs tools"),
        ({"tools": TOOLS, "tool_choice": "sometimes"}, "tool_choice", "must be one of"),
        (
            {"tools": TOOLS, "tool_choice": {"type": "function", "function": {"name": "f"}}},
            "tool_choice",
            '"f" is none of the tools',
        ),
        (
            {"tools": TOOLS, "tool_choice": {"type": "allowed_tools", "allowed_tools": {}}},
            "tool_choice",
            "not supported",
        ),
        ({"tools": TOOLS, "parallel_tool_calls": "yes"}, "parallel_tool_calls", "boolean"),
        ({"functions": [{"name": "f"}]}, "functions", "use tools"),
        ({"function_call": "auto"}, "function_call", "use tools"),
        (
            {"messages": [*USER, {"role": "tool", "content": "x"}]},
            "messages",
            "Missing data",
        ),
        (
            {"messages": [*USER, {"role": "tool", "content": "x", "tool_call_id": "c9"}]},
            "messages",
            "answers no tool call",
        ),
        (
            {"messages": [{"role": "tool", "content": "x", "tool_call_id": "call_1"}, *HISTORY]},
            "messages",
            "answers no tool call",  # a result before its call
        ),
        (
            {"messages": [{"role": "user", "content": "x", "tool_calls": [CALLED]}]},
            "messages",
            "only assistant messages",
        ),
        (
            {"messages": [{"role": "user", "content": "x", "tool_call_id": "c"}]},
            "messages",
            "only tool",
        ),
        ({"messages": [{"role": "assistant", "content": None}]}, "messages", "null only with"),
        (
            {"messages": [{"role": "assistant", "tool_calls": [{**CALLED, "type": "x"}]}]},
            "messages",
            '"function" tools',
        ),
        (
            {"messages": [{"role": "assistant", "tool_calls": [{"id": "c", "type": "function"}]}]},
            "messages",
            "Missing data",
        ),
    ],
)
def test_what_tool_calling_refuses(client, body, param, words):
    response = chat(client, **body)
    assert response.status_code == 400, response.get_data(as_text=True)
    error = response.get_json()["error"]
    assert error["param"] == param and words in error["message"], error
    assert response.headers["x-should-retry"] == "false"


def test_the_grammar_of_the_calls_is_bounded(client):
    """Parameters whose calls' grammar would be over the engine's bound: a 400 naming tools
    (not the structured_outputs field the client never sent). Only the callable functions
    count: one of them named passes (and its prompt is then too long for the model)."""
    properties = {f"p{i}": {"type": "string", "maxLength": 5} for i in range(400)}
    many = [
        tool(f"f{i}", parameters={"type": "object", "properties": properties}) for i in range(3)
    ]
    error = chat(client, tools=many).get_json()["error"]
    assert error["param"] == "tools" and "at most 32768" in error["message"], error
    named = {"type": "function", "function": {"name": "f1"}}
    error = chat(client, tools=many, tool_choice=named).get_json()["error"]
    assert error["code"] == "context_length_exceeded", error


@pytest.mark.parametrize("model", ["toolful", "plain"])
def test_tool_choice_none_shows_no_tools_and_changes_nothing(client, model):
    plain = ok(chat(client, model))
    unused = ok(chat(client, model, tools=TOOLS, tool_choice="none", parallel_tool_calls=False))
    assert unused["choices"] == plain["choices"]
    assert unused["usage"] | {"prompt_tokens_details": None} == plain["usage"] | {
        "prompt_tokens_details": None
    }  # the same prompt: the second is served from the prefix cache, only that differs
    offered = ok(chat(client, model, tools=TOOLS, max_tokens=1))  # auto: described
    assert offered["usage"]["prompt_tokens"] > plain["usage"]["prompt_tokens"] + 20


@pytest.mark.parametrize("model", ["toolful", "plain"])
def test_tool_turns_render_the_same_for_chat_and_tokenize(client, model):
    answered = ok(chat(client, model, messages=HISTORY))
    counted = ok(client.post(f"{API}/tokenize", json={"model": model, "messages": HISTORY}))
    assert answered["usage"]["prompt_tokens"] == len(counted["tokens"])
    plain = ok(chat(client, model, messages=[*USER, {"role": "assistant", "content": "x"}]))
    assert answered["usage"]["prompt_tokens"] > plain["usage"]["prompt_tokens"] + 10
    content_list = [{**HISTORY[2], "content": [{"type": "text", "text": "sunny"}]}]
    again = ok(chat(client, model, messages=[*HISTORY[:2], *content_list]))
    # the same prompt tokens (the second is served from the prefix cache: only that differs)
    assert again["usage"] | {"prompt_tokens_details": None} == answered["usage"] | {
        "prompt_tokens_details": None
    }


# --- with the engine's constrained decoding -------------------------------------------------


def assert_valid(call, names=tuple(SCHEMAS)):
    assert call["type"] == "function" and call["id"].startswith("call_")
    name = call["function"]["name"]
    assert name in names
    jsonschema.validate(json.loads(call["function"]["arguments"]), SCHEMAS[name])


@pytest.mark.parametrize("model", ["toolful", "plain"])
@pytest.mark.parametrize(
    "choice, parallel",
    [("required", True), ("required", False), ("set_level", True), ("get_weather", False)],
)
def test_required_and_named_answers_are_valid_calls(client, model, choice, parallel):
    named = choice not in ("required",)
    tool_choice = {"type": "function", "function": {"name": choice}} if named else choice
    body = ok(
        chat(
            client,
            model,
            tools=TOOLS,
            tool_choice=tool_choice,
            parallel_tool_calls=parallel,
            n=4,
            temperature=1.0,
            seed=15,
            max_tokens=300,  # a call is up to ~90 tokens of the tiny tokenizer
        )
    )
    for answer in body["choices"]:
        message = answer["message"]
        assert message["content"] is None
        calls = message["tool_calls"]
        for call in calls:
            assert_valid(call, [choice] if named else tuple(SCHEMAS))
        if parallel:  # the random model may go on calling until max_tokens
            assert calls and answer["finish_reason"] in ("tool_calls", "length")
        else:
            assert len(calls) == 1 and answer["finish_reason"] == "tool_calls"


@pytest.mark.parametrize("model", ["toolful", "plain"])
def test_auto_calls_are_valid_and_text_is_content(client, model):
    body = ok(chat(client, model, tools=TOOLS, n=8, temperature=1.0, seed=3, max_tokens=60))
    for answer in body["choices"]:
        message = answer["message"]
        if message["content"] is not None:
            assert "<tool_call>" not in message["content"] and "tool_calls" not in message
        for call in message.get("tool_calls", []):
            assert_valid(call)


def streamed(client, **body):
    response = client.post(
        "/v1/chat/completions",
        json={"messages": USER, "temperature": 0, "stream": True, **body},
    )
    assert response.status_code == 200, response.get_data(as_text=True)
    payloads = sse_data(response.get_data(as_text=True))
    assert payloads[-1] == "[DONE]"
    return [json.loads(payload) for payload in payloads[:-1]]


def rebuilt(chunks):
    """A streamed answer as the openai SDK accumulates it: content, tool calls by index,
    the finish_reason, the logprobs."""
    content, calls, finish, logprobs = None, {}, None, []
    for chunk in chunks:
        if not chunk["choices"]:
            continue
        (choice,) = chunk["choices"]
        delta = choice["delta"]
        if "content" in delta:
            content = (content or "") + delta["content"]
        for call in delta.get("tool_calls", []):
            assert set(call) == {"index", "id", "type", "function"}  # whole, in one delta
            assert call["index"] not in calls
            calls[call["index"]] = {key: call[key] for key in ("id", "type", "function")}
        finish = choice["finish_reason"] or finish
        if choice["logprobs"]:
            logprobs += choice["logprobs"]["content"]
    return content, [calls[i] for i in sorted(calls)], finish, logprobs


def without_ids(calls):
    return [call["function"] for call in calls]


@pytest.mark.parametrize("model", ["toolful", "plain"])
@pytest.mark.parametrize("tool_choice", ["required", "auto"])
def test_a_streamed_answer_rebuilds_the_whole_one(client, model, tool_choice):
    body = {
        "model": model,
        "tools": TOOLS,
        "tool_choice": tool_choice,
        "max_tokens": 200,
        "logprobs": True,
    }
    answered = ok(chat(client, **body))
    validator("CreateChatCompletionResponse").validate(answered)  # OpenAI's own schema
    whole = answered["choices"][0]
    chunks = streamed(client, **body)
    for chunk in chunks:
        validator("CreateChatCompletionStreamResponse").validate(chunk)
    assert chunks[0]["choices"][0]["delta"] == {"role": "assistant"}  # no content yet
    content, calls, finish, logprobs = rebuilt(chunks)
    assert content == whole["message"]["content"]
    assert without_ids(calls) == without_ids(whole["message"].get("tool_calls", []))
    assert finish == whole["finish_reason"]
    # The same tokens; their logprobs to float32 precision: whether a step verified
    # speculative drafts (a wider forward, other matmul shapes) depends on measured times.
    assert [entry["token"] for entry in logprobs] == [
        entry["token"] for entry in whole["logprobs"]["content"]
    ]
    assert [entry["logprob"] for entry in logprobs] == pytest.approx(
        [entry["logprob"] for entry in whole["logprobs"]["content"]], abs=1e-5
    )


def test_a_schema_the_engine_cannot_use_is_a_400_naming_tools(client):
    odd = tool(parameters={"type": "object", "properties": {"a": {"format": "nonsense"}}})
    response = chat(client, tools=[odd], tool_choice="required")
    assert response.status_code == 400
    error = response.get_json()["error"]
    assert error["param"] == "tools" and error["message"].startswith("tools: ")
    assert "nonsense" in error["message"]


def test_the_openai_sdk_reads_the_calls_whole_and_streamed(app):
    http = httpx2.Client(transport=httpx2.WSGITransport(app=app), base_url="http://tursi")
    with openai.OpenAI(base_url="http://tursi/v1", api_key="none", http_client=http) as sdk:
        asked = {
            "model": "plain",
            "messages": USER,
            "tools": TOOLS,
            "tool_choice": {"type": "function", "function": {"name": "get_weather"}},
            "parallel_tool_calls": False,
            "temperature": 0,
            "max_tokens": 200,
        }
        whole = sdk.chat.completions.create(**asked).choices[0]
        assert whole.finish_reason == "tool_calls" and whole.message.content is None
        (call,) = whole.message.tool_calls
        assert call.function.name == "get_weather"
        jsonschema.validate(json.loads(call.function.arguments), WEATHER["parameters"])
        with sdk.chat.completions.stream(**asked) as stream:
            final = stream.get_final_completion().choices[0]
        assert final.finish_reason == "tool_calls"
        (again,) = final.message.tool_calls
        assert (again.function.name, again.function.arguments) == (
            call.function.name,
            call.function.arguments,
        )
        # The round trip: the call and its result sent back, the model answers.
        history = [
            *USER,
            whole.message.model_dump(exclude_none=True),
            {"role": "tool", "tool_call_id": call.id, "content": "sunny"},
        ]
        answer = sdk.chat.completions.create(
            **{**asked, "messages": history, "tool_choice": "none"}
        ).choices[0]
        assert answer.message.tool_calls is None and isinstance(answer.message.content, str)


def test_auto_tools_and_a_structured_output_are_one_or_the_other(client):
    for asked in (
        {"response_format": {"type": "json_object"}},
        {"structured_outputs": {"regex": "[a-z]+"}},
    ):
        response = chat(client, tools=TOOLS, **asked)
        assert response.status_code == 400, response.get_data(as_text=True)
        assert response.get_json()["error"]["param"] == "tool_choice"


def test_required_tools_answer_calls_whatever_the_response_format(client):
    body = ok(
        chat(
            client,
            tools=TOOLS,
            tool_choice="required",
            parallel_tool_calls=False,
            response_format={"type": "json_object"},
            max_tokens=300,
        )
    )
    (answer,) = body["choices"]
    assert answer["finish_reason"] == "tool_calls"
    (call,) = answer["message"]["tool_calls"]
    assert_valid(call)
