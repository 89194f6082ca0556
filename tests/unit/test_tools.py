"""Tool calling's own pieces (tursi.api.tools), checked against outside references: the
grammars compile with llguidance over the embedded model's tokenizer and take exactly the
answers tool_choice allows; answers drawn at random under them read back as calls whose
arguments validate (jsonschema) against the function's parameters; the reader gives the same
content and calls streamed in any pieces as whole; prompts render through the real chat
templates (the embedded model's, which ignores `tools`, and one that renders them)."""

from __future__ import annotations

import json
import random
from types import SimpleNamespace

import jsonschema
import numpy as np
import pytest
from llguidance import LLMatcher
from llguidance.hf import from_tokenizer

from tursi.api.tools import CallReader, Tools, chat_prompt, closed, constraint, grammar, read
from tursi.engine.worker import ModelWorker

WEATHER = {
    "name": "get_weather",
    "description": "The weather in a city",
    "parameters": {
        "type": "object",
        "properties": {
            "city": {"type": "string", "maxLength": 20},
            "unit": {"enum": ["celsius", "fahrenheit"]},
        },
        "required": ["city"],
    },
}
BOUNDED = {
    "name": "set_level",
    "parameters": {
        "type": "object",
        "properties": {
            "level": {"type": "integer", "minimum": 1, "maximum": 10},
            "ratio": {"type": "number", "minimum": 0, "maximum": 1},
            "tags": {"type": "array", "items": {"type": "string", "maxLength": 8}, "maxItems": 3},
        },
        "required": ["level", "ratio"],
    },
}
# As pydantic writes a model with a nested one: $defs and a $ref from the root.
ORDER = {
    "name": "place_order",
    "parameters": {
        "$defs": {
            "Item": {
                "type": "object",
                "properties": {
                    "sku": {"type": "string", "pattern": "^[A-Z]{3}[0-9]{2}$"},
                    "quantity": {"type": "integer", "minimum": 1, "maximum": 9},
                },
                "required": ["sku", "quantity"],
            }
        },
        "type": "object",
        "properties": {
            "items": {"type": "array", "items": {"$ref": "#/$defs/Item"}, "minItems": 1},
            "express": {"type": "boolean"},
        },
        "required": ["items"],
    },
}
NOTHING = {"name": "get_time", "parameters": {"type": "object", "properties": {}}}
FUNCTIONS = [WEATHER, BOUNDED, ORDER, NOTHING]


def call(name: str, arguments: dict) -> str:
    return f"<tool_call>\n{json.dumps({'name': name, 'arguments': arguments})}\n</tool_call>"


PARIS = call("get_weather", {"city": "Paris"})
LEVEL = call("set_level", {"level": 3, "ratio": 0.5})


@pytest.fixture(scope="module")
def tokenizer():
    """The embedded model's tokenizer, from the GGUF its package ships (no download)."""
    from transformers import AutoTokenizer

    from tursi.engine.catalog import EMBEDDED_MODEL, Catalog
    from tursi.engine.loading.weights import embedded_gguf

    gguf = embedded_gguf(Catalog.load(None).get(EMBEDDED_MODEL))
    return AutoTokenizer.from_pretrained(gguf.parent, gguf_file=gguf.name)


@pytest.fixture(scope="module")
def ll_tokenizer(tokenizer):
    return from_tokenizer(tokenizer)


def matcher(ll_tokenizer, tools: Tools) -> LLMatcher:
    text = constraint(tools).value
    assert LLMatcher.validate_grammar(LLMatcher.grammar_from_lark(text), ll_tokenizer) == ""
    found = LLMatcher(ll_tokenizer, LLMatcher.grammar_from_lark(text), log_level=0)
    assert not found.is_error(), found.get_error()
    return found


