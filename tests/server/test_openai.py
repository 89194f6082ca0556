"""The OpenAI-compatible API (/v1) end to end: the official `openai` package drives a real
gunicorn server serving the embedded SmolLM2 model behind an API key."""

from __future__ import annotations

import json
import time

import openai
import pytest
import requests

from tests.helpers import API, CHAT, OPENAI_ERROR_FIELDS, Server, sse_data

MODEL = "smollm2-135m-instruct"


KEY = "test-key"


PROMPT = "Once upon a time"


def wait_ready(base, headers, model, timeout=300, process=None):
    """Poll /health, then GET /api/v1/models with the key until `model` is loaded."""
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        if process is not None and process.poll() is not None:
            raise RuntimeError("gunicorn exited")
        try:
            if requests.get(f"{base}/health", timeout=2).status_code == 200:
                response = requests.get(f"{base}{API}/models", headers=headers, timeout=2)
                assert response.status_code == 200, response.text
                entry = {m["name"]: m for m in response.json()["models"]}[model]
                if entry["status"] == "loaded":
                    return
                if entry["status"] == "failed":
                    raise RuntimeError(f"{model} failed to load: {entry.get('error')}")
        except requests.RequestException:  # still booting (imports torch)
            pass
        time.sleep(0.25)
    raise TimeoutError(f"{model} not loaded after {timeout}s")


@pytest.fixture(scope="module")
def server(embedded_home, tmp_path_factory):
    srv = Server(
        {
            "TURSI_HOME": str(embedded_home),
            "TURSI_PRELOAD": MODEL,
            "TURSI_RATE_LIMIT": "10000/minute",
            "TURSI_API_KEYS": KEY,
        },
        tmp_path_factory.mktemp("openai") / "gunicorn.log",
    )
    try:
        try:
            wait_ready(
                f"http://127.0.0.1:{srv.port}",
                {"Authorization": f"Bearer {KEY}"},
                MODEL,
                process=srv.process,
            )
        except Exception:
            print(srv.log_path.read_text()[-3000:])
            raise
        yield srv
    finally:
        srv.stop()


@pytest.fixture(scope="module")
def base_url(server):
    return f"http://127.0.0.1:{server.port}/v1"


@pytest.fixture(scope="module")
def oai(base_url):
    with openai.OpenAI(base_url=base_url, api_key=KEY, max_retries=0, timeout=120) as client:
        yield client


@pytest.fixture(scope="module")
def greedy_completion(oai):
    """A greedy 20-token completion of PROMPT, shared by the tests that compare with it."""
    return oai.completions.create(model=MODEL, prompt=PROMPT, temperature=0, max_tokens=20)


@pytest.fixture(scope="module")
def greedy_chat(oai):
    return oai.chat.completions.create(model=MODEL, messages=CHAT, temperature=0, max_tokens=30)


def test_models_list_has_the_loaded_model(oai):
    models = oai.models.list()
    ids = [m.id for m in models.data]
    assert ids == [MODEL]  # only loaded models: not the not-loaded built-ins
    assert models.data[0].object == "model"
    assert models.data[0].owned_by == "tursi"
    assert models.data[0].created > 0


def test_completion(greedy_completion):
    completion = greedy_completion
    assert completion.object == "text_completion"
    assert completion.id.startswith("cmpl-")
    assert completion.model == MODEL
    assert len(completion.choices) == 1
    choice = completion.choices[0]
    assert choice.index == 0
    assert choice.text.strip()
    assert not choice.text.startswith(PROMPT)  # no echo by default
    assert choice.finish_reason == "length"
    usage = completion.usage
    assert usage.completion_tokens == 20
    assert usage.prompt_tokens > 0
    assert usage.total_tokens == usage.prompt_tokens + usage.completion_tokens


