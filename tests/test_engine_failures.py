"""An engine that fails must end every job it holds: through Flask's test client, on the
tiny model. An allocation error while a prefill group joins the batch: each client gets a
5xx within a bounded time, never waits forever."""

import threading
import time

import pytest
import torch
from conftest import API, assert_error, load_and_wait, wait_for

from tursi.engine.kvcache import BatchCache
from tursi.engine.worker import ModelWorker

BOUND = 10.0  # seconds: every client must have its answer well before this
GROUP = 4


def body(**extra):
    return {
        "model": "tiny",
        "prompt": "lazy dog",
        "max_tokens": 5,
        "ignore_eos": True,
        "temperature": 0,
        **extra,
    }


def in_thread(call):
    """Start call() on a daemon thread; returns (thread, dict with its "value" once done)."""
    result = {}
    thread = threading.Thread(target=lambda: result.update(value=call()), daemon=True)
    thread.start()
    return thread, result


def joined(threads, bound=BOUND):
    """Wait for every thread; fail (instead of hanging) past `bound` seconds in all."""
    deadline = time.monotonic() + bound
    for thread in threads:
        thread.join(max(0.0, deadline - time.monotonic()))
    alive = sum(thread.is_alive() for thread in threads)
    assert alive == 0, f"{alive} client(s) still waiting after {bound:g} s"


def generations(client):
    return client.get(f"{API}/status").get_json()["generations"]


def model_entry(client, name="tiny"):
    models = client.get(f"{API}/models").get_json()["models"]
    return next(m for m in models if m["name"] == name)


@pytest.fixture
def gathered(make_app, monkeypatch):
    """The worker takes its first jobs only once the returned event is set, so requests
    submitted before that are prefilled together, as one group."""
    gate = threading.Event()
    real_take = ModelWorker._take_jobs

    def gated_take(self, block):
        gate.wait(30)
        return real_take(self, block)

    monkeypatch.setattr(ModelWorker, "_take_jobs", gated_take)
    yield gate
    gate.set()


def test_an_allocation_error_in_a_prefill_group_ends_every_job(make_app, gathered, monkeypatch):
    app = make_app()
    client = app.test_client()
    assert load_and_wait(client, "tiny")["status"] == "loaded"
    real_add_row = BatchCache.add_row
    calls = []

    def add_row(self, *args):
        calls.append(True)
        if len(calls) == 2:  # the second row of the group: the first is already in the batch
            raise torch.OutOfMemoryError("out of memory (test)")
        return real_add_row(self, *args)

    monkeypatch.setattr(BatchCache, "add_row", add_row)
    clients = [
        in_thread(lambda: app.test_client().post(f"{API}/generate", json=body()))
        for _ in range(GROUP)
    ]
    wait_for(lambda: generations(client) == {"running": 0, "waiting": GROUP})
    gathered.set()

    joined([thread for thread, _ in clients])
    assert len(calls) == 2  # one group: it failed at its second row
    for _, result in clients:
        error = assert_error(result["value"], 500, "generation_failed")
        assert "OutOfMemoryError" in error["message"]
    assert generations(client) == {"running": 0, "waiting": 0}  # every slot came back
    again = client.post(f"{API}/generate", json=body())
    assert again.status_code == 200, again.get_json()
    assert again.get_json()["tokens_generated"] == 5
    assert model_entry(client)["status"] == "loaded"
