"""The console's server side in-process: its files (served without a key, with a policy that
keeps the browser on this server), and the history its charts draw (GET
/api/v1/status/history): rates that are the counts over the interval, on a clock the test
controls. tests/server/test_console.py drives the page itself in Chromium."""

from __future__ import annotations

import pytest

from tests.helpers import API, load_and_wait
from tursi.api.history import ServerHistory

BODY = {"model": "tiny", "prompt": "hello", "max_tokens": 5, "temperature": 0, "ignore_eos": True}


def unhooked_history(app) -> ServerHistory:
    """The app's kind of history, on its manager, that only this test's clock ticks (the
    app's own also ticks on the housekeeping thread, on the real clock)."""
    state = app.extensions["tursi"]
    return ServerHistory(state.manager, state.gpu)


@pytest.mark.parametrize(
    "path, kind",
    [
        ("/console", "text/html"),
        ("/console/console.js", "text/javascript"),
        ("/console/console.css", "text/css"),
    ],
)
def test_the_console_files_need_no_key_and_keep_the_browser_here(make_app, path, kind):
    client = make_app(api_keys=["k1"]).test_client()
    response = client.get(path)
    assert response.status_code == 200 and response.content_type.startswith(kind)
    policy = response.headers["Content-Security-Policy"]
    assert "default-src 'none'" in policy and "connect-src 'self'" in policy
    assert "http" not in response.get_data(as_text=True).replace("http://www.w3.org/2000/svg", "")
    # the data does need the key
    assert client.get(f"{API}/status/history").status_code == 401
    assert (
        client.get(f"{API}/status/history", headers={"Authorization": "Bearer k1"}).status_code
        == 200
    )
    assert client.post(path).status_code in (401, 405)


def test_no_other_file_is_served(make_app):
    client = make_app().test_client()
    for name in ("index.html", "..%2Fapi%2Fapp.py", "nope.js"):
        assert client.get(f"/console/{name}").status_code == 404


def test_history_rates_are_the_counts_over_the_interval(make_app):
    app = make_app()
    client = app.test_client()
    assert load_and_wait(client, "tiny")["status"] == "loaded"
    history = unhooked_history(app)
    history.tick(now=100.0)
    for _ in range(3):
        assert client.post(f"{API}/generate", json=BODY).status_code == 200
    history.tick(now=101.0)  # under the interval: no sample
    history.tick(now=102.0)
    first, second = history.samples()[-2:]
    assert first["requests_per_second"] is None and first["tokens_per_second"] is None
    assert second["requests_per_second"] == 3 / 2  # the three generations, over 2 s
    assert second["tokens_per_second"] == 3 * 5 / 2
    assert second["running"] == 0 and second["waiting"] == 0
    assert second["process_memory_bytes"] > 0 and second["memory_used_bytes"] > 0
    assert second["gpu_memory_used_bytes"] is None  # no GPU here
    assert second["time"] >= first["time"]


def test_history_keeps_five_minutes(make_app):
    history = unhooked_history(make_app())
    for second in range(0, 2 * 200, 2):
        history.tick(now=float(second))
    assert len(history.samples()) == 150


def test_the_history_endpoint_starts_the_sampling(make_app):
    app = make_app()
    manager = app.extensions["tursi"].manager
    assert not manager._housekeeper_started  # no model loaded: nothing started it yet
    body = app.test_client().get(f"{API}/status/history").get_json()
    assert body["interval_seconds"] == 2.0 and isinstance(body["samples"], list)
    assert manager._housekeeper_started
