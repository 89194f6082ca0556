"""The lock-guarded model manager: which models exist, their state, and their workers.

States: not_loaded -> loading -> loaded | failed; unload returns loaded -> not_loaded; a
loaded model whose engine dies or gets stuck (tursi.engine.worker) turns failed, with why.
The lock guards only state changes (never I/O or compute), so a request never waits
behind a load. Loads run on native threads.

Memory: with a budget (TURSI_MAX_MEMORY), a load whose estimated size (its weights and its
prefix cache, TURSI_PREFIX_CACHE) does not fit evicts the least recently used idle models
that are not pinned, or is refused before anything is allocated. A model with a keep_alive
is unloaded once idle that long.

A housekeeping thread (started with the first load, or by `start_housekeeping`) checks every
HOUSEKEEPING_SECONDS that each engine is alive and unloads models idle past their keep_alive,
then runs the API layer's `tick_hooks` (the console's history sampler).

Several workers, one server: with a run folder (TURSI_RUN_DIR, tursi.engine.server_state)
load, unload, eviction and keep_alive change the server's DESIRED state, and every worker's
housekeeper reconciles its own models to it each tick (loading, or detaching, its copy) and
writes its report, from which the views of the whole server are made (tursi.engine.views).
Without one, this worker is the server and its state the truth, as it always was.
"""

from __future__ import annotations

import copy
import logging
import time
from collections.abc import Callable
from dataclasses import dataclass, field
from typing import Any

from ..errors import (
    InsufficientMemory,
    LoadInProgress,
    ModelConflict,
    ModelLoading,
    ModelNotLoaded,
)
from ..formatting import format_bytes
from ..telemetry import ModelStats
from ..threads import Channel, Empty, native_lock, native_sleep, off_hub, start_native_thread
from .catalog import Catalog, CatalogEntry
from .loading import (
    LoadError,
    LoadOptions,
    estimate_kv_bytes,
    estimate_load_seconds,
    estimate_memory_bytes,
    load_model,
)
from .progress import LoadProgress
from .server_state import ServerState
from .views import ModelView, entry_view, options_dict, server_view, wall_clock
from .worker import BatchLimits, ModelWorker

log = logging.getLogger(__name__)

UNLOAD_WAIT_SECONDS = 30.0
HOUSEKEEPING_SECONDS = 0.25


@dataclass
class ModelState:
    name: str
    status: str = "not_loaded"
    error: str | None = None
    options: LoadOptions | None = None
    worker: ModelWorker | None = None
    loaded_at: float | None = None  # wall clock, for load_time
    loaded_mono: float | None = None  # monotonic, for uptime
    load_seconds: float | None = None
    dtype: str | None = None
    device: str | None = None
    memory_bytes: int | None = None
    progress: LoadProgress | None = None  # while loading
    reserved_bytes: int | None = None  # while loading: the estimate counted against the budget
    last_used: float = 0.0  # time.monotonic() of the last request (or of the load)
    wanted: dict[str, Any] | None = None  # with a run folder: the desired entry loaded for
    stats: ModelStats = field(init=False)

    def __post_init__(self) -> None:
        self.stats = ModelStats(self.name)


@dataclass(frozen=True)
class LoadTicket:
    status: str  # "loading" (started now or already) | "loaded" (nothing to do)
    message: str
    estimated_seconds: float | None


