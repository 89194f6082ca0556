"""The installed `tursi` console script, run as a subprocess against a real gunicorn server
(tiny models, API key "secret")."""

from __future__ import annotations

import json
import os
import re
import select
import shutil
import subprocess
import sys
import time
from pathlib import Path

import pytest
import requests

from tests.helpers import GATED_APP, Server, StepGate, free_port

KEY = "secret"
UTF8_KEY = "ключ-clé"  # a second key: non-ASCII, sent as UTF-8


COMMANDS = ("serve", "models", "load", "unload", "generate", "status", "ps", "chat")


def tursi_command() -> list[str]:
    script = Path(sys.executable).with_name("tursi")
    return [str(script)] if script.exists() else [shutil.which("tursi") or "tursi"]


def cli_env(server: Server | None = None, key: str | None = KEY) -> dict[str, str]:
    """The environment for a `tursi` run: TURSI_URL at `server`, TURSI_API_KEY = `key`."""
    env = {k: v for k, v in os.environ.items() if k not in ("TURSI_URL", "TURSI_API_KEY")}
    env["PYTHONIOENCODING"] = "utf-8"
    if server is not None:
        env["TURSI_URL"] = root_url(server)
    if key is not None:
        env["TURSI_API_KEY"] = key
    return env


def root_url(server: Server) -> str:
    return server.url.removesuffix("/api/v1")


def tursi(
    *args: str, server: Server | None = None, key: str | None = KEY, timeout: float = 60
) -> subprocess.CompletedProcess:
    return subprocess.run(
        tursi_command() + list(args),
        capture_output=True,
        text=True,
        encoding="utf-8",
        env=cli_env(server, key),
        timeout=timeout,
    )


def ok(result: subprocess.CompletedProcess) -> str:
    assert result.returncode == 0, (result.stdout, result.stderr)
    return result.stdout


def fails(result: subprocess.CompletedProcess, code: str) -> None:
    """Exit status 1 and `error: <code>: ...` on stderr, without a traceback."""
    assert result.returncode == 1, (result.stdout, result.stderr)
    assert f"error: {code}: " in result.stderr
    assert "Traceback" not in result.stderr


def model_status(server: Server, name: str) -> dict:
    response = requests.get(
        f"{server.url}/models", timeout=10, headers={"Authorization": f"Bearer {KEY}"}
    )
    return next(m for m in response.json()["models"] if m["name"] == name)


@pytest.fixture(scope="module")
def gate(tmp_path_factory):
    return StepGate(tmp_path_factory.mktemp("tursi-cli-gate"))


@pytest.fixture(scope="module")
def server(tiny_models_dir, tmp_path_factory, gate):
    home = tmp_path_factory.mktemp("tursi-cli-home")
    srv = Server(
        {
            "TURSI_MODELS_FILE": str(tiny_models_dir / "models.json"),
            "TURSI_PRELOAD": "",
            "TURSI_HOME": str(home),
            "TURSI_RATE_LIMIT": "1000/minute",
            "TURSI_API_KEYS": f"{KEY},{UTF8_KEY}",
            **gate.env,
        },
        home / "gunicorn.log",
        GATED_APP,
    )
    try:
        deadline = time.monotonic() + 120
        while True:  # the worker imports torch before it answers
            assert srv.process.poll() is None, srv.log_path.read_text()[-3000:]
            try:
                requests.get(f"{srv.url}/status", timeout=2)
                break
            except requests.RequestException:
                assert time.monotonic() < deadline, srv.log_path.read_text()[-3000:]
                time.sleep(0.25)
        yield srv
    finally:
        srv.stop()


def test_help_lists_every_command_with_a_line_of_help():
    out = ok(tursi("--help"))
    for command in COMMANDS:
        assert re.search(rf"^\s+{command}\s+\S", out, re.MULTILINE), command
    for documented in ("--url", "--api-key", "TURSI_URL", "TURSI_API_KEY"):
        assert documented in out


@pytest.mark.parametrize(
    "command, flags",
    [
        ("serve", ["--host", "--port", "--workers"]),
        ("models", ["--json", "--url", "--api-key"]),
        ("load", ["--bits", "--mode", "--quantize", "--dtype", "--no-wait", "--url", "--api-key"]),
        ("unload", ["--url", "--api-key"]),
        (
            "generate",
            [
                "--max-tokens",
                "--temperature",
                "--top-p",
                "--top-k",
                "--seed",
                "--stop",
                "--no-stream",
                "--url",
                "--api-key",
            ],
        ),
        ("status", ["--json", "--url", "--api-key"]),
        ("ps", ["--url", "--api-key"]),
        ("chat", ["--system", "--max-tokens", "--temperature", "--top-p", "--seed", "--url"]),
    ],
)
def test_each_command_documents_its_flags(command, flags):
    out = ok(tursi(command, "--help"))
    for flag in flags:
        assert flag in out, (command, flag)


def test_no_command_is_a_usage_error():
    result = tursi()
    assert result.returncode == 2 and "usage: tursi" in result.stderr


