"""POST /api/v1/generate: validation (400s with the field named, context length, limits)
and results (shape, greedy, seeds, stop strings), on the tiny models."""

import pytest
import torch

from tests.helpers import (
    API,
    SECONDS,
    TINY_CONTEXT,
    assert_error,
    generate,
    generate_ok,
    load_and_wait,
    metrics,
    stream,
    streamed_text,
)


def test_generate_on_a_model_that_is_not_loaded(client):
    error = assert_error(generate(client, prompt="hi"), 409, "model_not_loaded")
    assert error["details"]["status"] == "not_loaded"
    assert error["details"]["hint"] == "POST /api/v1/models/tiny/load"


def test_generate_on_an_unknown_model(tiny_client):
    error = assert_error(generate(tiny_client, model="gpt3", prompt="hi"), 404, "model_not_found")
    assert "tiny" in error["details"]["available_models"]


@pytest.mark.parametrize(
    "body, field",
    [
        ({"prompt": "hi"}, "model"),
        ({"model": "tiny"}, "prompt"),
        ({"model": "", "prompt": "hi"}, "model"),
        ({"model": "tiny", "prompt": ""}, "prompt"),
        ({"model": "tiny", "prompt": 42}, "prompt"),
        ({"model": "tiny", "prompt": "hi", "max_tokens": 0}, "max_tokens"),
        ({"model": "tiny", "prompt": "hi", "max_tokens": -1}, "max_tokens"),
        ({"model": "tiny", "prompt": "hi", "max_tokens": "5"}, "max_tokens"),
        ({"model": "tiny", "prompt": "hi", "max_tokens": 1.5}, "max_tokens"),
        ({"model": "tiny", "prompt": "hi", "max_tokens": True}, "max_tokens"),
        ({"model": "tiny", "prompt": "hi", "temperature": -1}, "temperature"),
        ({"model": "tiny", "prompt": "hi", "temperature": 3}, "temperature"),
        ({"model": "tiny", "prompt": "hi", "temperature": "nan"}, "temperature"),
        ({"model": "tiny", "prompt": "hi", "temperature": "Infinity"}, "temperature"),
        ({"model": "tiny", "prompt": "hi", "temperature": "warm"}, "temperature"),
        ({"model": "tiny", "prompt": "hi", "top_p": 0}, "top_p"),
        ({"model": "tiny", "prompt": "hi", "top_p": 1.5}, "top_p"),
        ({"model": "tiny", "prompt": "hi", "top_p": -0.1}, "top_p"),
        ({"model": "tiny", "prompt": "hi", "stop": "\n"}, "stop"),
        ({"model": "tiny", "prompt": "hi", "stop": [f"s{i}" for i in range(17)]}, "stop"),
        ({"model": "tiny", "prompt": "hi", "stop": [""]}, "stop"),
        ({"model": "tiny", "prompt": "hi", "stop": [1]}, "stop"),
        ({"model": "tiny", "prompt": "hi", "stop": ["x" * 257]}, "stop"),
        ({"model": "tiny", "prompt": "hi", "stream": "sometimes"}, "stream"),
        ({"model": "tiny", "prompt": "hi", "seed": 2**63}, "seed"),
        ({"model": "tiny", "prompt": "hi", "seed": -(2**63) - 1}, "seed"),
        ({"model": "tiny", "prompt": "hi", "min_p": -0.1}, "min_p"),
        ({"model": "tiny", "prompt": "hi", "min_p": 1.1}, "min_p"),
        ({"model": "tiny", "prompt": "hi", "presence_penalty": 2.1}, "presence_penalty"),
        ({"model": "tiny", "prompt": "hi", "frequency_penalty": -2.1}, "frequency_penalty"),
        ({"model": "tiny", "prompt": "hi", "logit_bias": [[1, 2]]}, "logit_bias"),
        ({"model": "tiny", "prompt": "hi", "logit_bias": {"1.5": 2}}, "logit_bias"),
        ({"model": "tiny", "prompt": "hi", "logit_bias": {"1": -101}}, "logit_bias"),
        ({"model": "tiny", "prompt": "hi", "stop_token_ids": [1.0]}, "stop_token_ids"),
        ({"model": "tiny", "prompt": "hi", "logprobs": 21}, "logprobs"),
        ({"model": "tiny", "prompt": "hi", "logprobs": True}, "logprobs"),
        ({"model": "tiny", "prompt": "hi", "prompt_logprobs": -1}, "prompt_logprobs"),
        ({"model": "tiny", "prompt": "hi", "n": 2}, "n"),
        ({"model": "tiny", "prompt": "hi", "seed": "7"}, "seed"),
        ({"model": "tiny", "prompt": "hi", "ignore_eos": "sometimes"}, "ignore_eos"),
        ({"model": "tiny", "prompt": "hi", "ignore_eos": 2}, "ignore_eos"),
        ({"model": "tiny", "prompt": None}, "prompt"),  # null: the default, and it has none
        ({"model": "tiny", "prompt": "hi", "max_length": 5}, "max_length"),
    ],
)
def test_generate_validation(tiny_client, body, field):
    response = tiny_client.post(f"{API}/generate", json=body)
    error = assert_error(response, 400, "invalid_request")
    assert field in error["details"]["fields"]
    assert metrics(tiny_client)["requests_total"] == 0  # nothing reached the model


