"""Concurrent requests through Flask's test client: generations, streams and loads at once
give each caller its own exact answer."""

from __future__ import annotations

import threading
import time

from tests.helpers import (
    API,
    assert_error,
    build_llama,
    generate,
    generate_ok,
    load_and_wait,
    metrics,
    stream,
    streamed_text,
    wait_for,
    write_catalog,
)


def test_concurrent_generations_are_served_one_by_one(app, tiny_client):
    body = {"model": "tiny", "prompt": "jumps over", "max_tokens": 8, "temperature": 0}
    expected = generate_ok(tiny_client, **body)["text"]
    results, errors = [], []

    def worker():
        try:
            client = app.test_client()
            for _ in range(2):
                response = client.post(f"{API}/generate", json=body)
                results.append((response.status_code, response.get_json()["text"]))
        except Exception as exc:  # reported below
            errors.append(exc)

    threads = [threading.Thread(target=worker) for _ in range(6)]
    for thread in threads:
        thread.start()
    for thread in threads:
        thread.join(60)
    assert errors == []
    assert results == [(200, expected)] * 12
    assert metrics(tiny_client)["requests_total"] == 13


def test_concurrent_streams_and_loads(app, tiny_client):
    """Streams to one model while another loads: nothing waits on the load."""
    results = []

    def streamer():
        client = app.test_client()
        _, events = stream(client, prompt="lazy dog", max_tokens=6, temperature=0)
        results.append(streamed_text(events))

    threads = [threading.Thread(target=streamer) for _ in range(3)]
    for thread in threads:
        thread.start()
    entry = load_and_wait(app.test_client(), "tiny-gpt2")
    for thread in threads:
        thread.join(60)
    assert entry["status"] == "loaded"
    assert len(results) == 3 and len(set(results)) == 1
    assert results[0].startswith("lazy dog dog")


def test_json_null_body_is_not_an_object(client):
    response = client.post(f"{API}/generate", data="null", content_type="application/json")
    error = assert_error(response, 400, "invalid_request")
    assert error["message"] == "The body must be a JSON object"


def test_prompt_filling_the_context_without_max_tokens(tiny_client):
    error = assert_error(generate(tiny_client, prompt="dog " * 300), 400, "context_length_exceeded")
    assert error["details"]["prompt_tokens"] > error["details"]["context_length"] == 256
    assert "max_tokens" not in error["details"]
    assert "-" not in error["message"]


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
