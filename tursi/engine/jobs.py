"""What a request hands the engine (a job) and what it gets back (events on the job's channel)."""

from __future__ import annotations

import time
from collections.abc import Callable
from dataclasses import dataclass, field, fields
from typing import Any

from ..errors import TursiError
from ..threads import Channel, Empty

# How often a waiting request asks whether the job's engine is still alive: a client never
# waits longer than this for the news that the engine died or is stuck.
ENGINE_CHECK_SECONDS = 1.0


CONSTRAINT_KINDS = ("json_schema", "json_object", "regex", "choice", "grammar")


@dataclass(frozen=True)
class Constraint:
    """What a choice's output must match, by construction: each token is drawn from those
    the grammar allows next (tursi.engine.constraints compiles it with llguidance;
    docs/structured-output.md). `kind` is one of CONSTRAINT_KINDS; `value`:
    - json_schema: the JSON schema as compact JSON text (no spaces), so that equal schemas
      are one compiled grammar; its keys keep the client's order (the order of `properties`
      is the order the output writes them in);
    - json_object: "" (any JSON object);
    - regex: the pattern the whole output matches;
    - choice: the alternatives, a tuple of strings (the output is exactly one of them);
    - grammar: a grammar in llguidance's Lark dialect (or GBNF, converted)."""

    kind: str
    value: str | tuple[str, ...] = ""

    def __post_init__(self) -> None:
        if self.kind not in CONSTRAINT_KINDS:
            raise ValueError(f"unknown constraint kind {self.kind!r}")
        if isinstance(self.value, list):
            object.__setattr__(self, "value", tuple(self.value))


@dataclass(frozen=True, kw_only=True)
class SamplingParams:
    """How a request's tokens are chosen, what it reports and when it may stop. These
    fields are THE list of sampling parameters: both APIs' schemas accept exactly these keys
    (tursi.api.jobs) and `sampling.TokenChooser` takes the object whole, so a new parameter
    is one field here, one schema field (tursi.api.schemas.SamplingSchema) and its use in
    the sampler.

    The order of the logits processing (docs/api.md "Sampling"): logit_bias, then the
    repetition, presence and frequency penalties, then temperature, top_k, top_p and min_p
    (transformers' order), then the draw. Logprobs are of the model's raw distribution
    (log-softmax of its logits, before any of that), as vLLM reports by default."""

    temperature: float = 1.0  # 0: greedy
    top_p: float = 1.0  # 1: no nucleus cut
    top_k: int = 0  # 0: no top-k cut
    min_p: float = 0.0  # 0: no cut; else drop tokens below min_p * the top probability
    repetition_penalty: float = 1.0  # 1: none (transformers' definition, prompt + output)
    presence_penalty: float = 0.0  # OpenAI's definition, over the output tokens: -2..2
    frequency_penalty: float = 0.0  # OpenAI's definition, over the output tokens: -2..2
    logit_bias: tuple[tuple[int, float], ...] = ()  # (token id, -100..100) added to logits
    stop: tuple[str, ...] = ()
    stop_token_ids: tuple[int, ...] = ()  # end the choice like end-of-sequence does
    seed: int | None = None  # any int64; choice i of n draws with seed + i
    ignore_eos: bool = False  # keep going past end-of-sequence tokens (benchmarks)
    logprobs: int | None = None  # None: none; k: each output token's logprob + top k
    prompt_logprobs: int | None = None  # the same for the prompt's tokens (echo)
    constraint: Constraint | None = None  # structured output: JSON schema, regex, grammar...
    speculative: bool = True  # false: no speculative drafts for this request (same output)

    def __post_init__(self) -> None:
        # Requests give lists and dicts; tuples keep the frozen object hashable.
        object.__setattr__(self, "stop", tuple(self.stop))
        object.__setattr__(self, "stop_token_ids", tuple(self.stop_token_ids))
        bias = self.logit_bias
        pairs = bias.items() if isinstance(bias, dict) else bias
        object.__setattr__(self, "logit_bias", tuple((int(k), float(v)) for k, v in pairs))


