"""The last few minutes of the whole server, sampled every few seconds, for the console's
charts (GET /api/v1/status/history; docs/console.md).

Each sample holds what GET /status sums over the server's workers, at one moment: request
and token counts turned into rates over the interval since the previous sample, generations
running and waiting, the workers' resident memory, the machine's memory and the GPU's. The
sampler runs on the model manager's housekeeping thread (a native thread), every
INTERVAL seconds; every worker samples the whole server, so any worker answers alike.
Tokens are counted when a generation ends (as tursi_tokens_generated_total is), so a long
generation shows as one step at its end.
"""

from __future__ import annotations

import collections
import time
from typing import Any

from ..engine.manager import ModelManager
from ..telemetry import GpuMonitor, system_memory
from ..threads import native_lock

INTERVAL = 2.0  # seconds between two samples
KEEP = 150  # samples kept: five minutes


class ServerHistory:
    def __init__(self, manager: ModelManager, gpu: GpuMonitor) -> None:
        self.manager, self.gpu = manager, gpu
        self._lock = native_lock()
        self._samples: collections.deque[dict[str, Any]] = collections.deque(maxlen=KEEP)
        self._last: tuple[float, int, int] | None = None  # (monotonic, requests, tokens)

    def tick(self, now: float | None = None) -> None:
        """Take a sample when INTERVAL has passed since the last one (housekeeping hook)."""
        now = time.monotonic() if now is None else now
        if self._last is not None and now - self._last[0] < INTERVAL:
            return
        views, extras = self.manager.views_and_extras()
        requests = sum(extra["requests"]["total"] for extra in extras)
        tokens = sum(view.totals.get("tokens_generated", 0) for view in views)
        gpu = self.gpu.read()
        sample: dict[str, Any] = {
            "time": round(time.time(), 3),
            "requests_per_second": None,
            "tokens_per_second": None,
            "running": sum(view.running for view in views),
            "waiting": sum(view.waiting for view in views),
            "process_memory_bytes": sum(extra.get("rss", 0) for extra in extras),
            "memory_used_bytes": system_memory().used,
            "gpu_memory_used_bytes": gpu.used if gpu is not None else None,
            "gpu_utilization": gpu.utilization if gpu is not None else None,
        }
        if self._last is not None:
            seconds = now - self._last[0]
            sample["requests_per_second"] = round(max(0, requests - self._last[1]) / seconds, 3)
            sample["tokens_per_second"] = round(max(0, tokens - self._last[2]) / seconds, 3)
        self._last = (now, requests, tokens)
        with self._lock:
            self._samples.append(sample)

    def samples(self) -> list[dict[str, Any]]:
        with self._lock:
            return list(self._samples)
