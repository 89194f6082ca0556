"""Memory safety: the TURSI_MAX_MEMORY budget (estimate, LRU eviction of idle unpinned models,
507 before anything is allocated), preloads beyond the budget, and keep_alive (idle unload,
never mid-generation; TURSI_KEEP_ALIVE default; pin overrides it).

Budgets are set from the measured size of the tiny float32 Llama (M bytes once loaded, E
bytes estimated from its safetensors header), so "room for two" is exact, not guessed.
"""

from __future__ import annotations

import logging
import threading
from dataclasses import dataclass

import pytest

import tursi.engine.manager as manager_module
from tests.helpers import (
    API,
    assert_error,
    build_llama,
    generate,
    load_and_wait,
    model_entry,
    sse_events,
    wait_for,
    write_catalog,
)
from tursi import create_app
from tursi.config import Settings
from tursi.engine.catalog import CatalogError, read_catalog_file
from tursi.engine.loading import LoadOptions, estimate_memory_bytes
from tursi.engine.scheduler import Scheduler

LLAMA = {"dtype": "float32"}


@pytest.fixture(scope="module")
def catalog(tiny_models_dir, tmp_path_factory):
    """A catalog of several copies of the tiny Llama under different names, one pinned, some
    with keep_alive, and "big": a wider Llama (about 3.5x the tiny one)."""
    root = tmp_path_factory.mktemp("memory-catalog")
    build_llama(root / "big", hidden_size=128, intermediate_size=256)
    llama = str(tiny_models_dir / "llama")
    entries = {name: {"path": llama, **LLAMA} for name in ("m1", "m2", "m3", "m4")}
    entries.update(
        {
            "pinned": {"path": llama, **LLAMA, "pin": True},
            "big": {"path": "big", **LLAMA},
            "ka": {"path": llama, **LLAMA, "keep_alive": 1},
            "ka-minute": {"path": llama, **LLAMA, "keep_alive": "1m"},
            "ka-hour": {"path": llama, **LLAMA, "keep_alive": "1h"},
            "ka-pinned": {"path": llama, **LLAMA, "pin": True, "keep_alive": 1},
        }
    )
    return write_catalog(root / "models.json", entries)


@dataclass(frozen=True)
class Sizes:
    M: int  # memory_bytes of a loaded tiny Llama (GET /models)
    E: int  # estimate_memory_bytes of the tiny Llama (what a load asks the budget for)
    BIG: int  # memory_bytes of "big"
    EBIG: int  # estimate of "big"


@pytest.fixture(scope="module")
def sizes(catalog, tmp_path_factory):
    """Measured once: load m1 and big without a budget and read their memory_bytes."""
    home = str(tmp_path_factory.mktemp("sizes-home"))
    app = create_app(
        {"preload": [], "home": home, "models_file": str(catalog), "rate_limit": "1000/minute"}
    )
    client = app.test_client()
    try:
        m = load_and_wait(client, "m1")["memory_bytes"]
        big = load_and_wait(client, "big")["memory_bytes"]
    finally:
        app.extensions["tursi"].manager.shutdown()
    entries = {e.name: e for e in read_catalog_file(catalog)}

    def estimate(name):
        return estimate_memory_bytes(entries[name], LoadOptions().resolved(entries[name]), home)

    sizes = Sizes(m, estimate("m1"), big, estimate("big"))
    assert sizes.BIG > 3 * sizes.M  # the budgets below rely on it
    return sizes


@pytest.fixture
def budget_app(make_app, catalog):
    """budget_app(max_memory, **overrides) -> (app, client) on the memory catalog; no prefix
    cache and no KV budget unless asked (the budget's arithmetic below is about weights)."""

    def _make(max_memory=None, **overrides):
        overrides.setdefault("prefix_cache", 0)
        overrides.setdefault("kv_cache", 0)
        app = make_app(models_file=str(catalog), max_memory=max_memory, **overrides)
        return app, app.test_client()

    return _make


