"""The prefix cache through both APIs (issue 16): `cache_prompt` reaches every job of a
request, and the cached prompt tokens are reported where clients read them (native `done`
event and body, /v1 `usage.prompt_tokens_details`); the model's metrics (JSON and
Prometheus) show what the engine reports to its ModelStats. How the numbers add up over a
request's prompts and choices is tests/unit/test_response_formats.py's (synthetic events)."""

from __future__ import annotations

import json

import pytest

from tests.helpers import (
    API,
    CORPUS,
    ROUTE_REQUESTS,
    load_and_wait,
    parse_metrics,
    parse_sse,
    sse_data,
    value,
)
from tests.openai_spec import validator
from tursi.engine.prefix_cache import BLOCK_TOKENS

REQUESTS = ROUTE_REQUESTS


@pytest.fixture
def client(chat_client):
    return chat_client


def post(client, route, **extra):
    body = {"model": "tiny", "temperature": 0, **REQUESTS[route], **extra}
    response = client.post(route, json=body)
    assert response.status_code == 200, response.get_data(as_text=True)
    return response


@pytest.mark.parametrize("route", list(REQUESTS))
@pytest.mark.parametrize(
    "given, expected",
    [
        ({}, True),
        ({"cache_prompt": None}, True),
        ({"cache_prompt": True}, True),
        ({"cache_prompt": False}, False),
    ],
)
def test_cache_prompt_reaches_every_job(client, submitted, route, given, expected):
    post(client, route, **given)
    (jobs,) = submitted
    assert len(jobs) == (2 if route == "/v1/completions" else 1)
    assert [job.cache_prompt for job in jobs] == [expected] * len(jobs)


def cached_within(count, prompt_tokens):
    return type(count) is int and 0 <= count <= prompt_tokens


def prompt_tokens(client, text):
    response = client.post(f"{API}/tokenize", json={"model": "tiny", "text": text})
    assert response.status_code == 200, response.get_data(as_text=True)
    return response.get_json()["count"]


def test_native_answers_report_cached_tokens(client):
    prompt = prompt_tokens(client, REQUESTS[f"{API}/generate"]["prompt"])
    for cache_prompt in (True, False):
        body = post(client, f"{API}/generate", cache_prompt=cache_prompt).get_json()
        assert cached_within(body["cached_tokens"], prompt)
        if not cache_prompt:
            assert body["cached_tokens"] == 0  # not served from the cache
        response = post(client, f"{API}/generate", stream=True, cache_prompt=cache_prompt)
        events = parse_sse(response.get_data(as_text=True).splitlines())
        response.close()
        name, done = events[-1]
        assert name == "done"
        assert set(done) == {
            "tokens_generated",
            "generation_time",
            "finish_reason",
            "cached_tokens",
        }
        assert cached_within(done["cached_tokens"], prompt)
        if not cache_prompt:
            assert done["cached_tokens"] == 0


@pytest.mark.parametrize("route", ["/v1/completions", "/v1/chat/completions"])
def test_openai_usage_has_prompt_tokens_details(client, route):
    chat = route == "/v1/chat/completions"
    schema = "CreateChatCompletionResponse" if chat else "CreateCompletionResponse"
    for cache_prompt in (True, False):
        body = post(client, route, cache_prompt=cache_prompt).get_json()
        validator(schema).validate(body)
        usage = body["usage"]
        assert set(usage) == {
            "prompt_tokens",
            "completion_tokens",
            "total_tokens",
            "prompt_tokens_details",
        }
        assert list(usage["prompt_tokens_details"]) == ["cached_tokens"]
        cached = usage["prompt_tokens_details"]["cached_tokens"]
        assert cached_within(cached, usage["prompt_tokens"])
        if not cache_prompt:
            assert cached == 0
        if chat:
            assert body["choices"][0]["message"]["refusal"] is None

        streamed = post(
            client,
            route,
            cache_prompt=cache_prompt,
            stream=True,
            stream_options={"include_usage": True},
        )
        payloads = sse_data(streamed.get_data(as_text=True))
        streamed.close()
        assert payloads[-1] == "[DONE]"
        last = json.loads(payloads[-2])
        validator(
            "CreateChatCompletionStreamResponse" if chat else "CreateCompletionResponse",
            chunk=True,
        ).validate(last)
        assert last["choices"] == []
        details = last["usage"]["prompt_tokens_details"]
        assert list(details) == ["cached_tokens"]
        assert cached_within(details["cached_tokens"], last["usage"]["prompt_tokens"])
        if not cache_prompt:
            assert details["cached_tokens"] == 0


