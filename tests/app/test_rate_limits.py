"""Rate limits: the X-RateLimit-* headers, 429 with Retry-After, one budget per API key;
token budgets (TURSI_TOKEN_RATE_LIMIT) and their X-RateLimit-*-Tokens headers."""

import time

from tests.helpers import API, assert_error, load_and_wait, wait_for


def test_rate_limit_headers_and_429(make_app):
    app = make_app(rate_limit="3/minute")
    client = app.test_client()
    responses = [
        client.get(f"{API}/status"),
        client.get(f"{API}/nothing-here"),
        client.post(f"{API}/generate", json={"model": "tiny"}),
    ]
    assert [r.status_code for r in responses] == [200, 404, 400]
    now = time.time()
    for remaining, response in zip((2, 1, 0), responses, strict=False):
        assert response.headers["X-RateLimit-Limit"] == "3"
        assert response.headers["X-RateLimit-Remaining"] == str(remaining)
        assert now - 1 <= int(response.headers["X-RateLimit-Reset"]) <= now + 61

    limited = client.get(f"{API}/status")
    error = assert_error(limited, 429, "rate_limit_exceeded")
    assert "3 per 1 minute" in error["message"]
    assert 0 < int(limited.headers["Retry-After"]) <= 60
    assert limited.headers["X-RateLimit-Remaining"] == "0"
    assert_error(client.post(f"{API}/models/tiny/load"), 429, "rate_limit_exceeded")
    assert app.extensions["tursi"].manager.state("tiny").status == "not_loaded"


def test_rate_limits_are_per_api_key(make_app):
    client = make_app(api_keys=["k1", "k2"], rate_limit="2/minute").test_client()
    k1 = {"Authorization": "Bearer k1"}
    k2 = {"Authorization": "Bearer k2"}
    assert [client.get(f"{API}/status", headers=k1).status_code for _ in range(2)] == [200, 200]
    assert_error(client.get(f"{API}/status", headers=k1), 429, "rate_limit_exceeded")
    second = [client.get(f"{API}/status", headers=k2) for _ in range(2)]
    assert [r.status_code for r in second] == [200, 200]
    assert [r.headers["X-RateLimit-Remaining"] for r in second] == ["1", "0"]
    assert_error(client.get(f"{API}/status", headers=k2), 429, "rate_limit_exceeded")


TOKEN_HEADERS = (
    "X-RateLimit-Limit-Tokens",
    "X-RateLimit-Remaining-Tokens",
    "X-RateLimit-Reset-Tokens",
)


def test_without_a_token_limit_no_token_headers(make_app):
    response = make_app().test_client().get(f"{API}/status")
    assert response.status_code == 200
    assert not any(name in response.headers for name in TOKEN_HEADERS)