def accepts(tokenizer, ll_tokenizer, tools: Tools, text: str) -> bool:
    """Whether the grammar takes `text` whole (tokenized as the tokenizer would)."""
    found = matcher(ll_tokenizer, tools)
    for token in tokenizer.encode(text, add_special_tokens=False):
        if not found.consume_token(token):
            return False
    return found.is_accepting()


def test_the_constraint_is_a_grammar_and_none_without_tools():
    assert constraint(None) is None
    made = constraint(Tools([WEATHER], "required"))
    assert made.kind == "grammar" and made.value == grammar(Tools([WEATHER], "required"))
    assert made.value.startswith("%llguidance {}\n")  # Lark for llguidance, not GBNF


@pytest.mark.parametrize(
    "tools, text, accepted",
    [
        # required: calls of any of the functions, nothing else
        (Tools(FUNCTIONS, "required"), PARIS, True),
        (Tools(FUNCTIONS, "required"), PARIS + "\n" + LEVEL, True),
        (Tools(FUNCTIONS, "required"), call("get_time", {}), True),
        (Tools(FUNCTIONS, "required"), "It is sunny.", False),
        (Tools(FUNCTIONS, "required"), "", False),
        (Tools(FUNCTIONS, "required"), call("get_moon", {}), False),  # no such function
        (Tools(FUNCTIONS, "required"), call("get_weather", {"unit": "celsius"}), False),
        (Tools(FUNCTIONS, "required"), call("get_weather", {"city": "P", "unit": "k"}), False),
        (Tools(FUNCTIONS, "required"), call("get_weather", {"city": "P", "x": 1}), False),
        (Tools(FUNCTIONS, "required"), call("get_time", {"x": 1}), False),
        (Tools(FUNCTIONS, "required"), call("set_level", {"level": 11, "ratio": 0}), False),
        (Tools(FUNCTIONS, "required"), call("set_level", {"level": 1.5, "ratio": 0}), False),
        (Tools(FUNCTIONS, "required"), call("set_level", {"level": 1, "ratio": 2}), False),
        (
            Tools(FUNCTIONS, "required"),
            call("place_order", {"items": [{"sku": "ABC12", "quantity": 2}], "express": True}),
            True,
        ),
        (
            Tools(FUNCTIONS, "required"),
            call("place_order", {"items": [{"sku": "abc12", "quantity": 2}]}),
            False,
        ),
        (Tools(FUNCTIONS, "required"), call("place_order", {"items": []}), False),
        # JSON in the call format only: no free whitespace, json.dumps' separators
        (Tools(FUNCTIONS, "required"), PARIS.replace('": "', '":"'), False),
        (Tools(FUNCTIONS, "required"), PARIS.replace("{", "{ ", 1), False),
        (Tools(FUNCTIONS, "required"), " " + PARIS, False),
        # parallel_tool_calls false: exactly one call
        (Tools(FUNCTIONS, "required", parallel=False), PARIS, True),
        (Tools(FUNCTIONS, "required", parallel=False), PARIS + "\n" + LEVEL, False),
        # a named function: its calls only
        (Tools(FUNCTIONS, "function", "set_level"), LEVEL, True),
        (Tools(FUNCTIONS, "function", "set_level"), LEVEL + "\n" + LEVEL, True),
        (Tools(FUNCTIONS, "function", "set_level"), PARIS, False),
        (Tools(FUNCTIONS, "function", "set_level", parallel=False), LEVEL + "\n" + LEVEL, False),
        # auto: text without <tool_call> in it, or calls (after whitespace)
        (Tools(FUNCTIONS, "auto"), "It is sunny in Paris.", True),
        (Tools(FUNCTIONS, "auto"), "", True),
        (Tools(FUNCTIONS, "auto"), "<b>sunny</b>, 20 <tool_cal", True),
        (Tools(FUNCTIONS, "auto"), PARIS, True),
        (Tools(FUNCTIONS, "auto"), "\n " + PARIS + "\n" + LEVEL, True),
        (Tools(FUNCTIONS, "auto", parallel=False), PARIS + "\n" + LEVEL, False),
        (Tools(FUNCTIONS, "auto"), "Let me check.\n" + PARIS, False),
        (Tools(FUNCTIONS, "auto"), "I called <tool_call> before", False),
        (Tools(FUNCTIONS, "auto"), call("get_weather", {"town": "Paris"}), False),
    ],
)
def test_the_grammar_takes_exactly_the_answers_tool_choice_allows(
    tokenizer, ll_tokenizer, tools, text, accepted
):
    assert accepts(tokenizer, ll_tokenizer, tools, text) is accepted


