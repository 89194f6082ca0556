"""Clients that cost the server by being slow or sly, against a real gunicorn (gevent worker):
one that sends a byte after its request and then closes (the close must still be seen), one
that keeps sending bytes but stays (it must still be answered), bodies that trickle in
(TURSI_BODY_TIMEOUT) and a stream reader that stops reading (TURSI_SEND_TIMEOUT, whose big
frames go out in pieces). Nothing here bounds how fast the machine is: each test waits for
what must happen, and checks what must not have (a generation that ran to its max_tokens, a
connection still open)."""

from __future__ import annotations

import json
import select
import socket
import time

import pytest
import requests

from tests.helpers import (
    CORPUS,
    GATED_APP,
    Server,
    StepGate,
    build_llama,
    parse_metrics,
    parse_sse,
    value,
    wait_for,
    write_catalog,
)

MODEL = "tiny-long"
CONTEXT = 8192
# Longer than any generation here may get while a test holds the decode steps.
ENDLESS = {"model": MODEL, "prompt": "Once upon a time", "max_tokens": 2000, "ignore_eos": True}

SEND_TIMEOUT = 1.0
BODY_TIMEOUT = 1.0
CONNECTIONS = 5  # the slow-body server's TURSI_WORKER_CONNECTIONS


@pytest.fixture(scope="module")
def long_model(tmp_path_factory):
    """The tiny Llama with a context of CONTEXT tokens (a long prompt), and its catalog."""
    root = tmp_path_factory.mktemp("tiny-long")
    build_llama(root / "llama", max_position_embeddings=CONTEXT)
    return write_catalog(root / "models.json", {MODEL: {"path": "llama", "dtype": "float32"}})


@pytest.fixture(scope="module")
def gate(tmp_path_factory):
    return StepGate(tmp_path_factory.mktemp("slow-clients-gate"))


@pytest.fixture(scope="module")
def server(long_model, tmp_path_factory, gate):
    folder = tmp_path_factory.mktemp("slow-clients")
    srv = Server(
        {
            "TURSI_MODELS_FILE": str(long_model),
            "TURSI_PRELOAD": MODEL,
            "TURSI_HOME": str(folder / "home"),
            "TURSI_RATE_LIMIT": "100000/minute",
            "TURSI_SEND_TIMEOUT": str(SEND_TIMEOUT),
            # No heartbeats: a stream's first bytes are its first frame (see the stall test).
            "TURSI_HEARTBEAT_SECONDS": "600",
            **gate.env,
        },
        folder / "gunicorn.log",
        GATED_APP,
    )
    try:
        srv.wait_loaded(MODEL)
        yield srv
    finally:
        gate.release()
        srv.stop()


@pytest.fixture
def held(gate):
    """The server's decode steps wait until the test releases them: a generation cannot
    end by itself, only by being cancelled, and its tokens stay few."""
    gate.hold()
    yield gate
    gate.release()


def tokens_generated(server) -> int:
    response = requests.get(f"{server.url}/models/{MODEL}/metrics", timeout=10)
    return response.json()["metrics"]["tokens_generated"]


def errors_counted(server, code: str) -> float:
    scrape = requests.get(f"http://127.0.0.1:{server.port}/metrics", timeout=10)
    return value(parse_metrics(scrape.text), "tursi_errors_total", code=code)


def request_bytes(body: dict, path: str = "/api/v1/generate") -> bytes:
    data = json.dumps(body).encode()
    return (
        f"POST {path} HTTP/1.1\r\nHost: localhost\r\nContent-Type: application/json\r\n"
        f"Content-Length: {len(data)}\r\n\r\n".encode()
        + data
    )


def nothing_runs(server) -> bool:
    return server.generations() == {"running": 0, "waiting": 0}


def ends_cancelled(server, held: StepGate, before: int, max_tokens: int) -> None:
    """Give the engine its steps back: the cancelled generation leaves at the next one, so
    nothing runs and fewer than its max_tokens were generated."""
    held.release()
    wait_for(lambda: nothing_runs(server), timeout=60)
    assert tokens_generated(server) - before < max_tokens


