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


def test_out_of_range_parameters(oai, base_url):
    """Issue 14's parameters have OpenAI's ranges: past them a 400 names the field, and the
    answer tells the SDK not to retry (x-should-retry: false)."""
    cases = [
        ("completions", {"n": 17}, "n"),
        ("completions", {"logprobs": 6}, "logprobs"),
        ("completions", {"presence_penalty": 2.5}, "presence_penalty"),
        ("chat", {"top_logprobs": 21, "logprobs": True}, "top_logprobs"),
        ("chat", {"frequency_penalty": -3}, "frequency_penalty"),
        ("chat", {"logit_bias": {"42": 101}}, "logit_bias"),
    ]
    for kind, fields, param in cases:
        with pytest.raises(openai.BadRequestError) as raised:
            if kind == "chat":
                oai.chat.completions.create(model=MODEL, messages=CHAT, max_tokens=2, **fields)
            else:
                oai.completions.create(model=MODEL, prompt=PROMPT, max_tokens=2, **fields)
        assert raised.value.status_code == 400
        assert raised.value.param == param, (fields, raised.value.body)
        assert raised.value.type == "invalid_request_error"
        assert raised.value.response.headers["x-should-retry"] == "false"
    # A field OpenAI does not document either is still refused.
    with pytest.raises(openai.BadRequestError) as raised:
        oai.completions.create(model=MODEL, prompt=PROMPT, max_tokens=2, extra_body={"foo": 1})
    assert raised.value.param == "foo"


# --- issue 14: logprobs, n, penalties, logit_bias, echo, token-id prompts ----------------------


@pytest.fixture(scope="module")
def tokenizer(server, embedded_home):
    """The embedded model's own tokenizer, from the files the server converted and loads:
    to build token-id prompts and name tokens for logit_bias."""
    from transformers import AutoTokenizer

    from tursi.engine.catalog import Catalog
    from tursi.engine.loading import locate

    return AutoTokenizer.from_pretrained(
        locate(Catalog.load(None).get(MODEL), str(embedded_home), False)
    )


def assert_greedy_logprobs(tokens, token_logprobs, top_logprobs, k):
    """Greedy choices: each token's logprob is the largest of its top k, and is that token's."""
    assert len(tokens) == len(token_logprobs) == len(top_logprobs) > 0
    for token, logprob, top in zip(tokens, token_logprobs, top_logprobs, strict=True):
        assert len(top) == k
        assert logprob <= 0
        assert logprob == pytest.approx(max(top.values()), abs=1e-5)
        assert top[token] == pytest.approx(logprob, abs=1e-5)


def test_models_retrieve(oai):
    model = oai.models.retrieve(MODEL)
    assert model.id == MODEL
    assert model.object == "model"
    assert model.owned_by == "tursi"
    assert model.created > 0
    with pytest.raises(openai.NotFoundError) as raised:
        oai.models.retrieve("gpt-5")
    assert raised.value.code == "model_not_found"


def test_accepted_openai_fields(oai):
    """Fields OpenAI documents that do not change the output are accepted; null is the
    default; max_completion_tokens is max_tokens' synonym."""
    chat = oai.chat.completions.create(
        model=MODEL,
        messages=CHAT,
        temperature=0,
        max_completion_tokens=3,
        user="someone",
        store=False,
        metadata={"purpose": "test"},
        n=None,
        extra_body={"top_k": None},
    )
    assert chat.usage.completion_tokens <= 3
    assert len(chat.choices) == 1


