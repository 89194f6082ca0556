"""What a request hands the engine (a job) and what it gets back (events on the job's channel)."""

from __future__ import annotations

import time
from collections.abc import Callable
from dataclasses import dataclass, field

from ..errors import TursiError
from ..threads import Channel, Empty

# How often a waiting request asks whether the job's engine is still alive: a client never
# waits longer than this for the news that the engine died or is stuck.
ENGINE_CHECK_SECONDS = 1.0


@dataclass(frozen=True)
class GenerationParams:
    max_tokens: int
    temperature: float = 1.0
    top_p: float = 1.0
    stop: tuple[str, ...] = ()
    seed: int | None = None
    top_k: int = 0  # 0: no top-k cut
    repetition_penalty: float = 1.0  # 1: none
    ignore_eos: bool = False  # keep going past end-of-sequence tokens (benchmarks)


@dataclass(frozen=True)
class TextChunk:
    text: str


@dataclass(frozen=True)
class Finished:
    tokens_generated: int
    generation_seconds: float
    finish_reason: str  # "stop" (end of sequence or a stop string) | "length"


@dataclass(frozen=True)
class Failed:
    error: TursiError


Event = TextChunk | Finished | Failed


def _alive() -> TursiError | None:
    return None


@dataclass(eq=False)
class GenerationJob:
    """One generation request. The worker thread writes events; the request reads them."""

    prompt_ids: list[int]
    params: GenerationParams
    events: Channel = field(default_factory=Channel)
    cancelled: bool = False  # set by the request side; read by the worker at every step
    tokens_generated: int = 0  # written by the worker as it goes (counted even on failure)
    timeout: float | None = None  # seconds from submission (TURSI_REQUEST_TIMEOUT)
    deadline: float | None = None  # time.monotonic() value, set when submitted
    submitted: float = 0.0  # time.monotonic() at admission
    last_token: float = 0.0  # time.monotonic() when its latest token was chosen
    # set when submitted: why the worker that has the job can no longer serve, or None
    engine_failure: Callable[[], TursiError | None] = _alive

    def cancel(self) -> None:
        """Stop generating at the next step (client gone). Safe from any thread, idempotent."""
        self.cancelled = True

    def abandon(self, error: TursiError) -> None:
        """Cancel, and wake whoever waits on the events with `error` (the engine sends
        nothing more for a cancelled job)."""
        self.cancel()
        self.events.put(Failed(error))

    def next_event(self, timeout: float | None = None) -> Event:
        """The next event; raises Empty after `timeout` seconds (None: no limit) without
        one. Every ENGINE_CHECK_SECONDS of silence it asks whether the engine still serves:
        if not, the job is abandoned and its failure returned."""
        deadline = None if timeout is None else time.monotonic() + timeout
        while True:
            wait = ENGINE_CHECK_SECONDS
            if deadline is not None:
                wait = max(0.0, min(wait, deadline - time.monotonic()))
            try:
                return self.events.get(timeout=wait)
            except Empty:
                error = self.engine_failure()
                if error is not None:
                    self.cancel()
                    return Failed(error)
                if deadline is not None and time.monotonic() >= deadline:
                    raise
