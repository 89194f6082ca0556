"""GET /status and GET /models/{name}/metrics: fields, formats and counters that move
with the traffic."""

import re
from datetime import datetime, timezone

from tests.helpers import (
    API,
    PERCENT,
    SECONDS,
    SIZE,
    UPTIME,
    assert_error,
    generate,
    generate_ok,
    load_and_wait,
    metrics,
    model_entry,
    status,
    stream,
)


def test_status_fields(client):
    body = status(client)
    assert {"status", "uptime", "active_models", "memory_usage", "gpu_usage", "requests"} <= set(
        body
    )
    assert body["status"] == "healthy"
    assert UPTIME.match(body["uptime"])
    assert body["active_models"] == 0
    assert set(body["memory_usage"]) == {"total", "used", "free"}
    assert all(SIZE.match(v) for v in body["memory_usage"].values())
    assert set(body["requests"]) == {"total", "success", "failed", "rate"}
    assert re.match(r"^\d+/minute$", body["requests"]["rate"])
    process = body["process_memory"]
    assert set(process) == {"rss", "rss_bytes"} and SIZE.match(process["rss"])
    assert process["rss_bytes"] > 0  # the test process itself (its real figure: tests/server)


def test_status_gpu_usage(app, client):
    gpu = status(client)["gpu_usage"]
    if app.extensions["tursi"].gpu.read() is None:
        assert gpu is None
    else:
        assert set(gpu) == {"total", "used", "free", "utilization"}
        assert all(SIZE.match(gpu[k]) for k in ("total", "used", "free"))


def test_status_counts_requests(tiny_client):
    client = tiny_client
    first = status(client)["requests"]
    generate_ok(client, prompt="hi", max_tokens=2)
    assert_error(generate(client, prompt="hi", max_tokens=0), 400, "invalid_request")
    assert_error(client.get(f"{API}/nothing-here"), 404, "not_found")
    second = status(client)["requests"]
    # first's own GET, one success, two failures
    assert second["total"] == first["total"] + 4
    assert second["success"] == first["success"] + 2
    assert second["failed"] == first["failed"] + 2
    assert second["rate"] == f"{second['total']}/minute"


def test_status_counts_a_stream_once_when_it_ends(tiny_client):
    client = tiny_client
    first = status(client)["requests"]
    response = client.post(
        f"{API}/generate", json={"model": "tiny", "prompt": "hi", "max_tokens": 3, "stream": True}
    )
    during = status(client)["requests"]
    assert during["total"] == first["total"] + 1  # only `first` itself so far
    response.get_data()
    response.close()
    after = status(client)["requests"]
    assert after["total"] == during["total"] + 2
    assert after["success"] == during["success"] + 2
    assert after["failed"] == during["failed"]


def test_status_active_models(client):
    load_and_wait(client, "tiny")
    assert status(client)["active_models"] == 1
    load_and_wait(client, "tiny-gpt2")
    assert status(client)["active_models"] == 2
    client.post(f"{API}/models/tiny/unload")
    assert status(client)["active_models"] == 1


def test_metrics_fields_and_movement(tiny_client):
    client = tiny_client
    m = metrics(client)
    assert {
        "requests_total",
        "tokens_generated",
        "average_generation_time",
        "memory_usage",
        "load_time",
        "error_rate",
    } <= set(m)
    assert (m["requests_total"], m["tokens_generated"], m["error_rate"]) == (0, 0, "0%")
    assert SECONDS.match(m["average_generation_time"])
    assert m["memory_usage"] == model_entry(client, "tiny")["memory_usage"]
    loaded_at = datetime.strptime(m["load_time"], "%Y-%m-%dT%H:%M:%SZ").replace(tzinfo=timezone.utc)
    assert abs((datetime.now(timezone.utc) - loaded_at).total_seconds()) < 60

    tokens = generate_ok(client, prompt="hi", max_tokens=5)["tokens_generated"]
    tokens += generate_ok(client, prompt="lazy dog", max_tokens=3)["tokens_generated"]
    _, events = stream(client, prompt="hi", max_tokens=4)
    tokens += events[-1][1]["tokens_generated"]
    m = metrics(client)
    assert m["requests_total"] == 3
    assert m["tokens_generated"] == tokens
    assert SECONDS.match(m["average_generation_time"])
    assert m["error_rate"] == "0%"
    assert PERCENT.match(m["error_rate"])


def test_metrics_of_a_model_that_is_not_loaded(client):
    m = metrics(client, "tiny-gpt2")
    assert (m["requests_total"], m["tokens_generated"]) == (0, 0)
    assert m["load_time"] is None
    assert m["memory_usage"] is None


def test_metrics_unknown_model(client):
    error = assert_error(client.get(f"{API}/models/gpt3/metrics"), 404, "model_not_found")
    assert "tiny" in error["details"]["available_models"]