def test_completion_stream_matches_non_stream(oai, greedy_completion):
    chunks = list(
        oai.completions.create(
            model=MODEL,
            prompt=PROMPT,
            temperature=0,
            max_tokens=20,
            stream=True,
            stream_options={"include_usage": True},
        )
    )
    *content, usage_chunk = chunks
    assert len(content) > 5  # streamed piece by piece
    assert all(c.object == "text_completion" and c.id == content[0].id for c in chunks)
    assert all(len(c.choices) == 1 for c in content)
    assert "".join(c.choices[0].text for c in content) == greedy_completion.choices[0].text
    assert [c.choices[0].finish_reason for c in content[:-1]] == [None] * (len(content) - 1)
    assert content[-1].choices[0].finish_reason == "length"
    assert all(c.usage is None for c in content)
    # stream_options.include_usage: one last chunk, no choices, the usage.
    assert usage_chunk.choices == []
    assert usage_chunk.usage.completion_tokens == 20
    assert usage_chunk.usage.prompt_tokens == greedy_completion.usage.prompt_tokens
    assert usage_chunk.usage.total_tokens == greedy_completion.usage.total_tokens


def test_raw_stream_format(base_url, greedy_completion):
    """Without include_usage: `data: {json}` frames, the last one `data: [DONE]`."""
    response = requests.post(
        f"{base_url}/completions",
        stream=True,
        timeout=120,
        headers={"Authorization": f"Bearer {KEY}"},
        json={"model": MODEL, "prompt": PROMPT, "temperature": 0, "max_tokens": 20, "stream": True},
    )
    assert response.status_code == 200, response.text
    assert response.headers["Content-Type"].startswith("text/event-stream")
    text = "".join(response.iter_content(chunk_size=None, decode_unicode=True))
    payloads = sse_data(text)
    assert payloads[-1] == "[DONE]"
    assert "[DONE]" not in payloads[:-1]
    chunks = [json.loads(payload) for payload in payloads[:-1]]
    assert all(chunk["object"] == "text_completion" for chunk in chunks)
    assert all("usage" not in chunk for chunk in chunks)  # no include_usage: no usage chunk
    assert all(len(chunk["choices"]) == 1 for chunk in chunks)
    assert "".join(c["choices"][0]["text"] for c in chunks) == greedy_completion.choices[0].text
    assert chunks[-1]["choices"][0]["finish_reason"] == "length"


def test_chat_completion(greedy_chat):
    chat = greedy_chat
    assert chat.object == "chat.completion"
    assert chat.id.startswith("chatcmpl-")
    assert chat.model == MODEL
    message = chat.choices[0].message
    assert message.role == "assistant"
    assert message.content.strip()
    assert "<|im_start|>" not in message.content and "<|im_end|>" not in message.content
    assert chat.choices[0].finish_reason in ("stop", "length")
    assert 0 < chat.usage.completion_tokens <= 30
    # The prompt is the rendered template (system prompt, role markers), not just the question.
    assert chat.usage.prompt_tokens > 12
    assert chat.usage.total_tokens == chat.usage.prompt_tokens + chat.usage.completion_tokens


def test_chat_stream_matches_non_stream(oai, greedy_chat):
    chunks = list(
        oai.chat.completions.create(
            model=MODEL,
            messages=CHAT,
            temperature=0,
            max_tokens=30,
            stream=True,
            stream_options={"include_usage": True},
        )
    )
    *content, usage_chunk = chunks
    assert all(c.object == "chat.completion.chunk" for c in chunks)
    assert content[0].choices[0].delta.role == "assistant"
    text = "".join(c.choices[0].delta.content or "" for c in content)
    assert text == greedy_chat.choices[0].message.content
    assert content[-1].choices[0].finish_reason == greedy_chat.choices[0].finish_reason
    assert all(c.choices[0].finish_reason is None for c in content[:-1])
    assert usage_chunk.choices == []
    counts = ("prompt_tokens", "completion_tokens", "total_tokens")
    assert [getattr(usage_chunk.usage, name) for name in counts] == [
        getattr(greedy_chat.usage, name) for name in counts
    ]


