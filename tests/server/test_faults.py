"""Faults against a real gunicorn (gevent worker) serving the embedded model: clients that
vanish mid-request, an unload under load, and SIGTERM while requests are in flight."""

from __future__ import annotations

import json
import os
import signal
import socket
import threading
import time

import pytest
import requests
from gevent.hub import Hub

from tests.helpers import (
    GATED_APP,
    PrefillGate,
    Server,
    StepGate,
    embedded_server,
    parse_sse,
    wait_for,
)
from tursi.engine.scheduler import PREFILL_TOKENS

MODEL = "smollm2-135m-instruct"


PROMPT = "Once upon a time"


# Long enough that no request here could end by itself during a test (minutes of decoding).
ENDLESS = {
    "model": MODEL,
    "prompt": PROMPT,
    "max_tokens": 2000,
    "temperature": 0,
    "ignore_eos": True,
}


@pytest.fixture(scope="module")
def gate(tmp_path_factory):
    return StepGate(tmp_path_factory.mktemp("faults-gate"))


@pytest.fixture(scope="module")
def prefill_gate(tmp_path_factory):
    return PrefillGate(tmp_path_factory.mktemp("faults-prefill-gate"))


@pytest.fixture(scope="module")
def server(embedded_home, tmp_path_factory, gate, prefill_gate):
    log = tmp_path_factory.mktemp("faults") / "gunicorn.log"
    with embedded_server(embedded_home, log, GATED_APP, **gate.env, **prefill_gate.env) as srv:
        yield srv


@pytest.fixture
def held(gate):
    """The server's decode steps wait for gate.step() (or the release in vanish())."""
    gate.hold()
    yield gate
    gate.release()


def tokens_generated(server) -> int:
    response = requests.get(f"{server.url}/models/{MODEL}/metrics", timeout=5)
    return response.json()["metrics"]["tokens_generated"]


def vanish(server, socks: list[socket.socket], who: str, held: StepGate) -> None:
    """Close the clients' sockets, release the held decode steps, then wait until nothing
    runs or waits (the requests are ENDLESS: only the server noticing the clients ends them).
    Prints how long it took."""
    for sock in socks:
        sock.close()
    held.release()
    closed = time.monotonic()
    wait_for(lambda: server.generations() == {"running": 0, "waiting": 0}, timeout=60)
    print(
        f"\n{who} vanished: nothing running or waiting {time.monotonic() - closed:.2f} s "
        "after the sockets closed"
    )


def send_generate(port: int, body: dict) -> socket.socket:
    """A POST /generate written on a raw socket; nothing is read."""
    data = json.dumps(body).encode()
    sock = socket.create_connection(("127.0.0.1", port))
    sock.sendall(
        b"POST /api/v1/generate HTTP/1.1\r\nHost: localhost\r\n"
        b"Content-Type: application/json\r\n"
        + f"Content-Length: {len(data)}\r\n\r\n".encode()
        + data
    )
    return sock


def read_until(sock: socket.socket, marker: bytes, timeout: float = 60) -> None:
    sock.settimeout(timeout)
    received = b""
    while marker not in received:
        chunk = sock.recv(65536)
        assert chunk, f"the server closed the connection: {received[-500:]!r}"
        received += chunk


def test_a_hundred_stream_clients_vanishing_leave_nothing_running(server, gate):
    """100 streams start (32 decoding, 68 queued), then every client closes its socket:
    half after reading their first frames, half without reading a byte. Then no generation
    runs or waits, none ran to its max_tokens, and the server serves: the next request is
    the only one to end (tokens_generated grows by its 8 tokens exactly)."""
    worker = server.worker()
    for stream in (False, True):  # warm up: torch starts its compute threads on first use
        requests.post(
            f"{server.url}/generate",
            timeout=60,
            json={"model": MODEL, "prompt": PROMPT, "max_tokens": 2, "stream": stream},
        ).close()
    threads_before = worker.num_threads()
    before = tokens_generated(server)
    gate.hold()  # no decode step until the sockets are closed: the tokens below stay few
    socks = [send_generate(server.port, {**ENDLESS, "stream": True}) for _ in range(100)]
    try:
        wait_for(lambda: sum(server.generations().values()) == 100, timeout=60)
        for sock in socks[::2]:  # mid-stream: these have their first frames
            read_until(sock, b"event: text")
        wait_for(lambda: server.generations()["running"] > 0)
    finally:
        vanish(server, socks, "100 streams", gate)
    count = tokens_generated(server)
    assert count - before < ENDLESS["max_tokens"]  # not one of them ran to its end

    assert requests.get(f"http://127.0.0.1:{server.port}/health", timeout=5).status_code == 200
    answer = requests.post(
        f"{server.url}/generate",
        timeout=60,
        json={"model": MODEL, "prompt": PROMPT, "max_tokens": 8, "temperature": 0},
    )
    assert answer.status_code == 200 and answer.json()["tokens_generated"] == 8
    assert tokens_generated(server) == count + 8  # no vanished client's generation ended since
    # No thread left behind per client (50 or more here). gevent's hub thread pool, where
    # requests parse and tokenize off the hub, may have grown meanwhile: it starts a thread
    # when a call comes while its threads are busy (a loaded machine), up to its size.
    assert worker.num_threads() <= threads_before + Hub.threadpool_size


