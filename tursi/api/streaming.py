"""Reading a request's events (tursi.api.jobs.Submission): whole (`collect`), or relayed
as server-sent events (`relay`), with the frames of the native API (/api/v1/generate).
The OpenAI-compatible frames live with their responses (tursi.api.openai_responses)."""

from __future__ import annotations

import json
from collections import defaultdict
from collections.abc import Iterator
from dataclasses import dataclass
from typing import Any, Protocol

from flask import Response, request

from ..engine.jobs import Failed, Finished, PromptLogprobs, TextChunk, TokenLogprob
from ..errors import TursiError
from ..formatting import format_seconds
from ..threads import Empty
from .accounting import RequestOutcome, outcome
from .disconnect import bound_sends, watch_client
from .jobs import Submission
from .logprobs import TokenTexts, prompt_entries, token_entries
from .state import current

HEARTBEAT = ": keep-alive\n\n"


def sse(event: str, data: dict[str, Any]) -> str:
    return f"event: {event}\ndata: {json.dumps(data, ensure_ascii=False)}\n\n"


def done_payload(done: Finished) -> dict[str, Any]:
    """The native API's end of a generation (one job, one choice): its counts, including
    the prompt tokens the prefix cache served."""
    return {
        "tokens_generated": done.tokens_generated,
        "generation_time": format_seconds(done.generation_seconds),
        "finish_reason": done.finish_reason,
        "cached_tokens": done.cached_tokens,
    }


class Frames(Protocol):
    """How one API writes a stream: what goes first, per event, at the end, on error."""

    def start(self) -> list[str]: ...
    def prompt(self, event: PromptLogprobs) -> list[str]: ...
    def text(self, chunk: TextChunk) -> list[str]: ...
    def finished(self, done: Finished) -> list[str]: ...
    def end(self) -> list[str]: ...
    def error(self, error: TursiError) -> list[str]: ...


class NativeFrames:
    """/api/v1/generate (one choice): `event: text` chunks (the prompt first when
    return_full_text, so the chunks concatenate to the non-stream text), each with the
    `logprobs` of its tokens when asked; when prompt_logprobs is asked, one
    `event: prompt_logprobs` frame before any generated text (after the echoed prompt);
    one `event: done` or `event: error` at the end."""

    def __init__(self, prefix: str, texts: TokenTexts, logprobs: bool):
        self.prefix, self.texts, self.logprobs = prefix, texts, logprobs

    def start(self) -> list[str]:
        if not self.prefix:
            return []
        data: dict[str, Any] = {"text": self.prefix, "finished": False}
        if self.logprobs:
            data["logprobs"] = []  # the prompt's are in prompt_logprobs, when asked
        return [sse("text", data)]

    def prompt(self, event: PromptLogprobs) -> list[str]:
        entries = prompt_entries(event.entries, self.texts)
        return [sse("prompt_logprobs", {"prompt_logprobs": entries})]

    def text(self, chunk: TextChunk) -> list[str]:
        data: dict[str, Any] = {"text": chunk.text, "finished": False}
        if self.logprobs:
            data["logprobs"] = token_entries(chunk.logprobs, self.texts, with_id=True)
        return [sse("text", data)]

    def finished(self, done: Finished) -> list[str]:
        return [sse("done", done_payload(done))]

    def end(self) -> list[str]:
        return []

    def error(self, error: TursiError) -> list[str]:
        return [sse("error", error.body())]


def relay(
    submission: Submission,
    frames: Frames,
    heartbeat: float,
    environ: dict[str, Any],
    send_timeout: float | None = None,
) -> Iterator[str]:
    """Yield SSE frames for the request until all its choices finish. A comment heartbeat
    goes out when the engine is quiet, so a vanished client is noticed (the write fails,
    the server closes this generator) and the jobs are cancelled in `finally`; a client that
    closes its connection is noticed at once, and one that stops reading at `send_timeout`
    (tursi.api.disconnect). How the stream ended goes into the request's outcome, for the
    request counters (tursi.api.accounting)."""
    ended = outcome(environ)

    def stalled() -> None:
        ended.error_code = "send_timeout"
        submission.cancel()

    unwatch = watch_client(environ, submission)
    try:
        each = _frames(submission, frames, heartbeat, ended)
        yield from bound_sends(each, environ, send_timeout, stalled)
    finally:
        unwatch()
        submission.close()


def _frames(
    submission: Submission, frames: Frames, heartbeat: float, ended: RequestOutcome
) -> Iterator[str]:
    yield from frames.start()
    while True:
        try:
            event = submission.next_event(timeout=heartbeat)
        except Empty:
            yield HEARTBEAT
            continue
        if isinstance(event, TextChunk):
            if event.text or event.logprobs:
                yield from frames.text(event)
        elif isinstance(event, PromptLogprobs):
            yield from frames.prompt(event)
        elif isinstance(event, Finished):
            yield from frames.finished(event)
            if submission.finished(event):
                ended.stream_finished = True
                yield from frames.end()
                return
        elif isinstance(event, Failed):
            ended.error_code = event.error.code
            yield from frames.error(event.error)
            return


def stream_response(submission: Submission, frames: Frames) -> Response:
    settings = current().settings
    return Response(
        relay(
            submission, frames, settings.heartbeat_seconds, request.environ, settings.send_timeout
        ),
        mimetype="text/event-stream",
        headers={"Cache-Control": "no-cache", "X-Accel-Buffering": "no"},
    )


@dataclass
class Choice:
    """One whole choice: which of the request's prompts it answers (their position), its
    text, its tokens' logprobs (when asked), how it ended, the prompt's token ids and their
    logprobs (when asked; entry 0 None)."""

    index: int
    prompt: int
    text: str
    tokens: list[TokenLogprob]
    finished: Finished
    prompt_ids: list[int]
    prompt_logprobs: tuple[TokenLogprob | None, ...] | None


def collect(submission: Submission) -> list[Choice]:
    """Wait for every choice of a (non-streamed) request, in index order; raise the error
    of the first job that failed (also when the client disconnects first: the jobs are then
    abandoned, tursi.api.disconnect)."""
    texts: dict[int, list[str]] = defaultdict(list)
    tokens: dict[int, list[TokenLogprob]] = defaultdict(list)
    prompts: dict[int, tuple[TokenLogprob | None, ...]] = {}
    done: dict[int, Finished] = {}
    unwatch = watch_client(request.environ, submission)
    try:
        while True:
            event = submission.next_event()
            if isinstance(event, TextChunk):
                texts[event.index].append(event.text)
                tokens[event.index].extend(event.logprobs)
            elif isinstance(event, PromptLogprobs):
                prompts[event.index] = event.entries
            elif isinstance(event, Finished):
                done[event.index] = event
                if submission.finished(event):
                    break
            elif isinstance(event, Failed):
                raise event.error
    finally:
        unwatch()
        submission.close()
    return [
        Choice(
            index,
            number,
            "".join(texts[index]),
            tokens[index],
            done[index],
            job.prompt_ids,
            prompts.get(job.index),
        )
        for number, job in enumerate(submission.jobs)
        for index in range(job.index, job.index + job.n)
    ]
