"""Several choices and log probabilities through both APIs, on the tiny Llama in float32:
logprobs (prompt and generated tokens, top alternatives) equal a transformers forward pass
of the same model; n choices are identical under greedy decoding; token-id prompts and
lists of prompts give the right choices and indexes; best_of keeps the best; every body and
chunk is one OpenAI's own schemas accept (tests/openai_spec.py); streamed chunks add up to
the non-streamed answer."""

from __future__ import annotations

import json

import httpx2
import openai
import pytest
import torch
from transformers import AutoModelForCausalLM, AutoTokenizer

from tests.helpers import (
    API,
    CORPUS,
    assert_error,
    load_and_wait,
    sse_data,
    sse_events,
    transformers_greedy,
    with_chat_template,
    write_catalog,
)
from tests.openai_spec import validator

TOLERANCE = 1e-4
# ASCII prompts, so that every token is whole characters and the tokens join to the text.
PROMPTS = [
    " ".join(CORPUS[1].split()[i : i + words]) for i, words in enumerate([2, 3, 1, 5, 4])
] + [" ".join(CORPUS[2].split()[i : i + words]) for i, words in enumerate([3, 1, 6, 2, 4])]


@pytest.fixture(scope="module")
def reference(tiny_models_dir):
    """The stock transformers model and tokenizer from the tiny Llama's folder."""
    folder = tiny_models_dir / "llama"
    model = AutoModelForCausalLM.from_pretrained(folder, torch_dtype=torch.float32).eval()
    return model, AutoTokenizer.from_pretrained(folder)


def raw_logprobs(model, ids: list[int]) -> torch.Tensor:
    """Row i: the model's log-softmax for the token after ids[:i+1]."""
    with torch.inference_mode():
        logits = model(input_ids=torch.tensor([ids])).logits[0].float()
    return torch.log_softmax(logits, dim=-1)


@pytest.fixture
def client(make_app, tiny_models_dir, tmp_path):
    """An app with "tiny" (no chat template) and "chatty" (the same weights with one)
    loaded."""
    chatty = with_chat_template(tiny_models_dir / "llama", tmp_path / "chatty")
    catalog = write_catalog(
        tmp_path / "models.json",
        {
            "tiny": {"path": str(tiny_models_dir / "llama"), "dtype": "float32"},
            "chatty": {"path": str(chatty), "dtype": "float32"},
        },
    )
    client = make_app(models_file=str(catalog)).test_client()
    for name in ("tiny", "chatty"):
        assert load_and_wait(client, name)["status"] == "loaded"
    return client


def post(client, path, **body):
    body.setdefault("model", "tiny")
    response = client.post(path, json=body)
    assert response.status_code == 200, response.get_json()
    return response.get_json()


def chunks_of(client, path, **body):
    body.setdefault("model", "tiny")
    response = client.post(path, json={**body, "stream": True})
    assert response.status_code == 200, response.get_json()
    text = response.get_data(as_text=True)
    response.close()
    payloads = sse_data(text)
    assert payloads[-1] == "[DONE]"
    return [json.loads(p) for p in payloads[:-1]]


def close(a, b) -> bool:
    """Equal, floats within 1e-5: two runs of one greedy request are in different batches,
    which can move a logit's last bits."""
    if isinstance(a, float) and isinstance(b, float):
        return abs(a - b) <= 1e-5
    if isinstance(a, dict) and isinstance(b, dict):
        return a.keys() == b.keys() and all(close(a[k], b[k]) for k in a)
    if isinstance(a, list) and isinstance(b, list):
        return len(a) == len(b) and all(close(x, y) for x, y in zip(a, b, strict=True))
    return a == b


def token_bytes(token: str) -> bytes:
    """A completions token's bytes: `bytes:\\xNN...` names part of a character."""
    if token.startswith("bytes:"):
        return bytes.fromhex(token[len("bytes:") :].replace("\\x", ""))
    return token.encode()


def assert_top(top: dict[str, float] | list, row: torch.Tensor, k: int) -> None:
    """The top alternatives (completions: a dict, plus the chosen token; else a list of
    objects) hold the model's k best logprobs, best first."""
    best = row.topk(k).values.tolist()
    values = (
        sorted(top.values(), reverse=True) if isinstance(top, dict) else [t["logprob"] for t in top]
    )
    assert values[:k] == pytest.approx(best, abs=TOLERANCE)