def test_vanished_non_stream_clients_stop_their_generations(server, held):
    """A non-streamed request writes nothing until its text is complete; its client going
    away is still noticed (the socket is watched) and the generation ends."""
    before = tokens_generated(server)
    socks = [send_generate(server.port, ENDLESS) for _ in range(8)]
    try:
        wait_for(lambda: sum(server.generations().values()) == 8, timeout=60)
        while server.generations()["running"] < 8:  # one step per prefill turn
            held.step()
    finally:
        vanish(server, socks, "8 non-stream clients", held)
    # Tokens are counted as a request ends: fewer in all than one request's max_tokens means
    # that not one of the eight ran to its end.
    assert tokens_generated(server) - before < ENDLESS["max_tokens"]


def test_a_client_gone_during_a_long_prefill_costs_one_chunk_and_the_next_starts(
    server, prefill_gate
):
    """A prompt of ~2,100 tokens (five prefill chunks) and a short request queued behind it;
    the long one's client closes its socket while the prefill's second chunk waits to run.
    Prefill chunks are given one at a time, so the bounds are counted in chunks, whatever
    the machine's speed: once the server has seen the client go (the job at the gate is
    cancelled), that chunk is the last one of the prompt, and the next chunk to run is the
    short request's. Before, the long prefill ran to its end for nobody first."""
    long_body = {"model": MODEL, "prompt": PROMPT + " upon a time" * 700, "max_tokens": 4}
    prefill_gate.hold()
    try:
        sock = send_generate(server.port, long_body)
        prefill_gate.wait_held()  # its first chunk waits
        width = prefill_gate.width()
        assert width > 3 * PREFILL_TOKENS
        short: dict[str, requests.Response] = {}
        queued = threading.Thread(
            target=lambda: short.setdefault(
                "answer",
                requests.post(
                    f"{server.url}/generate",
                    timeout=120,
                    json={"model": MODEL, "prompt": PROMPT, "max_tokens": 3},
                ),
            )
        )
        queued.start()
        wait_for(lambda: server.generations() == {"running": 1, "waiting": 1}, timeout=60)
        prefill_gate.step()  # the first chunk runs; the second waits
        assert prefill_gate.width() == width
        sock.close()
        wait_for(prefill_gate.cancelled, timeout=30)  # the server saw the client go
        prefill_gate.step()  # that chunk runs; the next to arrive must be the short one's
        assert prefill_gate.width() < PREFILL_TOKENS, "the long prefill went on for nobody"
        assert server.generations() == {"running": 1, "waiting": 0}
    finally:
        prefill_gate.release()
    queued.join(120)
    answer = short["answer"]
    assert answer.status_code == 200 and answer.json()["tokens_generated"] == 3
    wait_for(lambda: server.generations() == {"running": 0, "waiting": 0}, timeout=30)


def test_unload_under_load_ends_every_request_with_a_clear_error(server):
    """Streams get `event: error` model_unloaded, non-streamed requests a 503 with that code;
    the model then loads again and serves."""
    results: dict[str, object] = {}

    def run_stream(i):
        response = requests.post(
            f"{server.url}/generate", stream=True, timeout=120, json={**ENDLESS, "stream": True}
        )
        results[f"stream{i}"] = parse_sse(response.iter_lines(decode_unicode=True))

    def run_plain():
        results["plain"] = requests.post(f"{server.url}/generate", json=ENDLESS, timeout=120)

    threads = [threading.Thread(target=run_stream, args=(i,)) for i in range(4)]
    threads.append(threading.Thread(target=run_plain))
    for thread in threads:
        thread.start()
    wait_for(lambda: server.generations()["running"] == 5, timeout=60)
    assert requests.post(f"{server.url}/models/{MODEL}/unload", timeout=60).status_code == 200
    for thread in threads:
        thread.join(60)
    for i in range(4):
        events = results[f"stream{i}"]
        assert events[-1][0] == "error", events[-3:]
        assert events[-1][1]["error"]["code"] == "model_unloaded"
        assert all(name == "text" for name, _ in events[:-1])
    plain = results["plain"]
    assert plain.status_code == 503 and plain.json()["error"]["code"] == "model_unloaded"

    assert requests.post(f"{server.url}/models/{MODEL}/load", timeout=10).status_code == 202
    server.wait_loaded(MODEL, timeout=120)
    answer = requests.post(
        f"{server.url}/generate",
        timeout=60,
        json={"model": MODEL, "prompt": PROMPT, "max_tokens": 4},
    )
    assert answer.status_code == 200