def test_generate_accepts_the_documented_limits(tiny_client):
    body = {
        "prompt": "hi",
        "max_tokens": 2,
        "temperature": 2,
        "top_p": 1,
        "stop": [f"s{i}" for i in range(16)],
        "stream": False,
        "seed": 0,
        "ignore_eos": False,
    }
    assert generate(tiny_client, **body).status_code == 200
    edges = {
        "seed": -(2**63),
        "min_p": 1,
        "presence_penalty": -2,
        "frequency_penalty": 2,
        "logit_bias": {str(i): 100 if i == 5 else -100 for i in range(300)},
        "stop_token_ids": list(range(64)),
        "logprobs": 20,
        "prompt_logprobs": 0,
        "n": 1,
        "ignore_eos": None,
    }
    response = generate(tiny_client, **{**body, **edges})
    assert response.status_code == 200, response.get_json()
    assert generate(tiny_client, **{**body, "seed": 2**63 - 1}).status_code == 200


@pytest.mark.parametrize(
    "data",
    [
        '{"model": "tiny", "prompt": "hi", "temperature": NaN}',
        '{"model": "tiny", "prompt": "hi", "top_p": Infinity}',
    ],
)
def test_generate_rejects_non_standard_json_numbers(tiny_client, data):
    response = tiny_client.post(f"{API}/generate", data=data, content_type="application/json")
    assert_error(response, 400, "invalid_request")


@pytest.mark.parametrize(
    "data, content_type",
    [
        ('{"model": "tiny", "prompt": ', "application/json"),
        ("", "application/json"),
        ("[]", "application/json"),
        ("null", "application/json"),
        ('"hi"', "application/json"),
        ('{"model": "tiny", "prompt": "hi"}', "text/plain"),
        ("model=tiny&prompt=hi", "application/x-www-form-urlencoded"),
        ('{"model": "tiny", "prompt": "hi"}', None),
    ],
)
def test_generate_body_must_be_a_json_object(tiny_client, data, content_type):
    response = tiny_client.post(f"{API}/generate", data=data, content_type=content_type)
    assert_error(response, 400, "invalid_request")


def test_wrong_content_type_is_named_in_details(tiny_client):
    response = tiny_client.post(
        f"{API}/generate", data='{"model": "tiny", "prompt": "hi"}', content_type="text/plain"
    )
    error = assert_error(response, 400, "invalid_request")
    assert error["details"] == {"content_type": "text/plain"}


@pytest.fixture(scope="module")
def tiny_tokenizer(tiny_models_dir):
    from transformers import AutoTokenizer

    return AutoTokenizer.from_pretrained(tiny_models_dir / "llama")


def test_context_length_exceeded(tiny_client, tiny_tokenizer):
    prompt = "Once upon a time there was a small server. " * 10
    prompt_tokens = len(tiny_tokenizer(prompt)["input_ids"])
    assert 20 < prompt_tokens < TINY_CONTEXT - 2
    room = TINY_CONTEXT - prompt_tokens

    error = assert_error(
        generate(tiny_client, prompt=prompt, max_tokens=room + 1), 400, "context_length_exceeded"
    )
    assert error["details"]["prompt_tokens"] == prompt_tokens
    assert error["details"]["context_length"] == TINY_CONTEXT
    assert error["details"]["max_tokens"] == room + 1
    assert str(TINY_CONTEXT) in error["message"]

    # Exactly filling the context is fine.
    prompt = "Once"
    while len(tiny_tokenizer(prompt + " time")["input_ids"]) < TINY_CONTEXT - 2:
        prompt += " time"
    room = TINY_CONTEXT - len(tiny_tokenizer(prompt)["input_ids"])
    assert 0 < room < 6
    result = generate_ok(tiny_client, prompt=prompt, max_tokens=room, temperature=0)
    assert result["tokens_generated"] <= room


