"""Rate limits shared across gunicorn workers and server processes through Redis
(TURSI_RATELIMIT_STORAGE_URI=redis://...), against a real redis-server started here.

Two gunicorn masters with two gevent workers each stand for two hosts behind a load
balancer; each request opens a new connection, so the kernel hands them to either worker.
With Redis the four workers share one budget exactly; with the default memory:// storage
each worker has its own (the control case). The token budget (TURSI_TOKEN_RATE_LIMIT) is
shared the same way, by the two workers of one server serving the tiny model."""

from __future__ import annotations

import re
import shutil
import subprocess
import time
from collections import Counter

import pytest
import requests

try:
    import redis
except ImportError:  # an optional extra (tursi[redis]); only the redis tests need it
    redis = None

from tests.helpers import Server, free_port, wait_for

REDIS_SERVER = shutil.which("redis-server")


# Only the tests with a redis_url need it; the memory:// control case runs without.
needs_redis = pytest.mark.skipif(
    REDIS_SERVER is None or redis is None,
    reason="redis-server or the redis package is not installed (apt-get install "
    "redis-server, pip install redis; .ci/run installs both)",
)
LIMIT = 20


KEYS = [f"scale-out-key-{i}" for i in range(10)]  # one budget per key: one per round


# The access log line names the worker (pid) that served each request, and its round.
ACCESS_FORMAT = "--access-logformat='%(p)s %(s)s %(U)s %({x-round}i)s'"


@pytest.fixture
def redis_url(tmp_path):
    port = free_port()
    process = subprocess.Popen(
        [
            REDIS_SERVER,
            "--port",
            str(port),
            "--bind",
            "127.0.0.1",
            "--save",
            "",
            "--appendonly",
            "no",
            "--dir",
            str(tmp_path),
        ],
        stdout=subprocess.DEVNULL,
        stderr=subprocess.DEVNULL,
    )
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
    env = {
        "TURSI_PRELOAD": "",
        "TURSI_HOME": str(tmp_path / "home"),
        "TURSI_WORKERS": "2",
        "TURSI_RATE_LIMIT": f"{LIMIT}/hour",
        "TURSI_RATELIMIT_STORAGE_URI": storage,
        "TURSI_API_KEYS": ",".join(KEYS),
        "GUNICORN_CMD_ARGS": ACCESS_FORMAT,
    }
    servers = [Server(env, tmp_path / f"host{i}.log") for i in range(2)]
    for srv in servers:
        srv.wait_healthy()
        wait_for_both_workers(srv)
    return servers


def wait_for_both_workers(srv: Server, timeout: float = 120) -> None:
    """/health on new connections until both workers of `srv` have answered one: a worker
    still importing torch takes no connections, and the rounds below need both (a cold
    start on a fresh install took longer than all ten rounds)."""
    pattern = re.compile(r"<(\d+)> \d+ /health ")
    deadline = time.monotonic() + timeout
    while True:
        lines = srv.log_path.read_text().splitlines()
        if len({m[1] for m in map(pattern.match, lines) if m}) == 2:
            return
        assert time.monotonic() < deadline, "the second worker never answered"
        root = srv.url.removesuffix("/api/v1")
        requests.get(f"{root}/health", headers={"Connection": "close"}, timeout=10)
        time.sleep(0.05)


def spread_requests(
    servers: list[Server], count: int, key: str = KEYS[0], round_: int = 0
) -> list[requests.Response]:
    """`count` requests, alternating between the servers, each on a new connection."""
    responses = []
    for i in range(count):
        responses.append(
            requests.get(
                f"{servers[i % 2].url}/status",
                timeout=10,
                headers={
                    "Authorization": f"Bearer {key}",
                    "Connection": "close",
                    "X-Round": str(round_),
                },
            )
        )
    return responses


def workers_seen(srv: Server, round_: int, path: str = "/api/v1/status") -> set[str]:
    """The worker pids of `srv` that served requests of this round."""
    pattern = re.compile(rf"<(\d+)> \d+ {path} {round_}$")
    return {m[1] for m in map(pattern.match, srv.log_path.read_text().splitlines()) if m}


@needs_redis
def test_two_hosts_of_two_workers_share_one_limit_exactly(tmp_path, redis_url):
    """Each round spends a fresh key's budget: LIMIT + 5 requests, exactly 5 refused. The
    kernel picks the worker of each new connection, so rounds go on (each a new key) until
    one round was served by all four workers; every round must be exact."""
    servers = start_servers(tmp_path, redis_url)
    try:
        for round_, key in enumerate(KEYS):
            responses = spread_requests(servers, LIMIT + 5, key, round_)
            # One budget, counted down in the order the requests were sent, whichever
            # worker of whichever host answered.
            assert [r.status_code for r in responses] == [200] * LIMIT + [429] * 5
            remaining = [int(r.headers["X-RateLimit-Remaining"]) for r in responses]
            assert remaining == list(range(LIMIT - 1, -1, -1)) + [0] * 5
            for rejected in responses[LIMIT:]:
                assert rejected.json()["error"]["code"] == "rate_limit_exceeded"
                assert int(rejected.headers["Retry-After"]) > 0
            workers = [workers_seen(srv, round_) for srv in servers]
            if all(len(pids) == 2 for pids in workers):
                break
        else:
            pytest.fail(f"no round reached all four workers in {len(KEYS)} rounds")
        print(
            f"\nscale-out: round {round_ + 1}: {LIMIT} allowed, 5 refused, served by "
            f"workers {workers}"
        )
        # Redis holds digests of the keys, never a key itself.
        stored = redis.Redis.from_url(redis_url).keys("*")
        assert stored and not any(key.encode() in name for name in stored for key in KEYS)
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


