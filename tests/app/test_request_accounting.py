"""One request-accounting hook (tursi.api.accounting) writes both ledgers: the JSON request
counters of /status and the Prometheus metrics, for responses refused by the before_request
hooks (key, draining), whole ones, and streams (counted when they end, with their outcome)."""

from prometheus_client.parser import text_string_to_metric_families

from tests.helpers import API, load_and_wait

KEY = {"Authorization": "Bearer k1"}
BODY = {"model": "tiny", "prompt": "hi", "max_tokens": 3, "temperature": 0, "ignore_eos": True}


def ledgers(client):
    """(JSON counters, Prometheus samples) as seen now; reading /status counts as one success."""
    counts = client.get(f"{API}/status", headers=KEY).get_json()["requests"]
    samples = {
        (s.name, tuple(sorted(s.labels.items()))): s.value
        for family in text_string_to_metric_families(client.get("/metrics").get_data(as_text=True))
        for s in family.samples
    }
    return counts, samples


def errors(samples, code):
    return samples.get(("tursi_errors_total", (("code", code),)), 0.0)


def generate_count(samples, status):
    labels = (("method", "POST"), ("route", "/api/v1/generate"), ("status", str(status)))
    return samples.get(("tursi_request_duration_seconds_count", labels), 0.0)


def stream(client):
    response = client.post(f"{API}/generate", json={**BODY, "stream": True}, headers=KEY)
    assert response.status_code == 200
    text = response.get_data(as_text=True)
    response.close()  # a stream counts when it closes
    return text


def test_one_hook_writes_both_ledgers(make_app, monkeypatch):
    app = make_app(api_keys=["k1"])
    client = app.test_client()
    assert load_and_wait(client, "tiny", headers=KEY)["status"] == "loaded"
    counts, samples = ledgers(client)

    assert client.post(f"{API}/generate", json=BODY).status_code == 401  # auth's hook
    assert client.post(f"{API}/generate", json=BODY, headers=KEY).status_code == 200
    assert "event: done" in stream(client)
    from tursi.engine.scheduler import Scheduler

    def broken_step(self):
        raise RuntimeError("boom")

    with monkeypatch.context() as patch:
        patch.setattr(Scheduler, "_decode_step", broken_step)
        assert "event: error" in stream(client)  # a 200 whose stream ends in an error
    app.extensions["tursi"].draining = True
    assert client.post(f"{API}/generate", json=BODY, headers=KEY).status_code == 503
    app.extensions["tursi"].draining = False

    after_counts, after = ledgers(client)
    # The first ledgers() call's /status, the whole 200 and the finished stream succeeded;
    # the 401, the failed stream and the 503 failed.
    assert after_counts["success"] - counts["success"] == 3
    assert after_counts["failed"] - counts["failed"] == 3
    for code in ("unauthorized", "generation_failed", "shutting_down"):
        assert errors(after, code) - errors(samples, code) == 1, code
    for status, n in ((200, 3), (401, 1), (503, 1)):
        assert generate_count(after, status) - generate_count(samples, status) == n, status
