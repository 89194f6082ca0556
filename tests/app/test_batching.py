"""Continuous batching on the tiny models, through Flask's test client: admission limits
(503 overloaded), request deadlines (504 request_timeout), cancels freeing batch slots, and
ignore_eos. Batched output against transformers' own: tests/unit/test_reference.py."""

import threading
import time

import pytest

import tursi.engine.scheduler as scheduler_module
from tests.helpers import (
    API,
    assert_error,
    generate,
    generate_ok,
    load_and_wait,
    metrics,
    sse_events,
    stream,
    wait_for,
)
from tursi.engine.scheduler import Scheduler

LONG = {
    "model": "tiny",
    "prompt": "lazy dog",
    "max_tokens": 250,
    "ignore_eos": True,
    "temperature": 0,
}  # 250 slow steps: still running whenever a test looks


def counts(client, name="tiny"):
    """(running, waiting) from the model's metrics."""
    m = metrics(client, name)
    return m["generations_running"], m["generations_waiting"]


def engine_counts(client, name="tiny"):
    """(running, waiting) read from the worker: for polling, which would use up the rate
    limit through the API."""
    worker = client.application.extensions["tursi"].manager.state(name).worker
    return worker.counts()


def in_thread(call):
    """Start call() on a thread; returns (thread, dict with its "value" once it ends)."""
    result = {}
    thread = threading.Thread(target=lambda: result.update(value=call()))
    thread.start()
    return thread, result


def test_a_full_model_answers_503_overloaded_then_admits_again(make_app, held_steps):
    app = make_app(max_batch=1, max_queue=1)
    client = app.test_client()
    load_and_wait(client, "tiny")
    held_steps.clear()
    running = client.post(f"{API}/generate", json={**LONG, "stream": True})
    assert b"lazy dog" in next(iter(running.response))  # started: closing it cancels the job
    wait_for(lambda: engine_counts(client) == (1, 0))
    queued, result = in_thread(lambda: generate(app.test_client(), prompt="hi", max_tokens=3))
    wait_for(lambda: engine_counts(client) == (1, 1))
    assert client.get(f"{API}/status").get_json()["generations"] == {"running": 1, "waiting": 1}

    for streamed in (True, False):  # a stream first: if it got in, it would not block
        response = generate(client, prompt="hi", max_tokens=3, stream=streamed)
        assert response.status_code == 503  # before assert_error, which would read a stream
        error = assert_error(response, 503, "overloaded")
        assert error["details"] == {"max_batch": 1, "max_queue": 1}
        assert response.headers["Retry-After"] == "1"
    # the admission check comes before the prompt is tokenized (which costs as much as the
    # prompt is long): a prompt over the context is refused as the full model's 503 too
    assert_error(generate(client, prompt="lazy dog " * 200, max_tokens=3), 503, "overloaded")
    assert counts(client) == (1, 1)  # refused requests take no place

    running.close()
    held_steps.set()
    wait_for(lambda: engine_counts(client)[1] == 0)  # the queued request took the freed slot
    assert generate_ok(client, prompt="hi", max_tokens=3)["tokens_generated"] == 3
    queued.join(30)
    assert result["value"].status_code == 200
    wait_for(lambda: engine_counts(client) == (0, 0))


STEP = 1 / 64  # seconds of the fake clock per decode step (exact in binary)


@pytest.fixture
def timed_steps(held_steps, fake_clock, monkeypatch):
    """held_steps, and each decode step moves the engine's fake clock on by STEP."""
    held_step = Scheduler._decode_step

    def timed_step(self):
        held_step(self)
        fake_clock.advance(STEP)

    monkeypatch.setattr(Scheduler, "_decode_step", timed_step)
    return held_steps


def test_the_deadline_ends_one_request_not_the_batch(make_app, timed_steps, fake_clock):
    """The long request's deadline passes while a second one is mid-generation beside it:
    the long one ends with 504, the other goes on to its last token. Speculation off: the
    bound below counts one token per step, and a verify step adds several (whether one runs
    depends on the step times measured, not on the fake clock)."""
    app = make_app(request_timeout=1.0, speculative=False)
    client = app.test_client()
    load_and_wait(client, "tiny")
    timed_steps.clear()
    long = client.post(f"{API}/generate", json={**LONG, "stream": True})
    frames = iter(long.response)
    assert next(frames).startswith(b"event: text")  # running; its deadline is 1 s from now
    fake_clock.advance(0.75)
    body = {"prompt": "jumps over", "max_tokens": 30, "temperature": 0, "ignore_eos": True}
    short, result = in_thread(lambda: generate(app.test_client(), **body))
    wait_for(lambda: sum(engine_counts(client)) == 2)  # queued, or joined the held batch
    timed_steps.set()  # the short one runs from 0.75 s to ~1.2 s: past the long one's end
    events = sse_events(b"".join(frames).decode())
    long.close()
    short.join(30)

    assert result["value"].status_code == 200, result["value"].get_json()
    answer = result["value"].get_json()
    assert (answer["tokens_generated"], answer["finish_reason"]) == (30, "length")
    names = [name for name, _ in events]
    assert names[:3] == ["text"] * 3 and names[-1] == "error" and "done" not in names
    error = events[-1][1]["error"]
    assert error["code"] == "request_timeout"
    assert set(error) == {"code", "message", "details"}
    assert error["details"]["timeout_seconds"] == 1.0
    # 1 s of steps after its first token (0.75 s held, then STEP each): ~0.25 / STEP more.
    assert 0.25 / STEP <= error["details"]["tokens_generated"] <= 0.25 / STEP + 2
    wait_for(lambda: engine_counts(client) == (0, 0))


