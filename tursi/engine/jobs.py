"""What a request hands the engine (a job) and what it gets back (events on the job's channel)."""

from __future__ import annotations

from dataclasses import dataclass, field

from ..errors import TursiError
from ..threads import Channel


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

    def cancel(self) -> None:
        """Stop generating at the next step (client gone). Safe from any thread, idempotent."""
        self.cancelled = True

    def abandon(self, error: TursiError) -> None:
        """Cancel, and wake whoever waits on the events with `error` (the engine sends
        nothing more for a cancelled job)."""
        self.cancel()
        self.events.put(Failed(error))