def test_prompt_longer_than_the_context(tiny_client):
    error = assert_error(generate(tiny_client, prompt="x " * 400), 400, "context_length_exceeded")
    assert error["details"]["prompt_tokens"] > TINY_CONTEXT
    assert error["details"]["context_length"] == TINY_CONTEXT


def test_max_tokens_over_the_server_limit(make_app):
    client = make_app(max_tokens=10).test_client()
    load_and_wait(client, "tiny")
    error = assert_error(generate(client, prompt="hi", max_tokens=11), 400, "invalid_request")
    assert error["details"]["max_tokens_limit"] == 10
    assert error["details"]["max_tokens"] == 11
    assert generate_ok(client, prompt="hi", max_tokens=10, temperature=0)["tokens_generated"] <= 10
    # Without max_tokens the server's limit is the default's ceiling.
    assert generate_ok(client, prompt="Hello", temperature=0)["tokens_generated"] == 10


def test_default_max_tokens_is_100(tiny_client):
    assert generate_ok(tiny_client, prompt="Hello", temperature=0)["tokens_generated"] == 100


def test_body_too_large(make_app):
    client = make_app(max_body_bytes=1000).test_client()
    load_and_wait(client, "tiny")
    response = generate(client, prompt="x" * 2000)
    error = assert_error(response, 413, "payload_too_large")
    assert error["details"] == {}
    assert_error(
        client.post(
            f"{API}/models/tiny/load", data="{" + " " * 2000 + "}", content_type="application/json"
        ),
        413,
        "payload_too_large",
    )
    assert generate(client, prompt="Once upon a time " * 20, max_tokens=1).status_code == 200


def test_generate_response_shape(tiny_client):
    result = generate_ok(tiny_client, prompt="Once upon a time", max_tokens=7)
    assert {"text", "tokens_generated", "generation_time"} <= set(result)
    assert result["text"].startswith("Once upon a time")
    assert len(result["text"]) > len("Once upon a time")
    assert 1 <= result["tokens_generated"] <= 7
    assert SECONDS.match(result["generation_time"])


def test_greedy_is_deterministic(tiny_client):
    first = generate_ok(tiny_client, prompt="jumps over", max_tokens=12, temperature=0)
    second = generate_ok(tiny_client, prompt="jumps over", max_tokens=12, temperature=0, top_p=0.3)
    assert first["text"] == second["text"]
    assert first["tokens_generated"] == second["tokens_generated"] == 12
    assert first["text"].startswith("jumps over ")


def test_return_full_text_false_returns_only_the_continuation(tiny_client):
    full = generate_ok(tiny_client, prompt="lazy dog", max_tokens=6, temperature=0)
    only = generate_ok(
        tiny_client, prompt="lazy dog", max_tokens=6, temperature=0, return_full_text=False
    )
    assert only["text"]
    assert not only["text"].startswith("lazy dog")
    assert full["text"] == "lazy dog" + only["text"]


def test_seed_makes_sampling_reproducible(tiny_client):
    body = {
        "prompt": "Once upon a time",
        "max_tokens": 10,
        "temperature": 1.0,
        "top_p": 1.0,
        "return_full_text": False,
    }
    a = generate_ok(tiny_client, seed=7, **body)["text"]
    b = generate_ok(tiny_client, seed=7, **body)["text"]
    c = generate_ok(tiny_client, seed=8, **body)["text"]
    unseeded = {generate_ok(tiny_client, **body)["text"] for _ in range(2)}
    assert a == b
    assert a != c
    assert len(unseeded) == 2


@pytest.mark.parametrize("tweak", [{"temperature": 1e-45}, {"temperature": 1.0, "top_p": 1e-50}])
def test_extreme_but_valid_sampling_values(tiny_client, tweak):
    greedy = generate_ok(tiny_client, prompt="jumps over", max_tokens=4, temperature=0)
    result = generate(tiny_client, prompt="jumps over", max_tokens=4, **tweak)
    assert result.status_code == 200, result.get_json()
    assert result.get_json()["text"] == greedy["text"]


