"""Start and stop a real gunicorn (gevent worker) for end-to-end tests, on a free loopback port."""

from __future__ import annotations

import json
import os
import socket
import subprocess
import sys
import time
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path

import psutil
import requests

ROOT = Path(__file__).resolve().parent.parent
EMBEDDED = "smollm2-135m-instruct"


def free_port() -> int:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return sock.getsockname()[1]


@contextmanager
def embedded_server(home: Path, log_path: Path, **env: str) -> Iterator[Server]:
    """A server preloading the embedded model (from the session's shared TURSI_HOME), with a
    rate limit no test reaches unless it sets its own; stopped when the block ends."""
    srv = Server(
        {
            "TURSI_HOME": str(home),
            "TURSI_PRELOAD": EMBEDDED,
            "TURSI_RATE_LIMIT": "100000/minute",
            **env,
        },
        log_path,
    )
    try:
        srv.wait_loaded(EMBEDDED)
        yield srv
    finally:
        srv.stop()


class Server:
    def __init__(self, env: dict[str, str], log_path: Path):
        self.port = free_port()
        self.url = f"http://127.0.0.1:{self.port}/api/v1"
        self.log_path = log_path
        full_env = {
            **os.environ,
            "HF_HUB_OFFLINE": "1",
            "TURSI_HOST": "127.0.0.1",
            "TURSI_PORT": str(self.port),
            **env,
        }
        self._log = log_path.open("w")
        self.process = subprocess.Popen(
            [sys.executable, "-m", "gunicorn", "-c", "gunicorn.conf.py", "wsgi:app"],
            cwd=ROOT,
            env=full_env,
            stdout=self._log,
            stderr=subprocess.STDOUT,
        )

    def generations(self) -> dict:
        """Generations running and waiting, as GET /status tells them."""
        return requests.get(f"{self.url}/status", timeout=10).json()["generations"]

    def worker(self) -> psutil.Process:
        """The one gunicorn worker process (TURSI_WORKERS=1)."""
        (worker,) = psutil.Process(self.process.pid).children()
        return worker

    def wait_healthy(self, timeout: float = 120) -> None:
        """Until GET /health answers (the worker has imported everything)."""

        def healthy() -> bool:
            return requests.get(f"http://127.0.0.1:{self.port}/health", timeout=2).ok

        self._poll(healthy, timeout, "no answer")

    def wait_loaded(self, model: str, timeout: float = 300) -> None:
        def loaded() -> bool:
            models = requests.get(f"{self.url}/models", timeout=2).json()["models"]
            status = {m["name"]: m for m in models}[model]
            if status["status"] == "failed":
                raise RuntimeError(f"{model} failed to load: {status.get('error')}")
            return status["status"] == "loaded"

        self._poll(loaded, timeout, f"{model} not loaded")

    def _poll(self, done, timeout: float, failure: str) -> None:
        """Call done() every 0.25 s until it is true; a request error counts as not yet (the
        worker still booting: it imports torch). Raises if gunicorn exits or time runs out."""
        deadline = time.monotonic() + timeout
        while time.monotonic() < deadline:
            if self.process.poll() is not None:
                raise RuntimeError(f"gunicorn exited: {self.log_path.read_text()[-3000:]}")
            try:
                if done():
                    return
            except requests.RequestException:
                pass
            time.sleep(0.25)
        raise TimeoutError(f"{failure} after {timeout}s: {self.log_path.read_text()[-3000:]}")

    def stop(self) -> None:
        self.process.terminate()
        try:
            self.process.wait(timeout=30)
        except subprocess.TimeoutExpired:
            self.process.kill()
            self.process.wait()
        self._log.close()


def parse_sse(lines) -> list[tuple[str, object]]:
    """(event, decoded JSON data) per frame from SSE lines; comment frames (heartbeats) are
    skipped. Every other frame must be exactly one `event:` and one `data:` line."""
    events, frame = [], []
    for line in lines:
        if line:
            frame.append(line)
            continue
        if frame and not all(part.startswith(":") for part in frame):
            fields = dict(part.split(": ", 1) for part in frame)
            assert set(fields) == {"event", "data"}, frame
            events.append((fields["event"], json.loads(fields["data"])))
        frame = []
    return events
