"""Counters and resource readings: request totals and rate, per-model stats, memory, GPU."""

from __future__ import annotations

import collections
import logging
import time
from dataclasses import dataclass
from typing import Any

import psutil

from .threads import native_lock

log = logging.getLogger(__name__)


class RequestStats:
    """Server-wide request counters; thread-safe. Rate = requests finished in the last 60 s."""

    window = 60.0

    def __init__(self) -> None:
        self._lock = native_lock()
        self.total = 0
        self.success = 0
        self.failed = 0
        self._recent: collections.deque[float] = collections.deque()

    def record(self, ok: bool, now: float | None = None) -> None:
        now = time.monotonic() if now is None else now
        with self._lock:
            self.total += 1
            if ok:
                self.success += 1
            else:
                self.failed += 1
            self._recent.append(now)
            self._trim(now)

    def rate_per_minute(self, now: float | None = None) -> int:
        now = time.monotonic() if now is None else now
        with self._lock:
            self._trim(now)
            return len(self._recent)

    def snapshot(self) -> dict[str, int]:
        """The counts and the rate, as numbers that add up over workers."""
        rate = self.rate_per_minute()
        with self._lock:
            return {
                "total": self.total,
                "success": self.success,
                "failed": self.failed,
                "rate": rate,
            }

    def _trim(self, now: float) -> None:
        while self._recent and self._recent[0] <= now - self.window:
            self._recent.popleft()


class _GaugeShare:
    """What one model adds to a Prometheus gauge shared by every model and app of the
    process: `set` moves the gauge by the difference, so that it stays right when several
    apps in one process serve a model of the same name. The caller holds its lock."""

    __slots__ = ("gauge", "value")

    def __init__(self, gauge: Any) -> None:
        self.gauge, self.value = gauge, 0

    def set(self, value: int) -> None:
        if value != self.value:
            self.gauge.inc(value - self.value)
            self.value = value


class ModelStats:
    """Per-model generation counters; written by the model's worker thread, read by requests.

    The engine reports here and nowhere else: totals for the JSON metrics, and timings and
    sizes for the Prometheus metrics (see tursi.metrics)."""

    def __init__(self, model: str = "") -> None:
        from .metrics import ModelMetrics

        self.model = model
        self._lock = native_lock()
        self.requests_total = 0
        self.requests_failed = 0
        self.tokens_generated = 0
        self.generation_seconds = 0.0
        # The prefix cache: prompt tokens looked up in it, those it served, blocks evicted.
        self.prefix_prompt_tokens = 0
        self.prefix_cached_tokens = 0
        self.prefix_evictions = 0
        # Speculative decoding: drafted tokens verified, and those kept.
        self.drafted_tokens = 0
        self.accepted_tokens = 0
        self._prometheus = metrics = ModelMetrics(model)
        # What this model adds to the shared gauges.
        self._running = _GaugeShare(metrics.running)
        self._waiting = _GaugeShare(metrics.waiting)
        self._memory = _GaugeShare(metrics.memory)
        self._prefix_bytes = _GaugeShare(metrics.prefix_bytes)
        self._kv_budget = _GaugeShare(metrics.kv_budget)
        self._kv_reserved = _GaugeShare(metrics.kv_reserved)
        self._kv_used = _GaugeShare(metrics.kv_used)

    def record(self, tokens: int, seconds: float, ok: bool) -> None:
        """A request ended, after generating `tokens`."""
        with self._lock:
            self.requests_total += 1
            self.tokens_generated += tokens
            self.generation_seconds += seconds
            if not ok:
                self.requests_failed += 1
        self._prometheus.tokens_generated.inc(tokens)

    def first_token(self, seconds: float) -> None:
        """Time from admission to a request's first token."""
        self._prometheus.time_to_first_token.observe(seconds)

    def inter_token(self, seconds: float) -> None:
        """Time between two tokens of one request."""
        self._prometheus.inter_token_latency.observe(seconds)

    def batch_sizes(self, running: int, waiting: int) -> None:
        """The scheduler's running batch and waiting queue, after each turn."""
        with self._lock:
            self._running.set(running)
            self._waiting.set(waiting)

    def loaded(self, memory_bytes: int, seconds: float) -> None:
        """The model finished loading."""
        self._prometheus.load_duration.observe(seconds)
        with self._lock:
            self._memory.set(memory_bytes)

    def prefix_lookup(self, prompt_tokens: int, cached_tokens: int) -> None:
        """A job's prefill starts: of its `prompt_tokens`, `cached_tokens` (0: a miss) had
        their KV in the prefix cache. Jobs that opted out (cache_prompt false) are not
        reported, so the hit rate is over the prompts the cache could serve."""
        with self._lock:
            self.prefix_prompt_tokens += prompt_tokens
            self.prefix_cached_tokens += cached_tokens
        self._prometheus.prefix_prompt_tokens.inc(prompt_tokens)
        self._prometheus.prefix_cached_tokens.inc(cached_tokens)

    def prefix_cache(self, bytes_held: int, evictions: int) -> None:
        """The prefix cache changed: it now holds `bytes_held`, and evicted `evictions`
        blocks since the last report."""
        with self._lock:
            self.prefix_evictions += evictions
            self._prefix_bytes.set(bytes_held)
        self._prometheus.prefix_evictions.inc(evictions)

    def speculated(self, drafted: int, accepted: int) -> None:
        """A decode step verified `drafted` tokens of speculative drafts and kept `accepted`."""
        with self._lock:
            self.drafted_tokens += drafted
            self.accepted_tokens += accepted
        self._prometheus.drafted_tokens.inc(drafted)
        self._prometheus.accepted_tokens.inc(accepted)

    def kv_budget(self, budget: int) -> None:
        """The model's KV budget (set when its worker starts)."""
        with self._lock:
            self._kv_budget.set(budget)

    def kv_cache(self, used: int, reserved: int) -> None:
        """The running batch's KV cache: bytes its rows fill, bytes allocated."""
        with self._lock:
            self._kv_reserved.set(reserved)
            self._kv_used.set(used)

    def unloaded(self) -> None:
        """The model was unloaded: its gauges go to 0 (its prefix cache goes with it). The
        manager calls this once the worker is told to stop (after which it moves no gauge),
        before the memory is released."""
        shares = (
            self._running,
            self._waiting,
            self._memory,
            self._prefix_bytes,
            self._kv_budget,
            self._kv_reserved,
            self._kv_used,
        )
        with self._lock:
            for share in shares:
                share.set(0)

    def totals(self) -> dict[str, Any]:
        """The raw counters, which add up over workers (tursi.engine.views)."""
        with self._lock:
            return {
                "requests_total": self.requests_total,
                "requests_failed": self.requests_failed,
                "tokens_generated": self.tokens_generated,
                "generation_seconds": self.generation_seconds,
                "prefix_prompt_tokens": self.prefix_prompt_tokens,
                "prefix_cached_tokens": self.prefix_cached_tokens,
                "prefix_cache_bytes": self._prefix_bytes.value,
                "prefix_evictions": self.prefix_evictions,
                "drafted_tokens": self.drafted_tokens,
                "accepted_tokens": self.accepted_tokens,
                "kv_cache_budget_bytes": self._kv_budget.value,
                "kv_cache_reserved_bytes": self._kv_reserved.value,
                "kv_cache_used_bytes": self._kv_used.value,
            }


