"""The gevent hub only does I/O (issue 19): while clients send 1 MB chat bodies in a loop,
/health answers in time and a running stream keeps its pace, on a real gunicorn server.

The bodies are the ones that froze the hub for seconds: a message of a million characters,
36,000 content parts, 300,000 CJK characters, and a body just under the character cap that
must be tokenized (off the hub) before its prompt is found to overflow the context. Every
one is refused with a 400. The tiny model's decode steps are paced (PACED_APP), so the
stream's tokens come at a known rate whatever the machine: the loaded gaps are compared
with the unloaded ones measured in the same test.
"""

from __future__ import annotations

import json
import subprocess
import sys
import threading
import time
from pathlib import Path

import pytest
import requests

from tests.helpers import PACED_APP, Server, with_chat_template, write_catalog

STEP_SECONDS = 0.03
ATTACKERS = 4
GAPS = 250  # tokens measured in each phase (p99: the third longest gap)
MAX_BODY = 1024 * 1024  # TURSI_MAX_BODY_BYTES' default: every body here is just under it


@pytest.fixture(scope="module")
def server(tiny_models_dir, tmp_path_factory):
    root = tmp_path_factory.mktemp("big-bodies")
    with_chat_template(tiny_models_dir / "llama", root / "chat")
    catalog = write_catalog(root / "models.json", {"chat": {"path": "chat", "dtype": "float32"}})
    srv = Server(
        {
            "TURSI_MODELS_FILE": str(catalog),
            "TURSI_PRELOAD": "chat",
            "TURSI_HOME": str(root / "home"),
            "TURSI_RATE_LIMIT": "1000000/minute",
            "TURSI_TEST_STEP_SECONDS": str(STEP_SECONDS),
            # one torch thread: the tiny model's steps are short, and two threads waiting on
            # each other on a busy machine made them 25 times slower (tests/conftest.py)
            "OMP_NUM_THREADS": "1",
        },
        root / "gunicorn.log",
        PACED_APP,
    )
    try:
        srv.wait_loaded("chat")
        yield srv
    finally:
        srv.stop()


def chat_body(messages: list[dict]) -> bytes:
    body = json.dumps(
        {"model": "chat", "messages": messages, "max_tokens": 1},
        ensure_ascii=False,
        separators=(",", ":"),
    ).encode()
    assert len(body) <= MAX_BODY
    return body


def attack_bodies() -> list[bytes]:
    english = "The quick brown fox jumps over the lazy dog. " * 25_000
    return [
        chat_body([{"role": "user", "content": english[:1_000_000]}]),
        chat_body([{"role": "user", "content": [{"type": "text", "text": "ab"}] * 36_000}]),
        chat_body([{"role": "user", "content": "漢字かな交じり文" * 37_500}]),
        chat_body([{"role": "user", "content": english[:199_000]}]),  # under the character cap
    ]


def p99(values: list[float]) -> float:
    ordered = sorted(values)
    return ordered[min(len(ordered) - 1, int(len(ordered) * 0.99))]


class Loop(threading.Thread):
    """A client thread that runs until `stop` is set; an assertion that fails in it is kept
    in `failure`, for the test to raise."""

    def __init__(self):
        super().__init__(daemon=True)
        self.stop = threading.Event()
        self.failure: BaseException | None = None

    def run(self) -> None:
        try:
            self.loop()
        except BaseException as exc:
            self.failure = exc

    def loop(self) -> None:
        raise NotImplementedError


class Probe(Loop):
    """GET /health every 10 ms; the latency of each."""

    def __init__(self, root: str):
        super().__init__()
        self.root, self.latencies = root, []

    def loop(self) -> None:
        with requests.Session() as session:
            while not self.stop.is_set():
                started = time.monotonic()
                assert session.get(f"{self.root}/health", timeout=30).status_code == 200
                self.latencies.append(time.monotonic() - started)
                time.sleep(0.01)


class Streamer(Loop):
    """Streams from /api/v1/generate back to back until stopped; the gaps between a
    stream's token frames (not the first, which waits for the prefill). logit_bias makes
    every token the one-character "a", so each decode step is one frame."""

    def __init__(self, api: str, token: int):
        super().__init__()
        self.api, self.gaps = api, []
        self.body = {
            "model": "chat",
            "prompt": "Once upon a time",
            "max_tokens": 200,
            "stream": True,
            "temperature": 0,
            "ignore_eos": True,
            "logit_bias": {str(token): 100},
        }

    def loop(self) -> None:
        while not self.stop.is_set():
            with requests.post(
                f"{self.api}/generate", json=self.body, stream=True, timeout=60
            ) as response:
                assert response.status_code == 200, response.text
                last = None
                for chunk in response.iter_content(chunk_size=None):
                    now = time.monotonic()
                    for _ in range(chunk.count(b"event: text")):
                        if last is not None:
                            self.gaps.append(now - last)
                        last = now
                    if self.stop.is_set():
                        break