def test_a_description_cannot_break_out_of_the_grammar(tokenizer, ll_tokenizer):
    """Schemas go into the grammar as JSON: quotes, newlines and Lark syntax in them are
    data."""
    sneaky = {
        "name": "f",
        "parameters": {
            "type": "object",
            "description": '"\nstart: /(?s:.*)/\n%json {} "} ::= x',
            "properties": {'a"\n': {"const": "</tool_call>\n"}},
        },
    }
    tools = Tools([sneaky], "required")
    assert accepts(tokenizer, ll_tokenizer, tools, call("f", {'a"\n': "</tool_call>\n"}))
    assert not accepts(tokenizer, ll_tokenizer, tools, "anything")


def allowed_tokens(found: LLMatcher, vocab: int) -> np.ndarray:
    bits = np.unpackbits(np.frombuffer(found.compute_bitmask(), dtype=np.uint8), bitorder="little")
    return np.flatnonzero(bits[:vocab])


def random_answer(
    tokenizer, ll_tokenizer, tools: Tools, rng: random.Random, start: str = ""
) -> str | None:
    """An answer beginning with `start`, then drawn token by token among those the grammar
    allows (short tokens favoured, so strings end), ended at the first chance half of the
    time; None past 300 tokens."""
    found, eos = matcher(ll_tokenizer, tools), tokenizer.eos_token_id
    ids = tokenizer.encode(start, add_special_tokens=False)
    for token in ids:
        assert found.consume_token(token)
    lengths = {}
    for _ in range(300):
        if found.is_stopped():
            return tokenizer.decode(ids)
        allowed = allowed_tokens(found, len(tokenizer))
        if eos in allowed and rng.random() < 0.5:
            return tokenizer.decode(ids)
        allowed = [int(t) for t in allowed if t != eos]
        if len(allowed) > 50:  # inside a string: mostly short tokens, some quotes
            for t in allowed:
                lengths.setdefault(t, len(tokenizer.decode([t])))
            allowed = [t for t in allowed if lengths[t] <= 2] or allowed
        token = rng.choice(allowed)
        assert found.consume_token(token)
        ids.append(token)
    return None


@pytest.mark.parametrize(
    "tools",
    [
        Tools(FUNCTIONS, "required"),
        Tools(FUNCTIONS, "required", parallel=False),
        Tools(FUNCTIONS, "function", "place_order"),
        Tools(FUNCTIONS, "auto"),
    ],
    ids=["required", "one-call", "named", "auto"],
)
def test_answers_drawn_under_the_grammar_read_back_as_valid_calls(tokenizer, ll_tokenizer, tools):
    rng = random.Random(15)
    schemas = {function["name"]: function["parameters"] for function in FUNCTIONS}
    starts = ["", "<tool_call>"] if tools.choice == "auto" else [""]  # auto: calls too
    answers = [
        random_answer(tokenizer, ll_tokenizer, tools, rng, starts[i % len(starts)])
        for i in range(12)
    ]
    finished = [answer for answer in answers if answer is not None]
    assert len(finished) >= 8
    made = 0
    for answer in finished:
        content, calls = read(answer)
        if content is not None:  # auto's text
            assert tools.choice == "auto" and "<tool_call>" not in content
            continue
        assert calls and (tools.parallel or len(calls) == 1), answer
        for made_call in calls:
            name = made_call["function"]["name"]
            assert tools.name in (None, name)
            arguments = json.loads(made_call["function"]["arguments"])
            jsonschema.validate(arguments, schemas[name])
            made += 1
    assert made >= (4 if tools.choice == "auto" else 8)