def summarize(totals: dict[str, Any]) -> dict[str, Any]:
    """ModelStats.totals (one worker's, or summed over workers) with the mean generation time,
    the error rate, the prefix cache's hit rate (cached over looked-up prompt tokens) and
    speculative decoding's acceptance rate (kept over drafted tokens) that the JSON metrics
    show."""
    total = totals["requests_total"]
    looked_up = totals["prefix_prompt_tokens"]
    drafted = totals["drafted_tokens"]
    return {
        "requests_total": total,
        "requests_failed": totals["requests_failed"],
        "tokens_generated": totals["tokens_generated"],
        "average_generation_seconds": totals["generation_seconds"] / total if total else 0.0,
        "error_rate": totals["requests_failed"] / total if total else 0.0,
        "prefix_prompt_tokens": looked_up,
        "prefix_cached_tokens": totals["prefix_cached_tokens"],
        "prefix_hit_rate": totals["prefix_cached_tokens"] / looked_up if looked_up else 0.0,
        "prefix_cache_bytes": totals["prefix_cache_bytes"],
        "prefix_evictions": totals["prefix_evictions"],
        "drafted_tokens": drafted,
        "accepted_tokens": totals["accepted_tokens"],
        "acceptance_rate": totals["accepted_tokens"] / drafted if drafted else 0.0,
        "kv_cache_budget_bytes": totals["kv_cache_budget_bytes"],
        "kv_cache_reserved_bytes": totals["kv_cache_reserved_bytes"],
        "kv_cache_used_bytes": totals["kv_cache_used_bytes"],
    }


@dataclass
class MemoryReading:
    total: int
    used: int
    free: int


def system_memory() -> MemoryReading:
    vm = psutil.virtual_memory()
    return MemoryReading(total=vm.total, used=vm.total - vm.available, free=vm.available)


def process_rss() -> int:
    """This process's resident memory in bytes (psutil; VmRSS on Linux)."""
    return psutil.Process().memory_info().rss


@dataclass
class GpuReading(MemoryReading):
    utilization: float | None  # fraction 0..1, None when the driver does not say


class GpuMonitor:
    """Reads GPU 0 through NVML (nvidia-ml-py), falling back to torch.cuda; None without a GPU."""

    def __init__(self) -> None:
        self._nvml = None
        try:
            import pynvml

            pynvml.nvmlInit()
            if pynvml.nvmlDeviceGetCount() > 0:
                self._nvml = pynvml
        except Exception:  # no driver, no library, no device: all mean "no NVML"
            self._nvml = None

    def read(self) -> GpuReading | None:
        if self._nvml is not None:
            try:
                handle = self._nvml.nvmlDeviceGetHandleByIndex(0)
                mem = self._nvml.nvmlDeviceGetMemoryInfo(handle)
                util = self._nvml.nvmlDeviceGetUtilizationRates(handle)
                return GpuReading(
                    total=mem.total, used=mem.used, free=mem.free, utilization=util.gpu / 100.0
                )
            except Exception:
                log.warning("NVML read failed; falling back to torch.cuda", exc_info=True)
        return _torch_cuda_reading()


def _torch_cuda_reading() -> GpuReading | None:
    import torch

    if not torch.cuda.is_available():
        return None
    free, total = torch.cuda.mem_get_info()
    return GpuReading(total=total, used=total - free, free=free, utilization=None)