@pytest.mark.parametrize("pause", [0, 0.5], ids=["together", "apart"])
def test_a_byte_after_the_request_does_not_hide_the_close(server, held, pause):
    """A non-streamed client sends its request, one more byte, then closes: at once (the
    server finds byte and close together) or after a pause (the watch first finds the byte
    alone). The byte stays unread (it would start the next request), so the socket never
    stops being readable; the close behind it is still seen: the request ends as 499
    client_disconnected while its generation, whose decode steps are held, cannot have ended
    by itself."""
    before, gone = tokens_generated(server), errors_counted(server, "client_disconnected")
    sock = socket.create_connection(("127.0.0.1", server.port))
    sock.sendall(request_bytes(ENDLESS))
    wait_for(lambda: server.generations()["running"] == 1, timeout=60)
    sock.sendall(b"x")
    time.sleep(pause)  # not a bound: only the order in which the server may see things
    sock.close()
    closed = time.monotonic()
    wait_for(lambda: errors_counted(server, "client_disconnected") == gone + 1, timeout=30)
    print(f"\nbyte then close ({pause} s apart): seen {time.monotonic() - closed:.2f} s after")
    ends_cancelled(server, held, before, ENDLESS["max_tokens"])


def test_a_client_that_sends_more_but_stays_gets_its_answer(server, held):
    """Bytes after the request (here the start of a next request, sent once the generation
    runs, so that they wait unread in the socket) are not a close: the generation runs to
    its end and the answer comes."""
    with socket.create_connection(("127.0.0.1", server.port), timeout=60) as sock:
        sock.sendall(request_bytes({**ENDLESS, "max_tokens": 8}))
        wait_for(lambda: server.generations()["running"] == 1, timeout=60)
        sock.sendall(b"GET /health")
        time.sleep(0.5)  # not a bound: the watch finds the bytes before the steps go on
        held.release()
        received = b""
        while not received.endswith(b"}\n"):
            chunk = sock.recv(65536)
            assert chunk, f"the server closed the connection: {received!r}"
            received += chunk
    head, _, body = received.partition(b"\r\n\r\n")
    assert head.startswith(b"HTTP/1.1 200 "), head
    assert json.loads(body)["tokens_generated"] == 8


