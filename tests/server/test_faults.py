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

from tests.helpers import embedded_server, parse_sse, wait_for

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
def server(embedded_home, tmp_path_factory):
    with embedded_server(embedded_home, tmp_path_factory.mktemp("faults") / "gunicorn.log") as srv:
        yield srv


def tokens_generated(server) -> int:
    response = requests.get(f"{server.url}/models/{MODEL}/metrics", timeout=5)
    return response.json()["metrics"]["tokens_generated"]


def vanish(server, socks: list[socket.socket], who: str) -> None:
    """Close the clients' sockets; one second later nothing may run or wait. Prints how long
    it took (/status polled every 20 ms)."""
    for sock in socks:
        sock.close()
    closed = time.monotonic()
    while time.monotonic() - closed < 1.0:
        if server.generations() == {"running": 0, "waiting": 0}:
            break
        time.sleep(0.02)
    print(
        f"\n{who} vanished: nothing running or waiting {time.monotonic() - closed:.2f} s "
        "after the sockets closed"
    )
    time.sleep(max(0.0, closed + 1.0 - time.monotonic()))
    assert server.generations() == {"running": 0, "waiting": 0}


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


def test_a_hundred_stream_clients_vanishing_leave_nothing_running(server):
    """100 streams start (32 decoding, 68 queued), then every client closes its socket:
    half after reading their first frames, half without reading a byte. One second later
    no generation runs or waits, no tokens are being made, and the server serves."""
    worker = server.worker()
    for stream in (False, True):  # warm up: torch starts its compute threads on first use
        requests.post(
            f"{server.url}/generate",
            timeout=60,
            json={"model": MODEL, "prompt": PROMPT, "max_tokens": 2, "stream": stream},
        ).close()
    threads_before = worker.num_threads()
    socks = [send_generate(server.port, {**ENDLESS, "stream": True}) for _ in range(100)]
    try:
        wait_for(lambda: sum(server.generations().values()) == 100, timeout=60)
        for sock in socks[::2]:  # mid-stream: these have their first frames
            read_until(sock, b"event: text")
        wait_for(lambda: server.generations()["running"] > 0)
    finally:
        vanish(server, socks, "100 streams")
    count = tokens_generated(server)
    time.sleep(0.5)
    assert tokens_generated(server) == count  # nothing is decoding any more

    assert requests.get(f"http://127.0.0.1:{server.port}/health", timeout=5).status_code == 200
    answer = requests.post(
        f"{server.url}/generate",
        timeout=60,
        json={"model": MODEL, "prompt": PROMPT, "max_tokens": 8, "temperature": 0},
    )
    assert answer.status_code == 200 and answer.json()["tokens_generated"] == 8
    assert worker.num_threads() <= threads_before  # no thread left behind per client


def test_vanished_non_stream_clients_stop_their_generations(server):
    """A non-streamed request writes nothing until its text is complete; its client going
    away is still noticed at once (the socket is watched) and the generation ends."""
    before = tokens_generated(server)
    socks = [send_generate(server.port, ENDLESS) for _ in range(8)]
    try:
        wait_for(lambda: server.generations()["running"] == 8, timeout=60)
    finally:
        vanish(server, socks, "8 non-stream clients")
    assert tokens_generated(server) - before < 8 * 200  # far from 8 x 2000


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


def test_sigterm_drains(embedded_home, tmp_path):
    """SIGTERM to the master: a request that fits the grace period finishes whole; a request
    arriving on a kept-alive connection gets 503 shutting_down; new connections are not
    taken; a request that would outlive the grace period is cut at it; the master exits 0."""
    grace = 8
    with embedded_server(
        embedded_home, tmp_path / "gunicorn.log", TURSI_GRACEFUL_TIMEOUT=str(grace)
    ) as srv:
        streams: dict[str, list] = {}

        def run_stream(name, max_tokens):
            response = requests.post(
                f"{srv.url}/generate",
                stream=True,
                timeout=120,
                json={**ENDLESS, "max_tokens": max_tokens, "stream": True},
            )
            events = []
            try:
                for event in parse_sse(response.iter_lines(decode_unicode=True)):
                    events.append(event)
            except requests.RequestException:  # cut by the grace period
                events.append(("cut", None))
            streams[name] = events

        short = threading.Thread(target=run_stream, args=("short", 60))
        endless = threading.Thread(target=run_stream, args=("endless", 2000))
        short.start(), endless.start()
        kept_alive = requests.Session()
        assert kept_alive.get(f"{srv.url}/status", timeout=5).status_code == 200
        wait_for(lambda: srv.generations()["running"] == 2, timeout=60)

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

        wait_for(refused_on_the_kept_alive_connection, timeout=5)
        outcomes = set()
        for _ in range(20):  # new connections: 503 until the worker closes its listener
            try:
                refused(requests.get(f"{srv.url}/status", timeout=5))
                outcomes.add(503)
            except requests.ConnectionError:
                outcomes.add("refused")
            time.sleep(0.1)
        assert "refused" in outcomes, outcomes  # after a second at most, none are taken

        short.join(30)
        names = [name for name, _ in streams["short"]]
        assert set(names[:-1]) == {"text"} and names[-1] == "done", names
        assert streams["short"][-1][1]["tokens_generated"] == 60

        srv.process.wait(timeout=grace + 10)
        exited = time.monotonic() - signalled
        print(f"\nSIGTERM: the master exited {exited:.1f} s after the signal (grace {grace} s)")
        endless.join(10)
        assert srv.process.returncode == 0
        assert grace - 1 <= exited <= grace + 5, exited
        assert "done" not in [name for name, _ in streams["endless"]]
