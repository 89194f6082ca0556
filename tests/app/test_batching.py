"""Continuous batching on the tiny models: admission limits (503 overloaded), request
deadlines (504 request_timeout), cancels freeing batch slots, batched output equal to
unbatched output, and ignore_eos. Through Flask's test client, or the Scheduler directly."""

import collections
import threading
import time

import pytest

import tursi.engine.scheduler as scheduler_module
from tests.helpers import (
    API,
    CORPUS,
    assert_error,
    build_llama,
    generate,
    generate_ok,
    load_and_wait,
    metrics,
    sse_events,
    stream,
    wait_for,
)
from tursi.engine.catalog import Catalog, CatalogEntry
from tursi.engine.jobs import Finished, GenerationJob, GenerationParams, TextChunk
from tursi.engine.loading import LoadOptions, load_model
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
    the long one ends with 504, the other goes on to its last token."""
    app = make_app(request_timeout=1.0)
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
    assert generate_ok(client, prompt="hi", max_tokens=2)["tokens_generated"] == 2


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


WORDS = " ".join(CORPUS[:4]).split()


# Twelve prompts of 1 to 34 words and different max_tokens: the rows join and leave the batch
# at different steps, so rows are added, moved and removed in the cache while others run.
REQUESTS = [
    (" ".join(WORDS[i % 7 : i % 7 + n]), 6 + 5 * i % 19)
    for i, n in enumerate([1, 2, 3, 5, 8, 13, 21, 34, 4, 10, 17, 26])
]


@pytest.fixture(scope="module", params=["tiny", "tiny-gpt2", "varied", "varied-eager"])
def loaded(request, tiny_models_dir, tmp_path_factory):
    """A tiny model in float32, loaded as the server loads it. The catalog's tiny Llama mostly
    repeats the prompt's last token; "varied" is a Llama with untied, larger random weights
    whose greedy text depends on the whole context ("-eager": with eager attention, which
    takes an additive mask instead of a boolean one)."""
    home = str(tmp_path_factory.mktemp("home"))
    if request.param.startswith("varied"):
        path = tmp_path_factory.mktemp("varied")
        build_llama(path, tie_word_embeddings=False, initializer_range=0.2)
        entry = CatalogEntry("varied", "local", str(path), dtype="float32")
    else:
        entry = Catalog.load(str(tiny_models_dir / "models.json")).get(request.param)
    model = load_model(entry, LoadOptions(), home)
    if request.param.endswith("-eager"):
        model.model.set_attn_implementation("eager")
    return model


def run_engine(loaded, requests, max_batch, one_per_turn=False):
    """Greedy generations through one Scheduler; [(text, tokens, finish_reason)] per request."""
    scheduler = Scheduler("test", loaded, max_batch, lambda job, seconds, ok: None)
    jobs = [
        GenerationJob(
            loaded.tokenizer(prompt)["input_ids"],
            GenerationParams(max_tokens, temperature=0.0, ignore_eos=True),
        )
        for prompt, max_tokens in requests
    ]
    arriving = collections.deque(jobs)
    while arriving or not scheduler.idle:
        while arriving:
            scheduler.add(arriving.popleft())
            if one_per_turn:
                break
        scheduler.turn()
    return [outcome(job) for job in jobs]


def outcome(job):
    pieces = []
    while True:
        event = job.events.get(timeout=1)
        if isinstance(event, Finished):
            return "".join(pieces), event.tokens_generated, event.finish_reason
        assert isinstance(event, TextChunk), event
        pieces.append(event.text)


@pytest.mark.parametrize(
    "max_batch, one_per_turn, prefill_tokens",
    [
        (16, False, 512),  # all at once: two prefill groups, then one batch
        (4, True, 512),  # one new request per turn into a batch of at most 4
        (16, True, 16),  # long prompts prefilled alone, 16 columns per turn, between steps
    ],
)
def test_greedy_fp32_text_is_the_same_alone_or_batched(
    loaded, monkeypatch, max_batch, one_per_turn, prefill_tokens
):
    assert loaded.dtype == "float32"
    lengths = [len(loaded.tokenizer(prompt)["input_ids"]) for prompt, _ in REQUESTS]
    assert len(set(lengths)) == len(REQUESTS) and max(lengths) > 40
    alone = [run_engine(loaded, [request], max_batch=1)[0] for request in REQUESTS]
    assert [tokens for _, tokens, _ in alone] == [n for _, n in REQUESTS]

    monkeypatch.setattr(scheduler_module, "PREFILL_TOKENS", prefill_tokens)
    assert run_engine(loaded, REQUESTS, max_batch, one_per_turn) == alone


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
