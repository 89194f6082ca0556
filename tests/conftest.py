"""Shared fixtures: tiny local models (built once per session), an app factory and a client.

Nothing here downloads anything: the models are random two-layer Llama / GPT-2 networks
with a tokenizer trained on a few sentences (see tiny_models.py).
"""

import gc
import os
import sys
import threading
import time
from pathlib import Path
from types import SimpleNamespace

import pytest

os.environ["HF_HUB_OFFLINE"] = "1"
os.environ["TRANSFORMERS_OFFLINE"] = "1"

sys.path.insert(0, str(Path(__file__).parent))

from tiny_models import build_gpt2, build_llama, write_catalog  # noqa: E402

from tursi import create_app  # noqa: E402

API = "/api/v1"


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


def wait_for(condition, timeout=30.0):
    deadline = time.monotonic() + timeout
    while not condition():
        assert time.monotonic() < deadline, "condition not met in time"
        time.sleep(0.01)


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