# --- reading -----------------------------------------------------------------------------


def pieces(text: str, size: int) -> list[str]:
    return [text[i : i + size] for i in range(0, len(text), size)] or [""]


@pytest.mark.parametrize(
    "text, content, names",
    [
        ("It is sunny.", "It is sunny.", []),
        ("", "", []),
        ("  <tool_ca", "  <tool_ca", []),  # never became a call: content
        ("<b>bold</b>", "<b>bold</b>", []),
        (PARIS, None, ["get_weather"]),
        ("\n" + PARIS + "\n" + LEVEL, None, ["get_weather", "set_level"]),
        (PARIS + "\n<tool_call>\n" + '{"name": "set_level", "argu', None, ["get_weather"]),
        (call("echo", {"text": "</tool_call>"}), None, ["echo"]),
    ],
)
def test_the_reader_gives_the_same_answer_whole_and_in_any_pieces(text, content, names):
    whole = read(text)
    assert whole[0] == content
    assert [c["function"]["name"] for c in whole[1]] == names
    for size in (1, 2, 5, 13):
        reader, texts, calls = CallReader(), [], []
        for piece in pieces(text, size):
            more_text, more_calls = reader.feed(piece)
            texts.append(more_text)
            calls += more_calls
        texts.append(reader.close())
        assert (None if reader.calling else "".join(texts)) == content
        assert [c["function"] for c in calls] == [c["function"] for c in whole[1]]
        assert reader.calls == len(names)


def test_calls_are_answered_as_openai_answers_them():
    content, calls = read(call("get_weather", {"city": "Zürich", "unit": "celsius"}))
    assert content is None
    (made,) = calls
    assert set(made) == {"id", "type", "function"} and made["type"] == "function"
    assert made["id"].startswith("call_") and len(made["id"]) == 29
    assert made["function"]["name"] == "get_weather"
    assert json.loads(made["function"]["arguments"]) == {"city": "Zürich", "unit": "celsius"}
    assert read(PARIS)[1][0]["id"] != read(PARIS)[1][0]["id"]


def test_text_is_released_as_soon_as_it_cannot_be_a_call():
    reader = CallReader()
    assert reader.feed(" \n") == ("", [])
    assert reader.feed("<tool") == ("", [])
    assert reader.feed("s are") == (" \n<tools are", [])
    assert reader.feed(" here") == (" here", [])
    reader = CallReader()
    assert reader.feed(PARIS[:-3]) == ("", [])
    text, calls = reader.feed(PARIS[-3:])
    assert text == "" and [c["function"]["name"] for c in calls] == ["get_weather"]


# --- closing objects ---------------------------------------------------------------------


def test_closed_objects_take_no_made_up_keys_unless_the_schema_allows_them():
    schema = {
        "type": "object",
        "properties": {
            "a": {"type": "object", "properties": {"b": {"type": "string"}}},
            "free": {"type": "object", "properties": {}, "additionalProperties": True},
            "any": {"type": "object"},
            "list": {"type": "array", "items": {"properties": {"c": {}}}},
            "ref": {"$ref": "#/$defs/D"},
        },
        "$defs": {"D": {"properties": {"d": {}}}},
    }
    shut = closed(schema)
    assert shut["additionalProperties"] is False
    assert shut["properties"]["a"]["additionalProperties"] is False
    assert shut["properties"]["free"]["additionalProperties"] is True
    assert "additionalProperties" not in shut["properties"]["any"]  # no properties listed
    assert shut["properties"]["list"]["items"]["additionalProperties"] is False
    assert shut["$defs"]["D"]["additionalProperties"] is False
    assert "additionalProperties" not in schema  # a copy
    ok = {"a": {"b": "x"}, "free": {"z": 1}, "any": {"z": 1}, "list": [{"c": 1}], "ref": {"d": 1}}
    jsonschema.validate(ok, shut)
    for made_up in ({**ok, "e": 1}, {**ok, "a": {"b": "x", "e": 1}}, {**ok, "ref": {"e": 1}}):
        jsonschema.validate(made_up, schema)
        with pytest.raises(jsonschema.ValidationError):
            jsonschema.validate(made_up, shut)


