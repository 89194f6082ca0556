"""Rate limits: the X-RateLimit-* headers, 429 with Retry-After, one budget per API key."""

import time

from tests.helpers import API, assert_error


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
