"""End to end: real gunicorn + gevent worker on loopback, serving the embedded SmolLM2 model."""

from __future__ import annotations

import json
import socket
import threading

import pytest
import requests

from tests.helpers import GATED_APP, StepGate, embedded_server, parse_sse, wait_for

MODEL = "smollm2-135m-instruct"


PROMPT = "Once upon a time"


@pytest.fixture(scope="module")
def gate(tmp_path_factory):
    return StepGate(tmp_path_factory.mktemp("e2e-gate"))


@pytest.fixture(scope="module")
def server(embedded_home, tmp_path_factory, gate):
    log = tmp_path_factory.mktemp("e2e") / "gunicorn.log"
    with embedded_server(embedded_home, log, GATED_APP, **gate.env) as srv:
        yield srv


@pytest.fixture
def held(gate):
    """The server's decode steps wait for gate.step() until the test ends."""
    gate.hold()
    yield gate
    gate.release()


def generate(server, **body):
    response = requests.post(f"{server.url}/generate", json={"model": MODEL, **body}, timeout=120)
    assert response.status_code == 200, response.text
    return response.json()


def stream(server, **body):
    response = requests.post(
        f"{server.url}/generate",
        stream=True,
        timeout=120,
        json={"model": MODEL, "stream": True, **body},
    )
    assert response.status_code == 200, response.text
    assert response.headers["Content-Type"].startswith("text/event-stream")
    return parse_sse(response.iter_lines(decode_unicode=True))


def test_the_spec_example_gives_a_coherent_continuation(server):
    out = generate(server, prompt=PROMPT, max_tokens=40, temperature=0)
    continuation = out["text"][len(PROMPT) :]
    assert out["text"].startswith(PROMPT)
    words = continuation.split()
    # Coherent English, not token soup: mostly alphabetic words of normal length, with repeats
    # of common function words.
    assert len(words) >= 15
    assert sum(w.strip(".,;:!?\"'").isalpha() for w in words) / len(words) > 0.8
    assert {"the", "a", "and", "of", "to", "was", "in"} & {w.lower().strip(".,") for w in words}


def test_greedy_output_is_deterministic(server):
    first = generate(server, prompt="The capital of France is", max_tokens=30, temperature=0)
    second = generate(server, prompt="The capital of France is", max_tokens=30, temperature=0)
    assert first["text"] == second["text"]
    assert first["tokens_generated"] == second["tokens_generated"]


def test_stream_chunks_concatenate_to_the_non_stream_text(server):
    body = {"prompt": PROMPT, "max_tokens": 40, "temperature": 0}
    whole = generate(server, **body)
    events = stream(server, **body)
    texts = [data for event, data in events if event == "text"]
    assert all(chunk["finished"] is False for chunk in texts)
    assert [event for event, _ in events].count("done") == 1 and events[-1][0] == "done"
    done = events[-1][1]
    assert "".join(chunk["text"] for chunk in texts) == whole["text"]
    assert done["tokens_generated"] == whole["tokens_generated"]
    assert len(texts) > 10  # streamed piece by piece, not in one lump