def test_tiny_top_p_is_greedy(tiny_client):
    greedy = generate_ok(tiny_client, prompt="jumps over", max_tokens=8, temperature=0)
    nucleus = generate_ok(
        tiny_client, prompt="jumps over", max_tokens=8, temperature=1.0, top_p=1e-6, seed=3
    )
    assert nucleus["text"] == greedy["text"]


@pytest.fixture(scope="module")
def reference_model(tiny_models_dir):
    """transformers itself on the tiny Llama: where the expected texts come from."""
    from transformers import AutoModelForCausalLM

    model = AutoModelForCausalLM.from_pretrained(tiny_models_dir / "llama", dtype=torch.float32)
    return model.eval()


def reference_continuation(model, tokenizer, prompt, max_tokens, repetition_penalty=None):
    """transformers' greedy continuation of `prompt` (without the prompt)."""
    ids = tokenizer(prompt, return_tensors="pt")["input_ids"]
    with torch.inference_mode():
        out = model.generate(
            ids,
            do_sample=False,
            max_new_tokens=max_tokens,
            repetition_penalty=repetition_penalty,
            pad_token_id=tokenizer.eos_token_id,
        )
    return tokenizer.decode(out[0, ids.shape[1] :])


def first_occurrences(text):
    """(stop, expected) for every 3-character stop string of `text` (none at its very start)
    taken where it occurs for the first time, in order. By the spec a stop string cuts the
    text right before its first occurrence: expected is the text before that position."""
    cases = []
    for start in range(1, len(text) - 2):
        stop = text[start : start + 3]
        if "\ufffd" not in stop and stop not in text[: start + 2]:  # its first occurrence
            cases.append((stop, text[:start]))
    assert len(cases) >= 3, f"fewer than 3 stop strings in {text!r}"
    return cases


# The tiny Llama mostly repeats the prompt's last token (" dog dog ..."); a repetition
# penalty makes it vary.
STOP_SAMPLING = [
    {"prompt": "lazy dog"},
    {"prompt": "lazy dog", "repetition_penalty": 5.0},
]


@pytest.mark.parametrize("sampling", STOP_SAMPLING)
def test_stop_strings_cut_the_text(tiny_client, reference_model, tiny_tokenizer, sampling):
    body = {**sampling, "temperature": 0, "max_tokens": 16, "return_full_text": False}
    reference = reference_continuation(reference_model, tiny_tokenizer, max_tokens=16, **sampling)
    full = generate_ok(tiny_client, **body)
    assert (full["text"], full["tokens_generated"]) == (reference, 16)
    cases = first_occurrences(reference)
    for stop, expected in cases[:: len(cases) // 3][:3]:  # three, spread over the text
        result = generate_ok(tiny_client, stop=[stop], **body)
        assert result["text"] == expected, (stop, reference)
        assert stop not in result["text"]
        assert result["tokens_generated"] < 16
        # The same cut when streaming, and with the prompt in front by default.
        _, events = stream(tiny_client, stop=[stop], **{**body, "return_full_text": True})
        assert streamed_text(events) == sampling["prompt"] + expected


def test_a_stop_string_cuts_at_its_first_occurrence(tiny_client):
    """The greedy text is " dog dog dog ...", where "og d" recurs: the cut is at the first."""
    body = {"prompt": "lazy dog", "temperature": 0, "max_tokens": 16, "return_full_text": False}
    assert generate_ok(tiny_client, **body)["text"].startswith(" dog dog dog")
    assert generate_ok(tiny_client, stop=["og d"], **body)["text"] == " d"


def test_earliest_of_several_stops_wins(tiny_client, reference_model, tiny_tokenizer):
    sampling = STOP_SAMPLING[1]
    body = {**sampling, "temperature": 0, "max_tokens": 16, "return_full_text": False}
    reference = reference_continuation(reference_model, tiny_tokenizer, max_tokens=16, **sampling)
    # Overlapping: both complete in the same piece of text, the one listed first later.
    (early, expected), (late, _), *_ = first_occurrences(reference)
    assert reference.index(late) == reference.index(early) + 1
    result = generate_ok(tiny_client, stop=[late, "never-there", early], **body)
    assert result["text"] == expected


def test_stop_string_in_the_prompt_does_not_stop(tiny_client):
    result = generate_ok(tiny_client, prompt="lazy dog", max_tokens=3, temperature=0, stop=["lazy"])
    assert result["tokens_generated"] == 3
    assert result["text"].startswith("lazy dog")