@pytest.fixture
def held(make_app, monkeypatch):
    """held(client, name) starts a streamed generation on `name` whose decode steps wait
    until the returned finish() is called: the model is busy (1 running) for as long as the
    test wants. finish() lets it run and returns the stream's events."""
    gates: dict[str, threading.Event] = {}
    responses = []
    real_step = Scheduler._decode_step

    def step(self):
        gate = gates.get(self.name)
        if gate is not None:
            assert gate.wait(30)
        return real_step(self)

    monkeypatch.setattr(Scheduler, "_decode_step", step)

    def start(client, name):
        gates[name] = threading.Event()
        response = client.post(
            f"{API}/generate",
            json={
                "model": name,
                "prompt": "lazy dog",
                "max_tokens": 20,
                "temperature": 0,
                "ignore_eos": True,
                "stream": True,
            },
        )
        assert response.status_code == 200, response.get_data(as_text=True)
        responses.append(response)
        worker = client.application.extensions["tursi"].manager.state(name).worker
        wait_for(lambda: worker.counts() == (1, 0))

        def finish():
            gates[name].set()
            try:
                return sse_events(response.get_data(as_text=True))
            finally:
                response.close()

        return finish

    yield start
    for gate in gates.values():
        gate.set()
    for response in responses:
        response.close()


@pytest.fixture
def load_calls(monkeypatch):
    """Names passed to the manager's load_model (what was actually allocated)."""
    calls = []
    real_load = manager_module.load_model

    def spy(entry, *args, **kwargs):
        calls.append(entry.name)
        return real_load(entry, *args, **kwargs)

    monkeypatch.setattr(manager_module, "load_model", spy)
    return calls


def statuses(client, *names):
    models = {m["name"]: m["status"] for m in client.get(f"{API}/models").get_json()["models"]}
    return {name: models[name] for name in names}


def serves(client, name):
    response = generate(client, model=name, prompt="hi", max_tokens=2)
    return response.status_code == 200


def test_the_estimate_is_within_10_percent_of_the_loaded_size(budget_app, catalog, sizes, tmp_path):
    app, client = budget_app()
    entries = {e.name: e for e in read_catalog_file(catalog)}
    assert abs(sizes.E - sizes.M) <= 0.1 * sizes.M
    assert abs(sizes.EBIG - sizes.BIG) <= 0.1 * sizes.BIG
    # GPT-2 (tied head, Conv1D) and a bfloat16 load too.
    tiny_gpt2 = read_catalog_file(
        app.extensions["tursi"].settings.models_file if False else catalog
    )  # same parser, other catalog below
    del tiny_gpt2
    for name, options in (("m1", LoadOptions(dtype="bfloat16")),):
        estimate = estimate_memory_bytes(
            entries[name], options.resolved(entries[name]), str(tmp_path)
        )
        entry = load_and_wait(client, name, {"dtype": "bfloat16"})
        assert entry["dtype"] == "bfloat16"
        assert abs(estimate - entry["memory_bytes"]) <= 0.1 * entry["memory_bytes"]
        assert estimate == sizes.E // 2


def test_the_gpt2_estimate_is_within_10_percent(make_app, tiny_models_dir, tmp_path):
    client = make_app().test_client()
    entry = next(
        e for e in read_catalog_file(tiny_models_dir / "models.json") if e.name == "tiny-gpt2"
    )
    estimate = estimate_memory_bytes(entry, LoadOptions().resolved(entry), str(tmp_path))
    loaded = load_and_wait(client, "tiny-gpt2")["memory_bytes"]
    assert abs(estimate - loaded) <= 0.1 * loaded


def test_the_budget_boundary_is_exact(budget_app, sizes):
    app, client = budget_app(max_memory=sizes.M + sizes.E)  # m1 loaded + m2's estimate: fits
    assert load_and_wait(client, "m1")["status"] == "loaded"
    assert load_and_wait(client, "m2")["status"] == "loaded"
    assert statuses(client, "m1", "m2") == {"m1": "loaded", "m2": "loaded"}

    app, client = budget_app(max_memory=sizes.M + sizes.E - 1)  # one byte short: evicts m1
    assert load_and_wait(client, "m1")["status"] == "loaded"
    assert load_and_wait(client, "m2")["status"] == "loaded"
    assert statuses(client, "m1", "m2") == {"m1": "not_loaded", "m2": "loaded"}


def test_the_budget_counts_each_models_prefix_cache(budget_app, sizes):
    cache = 1000  # TURSI_PREFIX_CACHE: each model's cache counts at its full size
    app, client = budget_app(max_memory=sizes.M + sizes.E + 2 * cache, prefix_cache=cache)
    assert load_and_wait(client, "m1")["status"] == "loaded"
    assert load_and_wait(client, "m2")["status"] == "loaded"
    assert statuses(client, "m1", "m2") == {"m1": "loaded", "m2": "loaded"}

    app, client = budget_app(max_memory=sizes.M + sizes.E + 2 * cache - 1, prefix_cache=cache)
    assert load_and_wait(client, "m1")["status"] == "loaded"
    assert load_and_wait(client, "m2")["status"] == "loaded"
    assert statuses(client, "m1", "m2") == {"m1": "not_loaded", "m2": "loaded"}