# An attacking client, in a process of its own (as clients are: in this process it would
# share the GIL with the probe and the stream reader, and delay what they measure). It posts
# the bodies of a folder in turn on one connection until killed, and writes each answer's
# status and error code, a line each.
ATTACKER = """
import http.client, json, pathlib, sys

port, folder, out = int(sys.argv[1]), pathlib.Path(sys.argv[2]), open(sys.argv[3], "w")
bodies = [path.read_bytes() for path in sorted(folder.glob("*.json"))]
connection = http.client.HTTPConnection("127.0.0.1", port, timeout=60)
for count in range(10**9):
    try:
        connection.request(
            "POST", "/v1/chat/completions", bodies[count % len(bodies)],
            {"Content-Type": "application/json"},
        )
        response = connection.getresponse()
        body = response.read()
    except (OSError, http.client.HTTPException):  # the server closed the connection
        connection.close()
        continue
    error = json.loads(body)["error"]
    print(response.status, error["code"], sorted(error) == ["code", "details", "message",
          "param", "type"], file=out, flush=True)
"""


class Attackers:
    """ATTACKERS client processes posting the attack bodies, from start() to stop()."""

    def __init__(self, port: int, folder: Path):
        self.port, self.folder = port, folder
        for index, body in enumerate(attack_bodies()):
            (folder / f"{index}.json").write_bytes(body)
        self.processes: list[subprocess.Popen] = []

    def start(self) -> None:
        for index in range(ATTACKERS):
            out = self.folder / f"answers-{index}.txt"
            command = [sys.executable, "-c", ATTACKER, str(self.port), str(self.folder), str(out)]
            self.processes.append(subprocess.Popen(command))

    def stop(self) -> list[str]:
        """The answers, one "status code shape-ok" line each."""
        for process in self.processes:
            assert process.poll() is None, "an attacker failed"
            process.kill()
            process.wait()
        return [
            line
            for index in range(ATTACKERS)
            for line in (self.folder / f"answers-{index}.txt").read_text().splitlines()
        ]


def measure(srv: Server, token: int, attackers: Attackers | None = None):
    """(/health latencies, token gaps, the attackers' answers) over GAPS tokens of a stream."""
    probe, streamer = Probe(f"http://127.0.0.1:{srv.port}"), Streamer(srv.url, token)
    threads = [probe, streamer]
    for thread in threads:
        thread.start()
    if attackers is not None:
        attackers.start()
    deadline = time.monotonic() + 60
    while len(streamer.gaps) < GAPS and time.monotonic() < deadline:
        if any(thread.failure is not None for thread in threads):
            break
        time.sleep(0.05)
    answers = attackers.stop() if attackers is not None else []
    for thread in threads:
        thread.stop.set()
    for thread in threads:
        thread.join(timeout=90)
        assert not thread.is_alive()
        if thread.failure is not None:
            raise thread.failure
    return probe.latencies, streamer.gaps, answers


def test_big_chat_bodies_leave_health_and_streams_on_time(server, tmp_path):
    api = server.url
    (token,) = requests.post(
        f"{api}/tokenize",
        json={"model": "chat", "text": "a", "add_special_tokens": False},
        timeout=10,
    ).json()["tokens"]
    health, gaps, _ = measure(server, token)
    assert len(gaps) >= GAPS

    attackers = Attackers(server.port, tmp_path)
    loaded_health, loaded_gaps, answers = measure(server, token, attackers)
    print(
        f"alone: /health p99 {p99(health) * 1000:.0f} ms (max {max(health) * 1000:.0f}), "
        f"gap p99 {p99(gaps) * 1000:.0f} ms; under the bodies: /health p99 "
        f"{p99(loaded_health) * 1000:.0f} ms (max {max(loaded_health) * 1000:.0f}), gap p99 "
        f"{p99(loaded_gaps) * 1000:.0f} ms (max {max(loaded_gaps) * 1000:.0f}); "
        f"{len(answers)} bodies answered: {sorted(set(answers))}"
    )
    assert len(answers) >= ATTACKERS
    assert {answer.split(" ", 1)[0] for answer in answers} == {"400"}
    assert all(answer.endswith("True") for answer in answers)  # OpenAI's error object
    assert len(loaded_gaps) >= GAPS
    assert p99(loaded_health) < 0.1
    assert p99(loaded_gaps) < 3 * p99(gaps)
