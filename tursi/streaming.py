"""Server-sent events: framing, and the generator that relays a job's events to the client."""
from __future__ import annotations

import json
from typing import Any, Callable, Iterator

from .engine.jobs import Failed, Finished, GenerationJob, TextChunk
from .engine.threads import Empty
from .formatting import format_seconds


def sse(event: str, data: dict[str, Any]) -> str:
    return f"event: {event}\ndata: {json.dumps(data, ensure_ascii=False)}\n\n"


HEARTBEAT = ": keep-alive\n\n"


def done_payload(done: Finished) -> dict[str, Any]:
    return {"tokens_generated": done.tokens_generated,
            "generation_time": format_seconds(done.generation_seconds),
            "finish_reason": done.finish_reason}


def relay(job: GenerationJob, prefix: str, heartbeat: float,
          on_end: Callable[[bool], None]) -> Iterator[str]:
    """Yield SSE frames for `job` until it finishes. A comment heartbeat goes out when the
    engine is quiet, so a vanished client is noticed (the write fails, the server closes
    this generator) and the job is cancelled in `finally`."""
    ok = False
    try:
        if prefix:
            yield sse("text", {"text": prefix, "finished": False})
        while True:
            try:
                event = job.events.get(timeout=heartbeat)
            except Empty:
                yield HEARTBEAT
                continue
            if isinstance(event, TextChunk):
                yield sse("text", {"text": event.text, "finished": False})
            elif isinstance(event, Finished):
                ok = True
                yield sse("done", done_payload(event))
                return
            elif isinstance(event, Failed):
                yield sse("error", event.error.body())
                return
    finally:
        job.cancel()
        on_end(ok)


def collect(job: GenerationJob) -> tuple[str, Finished]:
    """Wait for a whole (non-streamed) generation; raise its error if it failed."""
    pieces: list[str] = []
    try:
        while True:
            event = job.events.get()
            if isinstance(event, TextChunk):
                pieces.append(event.text)
            elif isinstance(event, Finished):
                return "".join(pieces), event
            elif isinstance(event, Failed):
                raise event.error
    finally:
        job.cancel()