@dataclass(frozen=True)
class GenerationParams(SamplingParams):
    """A job's settings: its sampling parameters and its token budget (per choice; 0 only
    with prompt_logprobs: the prompt is scored, nothing generated). The inherited fields
    are keyword-only, so `GenerationParams(100, temperature=0.0)` reads as it should."""

    max_tokens: int

    @classmethod
    def of(cls, sampling: SamplingParams, max_tokens: int) -> GenerationParams:
        return cls(
            max_tokens, **{f.name: getattr(sampling, f.name) for f in fields(SamplingParams)}
        )


@dataclass(frozen=True)
class TokenLogprob:
    """One token's log probability under the model's raw distribution, and the `top` most
    likely tokens at that position, best first (as many as the request asked for)."""

    token_id: int
    logprob: float
    top: tuple[tuple[int, float], ...] = ()


@dataclass(frozen=True)
class TextChunk:
    """Text of choice `index`, with the logprobs of the tokens whose text it completes
    (when the request asked for logprobs): the entries of all chunks of a choice, in order,
    are its output tokens, minus those cut by a stop string. An end-of-sequence or stop token
    is listed (lm-eval reads its score) though it has no text."""

    text: str
    index: int = 0
    logprobs: tuple[TokenLogprob, ...] = ()


@dataclass(frozen=True)
class PromptLogprobs:
    """The prompt's tokens scored (prompt_logprobs requests), sent once per job before any
    text, for its first choice `index`: entry 0 is None (nothing precedes the first token)."""

    entries: tuple[TokenLogprob | None, ...]
    index: int = 0


@dataclass(frozen=True)
class Finished:
    """Choice `index` ended. cumulative_logprob: the sum of its tokens' raw logprobs when
    the request asked for logprobs (best_of ranks by it), else None."""

    tokens_generated: int
    generation_seconds: float
    # "stop" (end of sequence, stop token, stop string, a constraint's grammar complete)
    # | "length" (max_tokens: a constrained output may be cut inside its structure)
    finish_reason: str
    index: int = 0
    cumulative_logprob: float | None = None
    cached_tokens: int = 0  # prompt tokens whose KV came from the prefix cache (per job)


@dataclass(frozen=True)
class Failed:
    """The whole job failed (all of its choices)."""

    error: TursiError


Event = TextChunk | PromptLogprobs | Finished | Failed


def _alive() -> TursiError | None:
    return None


@dataclass(eq=False)
class GenerationJob:
    """One prompt of a request, with its `n` choices. The worker thread writes events; the
    request reads them. The choices share the prompt's prefill and are numbered from
    `index` (a request with several prompts gives each its own range); the jobs of one
    request may share one `events` channel, events telling them apart by index."""

    prompt_ids: list[int]
    params: GenerationParams
    events: Channel = field(default_factory=Channel)
    n: int = 1  # choices, each its own row of the batch, all from one prefill
    index: int = 0  # the first choice's index in the request's answer
    cancelled: bool = False  # set by the request side; read by the worker at every step
    tokens_generated: int = 0  # all choices' tokens, written as it goes (counted on failure)
    timeout: float | None = None  # seconds from submission (TURSI_REQUEST_TIMEOUT)
    cache_prompt: bool = True  # False: the prefix cache neither serves nor keeps this prompt
    deadline: float | None = None  # time.monotonic() value, set when submitted
    submitted: float = 0.0  # time.monotonic() at admission
    last_token: float = 0.0  # time.monotonic() when its latest token was chosen
    # set when submitted: why the worker that has the job can no longer serve, or None
    engine_failure: Callable[[], TursiError | None] = _alive
    # structured output: one grammar matcher per choice (constraints.Matcher, made by the
    # worker's new_job from params.constraint); None when unconstrained
    matchers: list[Any] | None = None

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
