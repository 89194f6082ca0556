"""The lock-guarded model manager: which models exist, their state, and their workers.

States: not_loaded -> loading -> loaded | failed; unload returns loaded -> not_loaded.
The lock guards only state changes (never I/O or compute), so a request never waits
behind a load. Loads run on native threads.
"""
from __future__ import annotations

import logging
import time
from dataclasses import dataclass, field

from ..errors import ModelConflict, ModelLoading, ModelNotLoaded, ModelUnloaded
from ..telemetry import ModelStats
from .catalog import Catalog
from .loader import LoadError, LoadOptions, estimate_load_seconds, load_model
from .progress import LoadProgress
from .threads import Empty, native_lock, start_native_thread
from .worker import BatchLimits, ModelWorker

log = logging.getLogger(__name__)

UNLOAD_WAIT_SECONDS = 30.0


@dataclass
class ModelState:
    name: str
    status: str = "not_loaded"
    error: str | None = None
    options: LoadOptions | None = None
    worker: ModelWorker | None = None
    loaded_at: float | None = None      # wall clock, for load_time
    loaded_mono: float | None = None    # monotonic, for uptime
    load_seconds: float | None = None
    dtype: str | None = None
    device: str | None = None
    memory_bytes: int | None = None
    progress: LoadProgress | None = None  # while loading
    stats: ModelStats = field(init=False)

    def __post_init__(self) -> None:
        self.stats = ModelStats(self.name)


@dataclass(frozen=True)
class LoadTicket:
    status: str            # "loading" (started now or already) | "loaded" (nothing to do)
    message: str
    estimated_seconds: float | None


class ModelManager:
    def __init__(self, catalog: Catalog, home: str, max_gpu_memory: str | None = None,
                 allow_downloads: bool = False, limits: BatchLimits = BatchLimits()):
        self.catalog = catalog
        self.limits = limits
        self.home = home
        self.max_gpu_memory = max_gpu_memory
        self.allow_downloads = allow_downloads
        self._lock = native_lock()
        self._states = {name: ModelState(name) for name in catalog.names()}

    # --- reading ------------------------------------------------------------------------

    def state(self, name: str) -> ModelState:
        self.catalog.get(name)  # raises ModelNotFound with the available names
        return self._states[name]

    def states(self) -> list[ModelState]:
        return [self._states[name] for name in self.catalog.names()]

    def worker(self, name: str) -> ModelWorker:
        """The worker of a loaded model, or the error that says why there is none."""
        state = self.state(name)
        with self._lock:
            status, worker = state.status, state.worker
        if status == "loaded" and worker is not None:
            return worker
        if status == "loading":
            raise ModelLoading(f"Model '{name}' is still loading", {"status": status},
                               headers={"Retry-After": "5"})
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
        """Start a background load, or say the model is already loaded or loading."""
        entry = self.catalog.get(name)
        options = options.resolved(entry)
        state = self._states[name]
        with self._lock:
            if state.status in ("loaded", "loading"):
                if state.options != options:
                    raise ModelConflict(
                        f"Model '{name}' is {state.status} with other settings; unload it first",
                        {"status": state.status, "current": state.options.describe(),
                         "requested": options.describe()})
                return LoadTicket(state.status, f"Model already {state.status}", None)
            state.status, state.error, state.options = "loading", None, options
            state.progress = progress = LoadProgress()
        estimate = estimate_load_seconds(entry, self.home)
        start_native_thread(self._load_in_background, name, options, progress)
        return LoadTicket("loading", "Model loading initiated", estimate)

    def _load_in_background(self, name: str, options: LoadOptions,
                            progress: LoadProgress) -> None:
        state = self._states[name]
        started = time.monotonic()
        try:
            loaded = load_model(self.catalog.get(name), options, self.home,
                                self.max_gpu_memory, self.allow_downloads, progress)
        except Exception as exc:
            message = str(exc) if isinstance(exc, LoadError) else f"{type(exc).__name__}: {exc}"
            log.error("loading %s failed: %s", name, message)
            with self._lock:
                state.status, state.error, state.progress = "failed", message, None
            return
        worker = ModelWorker(name, loaded, state.stats, self.limits)
        worker.start()
        with self._lock:
            state.worker, state.progress = worker, None
            state.status = "loaded"
            state.loaded_at, state.loaded_mono = time.time(), time.monotonic()
            state.load_seconds = state.loaded_mono - started
            state.dtype, state.device = loaded.dtype, loaded.device
            state.memory_bytes = loaded.memory_bytes
        state.stats.loaded(loaded.memory_bytes, state.load_seconds)
        del loaded
        log.info("loaded %s in %.1fs", name, state.load_seconds)

    def unload(self, name: str) -> None:
        """Unload a loaded model. Its running and queued generations end with `model_unloaded`;
        returns once the worker has dropped the model (memory released)."""
        state = self.state(name)
        with self._lock:
            if state.status == "loading":
                raise ModelLoading(f"Model '{name}' is loading; unload it once it is loaded",
                                   {"status": "loading"}, headers={"Retry-After": "5"})
            if state.status != "loaded" or state.worker is None:
                raise ModelNotLoaded(f"Model '{name}' is not loaded", {"status": state.status})
            worker = state.worker
            state.worker = None
            state.status, state.options = "not_loaded", None
            state.loaded_at = state.loaded_mono = state.memory_bytes = None
            state.dtype = state.device = None
        exited = worker.stop()
        del worker
        try:
            exited.get(timeout=UNLOAD_WAIT_SECONDS)
        except Empty:
            log.warning("worker of %s still busy %.0fs after unload", name, UNLOAD_WAIT_SECONDS)
        state.stats.unloaded()

    def shutdown(self) -> None:
        for state in self.states():
            if state.status == "loaded":
                try:
                    self.unload(state.name)
                except (ModelNotLoaded, ModelLoading, ModelUnloaded):
                    pass
