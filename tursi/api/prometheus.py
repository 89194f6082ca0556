"""GET /metrics (Prometheus text format) and who may read it (see tursi.metrics and
docs/prometheus.md). The request metrics are written by tursi.api.accounting."""

from __future__ import annotations

import ipaddress

from flask import Blueprint, Response, current_app, request

from ..metrics import exposition
from .auth import bearer_token, key_is_valid, unauthorized

bp = Blueprint("prometheus", __name__)


@bp.get("/metrics")
def metrics() -> Response:
    """Prometheus metrics (text format).

    Open without API keys and to loopback clients; otherwise a valid key is needed (see
    scrape_allowed())."""
    if not scrape_allowed():
        raise unauthorized()
    body, content_type = exposition()
    return Response(body, content_type=content_type)


def scrape_allowed() -> bool:
    """Open without API keys and to loopback clients; otherwise a valid key is needed."""
    keys = current_app.extensions.get("tursi.api_keys") or []
    return not keys or is_loopback(request.remote_addr) or key_is_valid(bearer_token(), keys)


def is_loopback(address: str | None) -> bool:
    try:
        ip = ipaddress.ip_address(address or "")
    except ValueError:
        return False
    mapped = getattr(ip, "ipv4_mapped", None)  # ::ffff:127.0.0.1
    return (mapped or ip).is_loopback