def test_completion_logprobs(oai, greedy_completion):
    completion = oai.completions.create(
        model=MODEL, prompt=PROMPT, temperature=0, max_tokens=6, logprobs=5
    )
    choice = completion.choices[0]
    assert greedy_completion.choices[0].text.startswith(choice.text)
    logprobs = choice.logprobs
    assert_greedy_logprobs(logprobs.tokens, logprobs.token_logprobs, logprobs.top_logprobs, 5)
    assert "".join(logprobs.tokens) == choice.text
    # text_offset: where each token starts in the text.
    assert logprobs.text_offset == [
        sum(len(t) for t in logprobs.tokens[:i]) for i in range(len(logprobs.tokens))
    ]
    assert len(logprobs.tokens) == completion.usage.completion_tokens == 6

    # Streamed: the chunks' texts and logprobs join to the same.
    chunks = list(
        oai.completions.create(
            model=MODEL, prompt=PROMPT, temperature=0, max_tokens=6, logprobs=5, stream=True
        )
    )
    pieces = [c.choices[0] for c in chunks if c.choices]
    assert "".join(p.text for p in pieces) == choice.text
    streamed = [p.logprobs for p in pieces if p.logprobs is not None]
    assert sum((s.tokens for s in streamed), []) == logprobs.tokens
    assert sum((s.token_logprobs for s in streamed), []) == pytest.approx(
        logprobs.token_logprobs, abs=1e-5
    )


def test_chat_logprobs(oai, greedy_chat):
    chat = oai.chat.completions.create(
        model=MODEL, messages=CHAT, temperature=0, max_tokens=6, logprobs=True, top_logprobs=3
    )
    content = chat.choices[0].logprobs.content
    assert greedy_chat.choices[0].message.content.startswith(chat.choices[0].message.content)
    assert "".join(entry.token for entry in content) == chat.choices[0].message.content
    assert_greedy_logprobs(
        [e.token for e in content],
        [e.logprob for e in content],
        [{t.token: t.logprob for t in e.top_logprobs} for e in content],
        3,
    )
    for entry in content:
        assert entry.bytes == list(entry.token.encode())
        assert [t.logprob for t in entry.top_logprobs] == sorted(
            (t.logprob for t in entry.top_logprobs), reverse=True
        )
    # logprobs without top_logprobs: the tokens' own logprobs, no alternatives.
    plain = oai.chat.completions.create(
        model=MODEL, messages=CHAT, temperature=0, max_tokens=6, logprobs=True
    )
    assert [e.token for e in plain.choices[0].logprobs.content] == [e.token for e in content]
    assert all(e.top_logprobs == [] for e in plain.choices[0].logprobs.content)

    chunks = list(
        oai.chat.completions.create(
            model=MODEL,
            messages=CHAT,
            temperature=0,
            max_tokens=6,
            logprobs=True,
            top_logprobs=3,
            stream=True,
        )
    )
    streamed = [
        e
        for c in chunks
        if c.choices and c.choices[0].logprobs
        for e in c.choices[0].logprobs.content
    ]
    assert [e.token for e in streamed] == [e.token for e in content]
    assert [e.logprob for e in streamed] == pytest.approx([e.logprob for e in content], abs=1e-5)


def test_n_choices(oai):
    """n greedy choices are the same text; n sampled choices with a seed differ, and the
    same seed gives the same n again."""
    greedy = oai.completions.create(model=MODEL, prompt=PROMPT, temperature=0, max_tokens=6, n=3)
    assert [c.index for c in greedy.choices] == [0, 1, 2]
    assert len({c.text for c in greedy.choices}) == 1
    assert greedy.usage.completion_tokens == 18  # all choices' tokens, as OpenAI counts

    def sampled():
        chat = oai.chat.completions.create(
            model=MODEL, messages=CHAT, temperature=1.0, seed=5, max_tokens=8, n=4
        )
        assert sorted(c.index for c in chat.choices) == [0, 1, 2, 3]
        return [c.message.content for c in sorted(chat.choices, key=lambda c: c.index)]

    first = sampled()
    assert len(set(first)) > 1
    assert sampled() == first

    # Streamed: each choice's chunks carry its index and join to its text.
    chunks = list(
        oai.chat.completions.create(
            model=MODEL, messages=CHAT, temperature=1.0, seed=5, max_tokens=8, n=4, stream=True
        )
    )
    texts = ["", "", "", ""]
    for chunk in chunks:
        for choice in chunk.choices:
            texts[choice.index] += choice.delta.content or ""
    assert texts == first
    finished = [c.choices[0].index for c in chunks if c.choices and c.choices[0].finish_reason]
    assert sorted(finished) == [0, 1, 2, 3]


