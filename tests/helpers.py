"""Helpers shared by every test folder: tiny local models, a real gunicorn server, HTTP and
SSE helpers and assertions. Fixtures live in conftest.py."""

from __future__ import annotations

import json
import os
import re
import shutil
import socket
import subprocess
import sys
import time
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path

import psutil
import requests
import torch

# Imported here, not where the models are built: transformers imports each model's code on
# first use (seconds), and `make mutation` forks every mutant's run from a process that
# imported this module.
from tokenizers import Tokenizer, decoders, models, pre_tokenizers, trainers
from transformers import (
    DynamicCache,
    GPT2Config,
    GPT2LMHeadModel,
    LlamaConfig,
    LlamaForCausalLM,
    PreTrainedTokenizerFast,
)

CORPUS = [
    "Once upon a time there was a small server that answered every request.",
    "The quick brown fox jumps over the lazy dog. THE END",
    "Models load, generate tokens and unload; counters count them all.",
    "Ünïcödé text, emoji 🙂 and symbols € keep the decoder honest.",
] * 20


EOS = "<|endoftext|>"


def build_tokenizer(target: Path):

    tok = Tokenizer(models.BPE())
    tok.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    tok.decoder = decoders.ByteLevel()
    trainer = trainers.BpeTrainer(
        vocab_size=400, special_tokens=[EOS], initial_alphabet=pre_tokenizers.ByteLevel.alphabet()
    )
    tok.train_from_iterator(CORPUS, trainer)
    fast = PreTrainedTokenizerFast(
        tokenizer_object=tok, eos_token=EOS, bos_token=EOS, pad_token=EOS, model_max_length=256
    )
    fast.save_pretrained(target)
    return fast


def build_llama(target: Path, seed: int = 0, norm_spread: float = 0.0, **overrides) -> Path:
    """`overrides` change the LlamaConfig (e.g. tie_word_embeddings=False). With
    `norm_spread`, each RMSNorm weight is 1 plus that much Gaussian noise instead of all ones
    (transformers' init), so that every norm of the model differs from the others."""

    tokenizer = build_tokenizer(target)
    config = LlamaConfig(
        **{
            "vocab_size": len(tokenizer),
            "hidden_size": 64,
            "intermediate_size": 128,
            "num_hidden_layers": 2,
            "num_attention_heads": 4,
            "num_key_value_heads": 2,
            "max_position_embeddings": 256,
            "eos_token_id": tokenizer.eos_token_id,
            "bos_token_id": tokenizer.eos_token_id,
            "tie_word_embeddings": True,
            **overrides,
        }
    )
    torch.manual_seed(seed)
    model = LlamaForCausalLM(config)
    if norm_spread:
        with torch.no_grad():
            for name, weight in model.named_parameters():
                if name.endswith("norm.weight"):
                    weight.add_(torch.randn_like(weight) * norm_spread)
    model.save_pretrained(target)
    return target


def prefilled(model, prompts: list[list[int]], boolean_mask: bool = True, max_length: int = 256):
    """A BatchCache holding `prompts`, each prefilled alone by `model` (the engine's side)."""
    from tursi.engine.kvcache import BatchCache

    cache = BatchCache(model.config.num_hidden_layers, max_length, boolean_mask)
    for prompt in prompts:
        source = DynamicCache()
        with torch.inference_mode():
            model(input_ids=torch.tensor([prompt]), past_key_values=source, use_cache=True)
        cache.add_row(source, 0, torch.arange(len(prompt)))
    return cache


def transformers_greedy(model, prompt: list[int], max_tokens: int) -> list[int]:
    """transformers' greedy decoding of one prompt alone: the model's forward with a
    DynamicCache, one token per step, going on through end-of-sequence (as ignore_eos). The
    outside reference of the engine tests."""
    cache, ids, out = DynamicCache(), torch.tensor([prompt]), []
    with torch.inference_mode():
        for _ in range(max_tokens):
            logits = model(input_ids=ids, past_key_values=cache, use_cache=True).logits
            out.append(int(logits[0, -1].argmax()))
            ids = torch.tensor([[out[-1]]])
    return out