def test_load_shows_progress_until_loaded(server):
    result = tursi("load", "tiny-gpt2", server=server)
    out = ok(result)
    assert re.fullmatch(r"loaded tiny-gpt2 in \d+\.\ds \(float32, cpu, [\d.]+[KMG]?B\)\n", out)
    assert "loading tiny-gpt2" in result.stderr and "100%" in result.stderr  # the tqdm bar
    assert model_status(server, "tiny-gpt2")["status"] == "loaded"

    assert "tiny-gpt2 is already loaded" in ok(tursi("load", "tiny-gpt2", server=server))
    listing = ok(tursi("models", server=server))
    assert re.search(r"^tiny-gpt2\s+loaded\s+float32, cpu, ", listing, re.MULTILINE)
    assert re.search(r"^tiny\s+not_loaded\s*$", listing, re.MULTILINE)
    raw = json.loads(ok(tursi("models", "--json", server=server)))
    tiny = next(m for m in raw["models"] if m["name"] == "tiny")
    assert tiny["status"] == "not_loaded" and set(tiny) == {"name", "status", "workers"}


def test_load_with_other_settings_is_a_conflict(server):
    ok(tursi("load", "tiny-gpt2", server=server))
    fails(tursi("load", "tiny-gpt2", "--bits", "8", server=server), "model_conflict")


def test_generate_streams_tokens_as_they_come(server, gate):
    """The CLI prints text while the server's decode steps are held, long before its 200
    tokens can be done (only a few steps are let through until the first text shows)."""
    ok(tursi("load", "tiny", server=server))
    args = ["--max-tokens", "200", "--temperature", "0", "--ignore-eos"]
    gate.hold()
    process = subprocess.Popen(
        tursi_command() + ["generate", "tiny", "The quick brown"] + args,
        stdout=subprocess.PIPE,
        stderr=subprocess.PIPE,
        env=cli_env(server),
    )
    try:
        for _ in range(100):  # a token's text may wait for the next one (a split character)
            if select.select([process.stdout], [], [], 0.5)[0]:
                break
            gate.step()
        else:
            pytest.fail("no text on the CLI's output after 100 decode steps")
        first = os.read(process.stdout.fileno(), 64)
        assert first and process.poll() is None  # text before the 200 tokens are done
        gate.release()
        rest, err = process.communicate(timeout=60)
    finally:
        gate.release()
        process.kill()
    assert process.returncode == 0, err
    whole = requests.post(
        f"{server.url}/generate",
        timeout=60,
        headers={"Authorization": f"Bearer {KEY}"},
        json={
            "model": "tiny",
            "prompt": "The quick brown",
            "max_tokens": 200,
            "temperature": 0,
            "ignore_eos": True,
            "return_full_text": False,
        },
    ).json()
    assert (first + rest).decode() == whole["text"] + "\n"
    assert re.search(r"\[200 tokens in [\d.]+m?s, finish: length\]", err.decode())


def test_generate_without_streaming_and_from_stdin(server):
    ok(tursi("load", "tiny", server=server))
    streamed = ok(
        tursi(
            "generate", "tiny", "lazy dog", "--max-tokens", "8", "--temperature", "0", server=server
        )
    )
    whole = tursi(
        "generate",
        "tiny",
        "lazy dog",
        "--max-tokens",
        "8",
        "--temperature",
        "0",
        "--no-stream",
        server=server,
    )
    assert ok(whole) == streamed and "tokens in" in whole.stderr
    piped = subprocess.run(
        tursi_command() + ["generate", "tiny", "--max-tokens", "8", "--temperature", "0"],
        input=b"lazy dog",
        capture_output=True,
        env=cli_env(server),
        timeout=60,
    )
    assert piped.returncode == 0 and piped.stdout.decode() == streamed


def test_status_prints_the_fields(server):
    out = ok(tursi("status", server=server))
    for label in (
        "server:",
        "uptime:",
        "active models:",
        "memory:",
        "gpu:",
        "requests:",
        "generations:",
    ):
        assert re.search(rf"^{label} +\S", out, re.MULTILINE), label
    assert "(healthy)" in out and re.search(r"\d+ total, \d+ ok, \d+ failed", out)
    raw = json.loads(ok(tursi("status", "--json", server=server)))
    assert raw["status"] == "healthy" and set(raw["generations"]) == {"running", "waiting"}


def test_unload(server):
    ok(tursi("load", "tiny-gpt2", server=server))
    assert ok(tursi("unload", "tiny-gpt2", server=server)) == "unloaded tiny-gpt2\n"
    assert model_status(server, "tiny-gpt2")["status"] == "not_loaded"
    fails(tursi("unload", "tiny-gpt2", server=server), "model_not_loaded")


def test_errors_exit_1_with_the_code(server):
    result = tursi("load", "no-such-model", server=server)
    fails(result, "model_not_found")
    assert result.stdout == ""
    fails(tursi("generate", "tiny-gpt2", "hi", server=server), "model_not_loaded")
    fails(tursi("generate", "tiny", "hi", "--temperature", "5", server=server), "invalid_request")


def test_an_unreachable_server_is_named_without_a_traceback():
    url = f"http://127.0.0.1:{free_port()}"
    result = tursi("status", "--url", url)
    assert result.returncode == 1
    assert f"cannot connect to the Tursi server at {url}" in result.stderr
    assert "Traceback" not in result.stderr


def test_api_key_from_the_flag_or_the_environment(server):
    fails(tursi("models", server=server, key=None), "unauthorized")
    fails(tursi("models", "--api-key", "wrong", server=server, key=None), "unauthorized")
    ok(tursi("models", "--api-key", KEY, server=server, key=None))
    ok(tursi("models", server=server, key=KEY))  # TURSI_API_KEY
    ok(tursi("models", "--api-key", UTF8_KEY, server=server, key=None))  # sent as UTF-8
    ok(tursi("models", server=server, key=UTF8_KEY))
    # --url / --api-key also work before the command, and the flag wins over the environment
    ok(tursi("--url", root_url(server), "--api-key", KEY, "status", key="wrong"))