def test_stop_cuts_the_text(oai, greedy_completion):
    full = greedy_completion.choices[0].text
    words = full.split()
    stop = next(" " + w for w in words[2:] if full.find(" " + w) > 0)
    expected = full[: full.find(stop)]
    cut = oai.completions.create(
        model=MODEL, prompt=PROMPT, temperature=0, max_tokens=20, stop=[stop]
    )
    assert cut.choices[0].text == expected, (stop, full)
    assert stop not in cut.choices[0].text
    assert cut.choices[0].finish_reason == "stop"
    assert cut.usage.completion_tokens < 20
    # A single string is a valid `stop` too.
    again = oai.completions.create(
        model=MODEL, prompt=PROMPT, temperature=0, max_tokens=20, stop=stop
    )
    assert again.choices[0].text == expected


def test_seed_makes_sampling_reproducible(oai):
    def sample(seed):
        return (
            oai.completions.create(
                model=MODEL, prompt=PROMPT, temperature=1.0, seed=seed, max_tokens=10
            )
            .choices[0]
            .text
        )

    first = sample(1234)
    assert sample(1234) == first
    assert sample(4321) != first


def test_top_k_and_repetition_penalty_through_extra_body(oai, greedy_completion):
    # top_k = 1 leaves only the most likely token: sampling at temperature 1 is greedy.
    top1 = oai.completions.create(
        model=MODEL, prompt=PROMPT, temperature=1.0, seed=7, max_tokens=20, extra_body={"top_k": 1}
    )
    assert top1.choices[0].text == greedy_completion.choices[0].text
    penalized = oai.chat.completions.create(
        model=MODEL,
        messages=CHAT,
        temperature=0,
        max_tokens=8,
        extra_body={"repetition_penalty": 1.3, "top_k": 40},
    )
    assert penalized.choices[0].message.content
    assert 0 < penalized.usage.completion_tokens <= 8
    with pytest.raises(openai.BadRequestError) as raised:
        oai.completions.create(
            model=MODEL, prompt=PROMPT, max_tokens=2, extra_body={"repetition_penalty": 0}
        )
    assert raised.value.param == "repetition_penalty"


def test_wrong_api_key(base_url):
    with openai.OpenAI(base_url=base_url, api_key="wrong-key", max_retries=0) as client:
        with pytest.raises(openai.AuthenticationError) as raised:
            client.models.list()
        assert raised.value.status_code == 401
        assert raised.value.code == "unauthorized"
        assert raised.value.type == "authentication_error"
        with pytest.raises(openai.AuthenticationError):
            client.completions.create(model=MODEL, prompt=PROMPT, max_tokens=2)
    # No key at all: the same OpenAI-shaped 401.
    response = requests.get(f"{base_url}/models", timeout=10)
    assert response.status_code == 401
    assert set(response.json()["error"]) == OPENAI_ERROR_FIELDS


def test_unknown_model(oai):
    with pytest.raises(openai.NotFoundError) as raised:
        oai.completions.create(model="gpt-5", prompt=PROMPT, max_tokens=2)
    assert raised.value.status_code == 404
    assert raised.value.code == "model_not_found"
    with pytest.raises(openai.NotFoundError) as raised:
        oai.chat.completions.create(model="gpt-5", messages=CHAT, max_tokens=2)
    assert raised.value.code == "model_not_found"


def test_unsupported_parameters(oai):
    with pytest.raises(openai.BadRequestError) as raised:
        oai.completions.create(model=MODEL, prompt=PROMPT, max_tokens=2, n=2)
    assert raised.value.status_code == 400
    assert raised.value.param == "n"
    assert raised.value.type == "invalid_request_error"
    with pytest.raises(openai.BadRequestError) as raised:
        oai.chat.completions.create(model=MODEL, messages=CHAT, max_tokens=2, presence_penalty=0.5)
    assert raised.value.param == "presence_penalty"
