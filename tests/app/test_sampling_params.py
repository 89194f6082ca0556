"""top_k and repetition_penalty through the API (native /api/v1/generate and OpenAI /v1) on
the tiny models, then their validation (tests/unit/test_sampling_params.py checks the
sampling code against transformers' reference processors)."""

from __future__ import annotations

import collections

import pytest
import torch
from transformers import AutoModelForCausalLM, AutoTokenizer

import tursi.engine.scheduler as scheduler_module
from tests.helpers import API


def generate_ok(client, **body):
    body = {"model": "tiny", "return_full_text": False, **body}
    response = client.post(f"{API}/generate", json=body)
    assert response.status_code == 200, response.get_json()
    return response.get_json()


@pytest.fixture
def chosen_tokens(monkeypatch):
    """The token ids the scheduler picks, in order (one request at a time)."""
    picked: list[int] = []
    real = scheduler_module.choose_tokens

    def recording(logits, choosers):
        tokens = real(logits, choosers)
        picked.extend(tokens)
        return tokens

    monkeypatch.setattr(scheduler_module, "choose_tokens", recording)
    return picked


@pytest.fixture(scope="module")
def reference_model(tiny_models_dir):
    model = AutoModelForCausalLM.from_pretrained(tiny_models_dir / "llama", dtype=torch.float32)
    return model.eval(), AutoTokenizer.from_pretrained(tiny_models_dir / "llama")


@pytest.mark.parametrize("prompt", ["lazy dog", "Once upon a time", "jumps over"])
def test_top_k_1_sampling_is_greedy(tiny_client, prompt):
    greedy = generate_ok(tiny_client, prompt=prompt, max_tokens=12, temperature=0)
    for seed in range(3):
        top1 = generate_ok(
            tiny_client,
            prompt=prompt,
            max_tokens=12,
            temperature=1.0,
            top_p=1.0,
            top_k=1,
            seed=seed,
        )
        assert top1["text"] == greedy["text"]
        assert top1["tokens_generated"] == greedy["tokens_generated"]
    # Without the cut, sampling at temperature 1 is not greedy on this random model.
    sampled = {
        generate_ok(
            tiny_client, prompt=prompt, max_tokens=12, temperature=1.0, top_p=1.0, seed=seed
        )["text"]
        for seed in range(3)
    }
    assert sampled != {greedy["text"]}


def test_top_k_0_and_above_the_vocabulary_change_nothing(tiny_client):
    body = {
        "prompt": "Once upon a time",
        "max_tokens": 12,
        "temperature": 1.0,
        "top_p": 1.0,
        "seed": 11,
    }
    plain = generate_ok(tiny_client, **body)["text"]
    assert generate_ok(tiny_client, top_k=0, **body)["text"] == plain
    assert generate_ok(tiny_client, top_k=1_000_000, **body)["text"] == plain


def test_repetition_penalty_breaks_the_loop(tiny_client, chosen_tokens):
    """The tiny Llama repeats the prompt's last token; a strong penalty stops that."""
    plain = generate_ok(tiny_client, prompt="lazy dog", max_tokens=20, temperature=0)
    plain_ids = list(chosen_tokens)
    chosen_tokens.clear()
    penalized = generate_ok(
        tiny_client, prompt="lazy dog", max_tokens=20, temperature=0, repetition_penalty=5.0
    )
    penalized_ids = list(chosen_tokens)
    assert len(plain_ids) == len(penalized_ids) == 20
    assert penalized["text"] != plain["text"]

    def repeats(ids):
        return len(ids) - len(set(ids))

    assert repeats(plain_ids) >= 15  # " dog dog dog ..."
    assert repeats(penalized_ids) < repeats(plain_ids) // 3
    assert collections.Counter(penalized_ids).most_common(1)[0][1] <= 3
    # The prompt counts: its last token is not picked first.
    assert penalized_ids[0] != plain_ids[0]


@pytest.mark.parametrize(
    "prompt, penalty",
    [
        ("lazy dog", 5.0),
        ("Once upon a time", 1.3),
        ("jumps over", 2.0),
        ("The quick brown fox", 0.5),
    ],
)
def test_greedy_with_penalty_matches_transformers_generate(
    tiny_client, chosen_tokens, reference_model, prompt, penalty
):
    model, tokenizer = reference_model
    generate_ok(
        tiny_client, prompt=prompt, max_tokens=16, temperature=0, repetition_penalty=penalty
    )
    ids = tokenizer(prompt, return_tensors="pt")["input_ids"]
    with torch.inference_mode():
        expected = model.generate(
            ids,
            do_sample=False,
            repetition_penalty=penalty,
            max_new_tokens=16,
            pad_token_id=tokenizer.eos_token_id,
        )
    assert chosen_tokens == expected[0, ids.shape[1] :].tolist()


