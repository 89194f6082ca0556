"""Requests gunicorn itself refuses (a request line or header it cannot parse, headers over
its size limits) answered with Tursi's JSON error body instead of gunicorn's HTML page, so
that every 4xx/5xx a client sees has the same shape. Installed in each worker by the
post_worker_init hook (tursi.api.gunicorn_defaults)."""

from __future__ import annotations

import json

from ..errors import error_body

# gunicorn's statuses for the requests it refuses, as stable codes: the one list of what this
# module can send (tests check that tursi.api.response_schemas.ERROR_CODES and docs/api.md
# describe each). Any other status gets OTHER.
CODES = {
    400: "invalid_request",
    403: "forbidden",
    414: "uri_too_long",
    417: "expectation_failed",
    431: "headers_too_large",
    500: "internal_error",
    501: "not_implemented",
}
OTHER = "http_error"


def json_error(status: int, reason: str, message: str) -> bytes:
    """A whole HTTP response: the status line, headers and the JSON error body."""
    body = json.dumps(
        error_body(CODES.get(status, OTHER), f"{reason}: {message}" if message else reason)
    ).encode()
    head = (
        f"HTTP/1.1 {status} {reason}\r\nConnection: close\r\n"
        f"Content-Type: application/json\r\nContent-Length: {len(body)}\r\n\r\n"
    )
    return head.encode("latin-1") + body


def install() -> None:
    """Replace gunicorn's HTML error writer (gunicorn.util.write_error, which its workers
    call for requests they cannot parse) with the JSON one."""
    from gunicorn import util

    def write_error(sock, status_int, reason, mesg):  # gunicorn's signature
        util.write_nonblock(sock, json_error(int(status_int), reason, mesg))

    util.write_error = write_error
