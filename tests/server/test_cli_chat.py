"""`tursi chat` and `tursi ps` as a user runs them: the installed console script in a
pseudo-terminal (pexpect), against a real gunicorn server, its decode steps gated
(tests/helpers.py: StepGate). The model is a tiny Llama whose greedy text follows its whole
context (test_reference.py's, not one that repeats its last token), with a chat template;
every answer the chat prints is checked against the server's own greedy answer to the
history it should have sent."""

from __future__ import annotations

import re
import signal

import pexpect
import pytest
import requests

from tests.helpers import (
    GATED_APP,
    Server,
    StepGate,
    build_llama,
    wait_for,
    with_chat_template,
    write_catalog,
)
from tests.server.test_cli import KEY, cli_env, ok, tursi, tursi_command

MAX_TOKENS = 40


@pytest.fixture(scope="module")
def gate(tmp_path_factory):
    return StepGate(tmp_path_factory.mktemp("tursi-chat-gate"))


@pytest.fixture(scope="module")
def catalog(tmp_path_factory):
    root = tmp_path_factory.mktemp("chat-models")
    llama = build_llama(
        root / "llama",
        tie_word_embeddings=False,
        initializer_range=0.2,
        max_position_embeddings=512,
    )
    chat = with_chat_template(llama, root / "chat")
    return write_catalog(root / "models.json", {"tiny": {"path": str(chat), "dtype": "float32"}})


@pytest.fixture(scope="module")
def server(catalog, tmp_path_factory, gate):
    home = tmp_path_factory.mktemp("tursi-chat-home")
    srv = Server(
        {
            "TURSI_MODELS_FILE": str(catalog),
            "TURSI_PRELOAD": "tiny",
            "TURSI_HOME": str(home),
            "TURSI_RATE_LIMIT": "1000/minute",
            **gate.env,
        },
        home / "gunicorn.log",
        GATED_APP,
    )
    try:
        srv.wait_healthy()
        srv.wait_loaded("tiny")
        yield srv
    finally:
        srv.stop()


def greedy(server: Server, messages: list[dict]) -> dict:
    """The server's greedy answer to `messages` (choice 0: message and finish reason)."""
    response = requests.post(
        f"{server.url.removesuffix('/api/v1')}/v1/chat/completions",
        headers={"Authorization": f"Bearer {KEY}"},
        json={"model": "tiny", "messages": messages, "max_tokens": MAX_TOKENS, "temperature": 0},
        timeout=60,
    )
    assert response.status_code == 200, response.text
    return response.json()["choices"][0]


def metrics(server: Server) -> dict:
    response = requests.get(
        f"{server.url}/models/tiny/metrics", headers={"Authorization": f"Bearer {KEY}"}, timeout=10
    )
    return response.json()["metrics"]


def on_screen(text: str) -> str:
    """`text` as the terminal shows it: the pseudo-terminal writes each newline as CR LF."""
    return text.replace("\n", "\r\n")


def user(text: str) -> dict:
    return {"role": "user", "content": text}


def assistant(text: str) -> dict:
    return {"role": "assistant", "content": text}


def answer(chat: pexpect.spawn, line: str) -> str:
    """Type `line`; what the chat printed before its next prompt, less the echoed line."""
    chat.sendline(line)
    chat.expect_exact(">>> ")
    echoed, _, printed = chat.before.partition("\r\n")
    assert echoed == line
    return printed


def test_chat_keeps_the_history_resets_it_and_ctrl_c_stops_an_answer(server, gate):
    args = ["chat", "tiny", "--temperature", "0", "--max-tokens", str(MAX_TOKENS)]
    chat = pexpect.spawn(
        tursi_command()[0],
        args,
        env=cli_env(server),
        encoding="utf-8",
        timeout=60,
        # Ctrl-C raises KeyboardInterrupt, as in a user's terminal, also where this test runs
        # as a background job (its shell ignores SIGINT, and Python keeps that at startup)
        preexec_fn=lambda: signal.signal(signal.SIGINT, signal.SIG_DFL),
    )
    try:
        chat.expect_exact(">>> ")
        assert "/reset" in chat.before and "Ctrl-C" in chat.before  # the help line

        # two turns: the second is the model's answer to the whole conversation
        first = greedy(server, [user("hello there")])["message"]["content"]
        assert answer(chat, "hello there") == on_screen(first) + "\r\n"
        history = [user("hello there"), assistant(first), user("and then")]
        second = greedy(server, history)["message"]["content"]
        assert second != greedy(server, [user("and then")])["message"]["content"]  # context shows
        assert answer(chat, "and then") == on_screen(second) + "\r\n"

        # Ctrl-C while the answer is being generated: the stream closes, the server drops the
        # generation (nothing left running, far fewer steps than its max_tokens) and the turn
        # is not kept
        history += [assistant(second), user("go on")]
        uncut = greedy(server, history)
        assert uncut["finish_reason"] == "length"  # left alone it would run MAX_TOKENS steps
        gate.hold()
        held_at = gate.arrived()
        chat.sendline("go on")
        wait_for(lambda: metrics(server)["generations_running"] == 1, timeout=60)
        gate.wait_held()
        chat.sendintr()
        chat.expect_exact("[stopped]")
        chat.expect_exact(">>> ")
        gate.release()
        wait_for(lambda: metrics(server)["generations_running"] == 0, timeout=60)
        assert gate.arrived() - held_at < MAX_TOKENS // 2
        history.pop()  # "go on" and its stopped answer are not part of the history

        # the session goes on, with the history as it was before the stopped turn
        expected = greedy(server, [*history, user("tell me")])["message"]["content"]
        assert answer(chat, "tell me") == on_screen(expected) + "\r\n"

        # /reset: the next answer is the one to that message alone
        assert "(history cleared)" in answer(chat, "/reset")
        alone = greedy(server, [user("tell me")])["message"]["content"]
        assert answer(chat, "tell me") == on_screen(alone) + "\r\n"

        chat.sendline("/exit")
        chat.expect(pexpect.EOF)
    finally:
        gate.release()
        chat.close()
    assert chat.exitstatus == 0


def test_chat_with_a_model_the_server_does_not_know_fails_at_once(server):
    result = tursi("chat", "nope", server=server)
    assert result.returncode == 1 and "error: model_not_found: " in result.stderr


def test_ps_shows_the_loaded_model_and_what_it_runs(server, gate):
    """While one streamed request is held in the batch, `tursi ps` shows it running."""
    gate.hold()
    stream = requests.post(
        f"{server.url}/generate",
        headers={"Authorization": f"Bearer {KEY}"},
        json={"model": "tiny", "prompt": "hi", "max_tokens": 30, "stream": True},
        stream=True,
        timeout=60,
    )
    try:
        wait_for(lambda: metrics(server)["generations_running"] == 1, timeout=60)
        out = ok(tursi("ps", server=server))
    finally:
        gate.release()
        stream.close()
    header, row = out.splitlines()
    assert header.split() == [
        "NAME",
        "STATUS",
        "MEMORY",
        "PROCESSOR",
        "RUNNING",
        "WAITING",
        "KV",
        "CACHE",
        "UP",
    ]
    assert re.match(
        r"tiny\s+loaded\s+\S+\s+cpu, float32\s+1\s+0\s+[\d.]+MiB of [\d.]+MiB\s+\S+", row
    )