def verify_every_draft(monkeypatch, drafting: int | None = None) -> None:
    """Speculation without its cost policy: every draft the rows propose is verified,
    whatever the measured step times would choose (the output must not depend on that
    choice, and a test must not depend on this machine's speed). With `drafting`, every row
    drafts that token as far as it may (a token the random models rarely choose: the drafts
    are rejected, their width is the point)."""
    from tursi.engine.speculation import DraftState, Speculator

    monkeypatch.setattr(Speculator, "choose", lambda self, proposals: [d for _, d in proposals])
    if drafting is not None:
        monkeypatch.setattr(DraftState, "draft", lambda self, fed, token, limit: [drafting] * limit)


def decoded(tokenizer, prompt: list[int], ids: list[int]) -> str:
    """The text of `ids` after `prompt`, decoded by the tokenizer in one go (what a
    generation of `ids` must have streamed)."""
    whole = tokenizer.decode(prompt + ids, skip_special_tokens=True)
    return whole[len(tokenizer.decode(prompt, skip_special_tokens=True)) :]


def choice_continuations(tokenizer, done: str, choices: tuple[str, ...]) -> set[int]:
    """The token ids whose text, after the output `done`, still begins (or is) one of
    `choices`: what a choice constraint must allow next, read from the tokenizer's own
    decoding (the outside reference of the structured output tests; ASCII choices)."""
    special = set(tokenizer.all_special_ids)
    return {
        token
        for token in range(len(tokenizer))
        if token not in special
        and any(choice.startswith(done + tokenizer.decode([token])) for choice in choices)
    }


def build_gpt2(target: Path, seed: int = 0, **overrides) -> Path:
    """`overrides` change the GPT2Config (e.g. initializer_range=0.2)."""

    tokenizer = build_tokenizer(target)
    config = GPT2Config(
        **{
            "vocab_size": len(tokenizer),
            "n_embd": 64,
            "n_layer": 2,
            "n_head": 4,
            "n_positions": 128,
            "eos_token_id": tokenizer.eos_token_id,
            "bos_token_id": tokenizer.eos_token_id,
            **overrides,
        }
    )
    torch.manual_seed(seed)
    GPT2LMHeadModel(config).save_pretrained(target)
    return target


CHAT_TEMPLATE = (
    "{% for m in messages %}{{ m['role'] }}: {{ m['content'] }}\n"
    "{% endfor %}{% if add_generation_prompt %}assistant:{% endif %}"
)


def with_chat_template(source: Path, target: Path) -> Path:
    """A copy of the tiny model at `source` whose tokenizer has CHAT_TEMPLATE (the tiny
    tokenizers have none), so that chat completions can succeed."""

    shutil.copytree(source, target)
    config_path = target / "tokenizer_config.json"
    config = json.loads(config_path.read_text())
    config["chat_template"] = CHAT_TEMPLATE
    config_path.write_text(json.dumps(config))
    return target


def write_catalog(path: Path, entries: dict[str, dict]) -> Path:
    path.write_text(json.dumps({"models": entries}, indent=2))
    return path


ROOT = Path(__file__).resolve().parent.parent


EMBEDDED = "smollm2-135m-instruct"


def free_port() -> int:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return sock.getsockname()[1]


@contextmanager
def embedded_server(
    home: Path, log_path: Path, app: str = "wsgi:app", **env: str
) -> Iterator[Server]:
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
        app,
    )
    try:
        srv.wait_loaded(EMBEDDED)
        yield srv
    finally:
        srv.stop()