def test_model_metrics_show_what_the_engine_reports(client):
    """The engine reports to the model's ModelStats from its thread (prefix_lookup once per
    job, prefix_cache after each change of the cache); both metrics views show it, and an
    unload empties the bytes held while the counters stay."""
    stats = client.application.extensions["tursi"].manager.state("tiny").stats

    def scrape():
        return parse_metrics(client.get("/metrics").get_data(as_text=True))

    def prefix_cache():
        response = client.get(f"{API}/models/tiny/metrics")
        assert response.status_code == 200
        return response.get_json()["metrics"]["prefix_cache"]

    before = scrape()
    # Nothing generated yet on this app: nothing looked up, held or evicted.
    assert prefix_cache() == {
        "prompt_tokens": 0,
        "cached_tokens": 0,
        "hit_rate": "0%",
        "bytes": 0,
        "evictions": 0,
    }
    stats.prefix_lookup(40, 0)
    stats.prefix_lookup(40, 32)
    stats.prefix_cache(65536, 0)
    stats.prefix_cache(32768, 2)
    after = scrape()

    def delta(name):
        return value(after, name, model="tiny") - value(before, name, model="tiny")

    assert delta("tursi_prefix_cache_prompt_tokens_total") == 80
    assert delta("tursi_prefix_cache_cached_tokens_total") == 32
    assert delta("tursi_prefix_cache_evictions_total") == 2
    assert delta("tursi_prefix_cache_bytes") == 32768
    shown = prefix_cache()
    assert shown == {
        "prompt_tokens": 80,
        "cached_tokens": 32,
        "hit_rate": "40%",
        "bytes": 32768,
        "evictions": 2,
    }

    assert client.post(f"{API}/models/tiny/unload").status_code == 200
    assert value(scrape(), "tursi_prefix_cache_bytes", model="tiny") == value(
        before, "tursi_prefix_cache_bytes", model="tiny"
    )
    assert prefix_cache() == {**shown, "bytes": 0}  # the counters survive the unload


def test_a_repeated_prompt_is_served_from_the_cache_until_unloaded(client):
    """The engine's hits as each API reports them: a prompt of more than two blocks, asked
    again, skips the whole blocks before its last token; cache_prompt false skips nothing;
    an unload drops the model's cache (the same model loaded again starts cold)."""
    text = " ".join(CORPUS[:6])
    count = prompt_tokens(client, text)
    assert count > 2 * BLOCK_TOKENS
    hit = (count - 1) // BLOCK_TOKENS * BLOCK_TOKENS  # the last token is always prefilled
    native = {"model": "tiny", "prompt": text, "max_tokens": 3, "temperature": 0}

    def ask(**extra):
        response = client.post(f"{API}/generate", json={**native, **extra})
        assert response.status_code == 200, response.get_data(as_text=True)
        return response.get_json()

    def metrics():
        return client.get(f"{API}/models/tiny/metrics").get_json()["metrics"]["prefix_cache"]

    first = ask()
    assert first["cached_tokens"] == 0
    assert metrics()["bytes"] > 0
    again = ask()
    assert (again["cached_tokens"], again["text"]) == (hit, first["text"])
    assert ask(cache_prompt=False)["cached_tokens"] == 0
    body = client.post("/v1/completions", json=native).get_json()
    assert body["usage"]["prompt_tokens_details"] == {"cached_tokens": hit}
    assert first["text"].endswith(body["choices"][0]["text"])  # native text has the prompt
    shown = metrics()
    assert (shown["prompt_tokens"], shown["cached_tokens"]) == (3 * count, 2 * hit)

    assert client.post(f"{API}/models/tiny/unload").status_code == 200
    assert metrics()["bytes"] == 0
    assert load_and_wait(client, "tiny")["status"] == "loaded"
    assert ask()["cached_tokens"] == 0