def test_presence_and_frequency_penalties(oai):
    """Under greedy decoding each chosen token maximizes logprob - presence_penalty *
    [seen] - frequency_penalty * count, counted over the output so far (OpenAI's definition;
    logprobs are the raw distribution's), checked against the top 5 alternatives."""
    presence, frequency = 1.5, 1.0
    prompt = "List the numbers: one, two, one, two, one, two,"
    plain = oai.completions.create(model=MODEL, prompt=prompt, temperature=0, max_tokens=12)
    completion = oai.completions.create(
        model=MODEL,
        prompt=prompt,
        temperature=0,
        max_tokens=12,
        logprobs=5,
        presence_penalty=presence,
        frequency_penalty=frequency,
    )
    logprobs = completion.choices[0].logprobs
    assert completion.choices[0].text != plain.choices[0].text  # the penalties bite here

    counts: dict[str, int] = {}

    def penalized(token, logprob):
        count = counts.get(token, 0)
        return logprob - presence * (count > 0) - frequency * count

    for token, logprob, top in zip(
        logprobs.tokens, logprobs.token_logprobs, logprobs.top_logprobs, strict=True
    ):
        chosen = penalized(token, logprob)
        assert all(penalized(t, lp) <= chosen + 1e-4 for t, lp in top.items()), (token, top)
        counts[token] = counts.get(token, 0) + 1


def test_logit_bias(oai, tokenizer, greedy_completion):
    """-100 on the greedy first token: it never appears, greedy or sampled; +100 on a token
    makes it the only one chosen."""
    prompt_ids = tokenizer(PROMPT).input_ids
    full = tokenizer(PROMPT + greedy_completion.choices[0].text).input_ids
    assert full[: len(prompt_ids)] == prompt_ids
    banned = full[len(prompt_ids)]
    banned_text = tokenizer.decode([banned])
    greedy = oai.completions.create(
        model=MODEL,
        prompt=PROMPT,
        temperature=0,
        max_tokens=8,
        logprobs=1,
        logit_bias={str(banned): -100},
    )
    sampled = oai.completions.create(
        model=MODEL,
        prompt=PROMPT,
        temperature=1.0,
        seed=3,
        max_tokens=8,
        n=4,
        logprobs=1,
        logit_bias={str(banned): -100},
    )
    for choice in greedy.choices + sampled.choices:
        assert banned_text not in choice.logprobs.tokens
    forced = tokenizer(" dragon", add_special_tokens=False).input_ids
    assert len(forced) == 1
    chat = oai.chat.completions.create(
        model=MODEL, messages=CHAT, temperature=0, max_tokens=4, logit_bias={str(forced[0]): 100}
    )
    assert chat.choices[0].message.content == " dragon" * 4