class Server:
    """A real gunicorn (gevent worker) on a free loopback port; only tests/server starts one.
    `app` is gunicorn's app argument (GATED_APP: decode steps a StepGate releases)."""

    def __init__(self, env: dict[str, str], log_path: Path, app: str = "wsgi:app"):
        current = os.environ.get("PYTEST_CURRENT_TEST", "")
        assert not current or current.startswith("tests/server/"), (
            f"{current} starts a server: it belongs in tests/server/"
        )
        self.port = free_port()
        self.url = f"http://127.0.0.1:{self.port}/api/v1"
        self.log_path = log_path
        # Each test server gets its own shared folders (its master makes them), never a
        # folder another server of this session named in the environment.
        inherited = {
            name: value
            for name, value in os.environ.items()
            if name not in ("TURSI_RUN_DIR", "PROMETHEUS_MULTIPROC_DIR")
        }
        full_env = {
            **inherited,
            "HF_HUB_OFFLINE": "1",
            "TURSI_HOST": "127.0.0.1",
            "TURSI_PORT": str(self.port),
            **env,
        }
        self._log = log_path.open("w")
        self.process = subprocess.Popen(
            [sys.executable, "-m", "gunicorn", "-c", "gunicorn.conf.py", app],
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


class StepGate:
    """Decode steps of a server started with GATED_APP and `gate.env` run only as the test
    allows them: the held_steps fixture across a process boundary. Open until hold(); then
    each step() lets exactly one more decode step through and returns once the engine waits
    at the next one (so the batch is frozen, whatever the machine's speed). Two files in
    `folder`: "allowed" (written here; absent means open) and "arrived" (the worker's count
    of decode steps that reached the gate)."""

    def __init__(self, folder: Path):
        self.folder = folder
        self.env = {"TURSI_TEST_STEP_GATE": str(folder)}

    def allowed(self) -> float:
        return self._read("allowed", float("inf"))

    def arrived(self) -> int:
        return int(self._read("arrived", 0))

    def hold(self) -> None:
        """Steps not yet begun wait (at most one that is arriving now still runs)."""
        self._write("allowed", self.arrived())

    def wait_held(self, timeout: float = 60) -> None:
        """Until the engine waits at the gate (it has a decode step to run)."""
        wait_for(lambda: self.arrived() > self.allowed(), timeout)

    def step(self, timeout: float = 60) -> None:
        """One more decode step; returns when the engine waits at the next (the batch must
        still have work after this step)."""
        self.wait_held(timeout)
        self._write("allowed", self.allowed() + 1)
        self.wait_held(timeout)

    def release(self) -> None:
        (self.folder / "allowed").unlink(missing_ok=True)

    def _read(self, name: str, default: float) -> float:
        try:
            return float((self.folder / name).read_text())
        except FileNotFoundError:
            return default

    def _write(self, name: str, value: float) -> None:
        """Atomically (the other process reads it at any moment)."""
        temporary = self.folder / f".{name}.{os.getpid()}"
        temporary.write_text(str(int(value)))
        os.replace(temporary, self.folder / name)


class PrefillGate(StepGate):
    """A StepGate on prefill chunks (GATED_APP with `gate.env`): each chunk of a prompt's
    prefill waits at it, as decode steps wait at a StepGate, so a test counts chunks instead
    of timing them. It also tells the width (longest prompt, in tokens) of the prefill that
    arrived last, and whether every job of the one waiting now is cancelled (the server has
    seen its client go): files "width" and "cancelled"."""

    def __init__(self, folder: Path):
        super().__init__(folder)
        self.env = {"TURSI_TEST_PREFILL_GATE": str(folder)}

    def width(self) -> int:
        return int(self._read("width", 0))

    def cancelled(self) -> bool:
        return bool(self._read("cancelled", 0))


GATED_APP = "tests.helpers:gated_app()"


def gated_app():
    """gunicorn app factory (Server(..., app=GATED_APP)): the real app, with every decode
    step of its engine first waiting at the StepGate in $TURSI_TEST_STEP_GATE, and every
    prefill chunk at the PrefillGate in $TURSI_TEST_PREFILL_GATE, for those set."""
    from tursi.engine.scheduler import Scheduler, _Prefill
    from tursi.wsgi import app

    if "TURSI_TEST_STEP_GATE" in os.environ:
        _hold_at(StepGate(Path(os.environ["TURSI_TEST_STEP_GATE"])), Scheduler, "_decode_step")
    if "TURSI_TEST_PREFILL_GATE" in os.environ:
        gate = PrefillGate(Path(os.environ["TURSI_TEST_PREFILL_GATE"]))

        def arriving(prefill: _Prefill) -> None:
            gate._write("cancelled", 0)
            gate._write("width", prefill.width)

        def waiting(prefill: _Prefill) -> None:
            if all(job.cancelled for job in prefill.jobs) and not gate.cancelled():
                gate._write("cancelled", 1)

        _hold_at(gate, _Prefill, "step", arriving, waiting)
    return app


def _hold_at(gate: StepGate, cls: type, name: str, arriving=None, waiting=None) -> None:
    """Make method `name` of `cls` first wait at `gate` (a native sleep: the engine runs on a
    native thread), calling arriving(self) as it arrives, before the gate counts it, and
    waiting(self) while it waits."""
    from tursi.threads import native_sleep

    real = getattr(cls, name)
    arrived = 0

    def gated(self, *args):
        nonlocal arrived
        arrived += 1
        if arriving is not None:
            arriving(self)
        gate._write("arrived", arrived)
        while arrived > gate.allowed():
            if waiting is not None:
                waiting(self)
            native_sleep(0.005)
        return real(self, *args)

    setattr(cls, name, gated)


PACED_APP = "tests.helpers:paced_app()"


def paced_app():
    """gunicorn app factory (Server(..., app=PACED_APP)): the real app, with every decode step
    of its engine taking at least $TURSI_TEST_STEP_SECONDS (a native sleep before the step:
    the GIL is free meanwhile). A stream's tokens then come at a known pace, whatever the
    machine's speed, so that what delays them shows against it."""
    from tursi.engine.scheduler import Scheduler
    from tursi.threads import native_sleep
    from tursi.wsgi import app

    seconds = float(os.environ["TURSI_TEST_STEP_SECONDS"])
    real_step = Scheduler._decode_step

    def paced_step(self):
        native_sleep(seconds)
        return real_step(self)

    Scheduler._decode_step = paced_step
    return app


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


def wait_for(condition, timeout=30.0, interval=0.01):
    deadline = time.monotonic() + timeout
    while not condition():
        assert time.monotonic() < deadline, "condition not met in time"
        time.sleep(interval)


def assert_error(response, status, code):
    """The response is a JSON error of exactly the documented shape; returns its "error"."""
    assert response.status_code == status, response.get_data(as_text=True)
    assert response.mimetype == "application/json"
    assert "<html" not in response.get_data(as_text=True).lower()
    body = response.get_json()
    assert list(body) == ["error"]
    error = body["error"]
    assert set(error) == {"code", "message", "details"}
    assert error["code"] == code
    assert isinstance(error["message"], str) and error["message"]
    assert isinstance(error["details"], dict)
    return error


def wait_preloaded(manager, name, timeout=60.0):
    """Wait for a preloaded model of `manager` to be loaded (never failed)."""
    deadline = time.monotonic() + timeout
    while manager.state(name).status != "loaded":
        assert manager.state(name).status != "failed"
        assert time.monotonic() < deadline
        time.sleep(0.02)


def load_and_wait(client, name, body=None, timeout=60, headers=None):
    """POST .../load, then poll GET /models until `name` is loaded or failed; return its entry."""
    response = client.post(f"{API}/models/{name}/load", json=body, headers=headers)
    assert response.status_code in (200, 202), response.get_json()
    deadline = time.monotonic() + timeout
    while True:
        models = client.get(f"{API}/models", headers=headers).get_json()["models"]
        entry = next(m for m in models if m["name"] == name)
        if entry["status"] in ("loaded", "failed"):
            return entry
        assert time.monotonic() < deadline, f"{name} still {entry['status']} after {timeout}s"
        time.sleep(0.02)


API = "/api/v1"
# One short greedy request per generation route (the tiny chat catalog's model "tiny");
# completions with two prompts of two choices each.
ROUTE_REQUESTS = {
    f"{API}/generate": {"prompt": "Once upon a time", "max_tokens": 3},
    "/v1/completions": {"prompt": ["Once upon", "a time"], "n": 2, "max_tokens": 3},
    "/v1/chat/completions": {
        "messages": [{"role": "user", "content": "lazy dog"}],
        "max_tokens": 3,
    },
}


SIZE = re.compile(r"^\d+(\.\d)?(B|KB|MB|GB|TB)$")


SECONDS = re.compile(r"^\d+(\.\d+)?s$")


UPTIME = re.compile(r"^(\d+h \d+m|\d+m( \d+s)?|\d+s)$")


PERCENT = re.compile(r"^\d+(\.\d)?%$")


BUILTIN_NAMES = ["smollm2-135m-instruct", "gpt2", "gpt2-medium"]


TINY_CONTEXT = 256  # max_position_embeddings of the tiny Llama


def generate(client, headers=None, **body):
    body.setdefault("model", "tiny")
    return client.post(f"{API}/generate", json=body, headers=headers)


def generate_ok(client, **body):
    response = generate(client, **body)
    assert response.status_code == 200, response.get_json()
    return response.get_json()


def sse_events(text):
    """[(event, data), ...] of a complete event stream (it ends with a blank line)."""
    assert text.endswith("\n\n")
    return parse_sse(text.split("\n"))


def stream(client, **body):
    """POST a streamed generation, read it to the end, close it; return (response, events)."""
    body.setdefault("model", "tiny")
    response = client.post(f"{API}/generate", json={**body, "stream": True})
    try:
        text = response.get_data(as_text=True)
    finally:
        response.close()
    return response, sse_events(text)


def streamed_text(events):
    assert events[-1][0] == "done"
    assert [name for name, _ in events[:-1]] == ["text"] * (len(events) - 1)
    return "".join(data["text"] for _, data in events[:-1])


def model_entry(client, name, headers=None):
    models = client.get(f"{API}/models", headers=headers).get_json()["models"]
    return next(m for m in models if m["name"] == name)


def status(client):
    response = client.get(f"{API}/status")
    assert response.status_code == 200
    return response.get_json()


def metrics(client, name="tiny"):
    response = client.get(f"{API}/models/{name}/metrics")
    assert response.status_code == 200
    body = response.get_json()
    assert body["name"] == name
    return body["metrics"]


# --- the OpenAI API (/v1) -------------------------------------------------------------------

OPENAI_ERROR_FIELDS = {"message", "type", "param", "code", "details"}
CHAT = [{"role": "user", "content": "What is the capital of France?"}]


def sse_data(text):
    """The `data:` payloads of an OpenAI event stream, in order (strings, undecoded)."""
    assert text.endswith("\n\n"), text[-200:]
    frames = text.split("\n\n")[:-1]
    payloads = []
    for frame in frames:
        if frame.startswith(":"):  # heartbeat comment
            continue
        assert frame.startswith("data: ") and "\n" not in frame, frame
        payloads.append(frame[len("data: ") :])
    return payloads


# --- Prometheus -----------------------------------------------------------------------------


def parse_metrics(text):
    """{(sample name, ((label, value), ...)): value} of a /metrics body."""
    from prometheus_client.parser import text_string_to_metric_families

    return {
        (s.name, tuple(sorted(s.labels.items()))): s.value
        for family in text_string_to_metric_families(text)
        for s in family.samples
    }


def value(samples, name, **labels):
    """One sample's value in parse_metrics' output (0 when absent)."""
    return samples.get((name, tuple(sorted(labels.items()))), 0.0)


def requests_seen(samples, method, route, status):
    """Requests timed for (method, route, status)."""
    return value(
        samples,
        "tursi_request_duration_seconds_count",
        method=method,
        route=route,
        status=str(status),
    )
