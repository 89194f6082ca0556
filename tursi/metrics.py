"""Prometheus metrics (prometheus_client), correct under several gunicorn workers. The
engine writes them through telemetry.ModelStats; tursi.api.prometheus serves GET /metrics
and times the requests.

The metric objects are process-wide (prometheus_client keys its values by metric name) and
live in a private registry, so building several apps in one process is fine. With
PROMETHEUS_MULTIPROC_DIR set (tursi.api.gunicorn_defaults sets it for gunicorn), every worker
writes its values to files there and a scrape, whichever worker answers, sums them all.
See docs/prometheus.md.
"""

from __future__ import annotations

import logging
import os
import sys

from .threads import gevent_active

log = logging.getLogger(__name__)


def _import_prometheus_client() -> None:
    """prometheus_client takes ``threading.Lock`` when imported. Under gevent's patching that
    is a gevent lock, which fails (LoopExit) or hangs when a native engine thread and the hub
    share it, and they do (ModelStats writes from the engine thread). Import it with the
    real lock; its critical sections never yield, so greenlets are safe with it too."""
    if not gevent_active():
        import prometheus_client

        return
    import threading

    from gevent import monkey

    native = monkey.get_original("threading", "Lock")
    if "prometheus_client" not in sys.modules:
        patched, threading.Lock = threading.Lock, native
        try:
            import prometheus_client
        finally:
            threading.Lock = patched
    import prometheus_client.values

    if prometheus_client.values.Lock is not native:
        log.warning(
            "prometheus_client was imported after gevent's patching, with gevent "
            "locks: metrics written from engine threads may fail"
        )


_import_prometheus_client()

from prometheus_client import (  # noqa: E402
    CONTENT_TYPE_LATEST,
    CollectorRegistry,
    Counter,
    Gauge,
    Histogram,
    generate_latest,
    multiprocess,
)

MULTIPROC_DIR = os.environ.get("PROMETHEUS_MULTIPROC_DIR") or None

# The metrics, in a registry of their own (not prometheus_client's global one).
REGISTRY = CollectorRegistry()

