"""Request bodies arrive within TURSI_BODY_TIMEOUT, or the connection closes.

gunicorn bounds the wait for a request's headers (its keepalive timeout) and the discarding
of a body the app left unread, but the app reads the body itself, from `wsgi.input`, with no
timeout: a client that declares a 1,000-byte body and sends one byte holds its connection,
one of the worker's TURSI_WORKER_CONNECTIONS, for as long as it likes. So every read of the
body here runs under one deadline, counted from the start of the request (the headers are
in): the whole body must arrive within TURSI_BODY_TIMEOUT seconds, however it trickles. A
total, not a per-read idle timeout, because a byte every few seconds would renew an idle
one forever.

Past the deadline the read raises RequestBodyTimeout (408, the JSON error) inside gunicorn's
reader, which marks the body failed; gunicorn then closes the connection after the answer
instead of reading the rest of the body.

Only under gunicorn's gevent worker (the deadline is a gevent.Timeout); elsewhere (Flask's
test client) a body is already in memory.
"""

from __future__ import annotations

import time
from collections.abc import Callable, Iterator
from typing import Any

from ..errors import RequestBodyTimeout
from ..threads import gevent_active


class DeadlineInput:
    """`wsgi.input` whose reads (the WSGI input methods) end at `deadline` (time.monotonic)."""

    def __init__(self, stream: Any, deadline: float, seconds: float):
        self._stream, self._deadline, self._seconds = stream, deadline, seconds

    def _bounded(self, read: Callable[..., Any], *args: Any) -> Any:
        import gevent

        error = RequestBodyTimeout(
            f"The request body did not arrive within {self._seconds:g} s",
            {"timeout_seconds": self._seconds},
        )
        # Raised inside the read, so that gunicorn sees its reader fail (see above).
        with gevent.Timeout(max(self._deadline - time.monotonic(), 0.0), error):
            return read(*args)

    def read(self, *args: Any) -> bytes:
        return self._bounded(self._stream.read, *args)

    def readline(self, *args: Any) -> bytes:
        return self._bounded(self._stream.readline, *args)

    def readlines(self, *args: Any) -> list[bytes]:
        return self._bounded(self._stream.readlines, *args)

    def __iter__(self) -> Iterator[bytes]:
        return iter(self.readline, b"")


def with_deadline(wsgi_app: Any, seconds: float | None) -> Any:
    """`wsgi_app` with its request bodies bounded to `seconds` (None: unbounded)."""
    if seconds is None:
        return wsgi_app

    def bounded(environ: dict[str, Any], start_response: Any) -> Any:
        if gevent_active() and "gunicorn.socket" in environ:
            deadline = time.monotonic() + seconds
            environ["wsgi.input"] = DeadlineInput(environ["wsgi.input"], deadline, seconds)
        return wsgi_app(environ, start_response)

    return bounded
