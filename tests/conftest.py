"""Shared fixtures: tiny local models (built once per session), an app factory and a client.

Nothing here downloads anything: the models are random two-layer Llama / GPT-2 networks
with a tokenizer trained on a few sentences (see helpers.py).
"""

import gc
import threading
import time
from pathlib import Path
from types import SimpleNamespace

import pytest

from tests.helpers import build_gpt2, build_llama, load_and_wait, with_chat_template, write_catalog
from tursi import create_app
from tursi.engine.worker import ModelWorker

FOLDERS = ("unit", "app", "server")


def pytest_collection_modifyitems(items):
    """Markers come from the folder: tests/unit -> unit, tests/app -> app, tests/server ->
    server (`make test-fast` runs `-m "not server"`: no gunicorn, no redis)."""
    for item in items:
        folder = Path(item.fspath).parent.name
        if folder in FOLDERS:
            item.add_marker(folder)


@pytest.fixture(scope="module")
def one_torch_thread():
    """One torch thread for a module's tests (the engine tests that run many one-token
    steps): on two cores busy with other work, two threads waiting on each other made such
    steps 25 times slower."""
    import torch

    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(threads)


@pytest.fixture(scope="session")
def tiny_models_dir(tmp_path_factory):
    """A folder with the tiny models ("llama", "gpt2") and a catalog ("models.json")
    naming them "tiny" and "tiny-gpt2"."""
    root = tmp_path_factory.mktemp("tiny-models")
    build_llama(root / "llama")
    build_gpt2(root / "gpt2")
    write_catalog(
        root / "models.json",
        {
            "tiny": {"path": "llama", "dtype": "float32"},
            "tiny-gpt2": {"path": "gpt2", "dtype": "float32"},
        },
    )
    # Unloading runs a full gc.collect(); with torch and transformers imported that scans
    # ~400k long-lived objects (0.2-0.4 s per unload). Freezing them keeps teardowns fast;
    # objects created later (apps, models) are still collected as usual.
    gc.collect()
    gc.freeze()
    return root


@pytest.fixture(scope="session")
def chat_catalog(tiny_models_dir, tmp_path_factory):
    """A catalog naming the tiny Llama with a chat template "tiny", so that every route
    (chat and tokenize included) can serve it."""
    root = tmp_path_factory.mktemp("chat-catalog")
    chat = with_chat_template(tiny_models_dir / "llama", root / "chat")
    return write_catalog(root / "models.json", {"tiny": {"path": str(chat), "dtype": "float32"}})


@pytest.fixture(scope="session")
def embedded_home(tmp_path_factory):
    """One TURSI_HOME for every test of the session that serves the embedded model: its GGUF
    is converted to safetensors once (~25 s), not once per module. (Concurrent first loads
    are safe: the conversion is written under a file lock.)"""
    return tmp_path_factory.mktemp("tursi-home")


@pytest.fixture
def make_app(tiny_models_dir, tmp_path):
    """Factory: make_app(**overrides) -> a fresh app on the tiny catalog. Every app made
    here has its loaded models unloaded when the test ends."""
    apps = []

    def _make_app(**overrides):
        config = {
            "preload": [],
            "home": str(tmp_path / "home"),
            "models_file": str(tiny_models_dir / "models.json"),
            "rate_limit": "1000/minute",
            **overrides,
        }
        app = create_app(config)
        app.config["TESTING"] = True
        apps.append(app)
        return app

    yield _make_app

    for app in apps:
        app.extensions["tursi"].manager.shutdown()


@pytest.fixture
def chat_client(make_app, chat_catalog):
    """A test client of an app on the tiny chat catalog, its model "tiny" loaded."""
    client = make_app(models_file=str(chat_catalog)).test_client()
    assert load_and_wait(client, "tiny")["status"] == "loaded"
    return client


@pytest.fixture
def submitted(monkeypatch):
    """The jobs each request queued on the engine, one list per request."""
    requests: list[list] = []
    real = ModelWorker.submit_all

    def recording(self, jobs):
        requests.append(list(jobs))
        return real(self, jobs)

    monkeypatch.setattr(ModelWorker, "submit_all", recording)
    return requests


@pytest.fixture
def slow_steps(monkeypatch):
    """Each decode step takes at least 3 ms, so a long generation is still running while a
    test reacts to its first tokens, whatever the hardware."""
    from tursi.engine.scheduler import Scheduler

    real_step = Scheduler._decode_step

    def slow_step(self):
        time.sleep(0.003)
        return real_step(self)

    monkeypatch.setattr(Scheduler, "_decode_step", slow_step)


@pytest.fixture
def held_steps(monkeypatch):
    """Decode steps wait while the returned event is clear (at most 10 s each), so requests
    stay in the batch, however slow the machine, until the test sets it."""
    from tursi.engine.scheduler import Scheduler

    go = threading.Event()
    go.set()
    real_step = Scheduler._decode_step

    def held_step(self):
        go.wait(10)
        return real_step(self)

    monkeypatch.setattr(Scheduler, "_decode_step", held_step)
    yield go
    go.set()


class FakeClock:
    """A monotonic clock that moves only when the test moves it."""

    def __init__(self, start: float = 1000.0):
        self.now = start

    def monotonic(self) -> float:
        return self.now

    def advance(self, seconds: float) -> float:
        self.now += seconds
        return self.now


@pytest.fixture
def fake_clock(monkeypatch):
    """The engine's time.monotonic (manager: last use, keep_alive; worker and scheduler:
    request deadlines) is a FakeClock; wall time and perf_counter stay real. Advance it by
    sums of powers of two (0.25, 0.5, 1) so that boundaries compare exactly."""
    import tursi.engine.manager as manager_module
    import tursi.engine.scheduler as scheduler_module
    import tursi.engine.worker as worker_module

    clock = FakeClock()
    fake_time = SimpleNamespace(
        monotonic=clock.monotonic, time=time.time, perf_counter=time.perf_counter
    )
    for module in (manager_module, scheduler_module, worker_module):
        monkeypatch.setattr(module, "time", fake_time)
    return clock


@pytest.fixture
def app(make_app):
    return make_app()


@pytest.fixture
def client(app):
    return app.test_client()


@pytest.fixture
def tiny_client(client):
    """A client whose app has "tiny" loaded."""
    assert load_and_wait(client, "tiny")["status"] == "loaded"
    return client


@pytest.fixture
def gated_loads(monkeypatch):
    """Loads of the models named in `gated_loads.names` (all when empty) wait for
    `gated_loads.gate.set()` before reading any weights, so "loading" can be observed."""
    import tursi.engine.manager as manager_module

    gate = threading.Event()
    names: set[str] = set()
    real_load = manager_module.load_model

    def gated_load(entry, *args, **kwargs):
        if not names or entry.name in names:
            assert gate.wait(30)
        return real_load(entry, *args, **kwargs)

    monkeypatch.setattr(manager_module, "load_model", gated_load)
    yield SimpleNamespace(gate=gate, names=names)
    gate.set()


@pytest.fixture
def slow_loads(gated_loads):
    """Every load waits for slow_loads.set()."""
    return gated_loads.gate