SHORT_TOKENS = 8


@pytest.fixture
def draining_server(tiny_models_dir, tmp_path):
    """A server of the tiny model, whose decode steps a StepGate holds, with a grace period
    of GRACE seconds; SIGTERM is the test's to send."""
    gate = StepGate(tmp_path)
    srv = Server(
        {
            "TURSI_MODELS_FILE": str(tiny_models_dir / "models.json"),
            "TURSI_PRELOAD": "tiny",
            "TURSI_HOME": str(tmp_path / "home"),
            "TURSI_RATE_LIMIT": "100000/minute",
            "TURSI_GRACEFUL_TIMEOUT": str(GRACE),
            **gate.env,
        },
        tmp_path / "gunicorn.log",
        GATED_APP,
    )
    try:
        srv.wait_loaded("tiny")
        yield srv, gate
    finally:
        gate.release()
        srv.stop()


# The test's own work after the signal (a few requests, SHORT_TOKENS gate steps) must fit in
# it; no request's speed matters: the steps are the test's to give.
GRACE = 10


def test_sigterm_drains(draining_server):
    """SIGTERM to the master: a request that fits the grace period finishes whole; a request
    arriving on a kept-alive connection gets 503 shutting_down; new connections are not
    taken; a request that would outlive the grace period is cut at it; the master exits 0.
    Decode steps are held, and given one at a time: the short request gets the steps it
    needs during the drain, the endless one never gets enough to end."""
    srv, gate = draining_server
    streams: dict[str, list] = {}

    def run_stream(name, max_tokens):
        response = requests.post(
            f"{srv.url}/generate",
            stream=True,
            timeout=120,
            json={
                "model": "tiny",
                "prompt": PROMPT,
                "max_tokens": max_tokens,
                "ignore_eos": True,
                "stream": True,
            },
        )
        events = []
        try:
            for event in parse_sse(response.iter_lines(decode_unicode=True)):
                events.append(event)
        except requests.RequestException:  # cut by the grace period
            events.append(("cut", None))
        streams[name] = events

    gate.hold()
    short = threading.Thread(target=run_stream, args=("short", SHORT_TOKENS))
    endless = threading.Thread(target=run_stream, args=("endless", 200))
    short.start(), endless.start()
    kept_alive = requests.Session()
    assert kept_alive.get(f"{srv.url}/status", timeout=5).status_code == 200
    wait_for(lambda: sum(srv.generations().values()) == 2, timeout=60)
    while srv.generations()["running"] < 2:  # one step per prefill turn
        gate.step()

    signalled = time.monotonic()
    os.kill(srv.process.pid, signal.SIGTERM)

    def refused(response):
        assert response.status_code == 503
        assert response.json()["error"]["code"] == "shutting_down"
        assert response.headers["Connection"] == "close"
        assert response.headers["Retry-After"] == "1"

    def refused_on_the_kept_alive_connection():
        response = kept_alive.get(f"{srv.url}/status", timeout=5)
        if response.status_code == 200:  # the worker has not had the signal yet
            return False
        refused(response)
        return True

    def new_connection_refused():
        try:
            refused(requests.get(f"{srv.url}/status", timeout=5))  # not yet closed: 503
            return False
        except requests.ConnectionError:
            return True

    wait_for(refused_on_the_kept_alive_connection, timeout=GRACE)
    wait_for(new_connection_refused, timeout=GRACE)
    for _ in range(SHORT_TOKENS):  # the endless request keeps a step waiting at the gate
        gate.step()
    short.join(30)
    assert srv.process.poll() is None, "the master exited before the drain could finish"
    names = [name for name, _ in streams["short"]]
    assert set(names[:-1]) == {"text"} and names[-1] == "done", names
    assert streams["short"][-1][1]["tokens_generated"] == SHORT_TOKENS

    srv.process.wait(timeout=GRACE + 60)
    exited = time.monotonic() - signalled
    print(f"\nSIGTERM: the master exited {exited:.1f} s after the signal (grace {GRACE} s)")
    endless.join(30)
    assert srv.process.returncode == 0
    assert exited >= GRACE - 1, exited  # it waited for the held request...
    assert streams["endless"][-1][0] == "cut", streams["endless"][-3:]  # ...then cut it