def test_running_and_waiting_requests_past_their_deadline_get_504(
    make_app, held_steps, fake_clock, monkeypatch
):
    app = make_app(request_timeout=0.5, max_batch=1)
    client = app.test_client()
    load_and_wait(client, "tiny")
    stepping = threading.Event()  # a decode step began: the running one has its first token
    held_step = Scheduler._decode_step

    def step(self):
        stepping.set()
        return held_step(self)

    monkeypatch.setattr(Scheduler, "_decode_step", step)
    held_steps.clear()
    post = lambda: app.test_client().post(f"{API}/generate", json=LONG)  # noqa: E731
    running, ran = in_thread(post)
    assert stepping.wait(30)
    waiting, waited = in_thread(post)
    wait_for(lambda: engine_counts(client) == (1, 1))
    fake_clock.advance(0.5)  # both deadlines reached while the batch is held
    held_steps.set()
    running.join(30)
    waiting.join(30)

    errors = [assert_error(result["value"], 504, "request_timeout") for result in (ran, waited)]
    assert [error["details"]["timeout_seconds"] for error in errors] == [0.5, 0.5]
    assert errors[0]["details"]["tokens_generated"] > 0
    assert errors[1]["details"]["tokens_generated"] == 0  # it never left the queue
    wait_for(lambda: engine_counts(client) == (0, 0))
    again = generate_ok(client, prompt="hi", max_tokens=2, ignore_eos=True)  # sampled: no EOS
    assert again["tokens_generated"] == 2


def test_no_deadline_when_the_timeout_is_off(make_app):
    app = make_app(request_timeout=None)
    client = app.test_client()
    load_and_wait(client, "tiny")
    assert app.extensions["tursi"].manager.state("tiny").worker.request_timeout is None
    assert generate_ok(client, prompt="hi", max_tokens=3)["tokens_generated"] == 3


def test_closing_a_stream_frees_its_slot_while_the_others_go_on(tiny_client, slow_steps):
    client = tiny_client
    body = {**LONG, "stream": True, "return_full_text": False}
    responses = [client.post(f"{API}/generate", json=body) for _ in range(3)]
    frames = [iter(response.response) for response in responses]
    for frame in frames:
        assert next(frame).startswith(b"event: text")  # generated text: all three run
    wait_for(lambda: engine_counts(client) == (3, 0))

    responses[0].close()
    wait_for(lambda: engine_counts(client) == (2, 0))
    rest = [sse_events(b"".join(frame).decode()) for frame in frames[1:]]
    for response in responses[1:]:
        response.close()

    for events in rest:
        assert events[0][0] == "text"
        assert events[-1][0] == "done"
        assert (events[-1][1]["tokens_generated"], events[-1][1]["finish_reason"]) == (
            250,
            "length",
        )
    wait_for(lambda: engine_counts(client) == (0, 0))
    wait_for(lambda: metrics(client)["requests_total"] == 3)
    assert metrics(client)["tokens_generated"] < 3 * 250  # the closed one stopped early


def test_a_started_request_never_reads_as_waiting_again(tiny_client, monkeypatch):
    """Running/waiting stay consistent while a request gets its first and last tokens."""
    real_choose = scheduler_module.choose_tokens

    def slow_choose(*args):
        time.sleep(0.05)  # widen the moments between a prefill's end and the row joining
        return real_choose(*args)

    monkeypatch.setattr(scheduler_module, "choose_tokens", slow_choose)
    app = tiny_client.application
    worker = app.extensions["tursi"].manager.state("tiny").worker
    thread, result = in_thread(lambda: generate(app.test_client(), prompt="hi", max_tokens=4))
    seen = []
    while thread.is_alive():  # read the worker directly: the API would hit the rate limit
        seen.append(worker.counts())
    thread.join()
    assert result["value"].status_code == 200
    started = seen.index((1, 0)) if (1, 0) in seen else len(seen)
    assert started < len(seen)  # it was seen running
    assert set(seen[started:]) <= {(1, 0), (0, 0)}


def test_ignore_eos_generates_through_end_of_sequence_tokens(app, tiny_client):
    client = tiny_client
    body = {"prompt": "lazy dog", "max_tokens": 12, "temperature": 0, "return_full_text": False}
    plain = generate_ok(client, **body)
    assert (plain["tokens_generated"], plain["finish_reason"]) == (12, "length")

    # The tiny random model never picks its end-of-sequence token: make every token one.
    loaded = app.extensions["tursi"].manager.state("tiny").worker.loaded
    loaded.eos_ids = frozenset(range(len(loaded.tokenizer)))
    ended = generate_ok(client, **body)
    assert (ended["text"], ended["tokens_generated"], ended["finish_reason"]) == ("", 1, "stop")

    kept = generate_ok(client, ignore_eos=True, **body)
    assert (kept["text"], kept["tokens_generated"], kept["finish_reason"]) == (
        plain["text"],
        12,
        "length",
    )
    _, events = stream(client, ignore_eos=True, **body)
    assert events[-1][1]["finish_reason"] == "length"
    assert "".join(data["text"] for name, data in events if name == "text") == plain["text"]
