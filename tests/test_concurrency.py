"""Load and unload of one model from many threads at once: no 5xx, no lost state."""
from __future__ import annotations

import threading
import time

from conftest import API, load_and_wait


def test_concurrent_load_and_unload_of_one_model_is_safe(app):
    statuses: list[tuple[str, int]] = []
    lock = threading.Lock()

    def hammer(action: str) -> None:
        client = app.test_client()
        for _ in range(10):
            response = client.post(f"{API}/models/tiny/{action}")
            with lock:
                statuses.append((action, response.status_code))
            body = response.get_json()
            assert set(body) in ({"status", "message"}, {"status", "message", "estimated_time"},
                                 {"error"}), body

    threads = [threading.Thread(target=hammer, args=(action,))
               for action in ("load", "unload", "load", "unload")]
    for thread in threads:
        thread.start()
    for thread in threads:
        thread.join(timeout=60)
    assert not any(thread.is_alive() for thread in threads)
    assert all(code < 500 or code == 503 for _, code in statuses), statuses
    assert {code for action, code in statuses if action == "load"} <= {200, 202}
    assert {code for action, code in statuses if action == "unload"} <= {200, 409, 503}

    # Whatever the interleaving, the model ends in a consistent state that still works.
    client = app.test_client()
    deadline = time.monotonic() + 30
    while True:
        entry = {m["name"]: m for m in client.get(f"{API}/models").get_json()["models"]}["tiny"]
        if entry["status"] != "loading" or time.monotonic() > deadline:
            break
        time.sleep(0.02)
    assert entry["status"] in ("loaded", "not_loaded")
    if entry["status"] == "not_loaded":
        entry = load_and_wait(client, "tiny")
    assert entry["status"] == "loaded"
    generated = client.post(f"{API}/generate", json={"model": "tiny", "prompt": "Once",
                                                     "max_tokens": 3, "temperature": 0})
    assert generated.status_code == 200, generated.get_json()
    running = client.get(f"{API}/status").get_json()
    assert running["active_models"] == 1
