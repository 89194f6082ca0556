"""The lock-guarded model manager: which models exist, their state, and their workers.

States: not_loaded -> loading -> loaded | failed; unload returns loaded -> not_loaded; a
loaded model whose engine dies or gets stuck (tursi.engine.worker) turns failed, with why.
The lock guards only state changes (never I/O or compute), so a request never waits
behind a load. Loads run on native threads.

Memory: with a budget (TURSI_MAX_MEMORY), a load whose estimated size does not fit evicts
the least recently used idle models that are not pinned, or is refused before anything is
allocated. A model with a keep_alive is unloaded once idle that long.

A housekeeping thread (started with the first load) checks every
HOUSEKEEPING_SECONDS that each engine is alive and unloads models idle past their keep_alive.
"""

from __future__ import annotations

import copy
import logging
import time
from dataclasses import dataclass, field

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
from .catalog import Catalog
from .loading import (
    LoadError,
    LoadOptions,
    estimate_load_seconds,
    estimate_memory_bytes,
    load_model,
)
from .progress import LoadProgress
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

    # --- reading ------------------------------------------------------------------------

    def state(self, name: str) -> ModelState:
        self.catalog.get(name)  # raises ModelNotFound with the available names
        return self._states[name]

    def states(self) -> list[ModelState]:
        return [self._states[name] for name in self.catalog.names()]

    def snapshot(self, name: str) -> ModelState:
        """A consistent copy of one model's state (its fields change together under the
        lock), for views that read several of them."""
        state = self.state(name)
        with self._lock:
            return copy.copy(state)

    def snapshots(self) -> list[ModelState]:
        with self._lock:
            return [copy.copy(state) for state in self.states()]

    def worker(self, name: str) -> ModelWorker:
        """The worker of a loaded model, or the error that says why there is none."""
        state = self.state(name)
        with self._lock:
            status, worker = state.status, state.worker
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

    def counts(self) -> dict[str, int]:
        """Loaded models and generations running / waiting across all of them."""
        loaded = running = waiting = 0
        for state in self.states():
            worker = state.worker
            if state.status == "loaded" and worker is not None:
                loaded += 1
                worker_running, worker_waiting = worker.counts()
                running += worker_running
                waiting += worker_waiting
        return {"loaded": loaded, "running": running, "waiting": waiting}

    # --- changing -----------------------------------------------------------------------

    def load(self, name: str, options: LoadOptions) -> LoadTicket:
        """Start a background load, or say the model is already loaded or loading. With a
        memory budget, first make room (evicting idle models) or refuse (507)."""
        entry = self.catalog.get(name)
        options = options.resolved(entry)
        state = self._states[name]
        with self._lock:
            ticket = self._existing(state, options)
        if ticket is not None:
            return ticket
        needed = None
        if self.max_memory is not None:  # reads file headers: off the gevent hub
            needed = off_hub(estimate_memory_bytes, entry, options, self.home)
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
        in_use = sum(
            (s.memory_bytes or 0) if s.status == "loaded" else (s.reserved_bytes or 0)
            for s in self.states()
            if s.status in ("loaded", "loading")
        )
        candidates = sorted(
            (s for s in self.states() if self._evictable(s)), key=lambda s: s.last_used
        )
        victims = []
        for candidate in candidates:
            if in_use + needed <= self.max_memory:
                break
            victims.append(candidate)
            in_use -= candidate.memory_bytes or 0
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
        return InsufficientMemory(
            f"Loading '{name}' needs about {format_bytes(needed)}, which does not fit the memory "
            f"budget of {format_bytes(self.max_memory)} (TURSI_MAX_MEMORY) even after unloading "
            "every idle, unpinned model; unload a model or raise the budget",
            {"needed_bytes": needed, "budget_bytes": self.max_memory, "models": held},
        )

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
            message = _load_failure(exc)
            log.error("loading %s failed: %s", name, message)
            with self._lock:
                state.status, state.error, state.progress = "failed", message, None
                state.reserved_bytes = None
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

    def unload(self, name: str) -> None:
        """Unload a loaded model. Its running and queued generations end with `model_unloaded`;
        returns once the worker has dropped the model (memory released)."""
        state = self.state(name)
        exited = Channel()  # waited on here, so built here
        with self._lock:
            if state.status == "loading":
                raise LoadInProgress(
                    f"Model '{name}' is loading; unload it once it is loaded", {"status": "loading"}
                )
            if state.status != "loaded" or state.worker is None:
                raise ModelNotLoaded(f"Model '{name}' is not loaded", {"status": state.status})
            self._detach(state, exited)
        self._wait_released(name, exited)

    def _engine_failed(self, worker: ModelWorker, reason: str) -> None:
        """The worker's engine died or got stuck (it has ended its jobs): the model turns
        `failed` with the reason, until it is loaded again."""
        state = self._states[worker.name]
        with self._lock:
            if state.worker is not worker:  # unloaded meanwhile
                return
            self._detach(state, None)  # the worker has ended its jobs; stop() asks no more
            state.status, state.error = "failed", f"The engine stopped: {reason}"

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

    def _start_housekeeper(self) -> None:
        with self._lock:
            if self._housekeeper_started:
                return
            self._housekeeper_started = True
        start_native_thread(self._housekeep_forever)

    def _housekeep_forever(self) -> None:
        while not self._closed:
            native_sleep(HOUSEKEEPING_SECONDS)
            self.check_engines()
            self.reap_idle(time.monotonic())

    def reap_idle(self, now: float) -> list[str]:
        """Unload the models idle for longer than their keep_alive; a busy model counts as
        used now. Returns the names unloaded."""
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

    def shutdown(self) -> None:
        self._closed = True
        for state in self.states():
            if state.status == "loaded":
                try:
                    self.unload(state.name)
                except (ModelNotLoaded, LoadInProgress):
                    pass


def _load_failure(exc: Exception) -> str:
    """The reason a load failed, as GET /models shows it."""
    import torch

    if isinstance(exc, LoadError):
        return str(exc)
    if isinstance(exc, (MemoryError, torch.OutOfMemoryError)):  # host RAM / a GPU's memory
        return (
            f"Out of memory while loading ({type(exc).__name__}: {exc}). Free memory "
            "(unload a model), quantize, or set TURSI_MAX_MEMORY so that loads that do "
            "not fit are refused before they start"
        )
    return f"{type(exc).__name__}: {exc}"
