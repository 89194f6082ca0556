"""What the API shows of a model: one worker's state as a report entry, and the view of the
whole server combined from the live workers' entries and the desired state.

Without a run folder the server is this one worker, and its view is its own state."""

from __future__ import annotations

import time
from dataclasses import asdict, dataclass, field
from typing import Any

from .loading import LoadOptions

# ModelStats.totals' keys: each adds up over workers (prefix_cache_bytes too: each worker
# holds its own cache).
COUNTERS = (
    "requests_total",
    "requests_failed",
    "tokens_generated",
    "generation_seconds",
    "prefix_prompt_tokens",
    "prefix_cached_tokens",
    "prefix_cache_bytes",
    "prefix_evictions",
    "drafted_tokens",
    "accepted_tokens",
    "kv_cache_budget_bytes",
    "kv_cache_reserved_bytes",
    "kv_cache_used_bytes",
)


@dataclass
class ModelView:
    name: str
    status: str
    error: str | None = None
    options: LoadOptions | None = None
    dtype: str | None = None
    device: str | None = None
    memory_bytes: int | None = None
    loaded_at: float | None = None  # wall clock
    load_seconds: float | None = None
    progress: float | None = None
    stage: str | None = None
    running: int = 0
    waiting: int = 0
    totals: dict[str, Any] = field(default_factory=lambda: dict.fromkeys(COUNTERS, 0))
    workers: list[dict[str, Any]] | None = None  # [{pid, status, memory_bytes}]: run folder


def options_dict(options: LoadOptions | None) -> dict[str, Any] | None:
    return asdict(options) if options is not None else None


def entry_view(name: str, entry: dict[str, Any]) -> ModelView:
    """One worker's report entry as a view (the server is this worker)."""
    options = entry["options"]
    return ModelView(
        name=name,
        status=entry["status"],
        error=entry["error"],
        options=LoadOptions(**options) if options is not None else None,
        dtype=entry["dtype"],
        device=entry["device"],
        memory_bytes=entry["memory_bytes"],
        loaded_at=entry["loaded_at"],
        load_seconds=entry["load_seconds"],
        progress=entry["progress"],
        stage=entry["stage"],
        running=entry["running"],
        waiting=entry["waiting"],
        totals=dict(entry["totals"]),
    )


def server_view(
    name: str, wanted: dict[str, Any] | None, reports: list[dict[str, Any]]
) -> ModelView:
    """The whole server's view of a model: loaded once every live worker has loaded the
    desired options; failed when a worker's load of them failed; loading until then; not
    desired: not_loaded (failed when a worker says why, e.g. a refused preload). Memory and
    counters add up over the workers (N copies)."""
    entries = [(report["pid"], report["models"][name]) for report in reports]
    options = wanted["options"] if wanted is not None else None
    loaded = [e for _, e in entries if e["status"] == "loaded" and e["options"] == options]
    failed = [e for _, e in entries if e["status"] == "failed"]
    if wanted is None:
        status = "failed" if failed else "not_loaded"
    elif any(e["options"] == options for e in failed):
        status = "failed"
    elif entries and len(loaded) == len(entries):
        status = "loaded"
    else:
        status = "loading"
    loading = [e for _, e in entries if e["status"] == "loading" and e["progress"] is not None]
    slowest = min(loading, key=lambda e: e["progress"]) if loading else None
    first = loaded[0] if loaded else None
    return ModelView(
        name=name,
        status=status,
        error=failed[0]["error"] if status == "failed" else None,
        options=LoadOptions(**options) if options is not None else None,
        dtype=first["dtype"] if first else None,
        device=first["device"] if first else None,
        memory_bytes=sum(e["memory_bytes"] or 0 for e in loaded) if loaded else None,
        loaded_at=max(e["loaded_at"] for e in loaded) if loaded else None,
        load_seconds=max((e["load_seconds"] or 0 for _, e in entries), default=None) or None,
        progress=slowest["progress"] if slowest else None,
        stage=slowest["stage"] if slowest else None,
        running=sum(e["running"] for _, e in entries),
        waiting=sum(e["waiting"] for _, e in entries),
        totals={key: sum(e["totals"][key] for _, e in entries) for key in COUNTERS},
        workers=[
            {"pid": pid, "status": e["status"], "memory_bytes": e["memory_bytes"]}
            for pid, e in entries
        ],
    )


def wall_clock(monotonic: float) -> float:
    """A time.monotonic() reading as wall-clock time, comparable across processes."""
    return time.time() - (time.monotonic() - monotonic)
