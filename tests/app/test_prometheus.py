"""GET /metrics in-process: Prometheus counters moved by exactly the traffic sent, stream
timing, the memory gauge, who may scrape, and the gunicorn hooks."""

import json
import os
import re
import time

import pytest

from tests.helpers import API, ROOT, parse_metrics, requests_seen, value, wait_for

BODY = {"model": "tiny", "prompt": "hello", "max_tokens": 5, "temperature": 0, "ignore_eos": True}


GENERATE = ("POST", "/api/v1/generate")
HISTOGRAM_SAMPLES = ("_bucket", "_count", "_sum")


# The in-process tests read this process's registry, not a multiprocess folder.
assert not os.environ.get("PROMETHEUS_MULTIPROC_DIR"), "unset PROMETHEUS_MULTIPROC_DIR for tests"


def scrape(client, **kwargs):
    response = client.get("/metrics", **kwargs)
    assert response.status_code == 200, response.get_data(as_text=True)
    assert response.content_type.startswith("text/plain")
    return parse_metrics(response.get_data(as_text=True))


def stream(client, **body):
    response = client.post(f"{API}/generate", json={**BODY, **body, "stream": True})
    try:
        return response.status_code, response.get_data(as_text=True)
    finally:
        response.close()  # the stream's duration and outcome count when it closes


def test_counters_move_by_exactly_the_traffic(tiny_client):
    client, n = tiny_client, 3
    before = scrape(client)

    for _ in range(n):
        response = client.post(f"{API}/generate", json=BODY)
        assert response.status_code == 200 and response.get_json()["tokens_generated"] == 5
    status, body = stream(client)
    assert status == 200 and "event: done" in body
    assert client.post(f"{API}/generate", json={**BODY, "model": "nope"}).status_code == 404
    assert client.post(f"{API}/generate", json={"model": "tiny"}).status_code == 400
    assert client.get("/no/such/path").status_code == 404

    def delta(name, **labels):
        return value(after, name, **labels) - value(before, name, **labels)

    def settled():  # the engine reports a request's end just after its answer goes out
        nonlocal after
        after = scrape(client)
        return (
            delta("tursi_tokens_generated_total", model="tiny") >= (n + 1) * 5
            and value(after, "tursi_generations_running", model="tiny") == 0
        )

    after = {}
    wait_for(settled)
    assert delta("tursi_tokens_generated_total", model="tiny") == (n + 1) * 5
    assert delta("tursi_time_to_first_token_seconds_count", model="tiny") == n + 1
    assert delta("tursi_inter_token_latency_seconds_count", model="tiny") == (n + 1) * 4
    assert delta("tursi_errors_total", code="model_not_found") == 1
    assert delta("tursi_errors_total", code="invalid_request") == 1
    assert delta("tursi_errors_total", code="not_found") == 1
    assert requests_seen(after, *GENERATE, 200) - requests_seen(before, *GENERATE, 200) == n + 1
    assert requests_seen(after, *GENERATE, 404) - requests_seen(before, *GENERATE, 404) == 1
    assert requests_seen(after, *GENERATE, 400) - requests_seen(before, *GENERATE, 400) == 1
    assert (
        requests_seen(after, "GET", "unmatched", 404)
        - requests_seen(before, "GET", "unmatched", 404)
    ) == 1
    # A histogram's +Inf bucket is its count; durations are positive.
    assert value(
        after,
        "tursi_request_duration_seconds_bucket",
        method="POST",
        route="/api/v1/generate",
        status="200",
        le="+Inf",
    ) == requests_seen(after, *GENERATE, 200)
    assert (
        value(
            after,
            "tursi_request_duration_seconds_sum",
            method="POST",
            route="/api/v1/generate",
            status="200",
        )
        > 0
    )
    assert value(after, "tursi_model_memory_bytes", model="tiny") > 0
    assert value(after, "tursi_model_load_duration_seconds_count", model="tiny") >= 1
    assert value(after, "tursi_generations_running", model="tiny") == 0
    assert value(after, "tursi_generations_waiting", model="tiny") == 0


def test_a_stream_is_timed_when_it_ends_not_when_it_starts(tiny_client, monkeypatch):
    from tursi.engine.scheduler import Scheduler

    real_step = Scheduler._decode_step

    def slow_step(self):
        time.sleep(0.05)
        return real_step(self)

    monkeypatch.setattr(Scheduler, "_decode_step", slow_step)
    labels = {"method": "POST", "route": "/api/v1/generate", "status": "200"}
    before = scrape(tiny_client)
    # 4 decode steps (no speculative drafts, which could make it fewer): at least 0.2 s
    status, _ = stream(tiny_client, max_tokens=5, speculative=False)
    after = scrape(tiny_client)
    assert status == 200
    assert (
        value(after, "tursi_request_duration_seconds_count", **labels)
        - value(before, "tursi_request_duration_seconds_count", **labels)
    ) == 1
    assert (
        value(after, "tursi_request_duration_seconds_sum", **labels)
        - value(before, "tursi_request_duration_seconds_sum", **labels)
    ) >= 0.2


def test_a_stream_ending_in_an_error_counts_its_code(tiny_client, monkeypatch):
    from tursi.engine.scheduler import Scheduler

    def broken_step(self):
        raise RuntimeError("boom")

    monkeypatch.setattr(Scheduler, "_decode_step", broken_step)
    before = value(scrape(tiny_client), "tursi_errors_total", code="generation_failed")
    status, body = stream(tiny_client)
    assert status == 200 and "event: error" in body and "generation_failed" in body
    after = value(scrape(tiny_client), "tursi_errors_total", code="generation_failed")
    assert after - before == 1