def long_prompt(server, tokens: int) -> str:
    """A prompt of about `tokens` tokens (a few more) of the model's tokenizer."""
    unit = " ".join(CORPUS[:4]) + " "
    count = requests.post(
        f"{server.url}/tokenize", json={"model": MODEL, "text": unit}, timeout=10
    ).json()["count"]
    return unit * -(-tokens // count)


def test_a_stalled_stream_reader_ends_at_the_send_timeout(server, held):
    """A stream client with a tiny receive buffer that never reads. Its first frame, the
    prompt's logprobs with 20 alternatives per token, is 7 MB: more than the socket buffers
    hold (Linux's send buffer grows to 4 MB at most), so the server's write waits.
    TURSI_SEND_TIMEOUT later the request ends with send_timeout (counted) while its
    generation, whose decode steps are held, cannot have ended by itself; it then leaves the
    batch, and the server closes the connection."""
    before, stalls = tokens_generated(server), errors_counted(server, "send_timeout")
    body = {
        **ENDLESS,
        "prompt": long_prompt(server, 4000),
        "max_tokens": 1000,
        "stream": True,
        "prompt_logprobs": 20,
        "return_full_text": False,  # the prompt's logprobs are the first frame
    }
    sock = socket.socket()
    sock.setsockopt(socket.SOL_SOCKET, socket.SO_RCVBUF, 1)  # the kernel's minimum
    sock.connect(("127.0.0.1", server.port))
    try:
        sock.sendall(request_bytes(body))
        wait_for(lambda: server.generations()["running"] == 1, timeout=60)
        assert select.select([sock], [], [], 60)[0]  # the frame is on its way: nothing read
        writing = time.monotonic()
        wait_for(lambda: errors_counted(server, "send_timeout") == stalls + 1, timeout=60)
        print(f"\nstalled reader: cut {time.monotonic() - writing:.2f} s after its frame began")
        ends_cancelled(server, held, before, body["max_tokens"])
        sock.settimeout(60)
        try:
            while sock.recv(1 << 20):  # what the buffers held, then the end
                pass
        except ConnectionResetError:
            pass
    finally:
        sock.close()


def dechunks(data: bytes) -> list[bytes]:
    """The chunks of a chunked HTTP/1.1 message body, in order."""
    chunks, rest = [], data
    while True:
        size, _, rest = rest.partition(b"\r\n")
        if int(size, 16) == 0:
            return chunks
        chunks.append(rest[: int(size, 16)])
        rest = rest[int(size, 16) + 2 :]


def test_a_big_frame_goes_out_in_pieces(server):
    """The send timeout bounds each write the stream hands the server, so a 7 MB frame (the
    prompt's logprobs) goes out in pieces of at most SEND_PIECE characters, each under its
    own timeout: a client that takes a big frame slowly but steadily is judged on its
    progress, not on the whole frame. On the wire: many chunks, none over SEND_PIECE
    characters (3 bytes each at most here), which join into the same stream."""
    from tursi.api.disconnect import SEND_PIECE

    body = {
        **ENDLESS,
        "prompt": long_prompt(server, 4000),
        "max_tokens": 4,
        "stream": True,
        "prompt_logprobs": 20,
        "return_full_text": False,
    }
    received = b""
    with socket.create_connection(("127.0.0.1", server.port), timeout=60) as sock:
        sock.sendall(request_bytes(body))
        while not received.endswith(b"\r\n0\r\n\r\n"):
            chunk = sock.recv(1 << 20)
            assert chunk, f"the server closed the stream after {len(received)} bytes"
            received += chunk
    head, _, chunked = received.partition(b"\r\n\r\n")
    assert head.startswith(b"HTTP/1.1 200 ")
    chunks = dechunks(chunked)
    assert max(len(chunk) for chunk in chunks) <= 3 * SEND_PIECE
    events = parse_sse(b"".join(chunks).decode().split("\n"))
    assert events[0][0] == "prompt_logprobs" and len(events[0][1]["prompt_logprobs"]) >= 4000
    assert events[-1][0] == "done" and events[-1][1]["tokens_generated"] == 4


@pytest.fixture
def slow_body_server(tmp_path):
    srv = Server(
        {
            "TURSI_PRELOAD": "",
            "TURSI_HOME": str(tmp_path / "home"),
            "TURSI_WORKER_CONNECTIONS": str(CONNECTIONS),
            "TURSI_BODY_TIMEOUT": str(BODY_TIMEOUT),
        },
        tmp_path / "gunicorn.log",
    )
    try:
        srv.wait_healthy()
        yield srv
    finally:
        srv.stop()


def worker_connections(server) -> int:
    """Client connections the worker has accepted (its listener aside)."""
    return sum(
        1
        for conn in server.worker().net_connections("tcp")
        if conn.status == "ESTABLISHED" and conn.laddr.port == server.port
    )


@pytest.mark.parametrize("path", ["/api/v1/generate", "/v1/completions"])
def test_slow_bodies_are_cut_at_the_body_timeout(slow_body_server, path):
    """Every connection the worker may hold (TURSI_WORKER_CONNECTIONS) sends its headers and
    1 byte of a declared 1,000-byte body, then nothing. /health, asked meanwhile, waits for
    a free connection and gets one when the first slow body runs out of time; each slow
    client gets 408 request_body_timeout, no earlier than the timeout, and then the server
    closes its connection. Before, they held the worker forever and /health never came."""
    srv = slow_body_server
    head = (
        f"POST {path} HTTP/1.1\r\nHost: localhost\r\nContent-Type: application/json\r\n"
        "Content-Length: 1000\r\n\r\n{"
    ).encode()
    socks = []
    try:
        for _ in range(CONNECTIONS):
            sock = socket.create_connection(("127.0.0.1", srv.port), timeout=60)
            sock.sendall(head)
            socks.append((sock, time.monotonic()))
        wait_for(lambda: worker_connections(srv) == CONNECTIONS, timeout=30)
        asked = time.monotonic()
        health = requests.get(f"http://127.0.0.1:{srv.port}/health", timeout=60)
        assert health.status_code == 200
        print(f"\n{CONNECTIONS} slow bodies: /health answered in {time.monotonic() - asked:.2f} s")
        for sock, sent in socks:
            received = b""
            while chunk := sock.recv(65536):  # to the server's close (timeout 60 s: fails)
                received += chunk
            assert time.monotonic() - sent >= BODY_TIMEOUT
            head_in, _, body = received.partition(b"\r\n\r\n")
            assert head_in.startswith(b"HTTP/1.1 408 "), received
            assert json.loads(body)["error"]["code"] == "request_body_timeout"
    finally:
        for sock, _ in socks:
            sock.close()
    assert requests.get(f"http://127.0.0.1:{srv.port}/health", timeout=10).status_code == 200