def test_completion_logprobs_of_ten_prompts_equal_transformers(client, reference):
    """Ten prompts in one request (one batch), echoed with their scores: every prompt and
    generated token's logprob and top 5 equal the forward pass of prompt + greedy tokens."""
    model, tokenizer = reference
    body = post(
        client,
        "/v1/completions",
        prompt=PROMPTS,
        max_tokens=5,
        temperature=0,
        ignore_eos=True,
        echo=True,
        logprobs=5,
    )
    validator("CreateCompletionResponse", echo=True).validate(body)
    assert [c["index"] for c in body["choices"]] == list(range(10))
    prompt_tokens = 0
    for prompt, choice in zip(PROMPTS, body["choices"], strict=True):
        prompt_ids = tokenizer(prompt)["input_ids"]
        prompt_tokens += len(prompt_ids)
        ids = prompt_ids + transformers_greedy(model, prompt_ids, 5)
        rows = raw_logprobs(model, ids)
        lists = choice["logprobs"]
        assert len(lists["tokens"]) == len(ids)
        assert b"".join(map(token_bytes, lists["tokens"])).decode() == choice["text"]
        assert choice["text"] == prompt + tokenizer.decode(ids[len(prompt_ids) :])
        assert lists["token_logprobs"][0] is None and lists["top_logprobs"][0] is None
        expected = [rows[i - 1, ids[i]].item() for i in range(1, len(ids))]
        assert lists["token_logprobs"][1:] == pytest.approx(expected, abs=TOLERANCE)
        for i in range(1, len(ids)):
            assert_top(lists["top_logprobs"][i], rows[i - 1], 5)
        for i in range(len(prompt_ids), len(ids)):  # greedy: the chosen token is the best
            assert lists["token_logprobs"][i] == pytest.approx(
                max(lists["top_logprobs"][i].values())
            )
        starts = [b"".join(map(token_bytes, lists["tokens"][:i])) for i in range(len(ids))]
        assert lists["text_offset"] == [len(s.decode(errors="ignore")) for s in starts]
    assert body["usage"]["prompt_tokens"] == prompt_tokens
    assert body["usage"]["completion_tokens"] == 50


def test_echo_with_max_tokens_0_scores_the_prompt(client, reference):
    """What evaluation harnesses send: the prompt scored, nothing generated; a token-id
    prompt answers as its text does."""
    model, tokenizer = reference
    prompt = PROMPTS[3]
    ids = tokenizer(prompt)["input_ids"]
    rows = raw_logprobs(model, ids)
    for given in (prompt, ids, [ids]):
        body = post(client, "/v1/completions", prompt=given, max_tokens=0, echo=True, logprobs=1)
        validator("CreateCompletionResponse", echo=True).validate(body)
        (choice,) = body["choices"]
        assert choice["text"] == prompt and choice["finish_reason"] == "length"
        lists = choice["logprobs"]
        assert lists["token_logprobs"][0] is None
        assert lists["token_logprobs"][1:] == pytest.approx(
            [rows[i - 1, ids[i]].item() for i in range(1, len(ids))], abs=TOLERANCE
        )
        usage = dict(body["usage"])
        assert usage.pop("prompt_tokens_details").keys() == {"cached_tokens"}
        assert usage == {
            "prompt_tokens": len(ids),
            "completion_tokens": 0,
            "total_tokens": len(ids),
        }
    plain = post(client, "/v1/completions", prompt=prompt, max_tokens=0, echo=True)
    assert plain["choices"][0]["text"] == prompt and plain["choices"][0]["logprobs"] is None


def test_prompt_lists_token_ids_and_n(client, reference):
    """Prompt i's n choices are i*n .. i*n+n-1; under greedy decoding they are identical,
    and a token-id prompt answers as the text it encodes."""
    _, tokenizer = reference
    texts = PROMPTS[:3]
    ids = [tokenizer(text)["input_ids"] for text in texts]
    common = {"max_tokens": 6, "temperature": 0, "ignore_eos": True}
    alone = [
        post(client, "/v1/completions", prompt=t, **common)["choices"][0]["text"] for t in texts
    ]
    for prompt in (texts, ids):
        body = post(client, "/v1/completions", prompt=prompt, n=3, **common)
        validator("CreateCompletionResponse").validate(body)
        assert [c["index"] for c in body["choices"]] == list(range(9))
        assert [c["text"] for c in body["choices"]] == [t for t in alone for _ in range(3)]
        assert body["usage"]["completion_tokens"] == 9 * 6
        assert body["usage"]["prompt_tokens"] == sum(map(len, ids))
    echoed = post(client, "/v1/completions", prompt=ids[0], echo=True, **common)
    assert echoed["choices"][0]["text"] == texts[0] + alone[0]


def test_n_choices_differ_when_sampled_with_a_seed(client):
    def sampled() -> list[str]:
        body = post(
            client,
            "/v1/completions",
            prompt=PROMPTS[0],
            n=4,
            max_tokens=12,
            temperature=1.5,
            seed=7,
            ignore_eos=True,
        )
        return [c["text"] for c in body["choices"]]

    texts = sampled()
    assert len(set(texts)) > 1
    assert sampled() == texts  # the same seed, the same choices