class ModelManager:
    def __init__(
        self,
        catalog: Catalog,
        home: str,
        max_gpu_memory: str | None = None,
        allow_downloads: bool = False,
        limits: BatchLimits | None = None,
        max_memory: int | None = None,
        keep_alive: float | None = None,
        run_dir: str | None = None,
    ):
        self.catalog = catalog
        self.limits = limits or BatchLimits()
        self.home = home
        self.max_gpu_memory = max_gpu_memory
        self.allow_downloads = allow_downloads
        self.max_memory = max_memory  # bytes of loaded weights; None: no budget
        self.keep_alive = keep_alive  # seconds idle before unloading; None: forever
        self._lock = native_lock()
        self._states = {name: ModelState(name) for name in catalog.names()}
        self._housekeeper_started = False
        self._closed = False
        # Shared with the other workers of this server (None: this worker is the server).
        self.shared = ServerState(run_dir) if run_dir else None
        self._desired_seen: dict[str, Any] = {}  # the desired state at the last reconcile
        # Filled by the API layer (its request counters), carried in this worker's report.
        self.report_extra: Callable[[], dict[str, Any]] = dict
        # Called by the housekeeping thread after each tick (native thread: no gevent).
        self.tick_hooks: list[Callable[[], None]] = []

    # --- reading ------------------------------------------------------------------------

    def state(self, name: str) -> ModelState:
        self.catalog.get(name)  # raises ModelNotFound with the available names
        return self._states[name]

    def states(self) -> list[ModelState]:
        return [self._states[name] for name in self.catalog.names()]

    def snapshots(self) -> list[ModelState]:
        with self._lock:
            return [copy.copy(state) for state in self.states()]

    def worker(self, name: str) -> ModelWorker:
        """The worker of a loaded model, or the error that says why there is none."""
        state = self.state(name)
        with self._lock:
            status, worker, loaded_for = state.status, state.worker, state.wanted
        if self.shared is not None:  # the desired state decides, before the next reconcile
            wanted = self.shared.desired().get(name)
            if wanted is None:
                status = "failed" if status == "failed" else "not_loaded"
            elif status != "failed" and (
                status != "loaded" or not _same_options(loaded_for, wanted)
            ):
                status = "loading"  # the server has it: this worker's copy is on its way
        if status == "loaded" and worker is not None:
            state.last_used = time.monotonic()
            return worker
        if status == "loading":
            raise ModelLoading(
                f"Model '{name}' is still loading", {"status": status}, headers={"Retry-After": "5"}
            )
        hint = f"POST /api/v1/models/{name}/load"
        details = {"status": status, "hint": hint}
        if state.error:
            details["load_error"] = state.error
        raise ModelNotLoaded(f"Model '{name}' is not loaded", details)

    # --- changing -----------------------------------------------------------------------

    def load(self, name: str, options: LoadOptions) -> LoadTicket:
        """Start a background load, or say the model is already loaded or loading. With a
        memory budget, first make room (evicting idle models) or refuse (507)."""
        entry = self.catalog.get(name)
        options = options.resolved(entry)
        if self.shared is not None:  # decided under the file lock: on a native thread
            ticket = off_hub(self._desire, name, options)
            off_hub(self.reconcile)
            return ticket
        state = self._states[name]
        with self._lock:
            ticket = self._existing(state, options)
        if ticket is not None:
            return ticket
        needed = None
        if self.max_memory is not None:  # reads file headers: off the gevent hub
            needed = off_hub(estimate_memory_bytes, entry, options, self.home)
            if needed is not None:  # the budget counts the model's caches at their size
                needed += self._caches_bytes(self._kv_estimate(entry, options))
        estimate = off_hub(estimate_load_seconds, entry, self.home)  # reads the files too
        with self._lock:
            ticket = self._existing(state, options)
            if ticket is not None:
                return ticket
            victims = [(victim.name, Channel()) for victim in self._evictable_for(name, needed)]
            for victim, exited in victims:
                self._detach(self._states[victim], exited)
            state.status, state.error, state.options = "loading", None, options
            state.progress = progress = LoadProgress()
            state.reserved_bytes = needed
        for victim, exited in victims:
            log.info("evicting %s (least recently used, idle) to make room for %s", victim, name)
            self._wait_released(victim, exited)
        start_native_thread(self._load_in_background, name, options, progress)
        return LoadTicket("loading", "Model loading initiated", estimate)

    def preload(self, name: str) -> None:
        """Start loading a TURSI_PRELOAD model; a refusal (memory budget) marks it failed
        with the reason instead of stopping the server."""
        try:
            self.load(name, LoadOptions())
        except InsufficientMemory as exc:
            log.error("preloading %s refused: %s", name, exc.message)
            state = self.state(name)
            with self._lock:
                state.status, state.error = "failed", exc.message

    def _existing(self, state: ModelState, options: LoadOptions) -> LoadTicket | None:
        """Under the lock: the answer when the model is already loaded or loading."""
        if state.status not in ("loaded", "loading"):
            return None
        if state.options != options:
            raise ModelConflict(
                f"Model '{state.name}' is {state.status} with other settings; unload it first",
                {
                    "status": state.status,
                    "current": state.options.describe(),
                    "requested": options.describe(),
                },
            )
        return LoadTicket(state.status, f"Model already {state.status}", None)

    def _evictable_for(self, name: str, needed: int | None) -> list[ModelState]:
        """Under the lock: the least recently used idle, unpinned models whose unloading
        makes `needed` bytes fit the budget; raises InsufficientMemory when nothing can."""
        if self.max_memory is None or needed is None:
            return []
        in_use = sum(self._budgeted(s) for s in self.states() if s.status in ("loaded", "loading"))
        candidates = sorted(
            (s for s in self.states() if self._evictable(s)), key=lambda s: s.last_used
        )
        victims = []
        for candidate in candidates:
            if in_use + needed <= self.max_memory:
                break
            victims.append(candidate)
            in_use -= self._budgeted(candidate)
        if in_use + needed > self.max_memory:
            raise self._no_room(name, needed)
        return victims

    def _evictable(self, state: ModelState) -> bool:
        return (
            state.status == "loaded"
            and state.worker is not None
            and not self.catalog.get(state.name).pin
            and state.worker.counts() == (0, 0)
        )

    def _budgeted(self, state: ModelState) -> int:
        """What a loaded or loading model counts against TURSI_MAX_MEMORY: its weights, its
        prefix cache and its KV budget (while loading, the estimate of all three)."""
        if state.status == "loading":
            return state.reserved_bytes or 0
        kv = state.stats.totals()["kv_cache_budget_bytes"]
        return (state.memory_bytes or 0) + self.limits.prefix_cache_bytes + kv

    def _caches_bytes(self, kv_budget: int) -> int:
        """What a model's caches count against TURSI_MAX_MEMORY besides its weights: the
        prefix cache and the KV budget (`kv_budget`: the model's own, measured or estimated)."""
        return self.limits.prefix_cache_bytes + kv_budget

    def _kv_estimate(self, entry: CatalogEntry, options: LoadOptions) -> int:
        """A model's KV budget before it loads: TURSI_KV_CACHE, or the most the model can
        use when its config says that is less (tursi.engine.worker.kv_budget measures it)."""
        cap = self.limits.kv_cache_bytes
        if cap is None:
            return 0
        usable = estimate_kv_bytes(entry, options, self.home, self.limits.max_batch)
        return cap if usable is None else min(cap, usable)

    def _no_room(self, name: str, needed: int) -> InsufficientMemory:
        held = {
            s.name: {
                "status": s.status,
                "memory_bytes": s.memory_bytes if s.status == "loaded" else s.reserved_bytes,
                "pinned": self.catalog.get(s.name).pin,
                "busy": s.status == "loading" or not self._evictable(s),
            }
            for s in self.states()
            if s.status in ("loaded", "loading")
        }
        return self._refusal(name, needed, held)

    def _refusal(self, name: str, needed: int, held: dict[str, Any]) -> InsufficientMemory:
        return InsufficientMemory(
            f"Loading '{name}' needs about {format_bytes(needed)}, which does not fit the memory "
            f"budget of {format_bytes(self.max_memory)} (TURSI_MAX_MEMORY) even after unloading "
            "every idle, unpinned model; unload a model or raise the budget",
            {"needed_bytes": needed, "budget_bytes": self.max_memory, "models": held},
        )

    # --- the server's desired state (with a run folder; native threads only) -----------------

    def _desire(self, name: str, options: LoadOptions) -> LoadTicket:
        """Add a model to the desired state, making room in the memory budget among the
        desired models (a victim is evicted by removing it), or say it is there already."""
        shared = self.shared
        assert shared is not None
        entry = self.catalog.get(name)
        needed = None
        if self.max_memory is not None and name not in shared.desired():
            needed = estimate_memory_bytes(entry, options, self.home)
            if needed is not None:
                needed += self._caches_bytes(self._kv_estimate(entry, options))
        with shared.locked():
            desired = shared.desired()
            if name in desired:
                return self._desired_already(name, desired[name], options)
            victims = self._shared_victims(name, needed, desired)
            for victim in victims:
                log.info(
                    "evicting %s (least recently used, idle) to make room for %s", victim, name
                )
                del desired[victim]
            desired[name] = {"options": options_dict(options), "since": time.time()}
            shared.write_desired(desired)
        estimate = estimate_load_seconds(entry, self.home)
        return LoadTicket("loading", "Model loading initiated", estimate)

    def _desired_already(
        self, name: str, wanted: dict[str, Any], options: LoadOptions
    ) -> LoadTicket:
        """Under the desired lock: the answer to a load of a model already desired."""
        status = server_view(name, wanted, self._live_reports()).status
        current = LoadOptions(**wanted["options"])
        if current != options:
            raise ModelConflict(
                f"Model '{name}' is {status} with other settings; unload it first",
                {"status": status, "current": current.describe(), "requested": options.describe()},
            )
        if status == "failed":  # asked again: a new entry, so that every worker tries again
            desired = self.shared.desired()
            desired[name]["since"] = time.time()
            self.shared.write_desired(desired)
            return LoadTicket("loading", "Model loading initiated", None)
        return LoadTicket(status, f"Model already {status}", None)

    def _shared_victims(self, name: str, needed: int | None, desired: dict[str, Any]) -> list[str]:
        """The least recently used desired models, idle on every worker and not pinned, whose
        removal makes `needed` bytes fit the budget of each worker (every worker holds every
        model); raises InsufficientMemory when nothing can."""
        if self.max_memory is None or needed is None:
            return []
        reports = self._live_reports()
        entries = {n: [r["models"][n] for r in reports] for n in desired}
        held = {n: self._desired_bytes(n, desired[n], entries[n]) for n in desired}
        in_use = sum(held.values())
        idle = {n: _idle(entries[n]) and not self.catalog.get(n).pin for n in desired}
        last_used = {
            n: max([e["last_used"] or 0 for e in entries[n]] + [desired[n]["since"]])
            for n in desired
        }
        victims = []
        for candidate in sorted((n for n in desired if idle[n]), key=last_used.__getitem__):
            if in_use + needed <= self.max_memory:
                break
            victims.append(candidate)
            in_use -= held[candidate]
        if in_use + needed > self.max_memory:
            raise self._refusal(
                name,
                needed,
                {
                    n: {
                        "status": server_view(n, desired[n], reports).status,
                        "memory_bytes": held[n],
                        "pinned": self.catalog.get(n).pin,
                        "busy": not idle[n],
                    }
                    for n in desired
                },
            )
        return victims

    def _desired_bytes(self, name: str, wanted: dict[str, Any], entries: list) -> int:
        """What one copy of a desired model takes, its caches counted: measured by a worker
        that loaded it, else estimated from its files."""
        measured = [
            e["memory_bytes"] + self._caches_bytes(e["totals"]["kv_cache_budget_bytes"])
            for e in entries
            if e["status"] == "loaded" and e["options"] == wanted["options"]
        ]
        if measured:
            return max(measured)
        options = LoadOptions(**wanted["options"])
        entry = self.catalog.get(name)
        estimate = estimate_memory_bytes(entry, options, self.home)
        if estimate is None:
            return 0
        return estimate + self._caches_bytes(self._kv_estimate(entry, options))

    def _undesire(self, name: str) -> bool:
        """Remove a model from the desired state; False when it was not there."""
        shared = self.shared
        assert shared is not None
        with shared.locked():
            desired = shared.desired()
            if desired.pop(name, None) is None:
                return False
            shared.write_desired(desired)
        return True

    def start(self, preload: list[str]) -> None:
        """Start serving: load the TURSI_PRELOAD models. With a run folder, the first worker
        of the server makes the desired state from them and every worker (a replacement of a
        killed one too) loads what the desired state holds."""
        if self.shared is None:
            for name in preload:
                self.preload(name)
            return
        off_hub(self._first_desired, preload)
        off_hub(self.reconcile)
        self._start_housekeeper()

    def _first_desired(self, preload: list[str]) -> None:
        shared = self.shared
        assert shared is not None
        with shared.locked():
            if shared.exists():
                return
            shared.write_desired({})
        for name in preload:  # through the budget, as one load each
            try:
                self._desire(name, LoadOptions().resolved(self.catalog.get(name)))
            except InsufficientMemory as exc:
                log.error("preloading %s refused: %s", name, exc.message)
                state = self.state(name)
                with self._lock:
                    state.status, state.error = "failed", exc.message

    def reconcile(self) -> None:
        """Make this worker's models what the desired state says: start the loads it lacks,
        detach the models it no longer wants (or wants with other options). A load that
        failed stays failed until its desired entry changes: no retry loop. Native threads
        only (a detach here waits for nothing: no Channel, see tursi.threads)."""
        if self.shared is None or self._closed:
            return
        desired = self.shared.desired()
        starts = []
        with self._lock:
            for state in self.states():
                wanted = desired.get(state.name)
                # A loaded copy stays while the options stay (a retry of another worker's
                # failed load rewrites `since` only); a failed one is retried on any change.
                if state.status == "loaded" and not _same_options(state.wanted, wanted):
                    self._detach(state, None)
                if wanted is None:
                    if state.status == "failed" and state.name in self._desired_seen:
                        state.status, state.error = "not_loaded", None  # unloaded meanwhile
                    continue
                if state.status in ("loaded", "loading") or (
                    state.status == "failed" and state.wanted == wanted
                ):
                    continue
                options = LoadOptions(**wanted["options"])
                state.status, state.error, state.options = "loading", None, options
                state.wanted, state.progress = wanted, LoadProgress()
                starts.append((state.name, options, state.progress))
            self._desired_seen = desired
        for name, options, progress in starts:
            start_native_thread(self._load_in_background, name, options, progress)
        self.publish()

    def catching_up(self) -> list[str]:
        """The desired models that another live worker already serves and this one is still
        loading: a worker that joins a serving server (the replacement of a killed one)
        takes no connections until there are none (tursi.api.gunicorn_defaults)."""
        if self.shared is None:
            return []
        desired, others = self.shared.desired(), self.shared.other_reports()
        return [
            name
            for name, wanted in desired.items()
            if self._states[name].status not in ("loaded", "failed")
            and any(
                r["models"][name]["status"] == "loaded"
                and r["models"][name]["options"] == wanted["options"]
                for r in others
            )
        ]

    # --- reports and views ------------------------------------------------------------------

    def _report(self) -> dict[str, Any]:
        """This worker's report: its models, and the API layer's extra (request counts)."""
        now = time.monotonic()
        models = {}
        with self._lock:
            for state in self.states():
                running, waiting = state.worker.counts() if state.worker else (0, 0)
                if running or waiting:
                    state.last_used = now
                progress = state.progress if state.status == "loading" else None
                models[state.name] = {
                    "status": state.status,
                    "options": options_dict(state.options),
                    "error": state.error,
                    "dtype": state.dtype,
                    "device": state.device,
                    "memory_bytes": state.memory_bytes,
                    "loaded_at": state.loaded_at,
                    "load_seconds": state.load_seconds,
                    "last_used": wall_clock(state.last_used) if state.last_used else None,
                    "progress": round(progress.fraction, 3) if progress else None,
                    "stage": progress.stage if progress else None,
                    "running": running,
                    "waiting": waiting,
                    "totals": state.stats.totals(),
                }
        shared = self.shared
        pid = shared.pid if shared else None
        return {"pid": pid, "models": models, "extra": self.report_extra()}

    def publish(self) -> None:
        """Rewrite this worker's report (each tick, and after a change of its models)."""
        if self.shared is not None and not self._closed:
            self.shared.write_report(self._report())

    def _live_reports(self) -> list[dict[str, Any]]:
        """This worker's report, fresh, and the other live workers' (their last tick)."""
        others = self.shared.other_reports() if self.shared is not None else []
        return [self._report(), *others]

    def views(self) -> list[ModelView]:
        """Every catalog model as the whole server holds it."""
        return self._views(self._live_reports())

    def views_and_extras(self) -> tuple[list[ModelView], list[dict[str, Any]]]:
        """`views()`, and the API layer's extra of every live worker of the server (this one
        first), from one reading of the workers' reports."""
        reports = self._live_reports()
        return self._views(reports), [report["extra"] for report in reports]

    def _views(self, reports: list[dict[str, Any]]) -> list[ModelView]:
        if self.shared is None:
            return [entry_view(n, reports[0]["models"][n]) for n in self.catalog.names()]
        desired = self.shared.desired()
        return [server_view(n, desired.get(n), reports) for n in self.catalog.names()]

    def view(self, name: str) -> ModelView:
        self.catalog.get(name)  # raises ModelNotFound with the available names
        return next(v for v in self.views() if v.name == name)

    def _load_in_background(self, name: str, options: LoadOptions, progress: LoadProgress) -> None:
        state = self._states[name]
        started = time.monotonic()
        try:
            loaded = load_model(
                self.catalog.get(name),
                options,
                self.home,
                self.max_gpu_memory,
                self.allow_downloads,
                progress,
            )
        except Exception as exc:
            message, detail = _load_failure(exc)
            unexpected = not isinstance(exc, LoadError)  # its traceback helps
            log.error("loading %s failed: %s", name, detail, exc_info=unexpected)
            with self._lock:
                state.status, state.error, state.progress = "failed", message, None
                state.reserved_bytes = None
            self.publish()
            return
        worker = ModelWorker(name, loaded, state.stats, self.limits, self._engine_failed)
        self._start_housekeeper()
        worker.start()
        with self._lock:
            state.worker, state.progress, state.reserved_bytes = worker, None, None
            state.loaded_at, state.loaded_mono = time.time(), time.monotonic()
            state.load_seconds = state.loaded_mono - started
            state.dtype, state.device = loaded.dtype, loaded.device
            state.memory_bytes = loaded.memory_bytes
            state.status, state.last_used = "loaded", time.monotonic()
            # Under the lock: an unload, which zeroes the gauge under it, comes after this.
            state.stats.loaded(loaded.memory_bytes, state.load_seconds)
        del loaded
        log.info("loaded %s in %.1fs", name, state.load_seconds)
        self.publish()

    def unload(self, name: str) -> None:
        """Unload a model. Its running and queued generations end with `model_unloaded`;
        returns once this worker has dropped the model (memory released). With a run folder
        it leaves the desired state, and the other workers drop theirs within a tick."""
        state = self.state(name)
        if self.shared is not None and off_hub(self._undesire, name):
            self._unload_here(state, missing_ok=True)  # a load here ends in reconcile
            self.publish()
            return
        self._unload_here(state)

    def _unload_here(self, state: ModelState, missing_ok: bool = False) -> None:
        exited = Channel()  # waited on here, so built here
        with self._lock:
            if missing_ok and (state.status != "loaded" or state.worker is None):
                return
            if state.status == "loading":
                raise LoadInProgress(
                    f"Model '{state.name}' is loading; unload it once it is loaded",
                    {"status": "loading"},
                )
            if state.status != "loaded" or state.worker is None:
                raise ModelNotLoaded(
                    f"Model '{state.name}' is not loaded", {"status": state.status}
                )
            self._detach(state, exited)
        self._wait_released(state.name, exited)

    def _engine_failed(self, worker: ModelWorker, reason: str) -> None:
        """The worker's engine died or got stuck (it has ended its jobs): the model turns
        `failed` with the reason, until it is loaded again."""
        state = self._states[worker.name]
        with self._lock:
            if state.worker is not worker:  # unloaded meanwhile
                return
            options = state.options
            self._detach(state, None)  # the worker has ended its jobs; stop() asks no more
            # The options stay: with a run folder, failed with the desired options stays so.
            state.status, state.error = "failed", f"The engine stopped: {reason}"
            state.options = options

    def check_engines(self) -> None:
        """Ask each loaded model's worker whether its engine still serves; a stuck one is
        found here even when no client waits on it (and turns `failed`)."""
        with self._lock:
            workers = [s.worker for s in self.states() if s.worker is not None]
        for worker in workers:  # not under the lock: a failure calls _engine_failed
            worker.failure()

    def _detach(self, state: ModelState, exited: Channel | None) -> None:
        """Under the lock: mark a loaded model not loaded, stop its worker (its jobs end with
        `model_unloaded`; `exited` gets an item once the model's memory is released) and zero
        the model's gauges. Under the lock, so that a reload, which cannot start before the
        lock is released, sets the gauges after this, and the old worker moves them no more."""
        worker = state.worker
        assert worker is not None
        state.worker = None
        state.status, state.options = "not_loaded", None
        state.loaded_at = state.loaded_mono = state.memory_bytes = None
        state.dtype = state.device = None
        worker.stop(exited)
        state.stats.unloaded()

    def _wait_released(self, name: str, exited: Channel) -> None:
        """Return once a detached worker has dropped its model (memory released)."""
        try:
            exited.get(timeout=UNLOAD_WAIT_SECONDS)
        except Empty:
            log.warning("worker of %s still busy %.0fs after unload", name, UNLOAD_WAIT_SECONDS)

    # --- housekeeping: engines alive, keep_alive ----------------------------------------------

    def _keep_alive(self, name: str) -> float | None:
        entry = self.catalog.get(name)
        if entry.pin:
            return None
        return entry.keep_alive if entry.keep_alive is not None else self.keep_alive

    def start_housekeeping(self) -> None:
        """Start the housekeeping thread now, if no load has (idempotent)."""
        self._start_housekeeper()

    def _start_housekeeper(self) -> None:
        with self._lock:
            if self._housekeeper_started:
                return
            self._housekeeper_started = True
        start_native_thread(self._housekeep_forever)

    def _housekeep_forever(self) -> None:
        while not self._closed:
            native_sleep(HOUSEKEEPING_SECONDS)
            try:
                self.check_engines()
                self.reap_idle(time.monotonic())
                self.reconcile()
                for hook in self.tick_hooks:
                    hook()
            except Exception:  # one bad tick (a full disk, a torn file) must not end the thread
                log.exception("housekeeping failed")

    def reap_idle(self, now: float) -> list[str]:
        """Unload the models idle for longer than their keep_alive; a busy model counts as
        used now. With a run folder: the desired models idle on every worker. Returns the names
        unloaded."""
        if self.shared is not None:
            return self._reap_desired()
        expired = []
        with self._lock:
            for state in self.states():
                keep_alive = self._keep_alive(state.name)
                if keep_alive is None or state.status != "loaded" or state.worker is None:
                    continue
                if state.worker.counts() != (0, 0):
                    state.last_used = now
                elif now - state.last_used >= keep_alive:
                    # No exit channel: nothing waits here, and on the reaper's native thread
                    # building one would start a gevent hub (tursi.threads).
                    self._detach(state, None)
                    expired.append(state.name)
        for name in expired:
            log.info("unloaded %s: idle for its keep_alive", name)
        return expired

    def _reap_desired(self) -> list[str]:
        shared = self.shared
        assert shared is not None
        desired = shared.desired()
        timed = {name: self._keep_alive(name) for name in desired}
        timed = {name: keep_alive for name, keep_alive in timed.items() if keep_alive is not None}
        if not timed:  # the usual case: no report to read every tick
            return []
        reports = self._live_reports()
        expired = []
        for name, keep_alive in timed.items():
            wanted = desired[name]
            entries = [report["models"][name] for report in reports]
            if not _idle(entries):
                continue
            last_used = max([e["last_used"] or 0 for e in entries] + [wanted["since"]])
            if time.time() - last_used >= keep_alive:
                expired.append(name)
        if expired:
            with shared.locked():
                desired = shared.desired()
                for name in expired:
                    desired.pop(name, None)
                shared.write_desired(desired)
            log.info("unloaded %s: idle on every worker for its keep_alive", ", ".join(expired))
        return expired

    def shutdown(self) -> None:
        """Stop this worker's models (the server's desired state stays as it is)."""
        self._closed = True
        for state in self.states():
            if state.status == "loaded":
                try:
                    self._unload_here(state)
                except (ModelNotLoaded, LoadInProgress):
                    pass
        if self.shared is not None:
            self.shared.remove_report()


