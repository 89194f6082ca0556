"""An engine that fails must end every job it holds: through Flask's test client, on the
tiny model. (a) an allocation error while a prefill group joins the batch, (b) a worker
thread that dies, (c) a step that hangs past TURSI_STEP_TIMEOUT. Each client gets a 5xx
within a bounded time, never waits forever; the model's state says what happened."""

import json
import threading
import time

import pytest
import torch

import tursi.engine.jobs as jobs_module
from tests.helpers import API, assert_error, load_and_wait, wait_for
from tursi.engine.jobs import Failed, GenerationJob, GenerationParams
from tursi.engine.kvcache import BatchCache
from tursi.engine.scheduler import Scheduler
from tursi.engine.worker import ModelWorker
from tursi.errors import ModelFailed
from tursi.threads import Empty

BOUND = 10.0  # seconds: every client must have its answer well before this
GROUP = 4


class EngineCrash(BaseException):
    """Not an Exception: escapes the worker's per-turn handler, as a bug that kills the
    thread would."""


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


def read_stream(client):
    """POST a streamed generation and read it to the end; returns the last SSE event as
    (name, data)."""
    response = client.post(f"{API}/generate", json=body(max_tokens=200, stream=True))
    try:
        text = response.get_data(as_text=True)
    finally:
        response.close()
    frames = [frame for frame in text.split("\n\n") if frame.startswith("event: ")]
    name, data = frames[-1].split("\n", 1)
    return name.removeprefix("event: "), json.loads(data.removeprefix("data: "))


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


@pytest.fixture
def held_decode(make_app, monkeypatch):
    """The first decode step waits until the returned event is set and then runs `action`
    (set it on the event's `action` attribute); later steps run as usual."""
    gate = threading.Event()
    gate.action = lambda: None
    real_step = Scheduler._decode_step
    first = []

    def held_step(self):
        if not first:
            first.append(True)
            gate.wait(30)
            gate.action()
        return real_step(self)

    monkeypatch.setattr(Scheduler, "_decode_step", held_step)
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


def test_a_dead_worker_thread_fails_its_clients_and_the_model(make_app, held_decode, caplog):
    app = make_app(preload=["tiny"])
    client = app.test_client()
    wait_for(lambda: client.get("/ready").status_code == 200)

    def crash():
        raise EngineCrash("boom")

    held_decode.action = crash
    worker = app.extensions["tursi"].manager.state("tiny").worker
    streamed = in_thread(lambda: read_stream(app.test_client()))
    waiting = in_thread(lambda: app.test_client().post(f"{API}/generate", json=body()))
    wait_for(lambda: sum(generations(client).values()) == 2)
    held_decode.set()

    joined([streamed[0], waiting[0]])
    name, data = streamed[1]["value"]
    assert (name, data["error"]["code"]) == ("error", "model_failed")
    error = assert_error(waiting[1]["value"], 503, "model_failed")
    # The exception's type for clients; its text (which may name the server's files) and
    # the traceback only in the log.
    assert "EngineCrash" in error["message"] and "EngineCrash" in error["details"]["reason"]
    assert "boom" not in error["message"] + error["details"]["reason"]
    assert "EngineCrash: boom" in caplog.text
    entry = model_entry(client)
    assert entry["status"] == "failed"
    assert "crashed" in entry["error"] and "EngineCrash" in entry["error"]
    assert "boom" not in entry["error"]
    not_ready = assert_error(client.get("/ready"), 503, "not_ready")
    assert not_ready["details"]["models"] == {"tiny": "failed"}
    with pytest.raises(ModelFailed):  # a request that got the worker before it died
        worker.submit(GenerationJob([1], GenerationParams(5)))

    # A new request is refused at once; a new load serves again.
    later = in_thread(lambda: app.test_client().post(f"{API}/generate", json=body()))
    joined([later[0]])
    refused = assert_error(later[1]["value"], 409, "model_not_loaded")
    assert refused["details"]["status"] == "failed"
    assert refused["details"]["load_error"] == entry["error"]
    assert load_and_wait(client, "tiny")["status"] == "loaded"
    assert client.post(f"{API}/generate", json=body()).status_code == 200
    assert client.get("/ready").status_code == 200


def test_a_hung_step_is_caught_by_the_watchdog(make_app, held_decode):
    app = make_app(preload=["tiny"], step_timeout=1.0)
    client = app.test_client()
    wait_for(lambda: client.get("/ready").status_code == 200)
    streamed = in_thread(lambda: read_stream(app.test_client()))
    waiting = in_thread(lambda: app.test_client().post(f"{API}/generate", json=body()))

    joined([streamed[0], waiting[0]])  # the step is still hung: nothing released it
    name, data = streamed[1]["value"]
    assert (name, data["error"]["code"]) == ("error", "model_failed")
    error = assert_error(waiting[1]["value"], 503, "model_failed")
    assert "TURSI_STEP_TIMEOUT" in error["message"]
    entry = model_entry(client)
    assert entry["status"] == "failed" and "TURSI_STEP_TIMEOUT" in entry["error"]
    assert_error(client.get("/ready"), 503, "not_ready")

    held_decode.set()  # the stuck step returns: its thread ends; a new load serves again
    assert load_and_wait(client, "tiny")["status"] == "loaded"
    assert client.post(f"{API}/generate", json=body()).status_code == 200


def test_a_waiting_request_asks_whether_the_engine_still_serves(monkeypatch):
    """The wait behind collect() and the SSE relay: however the engine stops, a client
    hears of it at its next check, even if nobody sends it an event."""
    monkeypatch.setattr(jobs_module, "ENGINE_CHECK_SECONDS", 0.05)
    job = GenerationJob([1], GenerationParams(5))
    with pytest.raises(Empty):  # the engine serves, nothing came: the caller's timeout
        job.next_event(timeout=0.2)
    failure = ModelFailed("stopped")
    job.engine_failure = lambda: failure
    assert job.next_event() == Failed(failure)  # no timeout: it still returns
    assert job.cancelled
