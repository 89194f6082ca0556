"""Several workers, one server (TURSI_RUN_DIR): two apps on one run folder stand for two
gunicorn workers. A load, an unload, keep_alive and the views act on the whole server;
each app reconciles its own copy of the models to the shared desired state."""

import json
import os
import subprocess
import sys

import pytest

from tests.helpers import API, assert_error, generate, generate_ok, model_entry, status, wait_for
from tursi.api.response_schemas import ModelListSchema


@pytest.fixture
def run_dir(tmp_path):
    return tmp_path / "run"


@pytest.fixture
def workers(make_app, run_dir, tmp_path):
    """Two apps (workers A and B) sharing one run folder, each with its own home (so that a
    test can hold up B's loads alone)."""
    apps = [make_app(run_dir=str(run_dir), home=str(tmp_path / f"home-{n}")) for n in "ab"]
    return [app.test_client() for app in apps]


@pytest.fixture
def held_loads(monkeypatch):
    """Loads into the homes in `held_loads.homes` wait for `held_loads.gate.set()`: one
    worker's copy can be held up while the others load."""
    import threading
    from types import SimpleNamespace

    import tursi.engine.manager as manager_module

    held = SimpleNamespace(gate=threading.Event(), homes=set())
    real_load = manager_module.load_model

    def held_load(entry, options, home, *args):
        if home in held.homes:
            assert held.gate.wait(30)
        return real_load(entry, options, home, *args)

    monkeypatch.setattr(manager_module, "load_model", held_load)
    yield held
    held.gate.set()


def manager(client):
    return client.application.extensions["tursi"].manager


@pytest.fixture
def reconciles(monkeypatch):
    """reconciles(client) returns once the client's housekeeper has run two whole reconcile
    passes from now: at least one of them started after the call."""
    import tursi.engine.manager as manager_module

    done: dict[int, int] = {}
    real_reconcile = manager_module.ModelManager.reconcile

    def counted(self):
        try:
            return real_reconcile(self)
        finally:
            done[id(self)] = done.get(id(self), 0) + 1

    monkeypatch.setattr(manager_module.ModelManager, "reconcile", counted)

    def after_two(client):
        key = id(manager(client))
        start = done.get(key, 0)
        wait_for(lambda: done.get(key, 0) >= start + 2)

    return after_two


def all_say(clients, status_, name="tiny"):
    return all(model_entry(c, name)["status"] == status_ for c in clients)


def load_everywhere(clients, body=None):
    response = clients[0].post(f"{API}/models/tiny/load", json=body)
    assert response.status_code == 202, response.get_json()
    wait_for(lambda: all_say(clients, "loaded"), timeout=30)


def test_a_load_through_one_worker_reaches_every_worker(workers):
    a, b = workers
    load_everywhere(workers)
    assert manager(b).state("tiny").status == "loaded"  # B loaded by itself
    generate_ok(b, prompt="Once upon", max_tokens=3)
    body = b.get(f"{API}/models").get_json()
    assert ModelListSchema().validate(body) == {}  # the documented shape, workers included
    entry = model_entry(b, "tiny")
    assert [w["status"] for w in entry["workers"]] == ["loaded", "loaded"]
    # Memory: one copy per worker, both counted.
    copy = manager(a).state("tiny").memory_bytes
    assert entry["memory_bytes"] == 2 * copy
    # Loading again, through either worker, finds it loaded.
    response = b.post(f"{API}/models/tiny/load")
    assert response.status_code == 200 and response.get_json()["status"] == "loaded"


def test_a_worker_whose_copy_is_loading_answers_503_never_409(workers, held_loads, tmp_path):
    held_loads.homes.add(str(tmp_path / "home-b"))
    a, b = workers
    try:
        assert a.post(f"{API}/models/tiny/load").status_code == 202
        wait_for(lambda: manager(a).state("tiny").status == "loaded")
        wait_for(lambda: manager(b).state("tiny").status == "loading")
        # B publishes its report just after its state changes: A sees it at the next write.
        wait_for(lambda: [w["status"] for w in model_entry(a, "tiny")["workers"]].count("loading"))
        entry = model_entry(a, "tiny")
        assert entry["status"] == "loading"  # not every worker has it yet
        assert sorted(w["status"] for w in entry["workers"]) == ["loaded", "loading"]
        response = generate(b, prompt="Once upon", max_tokens=3)
        assert_error(response, 503, "model_loading")
        assert int(response.headers["Retry-After"]) > 0
        generate_ok(a, prompt="Once upon", max_tokens=3)
    finally:
        held_loads.gate.set()
    wait_for(lambda: all_say(workers, "loaded"))
    generate_ok(b, prompt="Once upon", max_tokens=3)


