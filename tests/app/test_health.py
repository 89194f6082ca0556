"""Probes: GET /health (liveness) and GET /ready (readiness) in-process on the tiny models
(tests/server/test_health.py probes a real server)."""

from __future__ import annotations

import pytest

from tests.helpers import API, assert_error, load_and_wait, wait_for, write_catalog

KEY = {"Authorization": "Bearer k1"}


def model_status(app, name):
    return app.extensions["tursi"].manager.state(name).status


def test_health_is_ok(client):
    response = client.get("/health")
    assert response.status_code == 200
    assert response.mimetype == "application/json"
    assert response.get_json() == {"status": "ok"}


@pytest.mark.parametrize("headers", [{}, {"Authorization": "Bearer wrong"}, KEY])
def test_health_is_open_with_api_keys(make_app, headers):
    client = make_app(api_keys=["k1"]).test_client()
    response = client.get("/health", headers=headers)
    assert response.status_code == 200
    assert response.get_json() == {"status": "ok"}
    assert_error(client.get(f"{API}/status"), 401, "unauthorized")  # keys are on


def test_health_does_not_need_a_model(make_app, gated_loads):
    client = make_app(preload=["tiny"]).test_client()
    assert client.get("/health").get_json() == {"status": "ok"}  # while the model loads


def test_health_and_ready_are_not_rate_limited(make_app):
    app = make_app(rate_limit="2/minute")
    client = app.test_client()
    for _ in range(6):
        health = client.get("/health")
        assert health.status_code == 200
        assert "X-RateLimit-Limit" not in health.headers
        ready = client.get("/ready")
        assert ready.status_code == 200
        assert "X-RateLimit-Limit" not in ready.headers
    # ...nor did they use up the API's budget.
    first = client.get(f"{API}/status")
    assert first.status_code == 200
    assert first.headers["X-RateLimit-Remaining"] == "1"
    assert client.get(f"{API}/status").status_code == 200
    assert_error(client.get(f"{API}/status"), 429, "rate_limit_exceeded")
    assert client.get("/health").status_code == 200  # still open once the API is limited
    assert client.get("/ready").status_code == 200


@pytest.mark.parametrize("path", ["/health", "/ready"])
def test_query_strings_are_rejected(client, path):
    error = assert_error(client.get(f"{path}?verbose=1"), 400, "invalid_request")
    assert "verbose" in error["details"]["fields"]


@pytest.mark.parametrize("path", ["/health", "/ready"])
def test_probes_answer_only_get(client, path):
    response = client.post(path)
    error = assert_error(response, 405, "method_not_allowed")
    assert "GET" in error["details"]["allowed_methods"]


def test_ready_without_preloaded_models(client):
    response = client.get("/ready")
    assert response.status_code == 200
    assert response.get_json() == {"status": "ready", "models": {}}


def test_ready_waits_for_the_preloaded_model(make_app, gated_loads):
    app = make_app(preload=["tiny"])
    client = app.test_client()
    response = client.get("/ready")
    error = assert_error(response, 503, "not_ready")
    assert error["details"]["models"] == {"tiny": "loading"}
    assert response.headers["Retry-After"] == "5"

    gated_loads.gate.set()
    wait_for(lambda: model_status(app, "tiny") == "loaded")
    response = client.get("/ready")
    assert response.status_code == 200
    assert response.get_json() == {"status": "ready", "models": {"tiny": "loaded"}}
    assert "Retry-After" not in response.headers


def test_ready_waits_for_every_preloaded_model(make_app, gated_loads):
    gated_loads.names.add("tiny-gpt2")
    app = make_app(preload=["tiny", "tiny-gpt2"])
    client = app.test_client()
    wait_for(lambda: model_status(app, "tiny") == "loaded")
    error = assert_error(client.get("/ready"), 503, "not_ready")
    assert error["details"]["models"] == {"tiny": "loaded", "tiny-gpt2": "loading"}

    gated_loads.gate.set()
    wait_for(lambda: model_status(app, "tiny-gpt2") == "loaded")
    assert client.get("/ready").get_json() == {
        "status": "ready",
        "models": {"tiny": "loaded", "tiny-gpt2": "loaded"},
    }


def test_ready_ignores_models_that_are_not_preloaded(make_app):
    app = make_app(preload=["tiny"])
    client = app.test_client()
    wait_for(lambda: model_status(app, "tiny") == "loaded")
    assert load_and_wait(client, "tiny-gpt2")["status"] == "loaded"
    assert client.get("/ready").get_json()["models"] == {"tiny": "loaded"}
    assert client.post(f"{API}/models/tiny-gpt2/unload").status_code == 200
    assert client.get("/ready").status_code == 200


def test_ready_after_a_preloaded_model_is_unloaded(make_app):
    app = make_app(preload=["tiny"])
    client = app.test_client()
    wait_for(lambda: client.get("/ready").status_code == 200)
    assert client.post(f"{API}/models/tiny/unload").status_code == 200
    error = assert_error(client.get("/ready"), 503, "not_ready")
    assert error["details"]["models"] == {"tiny": "not_loaded"}
    assert load_and_wait(client, "tiny")["status"] == "loaded"
    assert client.get("/ready").status_code == 200


def test_ready_when_the_preload_failed(make_app, tmp_path, tiny_models_dir):
    empty = tmp_path / "empty-weights"
    empty.mkdir()
    catalog = write_catalog(
        tmp_path / "models.json",
        {
            "broken": {"path": str(empty)},
            "tiny": {"path": str(tiny_models_dir / "llama"), "dtype": "float32"},
        },
    )
    app = make_app(models_file=str(catalog), preload=["tiny", "broken"])
    client = app.test_client()
    wait_for(
        lambda: model_status(app, "broken") == "failed" and model_status(app, "tiny") == "loaded"
    )
    for _ in range(2):  # it stays so: a failed preload is not retried behind the scenes
        response = client.get("/ready")
        error = assert_error(response, 503, "not_ready")
        assert error["details"]["models"] == {"tiny": "loaded", "broken": "failed"}
    assert client.get("/health").status_code == 200  # alive, just not ready


def test_ready_needs_the_api_key(make_app):
    app = make_app(api_keys=["k1"], preload=["tiny"])
    client = app.test_client()
    wait_for(lambda: model_status(app, "tiny") == "loaded")
    for headers in ({}, {"Authorization": "Bearer wrong"}):
        response = client.get("/ready", headers=headers)
        assert_error(response, 401, "unauthorized")
        assert response.headers["WWW-Authenticate"].startswith("Bearer")
    response = client.get("/ready", headers=KEY)
    assert response.status_code == 200
    assert response.get_json() == {"status": "ready", "models": {"tiny": "loaded"}}


def test_not_ready_needs_the_api_key_too(make_app, gated_loads):
    client = make_app(api_keys=["k1"], preload=["tiny"]).test_client()
    assert_error(client.get("/ready"), 401, "unauthorized")  # no model names leak
    assert_error(client.get("/ready", headers=KEY), 503, "not_ready")
