"""Noticing a client that went away, or stopped reading, while its request is served.

A write to a closed connection fails, but a request that is not writing (a non-streamed one,
or a stream still waiting for its turn in the batch) would only notice at its next write:
the end of the generation, or the next heartbeat. Under gunicorn's gevent worker a greenlet
watches the client's socket instead (`watch_client`), for the whole life of the request:
when the client closes its side (FIN), resets (RST) or half-closes the connection, the job
is abandoned at once, so it leaves the batch at the next step and frees its slot. HTTP
clients do not half-close, so that counts as gone too.

The close is read from poll(2)'s POLLRDHUP, not from reading the socket: a client may have
sent bytes after its request (a pipelined request, or one stray byte) that nobody reads
until this request is answered, and a read would find those bytes, not the close behind
them. While no such bytes wait, the greenlet sleeps until the socket turns readable (gevent
waits on readability only); while they do, the socket stays readable, so it checks every
PENDING_CHECK seconds instead of spinning.

A stream can also stall the other way: a client that stops reading (but keeps its
connection) blocks the server's write once the socket buffers are full, and the write
waits forever while the job, with nobody to read it, generates on. `bound_sends` ends
such a write after TURSI_SEND_TIMEOUT: the job is cancelled and the connection shut down.

Outside gunicorn's gevent worker (Flask's test client, a sync worker) both do nothing.
"""

from __future__ import annotations

import _socket
import logging
import select
from collections.abc import Callable, Iterator
from typing import Any

from ..engine.jobs import GenerationJob
from ..errors import ClientDisconnected
from ..threads import gevent_active

log = logging.getLogger(__name__)

# Seconds between two checks of a socket that holds unread bytes (see above).
PENDING_CHECK = 0.1
# Characters of a streamed frame written under one send timeout (bound_sends).
SEND_PIECE = 64 * 1024

_POLLRDHUP = getattr(select, "POLLRDHUP", 0)  # Linux; elsewhere the peek below sees a FIN
_GONE_EVENTS = _POLLRDHUP | select.POLLHUP | select.POLLERR | select.POLLNVAL


def _client_state(fd: int) -> bool | None:
    """Look at the client's socket without blocking or reading: True when the client closed,
    reset or half-closed it (even with bytes of its own still unread), False when it sent
    bytes nobody has read yet, None when nothing is there."""
    from gevent.monkey import get_original  # gevent's poll waits on readability only

    poller = get_original("select", "poll")()
    poller.register(fd, select.POLLIN | _POLLRDHUP)
    ready = poller.poll(0)
    if not ready:
        return None
    if ready[0][1] & _GONE_EVENTS:
        return True
    probe = _socket.socket(fileno=fd)  # a view of gunicorn's socket, detached below
    try:
        return probe.recv(1, _socket.MSG_PEEK | _socket.MSG_DONTWAIT) == b""
    except BlockingIOError:  # a spurious wakeup
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
            gone = _client_state(fd)
            if gone:
                job.abandon(ClientDisconnected("The client closed the connection"))
                return
            if gone is None:
                wait_read(fd)
            else:  # unread bytes: readable until this request is answered
                gevent.sleep(PENDING_CHECK)

    watcher = gevent.spawn(watch)
    return lambda: watcher.kill(block=False)


def bound_sends(
    frames: Iterator[str],
    environ: dict[str, Any],
    seconds: float | None,
    on_stall: Callable[[], None],
) -> Iterator[str]:
    """Yield `frames` (a streamed response's chunks) with each write bounded to `seconds`
    (None: unbounded). The server writes a chunk before it asks for the next, so a chunk not
    asked for `seconds` after it was handed over is a write stuck on a client that stopped
    reading: then `on_stall()` runs and the connection is shut down, which fails the stuck
    write (EPIPE); the server ends the response and closes the connection. A frame longer
    than SEND_PIECE characters (the prompt's logprobs of a long prompt can be megabytes)
    goes out in pieces, each with its own timeout, so that a client is judged on its
    progress, not on how long a whole big frame takes."""
    sock = environ.get("gunicorn.socket")
    if seconds is None or sock is None or not gevent_active():
        yield from frames
        return
    from gevent import get_hub

    fd = sock.fileno()

    def stalled() -> None:  # on the hub: nothing here may block
        log.warning("a stream's client read nothing for %g s: its generation ends", seconds)
        on_stall()
        # Through a plain view of the socket: gevent's own shutdown would wake the stuck
        # write with EBADF, which gunicorn logs with a traceback; EPIPE it ignores.
        view = _socket.socket(fileno=fd)
        try:
            view.shutdown(_socket.SHUT_RDWR)
        except OSError:  # already gone
            pass
        finally:
            view.detach()

    timer = get_hub().loop.timer(seconds)
    try:
        for frame in frames:
            for start in range(0, len(frame), SEND_PIECE):
                timer.start(stalled, update=True)
                try:
                    yield frame[start : start + SEND_PIECE]
                finally:
                    timer.stop()
    finally:
        timer.close()