REQUEST_DURATION = Histogram(
    "tursi_request_duration_seconds",
    "HTTP requests by method, route (the URL rule) and status; streams until they end",
    ["method", "route", "status"],
    registry=REGISTRY,
    buckets=(0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1, 2.5, 5, 10, 30, 60, 120, 300),
)
ERRORS = Counter(
    "tursi_errors_total",
    "Error responses and streams that ended with an error, by error code",
    ["code"],
    registry=REGISTRY,
)
TIME_TO_FIRST_TOKEN = Histogram(
    "tursi_time_to_first_token_seconds",
    "Time from a request's admission to its first token",
    ["model"],
    registry=REGISTRY,
    buckets=(0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1, 2.5, 5, 10, 20, 30),
)
INTER_TOKEN_LATENCY = Histogram(
    "tursi_inter_token_latency_seconds",
    "Time between two tokens of one request",
    ["model"],
    registry=REGISTRY,
    buckets=(0.005, 0.01, 0.02, 0.04, 0.06, 0.08, 0.1, 0.15, 0.25, 0.5, 1, 2),
)
TOKENS_GENERATED = Counter(
    "tursi_tokens_generated_total",
    "Tokens generated, counted when a request ends",
    ["model"],
    registry=REGISTRY,
)
RUNNING = Gauge(
    "tursi_generations_running",
    "Generations in the running batch",
    ["model"],
    registry=REGISTRY,
    multiprocess_mode="livesum",
)
WAITING = Gauge(
    "tursi_generations_waiting",
    "Generations queued for a batch slot",
    ["model"],
    registry=REGISTRY,
    multiprocess_mode="livesum",
)
MODEL_MEMORY = Gauge(
    "tursi_model_memory_bytes",
    "Memory held by the loaded model's weights (0 when not loaded)",
    ["model"],
    registry=REGISTRY,
    multiprocess_mode="livesum",
)
PREFIX_PROMPT_TOKENS = Counter(
    "tursi_prefix_cache_prompt_tokens_total",
    "Prompt tokens looked up in the prefix cache (requests with cache_prompt false excluded)",
    ["model"],
    registry=REGISTRY,
)
PREFIX_CACHED_TOKENS = Counter(
    "tursi_prefix_cache_cached_tokens_total",
    "Prompt tokens whose KV came from the prefix cache (not prefilled again)",
    ["model"],
    registry=REGISTRY,
)
PREFIX_EVICTIONS = Counter(
    "tursi_prefix_cache_evictions_total",
    "Blocks evicted from the prefix cache to make room",
    ["model"],
    registry=REGISTRY,
)
PREFIX_BYTES = Gauge(
    "tursi_prefix_cache_bytes",
    "Memory held by the prefix cache's blocks (0 when not loaded)",
    ["model"],
    registry=REGISTRY,
    multiprocess_mode="livesum",
)
DRAFTED_TOKENS = Counter(
    "tursi_speculative_drafted_tokens_total",
    "Tokens of speculative drafts (n-gram lookup) verified by the model",
    ["model"],
    registry=REGISTRY,
)
ACCEPTED_TOKENS = Counter(
    "tursi_speculative_accepted_tokens_total",
    "Drafted tokens kept: each one a token generated without a forward pass of its own",
    ["model"],
    registry=REGISTRY,
)
KV_BUDGET = Gauge(
    "tursi_kv_cache_budget_bytes",
    "The most the running batch's KV cache may hold (TURSI_KV_CACHE; 0 when not loaded)",
    ["model"],
    registry=REGISTRY,
    multiprocess_mode="livesum",
)
KV_RESERVED = Gauge(
    "tursi_kv_cache_reserved_bytes",
    "Memory allocated for the running batch's KV cache",
    ["model"],
    registry=REGISTRY,
    multiprocess_mode="livesum",
)
KV_USED = Gauge(
    "tursi_kv_cache_used_bytes",
    "The part of the KV cache's allocation that the running rows' tokens fill",
    ["model"],
    registry=REGISTRY,
    multiprocess_mode="livesum",
)
LOAD_DURATION = Histogram(
    "tursi_model_load_duration_seconds",
    "Time taken by each model load",
    ["model"],
    registry=REGISTRY,
    buckets=(0.5, 1, 2.5, 5, 10, 30, 60, 120, 300, 600),
)


class ModelMetrics:
    """One model's series, labelled once up front: the engine writes them per token."""

    def __init__(self, model: str):
        self.time_to_first_token = TIME_TO_FIRST_TOKEN.labels(model)
        self.inter_token_latency = INTER_TOKEN_LATENCY.labels(model)
        self.tokens_generated = TOKENS_GENERATED.labels(model)
        self.running = RUNNING.labels(model)
        self.waiting = WAITING.labels(model)
        self.memory = MODEL_MEMORY.labels(model)
        self.load_duration = LOAD_DURATION.labels(model)
        self.prefix_prompt_tokens = PREFIX_PROMPT_TOKENS.labels(model)
        self.prefix_cached_tokens = PREFIX_CACHED_TOKENS.labels(model)
        self.prefix_evictions = PREFIX_EVICTIONS.labels(model)
        self.prefix_bytes = PREFIX_BYTES.labels(model)
        self.drafted_tokens = DRAFTED_TOKENS.labels(model)
        self.accepted_tokens = ACCEPTED_TOKENS.labels(model)
        self.kv_budget = KV_BUDGET.labels(model)
        self.kv_reserved = KV_RESERVED.labels(model)
        self.kv_used = KV_USED.labels(model)


def scrape_registry() -> CollectorRegistry:
    """This process's registry, or in multiprocess mode every worker's files, summed."""
    if MULTIPROC_DIR is None:
        return REGISTRY
    registry = CollectorRegistry()
    multiprocess.MultiProcessCollector(registry, MULTIPROC_DIR)
    return registry


def exposition() -> tuple[bytes, str]:
    """The metrics in Prometheus' text format, and its content type."""
    return generate_latest(scrape_registry()), CONTENT_TYPE_LATEST