def test_an_unload_through_one_worker_frees_the_model_everywhere(workers):
    a, b = workers
    load_everywhere(workers)
    response = b.post(f"{API}/models/tiny/unload")
    assert response.status_code == 200
    # A answers from the desired state at once, before its housekeeper drops its copy.
    assert_error(generate(a, prompt="Once", max_tokens=2), 409, "model_not_loaded")
    wait_for(lambda: manager(a).state("tiny").status == "not_loaded")
    assert all_say(workers, "not_loaded")
    for client in workers:
        assert_error(generate(client, prompt="Once", max_tokens=2), 409, "model_not_loaded")
    assert_error(a.post(f"{API}/models/tiny/unload"), 409, "model_not_loaded")


def test_status_and_metrics_count_the_requests_of_every_worker(workers):
    a, b = workers
    load_everywhere(workers)
    for _ in range(3):
        generate_ok(b, prompt="Once upon", max_tokens=2)
    served = [c.application.extensions["tursi"].requests for c in workers]

    def counted_by_a() -> bool:  # B's report catches up within a tick
        body = status(a)
        # The /status call itself is counted once answered: A's count less one.
        return body["requests"]["total"] == served[0].total - 1 + served[1].total

    wait_for(counted_by_a, timeout=30)
    assert served[1].total >= 3 and status(a)["active_models"] == 1

    def model_metrics() -> dict:
        return a.get(f"{API}/models/tiny/metrics").get_json()["metrics"]

    # B's report may have been written during its last request (3 requests, 5 tokens): the
    # next housekeeping tick brings the whole count.
    wait_for(
        lambda: (model_metrics()["requests_total"], model_metrics()["tokens_generated"]) == (3, 6),
        timeout=30,
    )
    assert model_metrics()["memory_bytes"] == 2 * manager(a).state("tiny").memory_bytes


def test_a_dead_workers_report_is_ignored_and_removed(workers, run_dir):
    a, _ = workers
    load_everywhere(workers)
    dead = subprocess.Popen([sys.executable, "-c", "pass"])
    dead.wait()
    report = json.loads((run_dir / "workers" / manager(a).shared.report_name).read_text())
    report["pid"] = dead.pid
    report["models"]["tiny"]["status"] = "loading"
    path = run_dir / "workers" / f"{dead.pid}-dead.json"
    path.write_text(json.dumps(report))
    entry = model_entry(a, "tiny")
    assert entry["status"] == "loaded" and len(entry["workers"]) == 2
    assert not path.exists()


def test_keep_alive_unloads_a_model_idle_on_every_worker(make_app, run_dir, reconciles):
    clients = [make_app(run_dir=str(run_dir), keep_alive=1).test_client() for _ in range(2)]
    load_everywhere(clients)
    generate_ok(clients[1], prompt="Once", max_tokens=2)
    wait_for(lambda: all_say(clients, "not_loaded"), timeout=10)
    # Each worker drops its copy at its next reconcile once the desired state lost the model.
    for client in clients:
        reconciles(client)
    assert all(manager(c).state("tiny").status == "not_loaded" for c in clients)
    assert json.loads((run_dir / "desired.json").read_text()) == {}


def test_a_reload_with_8_bits_reaches_every_worker(workers):
    a, b = workers
    load_everywhere(workers)
    conflict = assert_error(
        b.post(f"{API}/models/tiny/load", json={"quantize": True, "bits": 8}), 409, "model_conflict"
    )
    assert conflict["details"]["status"] == "loaded"
    assert a.post(f"{API}/models/tiny/unload").status_code == 200
    load_everywhere([b, a], {"quantize": True, "bits": 8})
    for client in workers:
        assert manager(client).state("tiny").options.bits == 8
        generate_ok(client, prompt="Once upon", max_tokens=2)
    entry = model_entry(a, "tiny")
    assert entry["bits"] == 8
    assert entry["memory_bytes"] == 2 * manager(b).state("tiny").memory_bytes


def test_a_new_worker_loads_what_the_server_holds(make_app, workers, run_dir, tmp_path, held_loads):
    """A worker that replaces a killed one: nobody asks it, it loads the desired models, and
    says it is catching up (gunicorn then holds its connections back) until it has them."""
    load_everywhere(workers)
    assert manager(workers[0]).catching_up() == []
    held_loads.homes.add(str(tmp_path / "home-c"))
    c = make_app(run_dir=str(run_dir), home=str(tmp_path / "home-c")).test_client()
    assert manager(c).catching_up() == ["tiny"]
    held_loads.gate.set()
    wait_for(lambda: manager(c).catching_up() == [], timeout=30)
    assert manager(c).state("tiny").status == "loaded"
    generate_ok(c, prompt="Once upon", max_tokens=2)
    assert len(model_entry(workers[0], "tiny")["workers"]) == 3


