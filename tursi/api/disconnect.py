"""Noticing a client that went away while its request waits for the model.

A write to a closed connection fails, but a request that is not writing (a non-streamed one,
or a stream still waiting for its turn in the batch) would only notice at its next write:
the end of the generation, or the next heartbeat. Under gunicorn's gevent worker a greenlet
watches the client's socket instead: when it turns readable and a peek finds the end of the
stream (the client closed, FIN) or a reset (RST), the job is abandoned at once, so it leaves
the batch at the next step and frees its slot. Data on the socket (a pipelined request)
means the client is still there, and the watch ends. A client that half-closes its side
after sending a request counts as gone: HTTP clients do not do that.

Outside gunicorn's gevent worker (Flask's test client, a sync worker) this does nothing.
"""

from __future__ import annotations

import _socket
from collections.abc import Callable
from typing import Any

from ..engine.jobs import GenerationJob
from ..errors import ClientDisconnected
from ..threads import gevent_active


def _client_gone(fd: int) -> bool | None:
    """Peek at a readable socket: True when the client closed or reset it, False when it
    sent data, None when nothing is there after all (a spurious wakeup)."""
    probe = _socket.socket(fileno=fd)  # a view of gunicorn's socket, detached below
    try:
        return probe.recv(1, _socket.MSG_PEEK | _socket.MSG_DONTWAIT) == b""
    except BlockingIOError:
        return None
    except OSError:  # ECONNRESET and the like
        return True
    finally:
        probe.detach()


def watch_client(environ: dict[str, Any], job: GenerationJob) -> Callable[[], None]:
    """Abandon `job` as soon as its client disconnects; returns the function that ends the
    watch (call it when the response is done)."""
    sock = environ.get("gunicorn.socket")
    if sock is None or not gevent_active():
        return lambda: None
    import gevent
    from gevent.socket import wait_read

    fd = sock.fileno()

    def watch() -> None:
        while True:
            wait_read(fd)
            gone = _client_gone(fd)
            if gone is None:
                continue
            if gone:
                job.abandon(ClientDisconnected("The client closed the connection"))
            return

    watcher = gevent.spawn(watch)
    return lambda: watcher.kill(block=False)