def test_echo(oai, greedy_completion):
    """echo returns the prompt before the text; with logprobs the prompt's tokens are scored
    too (the first has nothing before it: null); max_tokens 0 with echo scores the prompt
    alone, as evaluation harnesses ask."""
    scored = oai.completions.create(
        model=MODEL, prompt=PROMPT, temperature=0, max_tokens=0, echo=True, logprobs=2
    )
    choice = scored.choices[0]
    assert choice.text == PROMPT
    assert "".join(choice.logprobs.tokens) == PROMPT
    assert len(choice.logprobs.tokens) == scored.usage.prompt_tokens
    assert scored.usage.completion_tokens == 0
    assert choice.logprobs.token_logprobs[0] is None
    assert all(lp <= 0 for lp in choice.logprobs.token_logprobs[1:])
    for token, logprob, top in zip(
        choice.logprobs.tokens[1:],
        choice.logprobs.token_logprobs[1:],
        choice.logprobs.top_logprobs[1:],
        strict=True,
    ):
        # The top 2, plus the prompt's own token when it is not among them ("up to
        # logprobs + 1", as OpenAI answers), then the lowest of the three.
        assert top[token] == pytest.approx(logprob, abs=1e-6)
        assert len(top) == 2 or (len(top) == 3 and logprob == min(top.values()))

    echoed = oai.completions.create(
        model=MODEL, prompt=PROMPT, temperature=0, max_tokens=4, echo=True, logprobs=1
    )
    text = echoed.choices[0].text
    assert text.startswith(PROMPT)
    assert greedy_completion.choices[0].text.startswith(text[len(PROMPT) :])
    tokens = echoed.choices[0].logprobs.tokens
    assert tokens[: len(choice.logprobs.tokens)] == choice.logprobs.tokens
    assert echoed.choices[0].logprobs.token_logprobs[1 : len(choice.logprobs.tokens)] == (
        pytest.approx(choice.logprobs.token_logprobs[1:], abs=1e-4)
    )

    # The generated tokens scored as a prompt get the logprobs they were generated with, up
    # to the dtype's rounding: the server runs bf16 where the CPU has it, and a prefill and
    # a decode step round differently there (0.02 seen; an off-by-one position is off by
    # whole units). In fp32 they agree to 1e-3: bench/lm_eval_check.py.
    generated = oai.completions.create(
        model=MODEL, prompt=PROMPT, temperature=0, max_tokens=4, logprobs=1
    ).choices[0]
    rescored = oai.completions.create(
        model=MODEL, prompt=PROMPT + generated.text, max_tokens=0, echo=True, logprobs=1
    ).choices[0]
    assert rescored.logprobs.tokens[-4:] == generated.logprobs.tokens
    assert rescored.logprobs.token_logprobs[-4:] == pytest.approx(
        generated.logprobs.token_logprobs, abs=0.1
    )


def test_token_id_and_list_prompts(oai, tokenizer, greedy_completion):
    """prompt as token ids, as a list of strings and as a list of token-id lists; with n,
    choice index = prompt index * n + choice (OpenAI's numbering)."""
    ids = tokenizer(PROMPT).input_ids
    by_ids = oai.completions.create(model=MODEL, prompt=ids, temperature=0, max_tokens=5)
    assert greedy_completion.choices[0].text.startswith(by_ids.choices[0].text)
    assert by_ids.usage.prompt_tokens == len(ids)

    other = "The capital of France is"
    alone = oai.completions.create(model=MODEL, prompt=other, temperature=0, max_tokens=5)
    listed = oai.completions.create(
        model=MODEL, prompt=[PROMPT, other], temperature=0, max_tokens=5
    )
    texts = [c.text for c in sorted(listed.choices, key=lambda c: c.index)]
    assert texts == [by_ids.choices[0].text, alone.choices[0].text]
    assert listed.usage.completion_tokens == 10

    lists = oai.completions.create(
        model=MODEL,
        prompt=[ids, tokenizer(other).input_ids],
        temperature=0,
        max_tokens=5,
        n=2,
    )
    texts = [c.text for c in sorted(lists.choices, key=lambda c: c.index)]
    assert texts == [by_ids.choices[0].text] * 2 + [alone.choices[0].text] * 2

    # What lm-evaluation-harness's local-completions sends to score choices: token-id
    # lists, echo, logprobs 1, max_tokens 1. Each choice holds its prompt's tokens + one.
    scored = oai.completions.create(
        model=MODEL,
        prompt=[ids, tokenizer(other).input_ids],
        temperature=0,
        max_tokens=1,
        echo=True,
        logprobs=1,
        seed=1234,
    )
    choices = sorted(scored.choices, key=lambda c: c.index)
    assert [len(c.logprobs.token_logprobs) for c in choices] == [
        len(ids) + 1,
        len(tokenizer(other).input_ids) + 1,
    ]
    generated = choices[0].logprobs.tokens[-1]
    assert choices[0].text == PROMPT + generated
    assert by_ids.choices[0].text.startswith(generated)
    assert choices[0].logprobs.token_logprobs[0] is None
