"""Unload paths: who stops a worker, from which thread, and when the gauges drop.

- the keep-alive reaper stops a worker without building a gevent hub on its native thread
  (unit level: a gevent-patched subprocess, no Flask);
- the memory and batch gauges follow the unload, whatever the timing of a reload or of the
  worker's last step (app level for the reload, unit level for the worker).
"""

import json
import os
import subprocess
import sys
import threading
from pathlib import Path
from types import SimpleNamespace

import pytest

import tursi
from tests.helpers import API, load_and_wait, wait_for
from tursi.engine.catalog import Catalog
from tursi.engine.jobs import SamplingParams
from tursi.engine.loading import LoadOptions, load_model
from tursi.engine.scheduler import Scheduler
from tursi.engine.worker import ModelWorker
from tursi.metrics import REGISTRY
from tursi.telemetry import ModelStats

API_DOC = Path(__file__).parents[1] / "docs" / "api.md"


# --- 4: the reaper's path builds no gevent hub on its native thread -----------------------

REAPER_SCRIPT = """
import json, os, sys, time
from gevent import monkey

monkey.patch_all()  # as gunicorn's gevent worker does

from gevent._hub_local import get_hub_if_exists

from tursi.engine.catalog import Catalog
from tursi.engine.loading import LoadOptions
from tursi.engine.manager import ModelManager
from tursi.threads import SimpleQueue, start_native_thread

manager = ModelManager(Catalog.load(sys.argv[1]), sys.argv[2], keep_alive=3600)
manager.load("tiny", LoadOptions())
while manager.state("tiny").status == "loading":
    time.sleep(0.05)
assert manager.state("tiny").status == "loaded", manager.state("tiny").error
results = SimpleQueue()


def reap():  # what the reaper thread does once the model has been idle for its keep_alive
    try:
        unloaded = manager.reap_idle(time.monotonic() + 7200)
        results.put({"unloaded": unloaded, "hub_on_this_thread": get_hub_if_exists() is not None})
    except BaseException as exc:
        results.put({"raised": repr(exc)})


start_native_thread(reap)
print(json.dumps(results.get(timeout=60)), flush=True)
# Now, not at interpreter teardown: the worker and housekeeping threads may still be running
# torch code, and tearing the runtime down under them aborts the process.
os._exit(0)
"""


def test_the_keep_alive_reaper_builds_no_gevent_hub_on_its_thread(tiny_models_dir, tmp_path):
    root = Path(tursi.__file__).parents[1]
    result = subprocess.run(
        [sys.executable, "-c", REAPER_SCRIPT, str(tiny_models_dir / "models.json"), str(tmp_path)],
        capture_output=True,
        text=True,
        timeout=180,
        cwd=root,
        env={**os.environ, "PYTHONPATH": str(root)},
    )
    assert result.returncode == 0, result.stderr[-3000:]
    lines = result.stdout.strip().splitlines()
    assert lines and json.loads(lines[-1]) == {"unloaded": ["tiny"], "hub_on_this_thread": False}


# --- 5: the gauges follow the unload -------------------------------------------------------


@pytest.fixture
def gated_steps(monkeypatch):
    """Decode steps wait for `gated_steps.gate`; `gated_steps.entered` is set once one waits."""
    gates = SimpleNamespace(gate=threading.Event(), entered=threading.Event())
    real_step = Scheduler._decode_step

    def step(self):
        gates.entered.set()
        assert gates.gate.wait(30)
        return real_step(self)

    monkeypatch.setattr(Scheduler, "_decode_step", step)
    yield gates
    gates.gate.set()


def gauge(name, model):
    return REGISTRY.get_sample_value(name, {"model": model}) or 0.0


def test_a_reload_during_the_unload_wait_keeps_its_memory_gauge(make_app, gated_steps):
    """App level: unload waits for a worker stuck in a decode step; meanwhile the model loads
    again. Once the unload returns, the gauge shows the new load's memory, not 0."""
    app = make_app()
    client, manager = app.test_client(), app.extensions["tursi"].manager
    baseline = gauge("tursi_model_memory_bytes", "tiny")
    load_and_wait(client, "tiny")
    body = {"model": "tiny", "prompt": "lazy dog", "max_tokens": 20, "ignore_eos": True}
    generation = threading.Thread(
        target=lambda: app.test_client().post(f"{API}/generate", json=body)
    )
    generation.start()
    assert gated_steps.entered.wait(30)
    unload = threading.Thread(target=manager.unload, args=("tiny",))
    unload.start()
    wait_for(lambda: manager.state("tiny").status == "not_loaded")
    assert load_and_wait(client, "tiny")["status"] == "loaded"
    assert unload.is_alive()  # still waiting for the old worker
    gated_steps.gate.set()
    unload.join(30)
    generation.join(30)
    assert not unload.is_alive() and not generation.is_alive()
    memory = manager.state("tiny").memory_bytes
    assert gauge("tursi_model_memory_bytes", "tiny") - baseline == memory > 0


def test_a_stopped_worker_moves_no_gauge_after_its_unload(tiny_models_dir, tmp_path, gated_steps):
    """Unit level: the keep-alive path stops a worker without waiting and zeroes its gauges;
    a step that was running then ends and must not put the running gauge back to 1."""
    entry = Catalog.load(str(tiny_models_dir / "models.json")).get("tiny")
    loaded = load_model(entry, LoadOptions().resolved(entry), str(tmp_path))
    stats = ModelStats("house-stopped-worker")
    worker = ModelWorker(stats.model, loaded, stats)
    del loaded
    worker.start()
    job = worker.new_job(
        "lazy dog", SamplingParams(ignore_eos=True), max_tokens=20, max_tokens_cap=100
    )
    worker.submit(job)
    assert gated_steps.entered.wait(30)
    assert gauge("tursi_generations_running", stats.model) in (0, 1)
    worker.stop()
    stats.unloaded()  # what the manager does once the worker is told to stop
    gated_steps.gate.set()
    wait_for(lambda: worker.loaded is None)  # the thread has ended its last step
    assert gauge("tursi_generations_running", stats.model) == 0
    assert gauge("tursi_generations_waiting", stats.model) == 0