def _same_options(loaded_for: dict[str, Any] | None, wanted: dict[str, Any] | None) -> bool:
    """Two desired entries ask for the same load (whenever they were asked)."""
    return (
        loaded_for is not None and wanted is not None and loaded_for["options"] == wanted["options"]
    )


def _idle(entries: list[dict[str, Any]]) -> bool:
    """Loaded somewhere and busy nowhere (no load, no generation running or waiting)."""
    return any(e["status"] == "loaded" for e in entries) and not any(
        e["status"] == "loading" or e["running"] or e["waiting"] for e in entries
    )


def _load_failure(exc: Exception) -> tuple[str, str]:
    """Why a load failed: what clients see (GET /models `error`, 409 `load_error`), in
    Tursi's words, with no path of the server and no library's message; and what the log
    keeps, which has both."""
    import torch

    kind = type(exc).__name__
    if isinstance(exc, LoadError):
        return str(exc), exc.detail
    if isinstance(exc, (MemoryError, torch.OutOfMemoryError)):  # host RAM / a GPU's memory
        memory = "host memory" if isinstance(exc, MemoryError) else "GPU memory"
        return (
            f"Out of memory while loading ({kind}: {memory}). Free memory "
            "(unload a model), quantize, or set TURSI_MAX_MEMORY so that loads that do "
            "not fit are refused before they start"
        ), f"out of memory ({kind}: {exc})"
    return f"The load failed ({kind}); the server log has the details", f"{kind}: {exc}"