def test_best_of_returns_the_best_choices(client):
    """best_of 4, n 2 draws the same 4 choices as n 4 with the same seed (choice i samples
    with seed + i) and keeps the 2 with the highest summed logprob, best first."""
    common = {"prompt": PROMPTS[1], "max_tokens": 8, "temperature": 1.2, "seed": 11}
    common["ignore_eos"] = True
    four = post(client, "/v1/completions", n=4, logprobs=0, **common)
    ranked = sorted(
        four["choices"], key=lambda c: sum(c["logprobs"]["token_logprobs"]), reverse=True
    )
    body = post(client, "/v1/completions", n=2, best_of=4, **common)
    validator("CreateCompletionResponse").validate(body)
    assert [c["index"] for c in body["choices"]] == [0, 1]
    assert [c["text"] for c in body["choices"]] == [c["text"] for c in ranked[:2]]
    assert all(c["logprobs"] is None for c in body["choices"])
    assert body["usage"]["completion_tokens"] == 4 * 8  # all four were computed


def test_completion_stream_adds_up_to_the_whole_answer(client):
    body = {
        "prompt": PROMPTS[:2],
        "n": 2,
        "max_tokens": 6,
        "temperature": 0,
        "ignore_eos": True,
        "echo": True,
        "logprobs": 3,
    }
    whole = post(client, "/v1/completions", **body)
    chunks = chunks_of(client, "/v1/completions", **body, stream_options={"include_usage": True})
    schema = validator("CreateCompletionResponse", echo=True, chunk=True)
    for chunk in chunks:
        schema.validate(chunk)
    assert chunks[-1]["choices"] == [] and chunks[-1]["usage"] == whole["usage"]
    for choice in whole["choices"]:
        mine = [c["choices"][0] for c in chunks[:-1] if c["choices"][0]["index"] == choice["index"]]
        assert "".join(c["text"] for c in mine) == choice["text"]
        assert mine[-1]["finish_reason"] == choice["finish_reason"]
        for key, values in choice["logprobs"].items():
            streamed = [v for c in mine if c["logprobs"] for v in c["logprobs"][key]]
            assert close(streamed, values), key


def test_chat_choices_and_logprobs(client, reference):
    model, tokenizer = reference
    messages = [{"role": "user", "content": "lazy dog"}]
    body = {
        "model": "chatty",
        "messages": messages,
        "n": 3,
        "max_tokens": 5,
        "temperature": 0,
        "ignore_eos": True,
        "logprobs": True,
        "top_logprobs": 4,
    }
    whole = post(client, "/v1/chat/completions", **body)
    validator("CreateChatCompletionResponse").validate(whole)
    assert [c["index"] for c in whole["choices"]] == [0, 1, 2]
    first = whole["choices"][0]
    assert all(c["message"] == first["message"] for c in whole["choices"])
    assert first["message"]["refusal"] is None
    # The rendered template, as the tiny one writes it; the reference scores its tokens.
    prompt_ids = tokenizer("user: lazy dog\nassistant:")["input_ids"]
    ids = prompt_ids + transformers_greedy(model, prompt_ids, 5)
    rows = raw_logprobs(model, ids)
    content = first["logprobs"]["content"]
    assert len(content) == 5 and first["logprobs"]["refusal"] is None
    assert bytes(b for t in content for b in t["bytes"]).decode() == first["message"]["content"]
    for i, token in enumerate(content, start=len(prompt_ids)):
        assert token["logprob"] == pytest.approx(rows[i - 1, ids[i]].item(), abs=TOLERANCE)
        assert len(token["top_logprobs"]) == 4
        assert_top(token["top_logprobs"], rows[i - 1], 4)
        assert token["top_logprobs"][0]["logprob"] == pytest.approx(token["logprob"])
    assert whole["usage"]["completion_tokens"] == 15

    plain = post(client, "/v1/chat/completions", **{**body, "logprobs": None, "top_logprobs": None})
    assert all(c["logprobs"] is None for c in plain["choices"])

    chunks = chunks_of(client, "/v1/chat/completions", **body)
    schema = validator("CreateChatCompletionStreamResponse")
    for chunk in chunks:
        schema.validate(chunk)
    for choice in whole["choices"]:
        mine = [c["choices"][0] for c in chunks if c["choices"][0]["index"] == choice["index"]]
        assert mine[0]["delta"] == {"role": "assistant", "content": ""}
        assert mine[-1]["finish_reason"] == choice["finish_reason"] and mine[-1]["delta"] == {}
        assert "".join(c["delta"].get("content", "") for c in mine) == choice["message"]["content"]
        streamed = [t for c in mine if c["logprobs"] for t in c["logprobs"]["content"]]
        assert close(streamed, choice["logprobs"]["content"])