TOKEN_LIMIT = 100
PROMPT = [5] * 10  # token ids: exactly 10 prompt tokens
EARLY = {"logit_bias": {"7": 100}, "stop_token_ids": [7]}  # stops at its first token
FULL = {"ignore_eos": True}  # generates all of max_tokens
# Each needs 10 + 10 = 20 tokens left; FULL costs 20, EARLY 10 + the token it generated.
TOKEN_ROUND = [EARLY, FULL, EARLY, FULL, FULL, FULL, FULL, EARLY]
ADMIN_KEY = "scale-out-admin"  # polls the load
ADMIN = {"Authorization": f"Bearer {ADMIN_KEY}"}


@needs_redis
def test_two_workers_share_one_token_budget_exactly(tmp_path, redis_url, tiny_models_dir):
    """TOKEN_LIMIT tokens per key and window (a year's: no round straddles two): each
    round spends a fresh key's budget with TOKEN_ROUND, one request per new connection.
    Exactly the requests whose prompt + max_tokens fit what is left pass, each charged its
    prompt and what it generated (its `usage`), and X-RateLimit-Remaining-Tokens counts
    that down whichever worker answered. Rounds go on until one was served by both."""
    srv = Server(
        {
            "TURSI_MODELS_FILE": str(tiny_models_dir / "models.json"),
            "TURSI_PRELOAD": "tiny",
            "TURSI_HOME": str(tmp_path / "home"),
            "TURSI_WORKERS": "2",
            "TURSI_RATE_LIMIT": "100000/hour",
            "TURSI_TOKEN_RATE_LIMIT": f"{TOKEN_LIMIT}/year",
            "TURSI_RATELIMIT_STORAGE_URI": redis_url,
            "TURSI_API_KEYS": ",".join([*KEYS, ADMIN_KEY]),
            "GUNICORN_CMD_ARGS": ACCESS_FORMAT,
        },
        tmp_path / "server.log",
    )
    root = srv.url.removesuffix("/api/v1")
    try:
        srv.wait_healthy()
        wait_for_both_workers(srv)

        def loaded() -> bool:  # on the server: on both workers (the keys' own budgets)
            models = requests.get(f"{srv.url}/models", headers=ADMIN, timeout=10).json()
            return {m["name"]: m["status"] for m in models["models"]}["tiny"] == "loaded"

        wait_for(loaded, timeout=300, interval=0.25)
        for round_, key in enumerate(KEYS):
            left, statuses, expected, remaining = TOKEN_LIMIT, [], [], []
            for extra in TOKEN_ROUND:
                response = requests.post(
                    f"{root}/v1/completions",
                    json={"model": "tiny", "prompt": PROMPT, "max_tokens": 10, **extra},
                    headers={
                        "Authorization": f"Bearer {key}",
                        "Connection": "close",
                        "X-Round": str(round_),
                    },
                    timeout=60,
                )
                fits = len(PROMPT) + 10 <= left
                expected.append(200 if fits else 429)
                statuses.append(response.status_code)
                if response.status_code == 200:
                    usage = response.json()["usage"]
                    left -= usage["prompt_tokens"] + usage["completion_tokens"]
                else:
                    error = response.json()["error"]
                    assert error["code"] == "token_rate_limit_exceeded"
                    assert int(response.headers["Retry-After"]) > 0
                remaining.append(int(response.headers["X-RateLimit-Remaining-Tokens"]))
                assert remaining[-1] == left, (round_, statuses, remaining)
            assert statuses == expected, (round_, statuses)
            assert 429 in statuses and statuses.count(200) >= 5
            if len(workers_seen(srv, round_, "/v1/completions")) == 2:
                break
        else:
            pytest.fail(f"no round reached both workers in {len(KEYS)} rounds")
        print(
            f"\ntoken budget: round {round_ + 1}: statuses {statuses}, remaining tokens "
            f"{remaining}, served by workers {workers_seen(srv, round_, '/v1/completions')}"
        )
        stored = redis.Redis.from_url(redis_url).keys("*")
        assert stored and not any(key.encode() in name for name in stored for key in KEYS)
    finally:
        srv.stop()