def test_penalties_apply_per_request_when_batched(app, tiny_client):
    """Two requests decoded in one batch, one penalized: each gets its own result."""
    import threading

    body = {"prompt": "lazy dog", "max_tokens": 20, "temperature": 0}
    plain = generate_ok(tiny_client, **body)["text"]
    penalized = generate_ok(tiny_client, repetition_penalty=5.0, **body)["text"]
    results = {}

    def run(name, **extra):
        results[name] = generate_ok(app.test_client(), **body, **extra)["text"]

    threads = [threading.Thread(target=run, args=(f"plain{i}",)) for i in range(2)]
    threads += [
        threading.Thread(target=run, args=(f"pen{i}",), kwargs={"repetition_penalty": 5.0})
        for i in range(2)
    ]
    for thread in threads:
        thread.start()
    for thread in threads:
        thread.join(60)
    assert results == {"plain0": plain, "plain1": plain, "pen0": penalized, "pen1": penalized}


def test_openai_completions_take_top_k_and_repetition_penalty(tiny_client):
    def completion(**extra):
        response = tiny_client.post(
            "/v1/completions",
            json={"model": "tiny", "prompt": "lazy dog", "max_tokens": 10, **extra},
        )
        assert response.status_code == 200, response.get_json()
        return response.get_json()["choices"][0]["text"]

    native = generate_ok(
        tiny_client, prompt="lazy dog", max_tokens=10, temperature=0, repetition_penalty=5.0
    )["text"]
    assert completion(temperature=0, repetition_penalty=5.0) == native
    greedy = completion(temperature=0)
    assert greedy != native
    assert completion(temperature=1.0, top_k=1, seed=5) == greedy


INVALID = [
    ("top_k", -1),
    ("top_k", "3"),
    ("top_k", 1.5),
    ("top_k", True),
    ("top_k", 1_000_001),
    ("repetition_penalty", 0),
    ("repetition_penalty", -1),
    ("repetition_penalty", 11),
    ("repetition_penalty", 10.0001),
    ("repetition_penalty", "strong"),
]


def field_error(response, field):
    assert response.status_code == 400, response.get_data(as_text=True)
    error = response.get_json()["error"]
    assert error["code"] == "invalid_request"
    assert field in error["details"]["fields"]
    assert field in error["message"]
    return error


@pytest.mark.parametrize("field, value", INVALID)
def test_generate_rejects(tiny_client, field, value):
    response = tiny_client.post(
        f"{API}/generate", json={"model": "tiny", "prompt": "hi", field: value}
    )
    field_error(response, field)


@pytest.mark.parametrize("field, value", INVALID)
@pytest.mark.parametrize(
    "path, body",
    [
        ("/v1/completions", {"prompt": "hi"}),
        ("/v1/chat/completions", {"messages": [{"role": "user", "content": "hi"}]}),
    ],
)
def test_openai_routes_reject(tiny_client, path, body, field, value):
    response = tiny_client.post(path, json={"model": "tiny", **body, field: value})
    error = field_error(response, field)
    assert error["param"] == field
    assert error["type"] == "invalid_request_error"


@pytest.mark.parametrize(
    "path, body",
    [
        (f"{API}/generate", '{"model": "tiny", "prompt": "hi", "repetition_penalty": %s}'),
        ("/v1/completions", '{"model": "tiny", "prompt": "hi", "repetition_penalty": %s}'),
        (f"{API}/generate", '{"model": "tiny", "prompt": "hi", "top_k": %s}'),
    ],
)
@pytest.mark.parametrize("number", ["NaN", "Infinity", "-Infinity"])
def test_non_finite_numbers_are_rejected(tiny_client, path, body, number):
    response = tiny_client.post(path, data=body % number, content_type="application/json")
    assert response.status_code == 400, response.get_data(as_text=True)
    error = response.get_json()["error"]
    field = "top_k" if "top_k" in body else "repetition_penalty"
    assert field in error["details"]["fields"]


@pytest.mark.parametrize(
    "extra",
    [
        {"top_k": 0},
        {"top_k": 1},
        {"top_k": 1_000_000},
        {"repetition_penalty": 10},
        {"repetition_penalty": 0.01},
        {"repetition_penalty": 1},
        {"top_k": 5, "repetition_penalty": 1.2, "temperature": 0.8, "top_p": 0.9, "seed": 1},
    ],
)
def test_documented_limits_are_accepted(tiny_client, extra):
    response = tiny_client.post(
        f"{API}/generate", json={"model": "tiny", "prompt": "hi", "max_tokens": 3, **extra}
    )
    assert response.status_code == 200, response.get_json()
    openai_response = tiny_client.post(
        "/v1/completions", json={"model": "tiny", "prompt": "hi", "max_tokens": 3, **extra}
    )
    assert openai_response.status_code == 200, openai_response.get_json()
    assert openai_response.get_json()["usage"]["completion_tokens"] <= 3