@pytest.mark.parametrize(
    "schema, value",
    [
        ({"properties": {"x": {}}, "allOf": [{"properties": {"y": {}}}]}, {"x": 1, "y": 2}),
        ({"allOf": [{"properties": {"x": {}}}, {"properties": {"y": {}}}]}, {"x": 1, "y": 2}),
        (
            {"properties": {"kind": {}}, "oneOf": [{"properties": {"a": {}}, "required": ["a"]}]},
            {"kind": 1, "a": 2},
        ),
        (
            {
                "$defs": {"D": {"properties": {"y": {}}}},
                "properties": {"x": {}},
                "$ref": "#/$defs/D",
            },
            {"x": 1, "y": 2},
        ),
        (  # through two $refs
            {
                "$defs": {"D": {"$ref": "#/$defs/E"}, "E": {"properties": {"y": {}}}},
                "properties": {"x": {}},
                "allOf": [{"$ref": "#/$defs/D"}],
            },
            {"x": 1, "y": 2},
        ),
    ],
)
def test_objects_whose_properties_come_from_elsewhere_stay_open(schema, value):
    jsonschema.validate(value, schema)
    jsonschema.validate(value, closed(schema))


def test_a_lone_ref_in_allof_is_no_merge():
    """pydantic v1 wraps a described nested model in allOf [{$ref}]: it stays closed."""
    schema = {
        "definitions": {"Item": {"properties": {"sku": {}}}},
        "properties": {"item": {"allOf": [{"$ref": "#/definitions/Item"}], "title": "x"}},
    }
    assert closed(schema)["definitions"]["Item"]["additionalProperties"] is False


# --- prompts -----------------------------------------------------------------------------

# A template that renders tools and tool turns, as Hermes-format models' templates do.
TOOL_TEMPLATE = (
    "{% if tools %}TOOLS {{ tools | tojson }}\n{% endif %}"
    "{% for m in messages %}{{ m.role }}: {{ m.content }}"
    "{% for c in m.tool_calls or [] %}[call {{ c.function.name }} "
    "{{ c.function.arguments | tojson }}]{% endfor %}"
    "{% if m.name %} (from {{ m.name }}){% endif %}\n{% endfor %}"
    "{% if add_generation_prompt %}assistant:{% endif %}"
)
# One that refuses any role but system, user and assistant, as some do.
STRICT_TEMPLATE = (
    "{% for m in messages %}{% if m.role not in ['system', 'user', 'assistant'] %}"
    "{{ raise_exception('unknown role') }}{% endif %}{{ m.role }}: {{ m.content }}\n"
    "{% endfor %}"
)

HISTORY = [
    {"role": "user", "content": "Weather in Paris?"},
    {
        "role": "assistant",
        "content": "",
        "tool_calls": [
            {
                "id": "call_1",
                "type": "function",
                "function": {"name": "get_weather", "arguments": '{"city": "Paris"}'},
            }
        ],
    },
    {"role": "tool", "tool_call_id": "call_1", "content": '{"sky": "sunny"}'},
]


def worker_with(tokenizer, template: str | None = None):
    """The real ModelWorker.chat_prompt over `tokenizer` (with `template` instead of its own)."""
    templated = tokenizer
    if template is not None:
        templated = SimpleNamespace(
            chat_template=template,
            apply_chat_template=lambda *a, **k: tokenizer.apply_chat_template(
                *a, **{**k, "chat_template": template}
            ),
        )
    loaded = SimpleNamespace(tokenizer=templated)
    fake = SimpleNamespace(name="m", _loaded=lambda: loaded)
    return SimpleNamespace(chat_prompt=lambda *a, **k: ModelWorker.chat_prompt(fake, *a, **k))