def test_token_budget_admits_exactly_what_fits(make_app):
    """100 tokens per window: each request needs its prompt plus max_tokens x choices to be
    left; it is charged its prompt plus what it generated (usage), so a choice that stops
    early gives the rest back; a refusal charges nothing. (A year's window: the test cannot
    straddle two.)"""
    app = make_app(api_keys=["k1", "k2"], token_rate_limit="100/year")
    client = app.test_client()
    k1, k2 = {"Authorization": "Bearer k1"}, {"Authorization": "Bearer k2"}
    assert load_and_wait(client, "tiny", headers=k1)["status"] == "loaded"
    prompt = [5] * 10
    early = {"logit_bias": {"7": 100}, "stop_token_ids": [7]}  # stops at its first token

    def complete(headers, max_tokens, n=1, **extra):
        body = {"model": "tiny", "prompt": prompt, "max_tokens": max_tokens, "n": n, **extra}
        return client.post("/v1/completions", json=body, headers=headers)

    left, resets = 100, set()
    steps = [  # (max_tokens, n, extra, expected code)
        (20, 1, early, 200),  # needs 30, costs 10 + what it generated
        (30, 1, {"ignore_eos": True}, 200),  # costs 40
        (30, 2, {"ignore_eos": True}, "token_rate_limit_exceeded"),  # needs 70
        (95, 1, {}, "request_exceeds_token_limit"),  # needs 105 > 100: never
        (None, 1, {"ignore_eos": True}, 200),  # needs exactly what is left
        (1, 1, {}, "token_rate_limit_exceeded"),
    ]
    generated_early = None
    for max_tokens, n, extra, expected in steps:
        if max_tokens is None:
            max_tokens = left - len(prompt)
        response = complete(k1, max_tokens, n, **extra)
        assert response.headers["X-RateLimit-Limit-Tokens"] == "100"
        resets.add(response.headers["X-RateLimit-Reset-Tokens"])
        if expected == 200:
            assert response.status_code == 200, response.get_json()
            usage = response.get_json()["usage"]
            assert usage["prompt_tokens"] == len(prompt)
            left -= usage["prompt_tokens"] + usage["completion_tokens"]
            if extra is early:
                generated_early = usage["completion_tokens"]
                assert generated_early < max_tokens  # some of the reservation came back
        else:
            assert response.status_code == 429
            error = response.get_json()["error"]
            assert (error["code"], error["type"]) == (expected, "rate_limit_error")
            assert error["details"]["requested_tokens"] == len(prompt) + max_tokens * n
            if expected == "request_exceeds_token_limit":
                assert response.headers["x-should-retry"] == "false"
                assert "Retry-After" not in response.headers
            else:
                assert "x-should-retry" not in response.headers
                assert int(response.headers["Retry-After"]) > 0
        assert response.headers["X-RateLimit-Remaining-Tokens"] == str(left)
    assert left == 0 and len(resets) == 1
    assert int(resets.pop()) > time.time()

    # Another key has its own budget. A stream's headers show its reservation; once it
    # ended, what it did not generate is back.
    with client.post(
        "/v1/completions",
        json={"model": "tiny", "prompt": prompt, "max_tokens": 20, "stream": True, **early},
        headers=k2,
    ) as streamed:
        assert streamed.status_code == 200
        assert streamed.headers["X-RateLimit-Remaining-Tokens"] == "70"
        assert streamed.get_data(as_text=True).endswith("data: [DONE]\n\n")
    after = client.get(f"{API}/status", headers=k2)
    assert after.headers["X-RateLimit-Remaining-Tokens"] == str(100 - 10 - generated_early)
    # Requests that generate nothing are not charged (the request limit counts them).
    assert client.get(f"{API}/status", headers=k1).headers["X-RateLimit-Remaining-Tokens"] == "0"


def test_token_budget_a_refused_request_costs_nothing_a_client_that_leaves_its_prompt(
    make_app, held_steps
):
    """With the one batch slot taken (decode steps held), a request the queue refuses (503)
    gives its whole reservation back; a stream the client leaves is charged its prompt and
    what was generated until then, not its max_tokens."""
    app = make_app(token_rate_limit="1000/year", max_batch=1, max_queue=0)
    client = app.test_client()
    load_and_wait(client, "tiny")
    held_steps.clear()
    body = {"model": "tiny", "prompt": [5] * 10, "ignore_eos": True}
    running = client.post("/v1/completions", json={**body, "max_tokens": 200, "stream": True})
    assert running.headers["X-RateLimit-Remaining-Tokens"] == "790"  # 10 + 200 reserved
    next(iter(running.response))  # started
    refused = client.post("/v1/completions", json={**body, "max_tokens": 5})
    assert refused.status_code == 503
    assert refused.headers["X-RateLimit-Remaining-Tokens"] == "790"
    running.close()  # the client leaves
    held_steps.set()
    worker = app.extensions["tursi"].manager.state("tiny").worker
    wait_for(lambda: worker.counts() == (0, 0))
    left = int(client.get(f"{API}/status").headers["X-RateLimit-Remaining-Tokens"])
    engine = client.get(f"{API}/models/tiny/metrics").get_json()["metrics"]
    # Charged: the prompt and the tokens generated before the client left (at most what
    # the engine generated in all).
    assert 990 - engine["tokens_generated"] <= left < 990
