"""Loads and unloads from many threads at once: no 5xx, no lost state, no broken model."""

from __future__ import annotations

import threading
import time

from conftest import API, load_and_wait, wait_for
from tiny_models import build_llama, write_catalog


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
            assert set(body) in (
                {"status", "message"},
                {"status", "message", "estimated_time"},
                {"error"},
            ), body

    threads = [
        threading.Thread(target=hammer, args=(action,))
        for action in ("load", "unload", "load", "unload")
    ]
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
    generated = client.post(
        f"{API}/generate",
        json={"model": "tiny", "prompt": "Once", "max_tokens": 3, "temperature": 0},
    )
    assert generated.status_code == 200, generated.get_json()
    running = client.get(f"{API}/status").get_json()
    assert running["active_models"] == 1


def test_models_loading_at_the_same_time_load_whole(make_app, tiny_models_dir, tmp_path):
    """Two preloads start together. transformers' from_pretrained is not thread-safe (two at
    once left the tied output head uninitialized: NaN or garbage logits), so loads take
    turns; each model must come out whole and answer exactly as when loaded alone."""
    build_llama(tmp_path / "other", seed=1, hidden_size=96, intermediate_size=192)
    catalog = write_catalog(
        tmp_path / "models.json",
        {
            "tiny": {"path": str(tiny_models_dir / "llama"), "dtype": "float32"},
            "other": {"path": str(tmp_path / "other"), "dtype": "float32"},
        },
    )
    body = {"prompt": "The quick brown", "max_tokens": 12, "temperature": 0, "ignore_eos": True}
    expected = {}
    for name in ("tiny", "other"):  # alone
        client = make_app(models_file=str(catalog)).test_client()
        assert load_and_wait(client, name)["status"] == "loaded"
        expected[name] = client.post(f"{API}/generate", json={"model": name, **body}).get_json()
    for _ in range(4):  # together
        app = make_app(models_file=str(catalog), preload=["tiny", "other"])
        manager = app.extensions["tursi"].manager

        def both_loaded(manager=manager):
            return {s.status for s in manager.states() if s.name in ("tiny", "other")} == {"loaded"}

        wait_for(both_loaded)
        client = app.test_client()
        for name in ("tiny", "other"):
            model = manager.state(name).worker.loaded.model
            assert not [key for key, value in model.state_dict().items() if value.is_meta]
            answer = client.post(f"{API}/generate", json={"model": name, **body})
            assert answer.get_json() == {
                **expected[name],
                "generation_time": answer.get_json()["generation_time"],
            }
        manager.shutdown()