def test_without_tools_the_prompt_is_the_templates_own(tokenizer):
    worker = worker_with(tokenizer)
    messages = [{"role": "system", "content": "Be brief."}, {"role": "user", "content": "Hi"}]
    expected = tokenizer.apply_chat_template(messages, tokenize=False, add_generation_prompt=True)
    assert chat_prompt(worker, messages) == expected


def test_a_template_without_tools_gets_the_fallback_prompt(tokenizer):
    """SmolLM2's template ignores `tools`: they go in the system message, with the call
    format; earlier calls in the call format; results stay role "tool"."""
    worker = worker_with(tokenizer)
    tools = Tools([WEATHER, NOTHING], "auto")
    prompt = chat_prompt(worker, HISTORY, tools)
    system, rest = prompt.split("<|im_end|>\n", 1)
    assert system.startswith("<|im_start|>system\n")
    assert json.dumps({"type": "function", "function": WEATHER}) in system
    assert "<tool_call>\n" in system and "When no function is needed" in system
    assert rest == (
        "<|im_start|>user\nWeather in Paris?<|im_end|>\n"
        f"<|im_start|>assistant\n{PARIS}<|im_end|>\n"
        '<|im_start|>tool\n{"sky": "sunny"}<|im_end|>\n'
        "<|im_start|>assistant\n"
    )
    # An existing system message keeps its text, the tools after it.
    asked = [{"role": "system", "content": "Be brief."}, *HISTORY]
    assert chat_prompt(worker, asked, tools).startswith(
        "<|im_start|>system\nBe brief.\n\nYou can call functions"
    )
    # No tools offered (tool_choice none), history with calls: no tool list.
    assert "<tools>" not in chat_prompt(worker, HISTORY, None)
    assert PARIS in chat_prompt(worker, HISTORY, None)


@pytest.mark.parametrize(
    "tools, rule",
    [
        (Tools([WEATHER], "required"), "Answer with function calls only."),
        (Tools([WEATHER], "required", parallel=False), "Answer with one call."),
        (Tools([WEATHER], "function", "get_weather"), 'a call of the function "get_weather".'),
        (Tools([WEATHER], "auto", parallel=False), "Make at most one call."),
    ],
)
def test_the_fallback_prompt_says_what_tool_choice_asks(tokenizer, tools, rule):
    assert rule in chat_prompt(worker_with(tokenizer), HISTORY[:1], tools)


def test_results_become_user_turns_when_the_template_refuses_the_tool_role(tokenizer):
    worker = worker_with(tokenizer, STRICT_TEMPLATE)
    two = [*HISTORY, {"role": "tool", "tool_call_id": "call_1", "content": "more"}]
    prompt = chat_prompt(worker, two, Tools([WEATHER], "auto"))
    assert prompt.endswith(
        'user: <tool_response>\n{"sky": "sunny"}\n</tool_response>\n'
        "<tool_response>\nmore\n</tool_response>\n"
    )


def test_a_template_that_renders_tools_gets_them_and_the_turns_as_documented(tokenizer):
    worker = worker_with(tokenizer, TOOL_TEMPLATE)
    prompt = chat_prompt(worker, HISTORY, Tools([WEATHER], "function", "get_weather"))
    assert prompt.startswith('TOOLS [{"type": "function", "function": {"name": "get_weather"')
    assert 'assistant: [call get_weather {"city": "Paris"}]' in prompt  # an object, not text
    assert 'tool: {"sky": "sunny"} (from get_weather)' in prompt
    assert "You can call functions" not in prompt
    assert not chat_prompt(worker, HISTORY, None).startswith("TOOLS")
