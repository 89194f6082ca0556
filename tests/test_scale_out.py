"""Rate limits shared across gunicorn workers and server processes through Redis
(TURSI_RATELIMIT_STORAGE_URI=redis://...), against a real redis-server started here.

Two gunicorn masters with two gevent workers each stand for two hosts behind a load
balancer; each request opens a new connection, so the kernel hands them to either worker.
With Redis the four workers share one budget exactly; with the default memory:// storage
each worker has its own (the control case)."""
from __future__ import annotations

import re
import shutil
import subprocess
import time
from collections import Counter

import pytest
import redis
import requests

from server import Server, free_port

REDIS_SERVER = shutil.which("redis-server")
pytestmark = [pytest.mark.e2e, pytest.mark.skipif(
    REDIS_SERVER is None, reason="redis-server is not installed (apt-get install "
                                 "redis-server; .ci/run installs it)")]
LIMIT = 20
KEY = "scale-out-key"
# The access log line names the worker (pid) that served each request.
ACCESS_FORMAT = "--access-logformat='%(p)s %(s)s %(U)s'"


@pytest.fixture
def redis_url(tmp_path):
    port = free_port()
    process = subprocess.Popen(
        [REDIS_SERVER, "--port", str(port), "--bind", "127.0.0.1", "--save", "",
         "--appendonly", "no", "--dir", str(tmp_path)],
        stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    client = redis.Redis(port=port)
    deadline = time.monotonic() + 10
    while True:
        try:
            client.ping()
            break
        except redis.ConnectionError:
            assert time.monotonic() < deadline, "redis-server did not start"
            time.sleep(0.05)
    yield f"redis://127.0.0.1:{port}"
    process.terminate()
    process.wait(10)


def start_servers(tmp_path, storage: str) -> list[Server]:
    env = {"TURSI_PRELOAD": "", "TURSI_HOME": str(tmp_path / "home"), "TURSI_WORKERS": "2",
           "TURSI_RATE_LIMIT": f"{LIMIT}/hour", "TURSI_RATELIMIT_STORAGE_URI": storage,
           "TURSI_API_KEYS": KEY, "GUNICORN_CMD_ARGS": ACCESS_FORMAT}
    servers = [Server(env, tmp_path / f"host{i}.log") for i in range(2)]
    for srv in servers:
        srv.wait_healthy()
    return servers


def spread_requests(servers: list[Server], count: int) -> list[requests.Response]:
    """`count` requests, alternating between the servers, each on a new connection."""
    responses = []
    for i in range(count):
        responses.append(requests.get(
            f"{servers[i % 2].url}/status", timeout=10,
            headers={"Authorization": f"Bearer {KEY}", "Connection": "close"}))
    return responses


def workers_seen(srv: Server) -> set[str]:
    lines = srv.log_path.read_text().splitlines()
    return {m[1] for m in (re.match(r"<(\d+)> \d+ /api/v1/status$", line) for line in lines) if m}


def test_two_hosts_of_two_workers_share_one_limit_exactly(tmp_path, redis_url):
    servers = start_servers(tmp_path, redis_url)
    try:
        responses = spread_requests(servers, LIMIT + 5)
        statuses = Counter(r.status_code for r in responses)
        assert statuses == {200: LIMIT, 429: 5}
        # One budget, counted down in the order the requests were sent, whichever worker
        # of whichever host answered.
        assert [r.status_code for r in responses] == [200] * LIMIT + [429] * 5
        remaining = [int(r.headers["X-RateLimit-Remaining"]) for r in responses]
        assert remaining == list(range(LIMIT - 1, -1, -1)) + [0] * 5
        for rejected in responses[LIMIT:]:
            assert rejected.json()["error"]["code"] == "rate_limit_exceeded"
            assert int(rejected.headers["Retry-After"]) > 0
        for srv in servers:
            assert len(workers_seen(srv)) == 2, srv.log_path.read_text()[-2000:]
        # Redis holds a digest of the key, never the key itself.
        stored = redis.Redis.from_url(redis_url).keys("*")
        assert stored and not any(KEY.encode() in name for name in stored)
    finally:
        for srv in servers:
            srv.stop()


def test_without_redis_each_worker_has_its_own_budget(tmp_path):
    """The control case: memory:// storage lets the same requests through (each of the four
    workers counts only what it served)."""
    servers = start_servers(tmp_path, "memory://")
    try:
        responses = spread_requests(servers, LIMIT + 5)
        assert Counter(r.status_code for r in responses) == {200: LIMIT + 5}
    finally:
        for srv in servers:
            srv.stop()