def test_the_first_worker_makes_the_desired_state_from_preload(make_app, run_dir):
    a = make_app(run_dir=str(run_dir), preload=["tiny"]).test_client()
    b = make_app(run_dir=str(run_dir), preload=["tiny"]).test_client()
    wait_for(lambda: all_say([a, b], "loaded"), timeout=30)
    desired = json.loads((run_dir / "desired.json").read_text())
    assert list(desired) == ["tiny"]
    assert a.get("/ready").status_code == 200 and b.get("/ready").status_code == 200
    assert sorted(os.listdir(run_dir / "workers")) == sorted(
        manager(c).shared.report_name for c in (a, b)
    )


def test_a_failed_copy_shows_failed_and_a_new_load_retries_it_alone(
    workers, monkeypatch, tmp_path, reconciles
):
    """B's load fails: the server says failed with B's reason, B does not retry by itself;
    loading again retries B's copy and leaves A's loaded copy as it is."""
    import tursi.engine.manager as manager_module

    real_load = manager_module.load_model
    broken = {str(tmp_path / "home-b")}
    failures = []

    def failing_load(entry, options, home, *args):
        if home in broken:
            failures.append(home)
            raise OSError("disk on fire")
        return real_load(entry, options, home, *args)

    monkeypatch.setattr(manager_module, "load_model", failing_load)
    a, b = workers
    assert a.post(f"{API}/models/tiny/load").status_code == 202
    wait_for(lambda: model_entry(a, "tiny")["status"] == "failed")
    wait_for(lambda: manager(a).state("tiny").status == "loaded")
    assert "OSError" in model_entry(b, "tiny")["error"]  # the words stay in B's log
    assert "disk on fire" not in model_entry(b, "tiny")["error"]
    assert_error(generate(b, prompt="Once", max_tokens=2), 409, "model_not_loaded")
    serving = manager(a).state("tiny").worker
    reconciles(b)  # B's housekeeper has looked again: no retry loop
    assert manager(b).state("tiny").status == "failed"
    assert len(failures) == 1
    broken.clear()
    assert b.post(f"{API}/models/tiny/load").status_code == 202
    wait_for(lambda: all_say(workers, "loaded"))
    reconciles(a)  # A's housekeeper has seen the new entry
    assert manager(a).state("tiny").worker is serving  # A's copy was not reloaded
    generate_ok(b, prompt="Once upon", max_tokens=2)


def test_an_unload_while_copies_load_drops_each_copy_when_its_load_ends(
    workers, held_loads, tmp_path
):
    held_loads.homes.update(str(tmp_path / f"home-{n}") for n in "ab")
    a, b = workers
    assert a.post(f"{API}/models/tiny/load").status_code == 202
    wait_for(lambda: all(manager(c).state("tiny").status == "loading" for c in workers))
    assert b.post(f"{API}/models/tiny/unload").status_code == 200
    assert all_say(workers, "not_loaded")
    held_loads.gate.set()
    wait_for(lambda: all(manager(c).state("tiny").status == "not_loaded" for c in workers), 10)
    assert_error(generate(a, prompt="Once", max_tokens=2), 409, "model_not_loaded")


def test_the_memory_budget_evicts_from_the_servers_models(make_app, run_dir, tmp_path):
    """A budget with room for one model: loading the other through B evicts the first from
    the desired state, and every worker drops it. No prefix cache and no KV budget: the
    arithmetic is about weights (tests/app/test_memory.py counts the caches)."""
    from tursi.engine.loading import LoadOptions, estimate_memory_bytes

    apps = [
        make_app(run_dir=str(run_dir), home=str(tmp_path / f"home-{n}"), prefix_cache=0, kv_cache=0)
        for n in "ab"
    ]
    workers = [app.test_client() for app in apps]
    a, b = workers
    load_everywhere(workers)
    held = manager(a).state("tiny").memory_bytes
    entry = manager(b).catalog.get("tiny-gpt2")
    needed = estimate_memory_bytes(entry, LoadOptions().resolved(entry), str(tmp_path / "home-b"))
    for client in workers:
        manager(client).max_memory = max(held, needed) + min(held, needed) // 2
    response = b.post(f"{API}/models/tiny-gpt2/load")
    assert response.status_code == 202, response.get_json()
    wait_for(lambda: all_say(workers, "loaded", "tiny-gpt2"))
    assert all_say(workers, "not_loaded", "tiny")
    wait_for(lambda: all(manager(c).state("tiny").status == "not_loaded" for c in workers), 2)
    desired = json.loads((tmp_path / "run" / "desired.json").read_text())
    assert list(desired) == ["tiny-gpt2"]