def test_native_logprobs_in_the_body_and_the_frames(client, reference):
    model, tokenizer = reference
    prompt = PROMPTS[4]
    prompt_ids = tokenizer(prompt)["input_ids"]
    ids = prompt_ids + transformers_greedy(model, prompt_ids, 6)
    rows = raw_logprobs(model, ids)
    request = {
        "model": "tiny",
        "prompt": prompt,
        "max_tokens": 6,
        "temperature": 0,
        "ignore_eos": True,
        "logprobs": 3,
        "prompt_logprobs": 2,
    }
    body = post(client, f"{API}/generate", **request)
    assert [t["token_id"] for t in body["logprobs"]] == ids[len(prompt_ids) :]
    assert body["prompt_logprobs"][0] is None
    assert [t["token_id"] for t in body["prompt_logprobs"][1:]] == prompt_ids[1:]
    scored = body["prompt_logprobs"][1:] + body["logprobs"]
    for i, token in enumerate(scored, start=1):
        assert token["logprob"] == pytest.approx(rows[i - 1, ids[i]].item(), abs=TOLERANCE)
        expected = rows[i - 1].topk(2 if i < len(prompt_ids) else 3)
        assert [t["token_id"] for t in token["top_logprobs"]] == expected.indices.tolist()
        assert_top(token["top_logprobs"], rows[i - 1], len(expected.indices))
        assert set(token) == {"token", "token_id", "logprob", "bytes", "top_logprobs"}
    assert "".join(t["token"] for t in body["logprobs"]) == body["text"][len(prompt) :]

    response = client.post(f"{API}/generate", json={**request, "stream": True})
    events = sse_events(response.get_data(as_text=True))
    response.close()
    names = [name for name, _ in events]
    assert names[:2] == ["text", "prompt_logprobs"] and names[-1] == "done"
    assert set(names[2:-1]) == {"text"}
    assert close(events[1][1], {"prompt_logprobs": body["prompt_logprobs"]})
    frames = [data for name, data in events if name == "text"]
    assert "".join(f["text"] for f in frames) == body["text"]
    assert close([t for f in frames for t in f["logprobs"]], body["logprobs"])

    plain = post(client, f"{API}/generate", prompt=prompt, max_tokens=2)
    assert "logprobs" not in plain and "prompt_logprobs" not in plain


def test_native_refuses_several_choices(client):
    response = client.post(f"{API}/generate", json={"model": "tiny", "prompt": "hi", "n": 2})
    error = assert_error(response, 400, "invalid_request")
    assert "n" in error["details"]["fields"]


def test_the_openai_client_reads_choices_and_logprobs(client):
    """The official client (over WSGI, in-process) parses every new shape into its types."""
    http = httpx2.Client(
        transport=httpx2.WSGITransport(app=client.application), base_url="http://t"
    )
    with openai.OpenAI(
        base_url="http://t/v1", api_key="none", max_retries=0, http_client=http
    ) as sdk:
        chat = sdk.chat.completions.create(
            model="chatty",
            messages=[{"role": "user", "content": "lazy dog"}],
            n=2,
            max_tokens=4,
            temperature=0,
            logprobs=True,
            top_logprobs=2,
            extra_body={"ignore_eos": True},
        )
        assert [c.index for c in chat.choices] == [0, 1]
        assert chat.choices[0].message.refusal is None
        content = chat.choices[0].logprobs.content
        assert len(content) == 4 and len(content[0].top_logprobs) == 2
        assert (
            bytes(b for t in content for b in t.bytes).decode() == chat.choices[0].message.content
        )

        echoed = sdk.completions.create(
            model="tiny", prompt=[[72, 101], "lazy dog"], echo=True, logprobs=2, max_tokens=0
        )
        assert [c.index for c in echoed.choices] == [0, 1]
        assert echoed.choices[1].text == "lazy dog"
        assert echoed.choices[1].logprobs.token_logprobs[0] is None
        assert echoed.usage.completion_tokens == 0

        pieces: dict[int, str] = {}
        for chunk in sdk.chat.completions.create(
            model="chatty",
            messages=[{"role": "user", "content": "lazy dog"}],
            n=2,
            max_tokens=4,
            temperature=0,
            stream=True,
            logprobs=True,
        ):
            for choice in chunk.choices:
                pieces[choice.index] = pieces.get(choice.index, "") + (choice.delta.content or "")
        assert pieces == {0: chat.choices[0].message.content, 1: chat.choices[1].message.content}