def test_stop_strings_are_cut(server):
    base = generate(server, prompt=PROMPT, max_tokens=40, temperature=0, return_full_text=False)[
        "text"
    ]
    words = base.split()
    stop = " " + words[len(words) // 2]  # a stop that starts mid-continuation
    cut = base.index(stop)
    out = generate(
        server, prompt=PROMPT, max_tokens=40, temperature=0, stop=[stop], return_full_text=False
    )
    assert out["text"] == base[:cut]
    assert out["finish_reason"] == "stop"
    streamed = stream(
        server, prompt=PROMPT, max_tokens=40, temperature=0, stop=[stop], return_full_text=False
    )
    assert "".join(d["text"] for e, d in streamed if e == "text") == base[:cut]


def test_status_answers_while_the_engine_is_inside_a_decode_step(server, held):
    """The engine thread is held inside a decode step of four streams (as it would be in a
    long forward pass): /status still answers, every time, and sees them all running; once
    released, every stream ends with `done`. Were the model run on the hub, or /status to
    wait for the engine, no answer could come while the step lasts."""
    finished = []

    def client():
        events = stream(server, prompt=PROMPT, max_tokens=80, temperature=0)
        finished.append(events[-1][0])

    threads = [threading.Thread(target=client) for _ in range(4)]
    for thread in threads:
        thread.start()
    wait_for(lambda: sum(server.generations().values()) == 4, timeout=60)
    held.wait_held()
    for _ in range(25):
        status = requests.get(f"{server.url}/status", timeout=30)
        assert status.status_code == 200
        generations = status.json()["generations"]
        assert generations["running"] + generations["waiting"] == 4, generations
    held.release()
    for thread in threads:
        thread.join(timeout=120)
    assert finished == ["done"] * 4


def test_a_vanished_client_stops_its_generation(server):
    metrics_url = f"{server.url}/models/{MODEL}/metrics"
    before = requests.get(metrics_url, timeout=5).json()["metrics"]["tokens_generated"]
    # No end of sequence: only max_tokens or the server noticing the client can end it.
    body = json.dumps(
        {"model": MODEL, "prompt": PROMPT, "max_tokens": 1000, "stream": True, "ignore_eos": True}
    )
    sock = socket.create_connection(("127.0.0.1", server.port))
    sock.sendall(
        (
            f"POST /api/v1/generate HTTP/1.1\r\nHost: localhost\r\n"
            f"Content-Type: application/json\r\nContent-Length: {len(body)}\r\n\r\n"
            f"{body}"
        ).encode()
    )
    received = b""
    while received.count(b"event: text") < 5:
        chunk = sock.recv(4096)
        assert chunk, "server closed the stream early"
        received += chunk
    assert server.generations()["running"] == 1
    sock.close()
    wait_for(lambda: server.generations() == {"running": 0, "waiting": 0}, timeout=60)
    after = requests.get(metrics_url, timeout=5).json()["metrics"]["tokens_generated"]
    assert after - before < 1000  # it ended before max_tokens: the server cut it


def reload(server, body=None):
    assert requests.post(f"{server.url}/models/{MODEL}/unload", timeout=60).status_code == 200
    load = requests.post(f"{server.url}/models/{MODEL}/load", json=body, timeout=10)
    assert load.status_code == 202, load.text
    server.wait_loaded(MODEL, timeout=120)
    models = requests.get(f"{server.url}/models", timeout=5).json()["models"]
    return {m["name"]: m for m in models}[MODEL]


@pytest.fixture
def fp32_model(server):
    """The embedded model reloaded in float32 for one test, then back to its default dtype."""
    assert reload(server, {"dtype": "float32"})["dtype"] == "float32"
    try:
        yield
    finally:
        reload(server)


PASSAGE = (
    "The old lighthouse keeper climbed the spiral stairs every evening, counting the steps "
    "as his father had taught him, and lit the great lamp that warned the fishing boats "
    "away from the rocks. In winter the storms came in from the north and the sea rose "
    "over the harbour wall, but the light never failed. The children of the village "
    "believed he could talk to the gulls, and the gulls, for their part, seemed to wait "
    "for him on the railing each morning when he came down with bread in his pockets. "
    "One night a ship with black sails appeared on the horizon, and nobody in the village "
    "could say where it had come from or what it wanted"
).split()


# Sixteen prompts of 1 to 110 words, each starting at a different place in the passage.
BATCH_PROMPTS = [
    " ".join((PASSAGE[7 * i :] + PASSAGE)[:n])
    for i, n in enumerate([1, 2, 4, 6, 9, 12, 16, 21, 27, 34, 42, 51, 61, 72, 90, 110])
]


def test_greedy_fp32_text_is_the_same_alone_or_in_a_batch_of_16(server, fp32_model, gate):
    """The acceptance test of continuous batching: greedy decoding in fp32 gives a request the
    same text whether it ran alone or in a batch with 15 other prompts of other lengths.
    Decode steps are let through one at a time until all 16 are in the batch at once (each
    needs 24 steps; joining takes a few prefill turns), then run freely."""
    body = {"max_tokens": 24, "temperature": 0, "ignore_eos": True, "return_full_text": False}
    alone = [generate(server, prompt=prompt, **body)["text"] for prompt in BATCH_PROMPTS]
    assert len(set(alone)) > 8  # different prompts, different continuations

    together = {}

    def send(index):
        together[index] = generate(server, prompt=BATCH_PROMPTS[index], **body)["text"]

    gate.hold()
    threads = [threading.Thread(target=send, args=(i,)) for i in range(len(BATCH_PROMPTS))]
    try:
        for thread in threads:
            thread.start()
        wait_for(lambda: sum(server.generations().values()) == len(BATCH_PROMPTS), timeout=60)
        steps = 0
        while server.generations()["running"] < len(BATCH_PROMPTS):
            assert steps < body["max_tokens"] - 1, "the requests never ran all together"
            gate.step()
            steps += 1
    finally:
        gate.release()
    for thread in threads:
        thread.join(timeout=120)
    assert [together.get(i) for i in range(len(BATCH_PROMPTS))] == alone


def test_a_seeded_sampled_request_is_reproducible(server):
    body = {
        "prompt": PROMPT,
        "max_tokens": 24,
        "temperature": 0.8,
        "seed": 123,
        "return_full_text": False,
    }
    first = generate(server, **body)
    second = generate(server, **body)
    assert first["text"] == second["text"]
    assert first["tokens_generated"] == second["tokens_generated"]


def test_unload_ends_generations_in_flight_then_reload_serves_again(server):
    response = requests.post(
        f"{server.url}/generate",
        stream=True,
        timeout=120,
        json={
            "model": MODEL,
            "prompt": PROMPT,
            "max_tokens": 500,
            "stream": True,
            "temperature": 0,
        },
    )
    lines = response.iter_lines(decode_unicode=True)
    seen = []
    for line in lines:  # wait until generation is under way
        seen.append(line)
        if sum(line.startswith("event: text") for line in seen) >= 3:
            break
    unload = requests.post(f"{server.url}/models/{MODEL}/unload", timeout=60)
    assert unload.status_code == 200
    assert unload.json() == {"status": "success", "message": "Model unloaded successfully"}
    events = parse_sse(seen + list(lines))
    assert events[-1][0] == "error"
    assert events[-1][1]["error"]["code"] == "model_unloaded"
    listed = {m["name"]: m for m in requests.get(f"{server.url}/models").json()["models"]}
    assert listed[MODEL]["status"] == "not_loaded"
    assert server.generations() == {"running": 0, "waiting": 0}
    gone = requests.post(f"{server.url}/generate", json={"model": MODEL, "prompt": "Hi"})
    assert gone.status_code == 409 and gone.json()["error"]["code"] == "model_not_loaded"

    assert requests.post(f"{server.url}/models/{MODEL}/load").status_code == 202
    server.wait_loaded(MODEL, timeout=120)
    assert generate(server, prompt=PROMPT, max_tokens=5, temperature=0)["tokens_generated"] >= 1
