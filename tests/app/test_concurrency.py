"""Concurrent requests through Flask's test client: generations, streams and loads at once
give each caller its own exact answer."""

from __future__ import annotations

import threading
from functools import partial

from tests.helpers import (
    API,
    assert_error,
    build_llama,
    generate,
    generate_ok,
    load_and_wait,
    metrics,
    model_entry,
    stream,
    streamed_text,
    wait_for,
    write_catalog,
)


def run_together(*calls):
    """Run each call on its own thread; return their results in order. An exception raised
    on a thread is raised here (pytest would only warn about it)."""
    outcomes: list[tuple[bool, object]] = [(False, None)] * len(calls)

    def run(index, call):
        try:
            outcomes[index] = (True, call())
        except BaseException as exc:  # re-raised on the test's thread below
            outcomes[index] = (False, exc)

    threads = [threading.Thread(target=run, args=item) for item in enumerate(calls)]
    for thread in threads:
        thread.start()
    for thread in threads:
        thread.join(60)
    assert not any(thread.is_alive() for thread in threads), "a thread still runs after 60 s"
    for ok, value in outcomes:
        if not ok:
            raise value
    return [value for _, value in outcomes]


def test_concurrent_generations_share_the_batch_and_each_get_the_lone_answer(
    app, tiny_client, held_steps
):
    """Six clients at once: all six run in one batch (seen running together while decode
    steps are held), and each gets exactly the greedy text of the same request alone."""
    body = {"model": "tiny", "prompt": "jumps over", "max_tokens": 8, "temperature": 0}
    alone = generate_ok(tiny_client, **body)
    worker = app.extensions["tursi"].manager.state("tiny").worker
    held_steps.clear()

    def release_once_all_run():
        try:
            wait_for(lambda: worker.counts() == (6, 0))
        finally:
            held_steps.set()

    def client_twice():
        client = app.test_client()
        return [client.post(f"{API}/generate", json=body).get_json() for _ in range(2)]

    *answers, _ = run_together(*[client_twice] * 6, release_once_all_run)
    texts = [(a["text"], a["tokens_generated"]) for pair in answers for a in pair]
    assert texts == [(alone["text"], alone["tokens_generated"])] * 12
    m = metrics(tiny_client)
    assert m["requests_total"] == 13
    assert m["tokens_generated"] == 13 * alone["tokens_generated"]


def test_concurrent_streams_and_loads(app, client, gated_loads):
    """Streams to one model while another loads: nothing waits on the load (it is held until
    every stream has ended)."""
    gated_loads.names.add("tiny-gpt2")
    assert load_and_wait(client, "tiny")["status"] == "loaded"
    assert client.post(f"{API}/models/tiny-gpt2/load").status_code == 202

    def streamer():
        _, events = stream(app.test_client(), prompt="lazy dog", max_tokens=6, temperature=0)
        return streamed_text(events)

    results = run_together(*[streamer] * 3)
    assert model_entry(client, "tiny-gpt2")["status"] == "loading"  # still held
    assert len(set(results)) == 1
    assert results[0].startswith("lazy dog dog")
    gated_loads.gate.set()
    wait_for(lambda: model_entry(client, "tiny-gpt2")["status"] == "loaded")


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
    def hammer(action: str) -> list[tuple[str, int, dict]]:
        client = app.test_client()
        answers = []
        for _ in range(10):
            response = client.post(f"{API}/models/tiny/{action}")
            answers.append((action, response.status_code, response.get_json()))
        return answers

    actions = ("load", "unload", "load", "unload")
    answers = [a for batch in run_together(*[partial(hammer, a) for a in actions]) for a in batch]
    for *_, body in answers:
        assert set(body) in (
            {"status", "message"},
            {"status", "message", "estimated_time"},
            {"error"},
        ), body
    statuses = [(action, code) for action, code, _ in answers]
    assert all(code < 500 or code == 503 for _, code in statuses), statuses
    assert {code for action, code in statuses if action == "load"} <= {200, 202}
    assert {code for action, code in statuses if action == "unload"} <= {200, 409, 503}

    # Whatever the interleaving, the model ends in a consistent state that still works.
    client = app.test_client()
    wait_for(lambda: model_entry(client, "tiny")["status"] != "loading")
    entry = model_entry(client, "tiny")
    assert entry["status"] in ("loaded", "not_loaded")
    if entry["status"] == "not_loaded":  # either end of the race is fine
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
