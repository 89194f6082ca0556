"""Prometheus metrics (prometheus_client) at GET /metrics, correct under several gunicorn workers.

The metric objects are process-wide (prometheus_client keys its values by metric name) and
live in a private registry, so building several apps in one process is fine. With
PROMETHEUS_MULTIPROC_DIR set (tursi.gunicorn_defaults sets it for gunicorn), every worker
writes its values to files there and a scrape, whichever worker answers, sums them all.
See docs/prometheus.md.
"""
from __future__ import annotations

import ipaddress
import logging
import os
import sys
import time
from typing import Any

from flask import Blueprint, Flask, Response, current_app, g, request

from .engine.threads import gevent_active

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
        log.warning("prometheus_client was imported after gevent's patching, with gevent "
                    "locks: metrics written from engine threads may fail")


_import_prometheus_client()

from prometheus_client import (  # noqa: E402
    CONTENT_TYPE_LATEST, CollectorRegistry, Counter, Gauge, Histogram, generate_latest,
    multiprocess)

MULTIPROC_DIR = os.environ.get("PROMETHEUS_MULTIPROC_DIR") or None

# The metrics, in a registry of their own (not prometheus_client's global one).
REGISTRY = CollectorRegistry()

REQUEST_DURATION = Histogram(
    "tursi_request_duration_seconds",
    "HTTP requests by method, route (the URL rule) and status; streams until they end",
    ["method", "route", "status"], registry=REGISTRY,
    buckets=(0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1, 2.5, 5, 10, 30, 60, 120, 300))
ERRORS = Counter(
    "tursi_errors_total", "Error responses and streams that ended with an error, by error code",
    ["code"], registry=REGISTRY)
TIME_TO_FIRST_TOKEN = Histogram(
    "tursi_time_to_first_token_seconds", "Time from a request's admission to its first token",
    ["model"], registry=REGISTRY,
    buckets=(0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1, 2.5, 5, 10, 20, 30))
INTER_TOKEN_LATENCY = Histogram(
    "tursi_inter_token_latency_seconds", "Time between two tokens of one request",
    ["model"], registry=REGISTRY,
    buckets=(0.005, 0.01, 0.02, 0.04, 0.06, 0.08, 0.1, 0.15, 0.25, 0.5, 1, 2))
TOKENS_GENERATED = Counter(
    "tursi_tokens_generated_total", "Tokens generated, counted when a request ends",
    ["model"], registry=REGISTRY)
RUNNING = Gauge(
    "tursi_generations_running", "Generations in the running batch",
    ["model"], registry=REGISTRY, multiprocess_mode="livesum")
WAITING = Gauge(
    "tursi_generations_waiting", "Generations queued for a batch slot",
    ["model"], registry=REGISTRY, multiprocess_mode="livesum")
MODEL_MEMORY = Gauge(
    "tursi_model_memory_bytes", "Memory held by the loaded model's weights (0 when not loaded)",
    ["model"], registry=REGISTRY, multiprocess_mode="livesum")
LOAD_DURATION = Histogram(
    "tursi_model_load_duration_seconds", "Time taken by each model load",
    ["model"], registry=REGISTRY,
    buckets=(0.5, 1, 2.5, 5, 10, 30, 60, 120, 300, 600))


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


# --- GET /metrics --------------------------------------------------------------------------

bp = Blueprint("prometheus", __name__)


@bp.get("/metrics")
def metrics() -> Response:
    """The metrics in Prometheus' text format; see scrape_allowed() for who may read them."""
    if not scrape_allowed():
        from .auth import unauthorized
        raise unauthorized()
    return Response(generate_latest(scrape_registry()), content_type=CONTENT_TYPE_LATEST)


def scrape_registry() -> CollectorRegistry:
    """This process's registry, or in multiprocess mode every worker's files, summed."""
    if MULTIPROC_DIR is None:
        return REGISTRY
    registry = CollectorRegistry()
    multiprocess.MultiProcessCollector(registry, MULTIPROC_DIR)
    return registry


def scrape_allowed() -> bool:
    """Open without API keys and to loopback clients; otherwise a valid key is needed."""
    from .auth import bearer_token, key_is_valid
    keys = current_app.extensions.get("tursi.api_keys") or []
    return not keys or is_loopback(request.remote_addr) or key_is_valid(bearer_token(), keys)


def is_loopback(address: str | None) -> bool:
    try:
        ip = ipaddress.ip_address(address or "")
    except ValueError:
        return False
    mapped = getattr(ip, "ipv4_mapped", None)  # ::ffff:127.0.0.1
    return (mapped or ip).is_loopback


# --- request hooks -------------------------------------------------------------------------

_STARTED = "tursi.started"
_METHODS = frozenset({"GET", "HEAD", "POST", "PUT", "PATCH", "DELETE", "OPTIONS"})


def init_app(app: Flask, state: Any) -> None:
    """Register GET /metrics and the request hooks that feed it."""
    app.register_blueprint(bp)
    app.wsgi_app = _stamp_start(app.wsgi_app)
    app.after_request(_observe)


def _stamp_start(wsgi_app: Any) -> Any:
    """Time from the WSGI call on, so requests refused by earlier hooks (401, 429) count."""
    def timed(environ: dict[str, Any], start_response: Any) -> Any:
        environ[_STARTED] = time.perf_counter()
        return wsgi_app(environ, start_response)
    return timed


def _observe(response: Response) -> Response:
    """Count every response: error codes now, durations now or, for a stream, when it ends."""
    environ = request.environ
    rule = request.url_rule
    labels = (request.method if request.method in _METHODS else "other",
              rule.rule if rule is not None else "unmatched", str(response.status_code))
    code = g.get("error_code")
    if code:
        ERRORS.labels(code).inc()
    if response.is_streamed and response.status_code < 400:
        response.call_on_close(lambda: _request_ended(environ, labels))
    else:
        _request_ended(environ, labels)
    return response


def _request_ended(environ: dict[str, Any], labels: tuple[str, str, str]) -> None:
    started = environ.get(_STARTED)
    if started is not None:
        REQUEST_DURATION.labels(*labels).observe(time.perf_counter() - started)
    stream_error = environ.get("tursi.stream_error")
    if stream_error:
        ERRORS.labels(stream_error).inc()
