"""Server-sent events: the generator that relays a job's events to the client, and the
frames of the native API (/api/v1/generate). The OpenAI-compatible frames live with
their routes (tursi.api.openai_compat)."""

from __future__ import annotations

import json
from collections.abc import Iterator
from typing import Any, Protocol

from flask import Response, request

from ..engine.jobs import Failed, Finished, GenerationJob, TextChunk
from ..errors import TursiError
from ..formatting import format_seconds
from ..threads import Empty
from .accounting import outcome
from .disconnect import watch_client
from .state import current

HEARTBEAT = ": keep-alive\n\n"


def sse(event: str, data: dict[str, Any]) -> str:
    return f"event: {event}\ndata: {json.dumps(data, ensure_ascii=False)}\n\n"


def done_payload(done: Finished) -> dict[str, Any]:
    return {
        "tokens_generated": done.tokens_generated,
        "generation_time": format_seconds(done.generation_seconds),
        "finish_reason": done.finish_reason,
    }


class Frames(Protocol):
    """How one API writes a stream: what goes first, per text chunk, at the end, on error."""

    def start(self) -> list[str]: ...
    def text(self, text: str) -> str: ...
    def done(self, done: Finished) -> list[str]: ...
    def error(self, error: TursiError) -> list[str]: ...


class NativeFrames:
    """/api/v1/generate: `event: text` chunks (the prompt first when return_full_text, so
    the chunks concatenate to the non-stream text), one `event: done` or `event: error`."""

    def __init__(self, prefix: str):
        self.prefix = prefix

    def start(self) -> list[str]:
        return [sse("text", {"text": self.prefix, "finished": False})] if self.prefix else []

    def text(self, text: str) -> str:
        return sse("text", {"text": text, "finished": False})

    def done(self, done: Finished) -> list[str]:
        return [sse("done", done_payload(done))]

    def error(self, error: TursiError) -> list[str]:
        return [sse("error", error.body())]


def relay(
    job: GenerationJob, frames: Frames, heartbeat: float, environ: dict[str, Any]
) -> Iterator[str]:
    """Yield SSE frames for `job` until it finishes. A comment heartbeat goes out when the
    engine is quiet, so a vanished client is noticed (the write fails, the server closes
    this generator) and the job is cancelled in `finally`; a client that closes its
    connection is noticed at once (tursi.api.disconnect). How the stream ended goes into the
    request's outcome, for the request counters (tursi.api.accounting)."""
    ended = outcome(environ)
    unwatch = watch_client(environ, job)
    try:
        yield from frames.start()
        while True:
            try:
                event = job.next_event(timeout=heartbeat)
            except Empty:
                yield HEARTBEAT
                continue
            if isinstance(event, TextChunk):
                yield frames.text(event.text)
            elif isinstance(event, Finished):
                ended.stream_finished = True
                yield from frames.done(event)
                return
            elif isinstance(event, Failed):
                ended.error_code = event.error.code
                yield from frames.error(event.error)
                return
    finally:
        unwatch()
        job.cancel()


def stream_response(job: GenerationJob, frames: Frames) -> Response:
    heartbeat = current().settings.heartbeat_seconds
    return Response(
        relay(job, frames, heartbeat, request.environ),
        mimetype="text/event-stream",
        headers={"Cache-Control": "no-cache", "X-Accel-Buffering": "no"},
    )


def collect(job: GenerationJob) -> tuple[str, Finished]:
    """Wait for a whole (non-streamed) generation; raise its error if it failed (also when
    the client disconnects first: the job is then abandoned, tursi.api.disconnect)."""
    pieces: list[str] = []
    unwatch = watch_client(request.environ, job)
    try:
        while True:
            event = job.next_event()
            if isinstance(event, TextChunk):
                pieces.append(event.text)
            elif isinstance(event, Finished):
                return "".join(pieces), event
            elif isinstance(event, Failed):
                raise event.error
    finally:
        unwatch()
        job.cancel()