def test_unloading_releases_the_memory_gauge(tiny_client):
    held = tiny_client.application.extensions["tursi"].manager.state("tiny").memory_bytes
    before = value(scrape(tiny_client), "tursi_model_memory_bytes", model="tiny")
    assert held > 0 and before >= held
    assert tiny_client.post(f"{API}/models/tiny/unload").status_code == 200
    assert value(scrape(tiny_client), "tursi_model_memory_bytes", model="tiny") == before - held


REMOTE = {"REMOTE_ADDR": "10.0.0.5"}


def test_with_keys_remote_scrapers_need_one_loopback_ones_do_not(make_app):
    client = make_app(api_keys=["k1"]).test_client()
    refused = client.get("/metrics", environ_base=REMOTE)
    assert refused.status_code == 401
    assert refused.get_json()["error"]["code"] == "unauthorized"
    assert refused.headers["WWW-Authenticate"].startswith("Bearer")
    wrong = client.get("/metrics", environ_base=REMOTE, headers={"Authorization": "Bearer k2"})
    assert wrong.status_code == 401
    scrape(client, environ_base=REMOTE, headers={"Authorization": "Bearer k1"})
    scrape(client, environ_base={"REMOTE_ADDR": "127.0.0.1"})
    scrape(client, environ_base={"REMOTE_ADDR": "::1"})


def test_without_keys_metrics_are_open(client):
    scrape(client, environ_base=REMOTE)


@pytest.mark.parametrize(
    "address, loopback",
    [
        ("127.0.0.1", True),
        ("127.8.9.10", True),
        ("::1", True),
        ("::ffff:127.0.0.1", True),
        ("10.0.0.5", False),
        ("::ffff:10.0.0.5", False),
        ("2001:db8::1", False),
        ("", False),
        (None, False),
        ("not-an-ip", False),
    ],
)
def test_loopback_addresses(address, loopback):
    from tursi.api.prometheus import is_loopback

    assert is_loopback(address) is loopback


class FakeServer:
    class log:
        @staticmethod
        def info(*args):
            pass


@pytest.mark.parametrize("variable", ["PROMETHEUS_MULTIPROC_DIR", "TURSI_RUN_DIR"])
def test_the_master_makes_its_folders_and_removes_them(monkeypatch, variable):
    from tursi.api import gunicorn_defaults

    for name in ("PROMETHEUS_MULTIPROC_DIR", "TURSI_RUN_DIR"):
        monkeypatch.setenv(name, "")  # so that undoing removes it again
        monkeypatch.delenv(name)
    gunicorn_defaults.on_starting(FakeServer)
    folder = os.environ[variable]
    assert os.path.isdir(folder)
    gunicorn_defaults.on_exit(FakeServer)
    assert not os.path.exists(folder)
    assert variable not in os.environ  # a later master in this process makes its own


def test_the_hooks_reach_gunicorn_conf():
    import runpy

    conf = runpy.run_path(str(ROOT / "gunicorn.conf.py"))
    assert {"on_starting", "child_exit", "on_exit"} <= set(conf)
    assert not conf.get("preload_app")


def test_the_grafana_dashboard_queries_only_exported_metrics(tiny_client):
    """deploy/grafana/tursi-dashboard.json is a dashboard Grafana can import (JSON, panels
    with a place and queries, the variables they use defined), and every metric its queries
    name is one GET /metrics exports, of the kind the query's suffix needs."""
    dashboard = json.loads((ROOT / "deploy" / "grafana" / "tursi-dashboard.json").read_text())
    variables = {variable["name"] for variable in dashboard["templating"]["list"]}
    text = tiny_client.get("/metrics").get_data(as_text=True)
    kinds = dict(re.findall(r"^# TYPE (\S+) (\S+)$", text, re.MULTILINE))
    named = set()
    assert dashboard["panels"] and dashboard["uid"] and dashboard["title"]
    for panel in dashboard["panels"]:
        assert set(panel["gridPos"]) == {"x", "y", "w", "h"}, panel["title"]
        assert [t["refId"] for t in panel["targets"]] == sorted(
            {t["refId"] for t in panel["targets"]}
        )
        for target in panel["targets"]:
            assert (
                set(re.findall(r"\$(\w+)", target["expr"])) - {"__rate_interval", "__range"}
                <= variables
            )
            for name in re.findall(r"\btursi_\w+", target["expr"]):
                named.add(name)
                family = next(
                    (name.removesuffix(s) for s in HISTOGRAM_SAMPLES if name.endswith(s)), name
                )
                if family == name:  # a gauge or a counter, exposed under its own name
                    assert kinds.get(name) in ("gauge", "counter"), (panel["title"], name)
                else:
                    assert kinds.get(family) == "histogram", (panel["title"], name)
    # the dashboard covers throughput, latency, queue, memory and errors
    for needed in (
        "tursi_tokens_generated_total",
        "tursi_time_to_first_token_seconds_bucket",
        "tursi_inter_token_latency_seconds_bucket",
        "tursi_generations_waiting",
        "tursi_kv_cache_reserved_bytes",
        "tursi_errors_total",
    ):
        assert needed in named