def test_the_budget_counts_each_models_kv_budget(budget_app, sizes):
    """TURSI_KV_CACHE is what each model's batch may hold, counted against TURSI_MAX_MEMORY
    (the tiny Llama could use more: its max_batch rows at its whole context)."""
    kv = 100_000
    app, client = budget_app(max_memory=sizes.M + sizes.E + 2 * kv, kv_cache=kv)
    assert load_and_wait(client, "m1")["status"] == "loaded"
    assert load_and_wait(client, "m2")["status"] == "loaded"
    assert statuses(client, "m1", "m2") == {"m1": "loaded", "m2": "loaded"}
    budget = client.get(f"{API}/models/m1/metrics").get_json()["metrics"]["kv_cache"]
    assert budget["budget_bytes"] == kv

    app, client = budget_app(max_memory=sizes.M + sizes.E + 2 * kv - 1, kv_cache=kv)
    assert load_and_wait(client, "m1")["status"] == "loaded"
    assert load_and_wait(client, "m2")["status"] == "loaded"
    assert statuses(client, "m1", "m2") == {"m1": "not_loaded", "m2": "loaded"}


def test_a_third_model_evicts_the_least_recently_used_idle_one(budget_app, sizes, caplog):
    app, client = budget_app(max_memory=2 * sizes.M + sizes.M // 2)  # room for two
    load_and_wait(client, "m1")
    load_and_wait(client, "m2")
    assert serves(client, "m1")  # m1 is now more recently used than m2

    caplog.set_level(logging.INFO, logger="tursi.engine.manager")
    response = client.post(f"{API}/models/m3/load")
    assert response.status_code == 202, response.get_json()
    assert statuses(client, "m2")["m2"] == "not_loaded"  # evicted before the load started
    assert load_and_wait(client, "m3")["status"] == "loaded"
    assert statuses(client, "m1", "m2", "m3") == {
        "m1": "loaded",
        "m2": "not_loaded",
        "m3": "loaded",
    }
    assert serves(client, "m1") and serves(client, "m3")
    error = assert_error(generate(client, model="m2", prompt="hi"), 409, "model_not_loaded")
    assert error["details"]["status"] == "not_loaded"
    assert "load_error" not in error["details"]  # evicted, not failed
    assert any("evicting m2" in r.getMessage() and "m3" in r.getMessage() for r in caplog.records)

    # m1 used again, m3 untouched since its load: loading m4 now evicts m3.
    assert serves(client, "m1")
    assert load_and_wait(client, "m4")["status"] == "loaded"
    assert statuses(client, "m1", "m3", "m4") == {
        "m1": "loaded",
        "m3": "not_loaded",
        "m4": "loaded",
    }


def test_eviction_takes_as_many_as_needed_oldest_first_and_stops(budget_app, sizes):
    # Three tiny models fit; "big" needs two of them gone, not three.
    app, client = budget_app(max_memory=sizes.EBIG + sizes.M + sizes.M // 2)
    for name in ("m1", "m2", "m3"):
        load_and_wait(client, name)
    assert serves(client, "m1")  # LRU order now: m2, m3, m1
    assert load_and_wait(client, "big")["status"] == "loaded"
    assert statuses(client, "m1", "m2", "m3", "big") == {
        "m1": "loaded",
        "m2": "not_loaded",
        "m3": "not_loaded",
        "big": "loaded",
    }
    assert serves(client, "m1") and serves(client, "big")


def test_a_pinned_model_is_never_evicted(budget_app, sizes):
    app, client = budget_app(max_memory=2 * sizes.M + sizes.M // 2)
    load_and_wait(client, "pinned")  # the least recently used, but pinned
    load_and_wait(client, "m1")
    assert load_and_wait(client, "m2")["status"] == "loaded"
    assert statuses(client, "pinned", "m1", "m2") == {
        "pinned": "loaded",
        "m1": "not_loaded",
        "m2": "loaded",
    }
    assert serves(client, "pinned")


def test_a_busy_model_is_not_evicted(budget_app, sizes, held):
    app, client = budget_app(max_memory=2 * sizes.M + sizes.M // 2)
    load_and_wait(client, "m1")
    load_and_wait(client, "m2")
    finish = held(client, "m1")  # m1 generating...
    assert serves(client, "m2")  # ...and m2 used after it: m2 is the most recently used
    assert load_and_wait(client, "m3")["status"] == "loaded"
    assert statuses(client, "m1", "m2", "m3") == {
        "m1": "loaded",
        "m2": "not_loaded",
        "m3": "loaded",
    }
    events = finish()
    assert events[-1][0] == "done" and events[-1][1]["tokens_generated"] == 20


def test_only_pinned_or_busy_models_left_is_507_and_nothing_changes(
    budget_app, sizes, held, load_calls
):
    budget = 2 * sizes.M + sizes.M // 2
    app, client = budget_app(max_memory=budget)
    load_and_wait(client, "pinned")
    load_and_wait(client, "m1")
    finish = held(client, "m1")
    before = client.get(f"{API}/models").get_json()
    load_calls.clear()

    error = assert_error(client.post(f"{API}/models/m2/load"), 507, "insufficient_memory")
    assert error["details"]["needed_bytes"] == sizes.E
    assert error["details"]["budget_bytes"] == budget
    models = error["details"]["models"]
    assert set(models) == {"pinned", "m1"}
    assert models["pinned"]["status"] == "loaded" and models["pinned"]["pinned"] is True
    assert models["pinned"]["memory_bytes"] == sizes.M
    assert models["m1"] == {
        "status": "loaded",
        "memory_bytes": sizes.M,
        "pinned": False,
        "busy": True,
    }
    assert "TURSI_MAX_MEMORY" in error["message"]

    # No state changed: nothing unloaded, nothing allocated, m2 not even "loading".
    assert load_calls == []
    after = client.get(f"{API}/models").get_json()

    def strip(body):
        return [{k: v for k, v in m.items() if k != "uptime"} for m in body["models"]]

    assert strip(after) == strip(before)
    assert statuses(client, "pinned", "m1", "m2") == {
        "pinned": "loaded",
        "m1": "loaded",
        "m2": "not_loaded",
    }
    assert serves(client, "pinned")
    events = finish()
    assert events[-1][0] == "done"  # the busy model kept generating
    assert serves(client, "m1")

    # Once m1 is idle it can make room.
    assert load_and_wait(client, "m2")["status"] == "loaded"
    assert statuses(client, "pinned", "m1", "m2") == {
        "pinned": "loaded",
        "m1": "not_loaded",
        "m2": "loaded",
    }


def test_a_model_bigger_than_the_whole_budget_is_refused_at_once(budget_app, sizes, load_calls):
    budget = 2 * sizes.M + sizes.M // 2
    assert sizes.EBIG > budget
    app, client = budget_app(max_memory=budget)
    load_and_wait(client, "m1")
    load_and_wait(client, "m2")
    load_calls.clear()
    # At once: the load request itself answers 507 (not 202 and a failed load later).
    error = assert_error(client.post(f"{API}/models/big/load"), 507, "insufficient_memory")
    assert error["details"]["needed_bytes"] == sizes.EBIG
    assert error["details"]["budget_bytes"] == budget
    assert set(error["details"]["models"]) == {"m1", "m2"}
    assert load_calls == []
    assert statuses(client, "m1", "m2", "big") == {
        "m1": "loaded",
        "m2": "loaded",
        "big": "not_loaded",
    }
    assert serves(client, "m1") and serves(client, "m2")


def test_models_still_loading_count_against_the_budget(budget_app, sizes, slow_loads):
    app, client = budget_app(max_memory=2 * sizes.M + sizes.M // 2)
    try:
        assert client.post(f"{API}/models/m1/load").status_code == 202
        assert client.post(f"{API}/models/m2/load").status_code == 202
        error = assert_error(client.post(f"{API}/models/m3/load"), 507, "insufficient_memory")
        assert error["details"]["models"] == {
            name: {"status": "loading", "memory_bytes": sizes.E, "pinned": False, "busy": True}
            for name in ("m1", "m2")
        }
    finally:
        slow_loads.set()
    wait_for(lambda: statuses(client, "m1", "m2") == {"m1": "loaded", "m2": "loaded"})
    assert statuses(client, "m3")["m3"] == "not_loaded"


def test_preload_beyond_the_budget_fails_that_model_and_the_server_starts(budget_app, sizes):
    app, client = budget_app(max_memory=sizes.M + sizes.M // 2, preload=["pinned", "m1", "big"])
    assert client.get("/health").status_code == 200
    wait_for(lambda: statuses(client, "pinned")["pinned"] == "loaded")
    for name in ("m1", "big"):
        entry = model_entry(client, name)
        assert entry["status"] == "failed"
        assert "TURSI_MAX_MEMORY" in entry["error"] and name in entry["error"]
        error = assert_error(generate(client, model=name, prompt="hi"), 409, "model_not_loaded")
        assert "TURSI_MAX_MEMORY" in error["details"]["load_error"]
    assert serves(client, "pinned")
    ready = client.get("/ready")
    assert ready.status_code == 503
    assert ready.get_json()["error"]["details"]["models"] == {
        "pinned": "loaded",
        "m1": "failed",
        "big": "failed",
    }

    # After making room, the failed one loads.
    assert_error(client.post(f"{API}/models/m1/load"), 507, "insufficient_memory")
    assert client.post(f"{API}/models/pinned/unload").status_code == 200
    entry = load_and_wait(client, "m1")
    assert entry["status"] == "loaded" and "error" not in entry
    assert serves(client, "m1")


@pytest.mark.parametrize(
    "value, expected",
    [
        ("1GiB", 1 << 30),
        ("512MB", 512_000_000),
        ("100", 100),
        ("8 GiB", 8 << 30),
        ("1.5G", 1_500_000_000),
        ("64kib", 65536),
        ("2tb", 2 * 1000**4),
    ],
)
def test_max_memory_parsing(value, expected):
    assert Settings.from_env({"TURSI_MAX_MEMORY": value}).max_memory == expected


@pytest.mark.parametrize("value", ["lots", "-1", "0", "0.1", "1 XB", "", "1GiB2", "GiB", "nan"])
def test_bad_max_memory_names_the_variable(value):
    with pytest.raises(ValueError, match="TURSI_MAX_MEMORY"):
        Settings.from_env({"TURSI_MAX_MEMORY": value})


def test_no_budget_by_default():
    assert Settings.from_env({}).max_memory is None
    assert Settings.from_env({}).keep_alive is None


@pytest.mark.parametrize(
    "value, expected", [("300", 300), ("30s", 30), ("5m", 300), ("1h", 3600), ("0.5", 0.5)]
)
def test_keep_alive_parsing(value, expected):
    assert Settings.from_env({"TURSI_KEEP_ALIVE": value}).keep_alive == expected


@pytest.mark.parametrize("value", ["0", "-5", "forever", "5d", ""])
def test_bad_keep_alive_names_the_variable(value):
    with pytest.raises(ValueError, match="TURSI_KEEP_ALIVE"):
        Settings.from_env({"TURSI_KEEP_ALIVE": value})


@pytest.mark.parametrize(
    "spec, expected",
    [
        ({"keep_alive": 1}, (False, 1.0)),
        ({"keep_alive": "5m"}, (False, 300.0)),
        ({"keep_alive": 2.5}, (False, 2.5)),
        ({"pin": True}, (True, None)),
        ({}, (False, None)),
    ],
)
def test_catalog_pin_and_keep_alive(tmp_path, spec, expected):
    path = write_catalog(tmp_path / "models.json", {"x": {"path": ".", **spec}})
    (entry,) = read_catalog_file(path)
    assert (entry.pin, entry.keep_alive) == expected


@pytest.mark.parametrize(
    "spec",
    [
        {"keep_alive": 0},
        {"keep_alive": -1},
        {"keep_alive": "soon"},
        {"keep_alive": True},
        {"keep_alive": None},
        {"pin": "yes"},
        {"pin": 1},
    ],
)
def test_bad_catalog_pin_or_keep_alive_is_refused_at_start(make_app, tmp_path, spec):
    path = write_catalog(tmp_path / "models.json", {"x": {"path": ".", **spec}})
    with pytest.raises(CatalogError, match="'x'"):
        make_app(models_file=str(path))


@pytest.fixture
def passes(monkeypatch):
    """The fake clock readings of the housekeeping passes (reap_idle) so far, each recorded
    once its unloads are done."""
    seen: list[float] = []
    real_reap = manager_module.ModelManager.reap_idle

    def recording_reap(self, now):
        try:
            return real_reap(self, now)
        finally:
            seen.append(now)

    monkeypatch.setattr(manager_module.ModelManager, "reap_idle", recording_reap)
    return seen


def after_a_pass(passes, clock, client, *names):
    """statuses() once a housekeeping pass has read the clock's current time."""
    now = clock.monotonic()
    wait_for(lambda: passes and passes[-1] >= now)
    return statuses(client, *names)


def test_keep_alive_unloads_an_idle_model_and_use_keeps_it(budget_app, fake_clock, passes):
    app, client = budget_app()
    load_and_wait(client, "ka")  # keep_alive 1 s
    load_and_wait(client, "m1")  # no keep_alive, no server default
    for _ in range(4):  # used every 0.75 s for 3 s: never idle for 1 s
        fake_clock.advance(0.75)
        assert after_a_pass(passes, fake_clock, client, "ka") == {"ka": "loaded"}
        assert serves(client, "ka")

    fake_clock.advance(0.75)  # idle 0.75 s since its last use
    assert after_a_pass(passes, fake_clock, client, "ka") == {"ka": "loaded"}
    fake_clock.advance(0.25)  # idle exactly its keep_alive
    assert after_a_pass(passes, fake_clock, client, "ka", "m1") == {
        "ka": "not_loaded",
        "m1": "loaded",
    }
    assert serves(client, "m1")
    error = assert_error(generate(client, model="ka", prompt="hi"), 409, "model_not_loaded")
    assert error["details"]["status"] == "not_loaded"
    assert load_and_wait(client, "ka")["status"] == "loaded"  # and it loads again
    assert serves(client, "ka")


def test_keep_alive_never_unloads_a_model_mid_generation(budget_app, held, fake_clock, passes):
    app, client = budget_app()
    load_and_wait(client, "ka")
    finish = held(client, "ka")
    fake_clock.advance(2.5)  # 2.5x its keep_alive, busy the whole time
    assert after_a_pass(passes, fake_clock, client, "ka") == {"ka": "loaded"}
    events = finish()
    assert [name for name, _ in events].count("done") == 1 and events[-1][0] == "done"
    assert events[-1][1]["tokens_generated"] == 20
    # Idle from the last pass that saw it busy: unloaded keep_alive after that, not before.
    fake_clock.advance(0.75)
    assert after_a_pass(passes, fake_clock, client, "ka") == {"ka": "loaded"}
    fake_clock.advance(0.25)
    assert after_a_pass(passes, fake_clock, client, "ka") == {"ka": "not_loaded"}


def test_server_default_keep_alive_and_what_overrides_it(budget_app, fake_clock, passes):
    app, client = budget_app(keep_alive=1)  # TURSI_KEEP_ALIVE=1
    names = ("m1", "ka-hour", "pinned", "ka-pinned")
    for name in names:
        load_and_wait(client, name)
    fake_clock.advance(0.75)
    assert set(after_a_pass(passes, fake_clock, client, *names).values()) == {"loaded"}
    fake_clock.advance(0.25)  # the default, for the model without a keep_alive of its own
    assert after_a_pass(passes, fake_clock, client, *names) == {
        "m1": "not_loaded",
        "ka-hour": "loaded",
        "pinned": "loaded",
        "ka-pinned": "loaded",
    }
    fake_clock.advance(3598.75)  # its own hour, not the default's second
    assert after_a_pass(passes, fake_clock, client, "ka-hour") == {"ka-hour": "loaded"}
    fake_clock.advance(0.25)
    assert after_a_pass(passes, fake_clock, client, *names) == {
        "m1": "not_loaded",
        "ka-hour": "not_loaded",
        "pinned": "loaded",  # pinned: kept whatever the default or its own keep_alive
        "ka-pinned": "loaded",
    }


def test_reap_idle_with_a_fake_clock(budget_app, held, monkeypatch):
    app, client = budget_app(keep_alive=30)
    manager = app.extensions["tursi"].manager
    monkeypatch.setattr(manager, "_start_housekeeper", lambda: None)  # only this test's clock
    names = ("m1", "m2", "ka-minute", "ka-hour", "pinned", "ka-pinned")
    for name in names:
        load_and_wait(client, name)
    finish = held(client, "m2")  # busy
    for name in names:
        manager.state(name).last_used = 1000.0

    assert manager.reap_idle(1029.9) == []
    assert manager.reap_idle(1030.0) == ["m1"]  # the server default, 30 s
    assert manager.state("m2").last_used == 1030.0  # busy counts as used now
    assert manager.reap_idle(1059.9) == []
    assert manager.reap_idle(1060.0) == ["ka-minute"]
    assert manager.reap_idle(4599.0) == []
    assert manager.reap_idle(4600.0) == ["ka-hour"]
    assert manager.state("m2").last_used == 4600.0
    assert finish()[-1][0] == "done"
    assert manager.reap_idle(4629.9) == []  # idle again: 30 s from its last busy tick
    assert manager.reap_idle(4630.0) == ["m2"]
    assert manager.reap_idle(1e12) == []  # pinned models stay, keep_alive or not
    assert statuses(client, *names) == {
        "m1": "not_loaded",
        "m2": "not_loaded",
        "ka-minute": "not_loaded",
        "ka-hour": "not_loaded",
        "pinned": "loaded",
        "ka-pinned": "loaded",
    }
    assert serves(client, "pinned") and serves(client, "ka-pinned")


@pytest.mark.parametrize(
    ("env", "expected"),
    [
        ({}, 512 * 1024**2),
        ({"TURSI_PREFIX_CACHE": "0"}, 0),
        ({"TURSI_PREFIX_CACHE": "64MiB"}, 64 * 1024**2),
        ({"TURSI_MAX_MEMORY": "1GiB"}, 256 * 1024**2),  # a quarter of the budget
        ({"TURSI_MAX_MEMORY": "8GiB"}, 512 * 1024**2),
        ({"TURSI_MAX_MEMORY": "1GiB", "TURSI_PREFIX_CACHE": "600MiB"}, 600 * 1024**2),
    ],
)
def test_the_prefix_cache_size(env, expected):
    assert Settings.from_env(env).prefix_cache_bytes() == expected


@pytest.mark.parametrize("value", ["-1", "lots", "0.1"])
def test_a_bad_prefix_cache_size_names_the_variable(value):
    with pytest.raises(ValueError, match="TURSI_PREFIX_CACHE"):
        Settings.from_env({"TURSI_PREFIX_CACHE": value})


def test_a_request_whose_kv_could_never_fit_gets_507_and_one_that_fits_runs(make_app):
    """TURSI_KV_CACHE bounds each request too: one whose prompt and max_tokens need more
    than the whole budget alone is refused at once (it would wait forever), with what it
    needs; a smaller one runs. The tiny Llama's token: 2 layers x (keys, values) x 2 kv heads
    x 16 x 4 bytes = 512 bytes."""
    app = make_app(kv_cache=64 * 1024)  # 128 columns of the tiny Llama
    client = app.test_client()
    assert load_and_wait(client, "tiny")["status"] == "loaded"
    response = generate(client, model="tiny", prompt="hello there", max_tokens=200)
    error = assert_error(response, 507, "insufficient_memory")
    assert error["details"]["budget_bytes"] == 64 * 1024
    assert error["details"]["needed_bytes"] > 64 * 1024
    assert "TURSI_KV_CACHE" in error["message"]
    assert generate(client, model="tiny", prompt="hello there", max_tokens=20).status_code == 200
    metrics = client.get(f"{API}/models/tiny/metrics").get_json()["metrics"]["kv_cache"]
    assert metrics["budget_bytes"] == 64 * 1024


@pytest.mark.parametrize(
    ("env", "expected"),
    [
        ({"TURSI_KV_CACHE": "0"}, None),  # no bound, not counted
        ({"TURSI_KV_CACHE": "64MiB"}, 64 * 1024**2),
        ({"TURSI_MAX_MEMORY": "1GiB"}, 256 * 1024**2),  # a quarter of the budget
        ({"TURSI_MAX_MEMORY": "1GiB", "TURSI_KV_CACHE": "600MiB"}, 600 * 1024**2),
    ],
)
def test_the_kv_budget_setting(env, expected):
    assert Settings.from_env(env).kv_cache_bytes() == expected


def test_the_kv_budget_defaults_to_an_eighth_of_the_machine(monkeypatch):
    monkeypatch.setattr("psutil.virtual_memory", lambda: type("VM", (), {"total": 8 * 1024**3}))
    assert Settings.from_env({}).kv_cache_bytes() == 1024**3
