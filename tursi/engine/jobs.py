"""What a request hands the engine (a job) and what it gets back (events on the job's channel)."""

from __future__ import annotations

import time
from collections.abc import Callable
from dataclasses import dataclass, field, fields

from ..errors import TursiError
from ..threads import Channel, Empty

# How often a waiting request asks whether the job's engine is still alive: a client never
# waits longer than this for the news that the engine died or is stuck.
ENGINE_CHECK_SECONDS = 1.0


@dataclass(frozen=True, kw_only=True)
class SamplingParams:
    """How a request's tokens are chosen and when it may stop. These fields are THE list of
    sampling parameters: both APIs' schemas accept exactly these keys (tursi.api.jobs) and
    `sampling.TokenChooser` takes the object whole, so a new parameter is one field here, one
    schema field (tursi.api.schemas.SamplingSchema) and its use in the sampler."""

    temperature: float = 1.0  # 0: greedy
    top_p: float = 1.0  # 1: no nucleus cut
    top_k: int = 0  # 0: no top-k cut
    repetition_penalty: float = 1.0  # 1: none
    stop: tuple[str, ...] = ()
    seed: int | None = None
    ignore_eos: bool = False  # keep going past end-of-sequence tokens (benchmarks)

    def __post_init__(self) -> None:
        # Requests give a list; a tuple keeps the frozen object hashable and unchangeable.
        object.__setattr__(self, "stop", tuple(self.stop))


@dataclass(frozen=True)
class GenerationParams(SamplingParams):
    """A job's settings: its sampling parameters and its token budget. The inherited fields
    are keyword-only, so `GenerationParams(100, temperature=0.0)` reads as it should."""

    max_tokens: int

    @classmethod
    def of(cls, sampling: SamplingParams, max_tokens: int) -> GenerationParams:
        return cls(
            max_tokens, **{f.name: getattr(sampling, f.name) for f in fields(SamplingParams)}
        )


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
