"""From validated request data to submitted jobs: the one path both APIs (/api/v1 and the
OpenAI-compatible /v1) take into the engine, and the request's handle on them."""

from __future__ import annotations

from collections.abc import Callable, Mapping, Sequence
from dataclasses import fields
from typing import Any, TypeAlias

from ..engine.jobs import Event, Failed, Finished, GenerationJob, SamplingParams
from ..engine.worker import ModelWorker
from ..errors import TursiError
from ..threads import Channel, off_hub
from .state import current
from .token_budget import Reservation, reserve

# A prompt: text, token ids, or a function of the worker that renders it (a chat's messages
# through the model's template: tursi.api.tools.chat_prompt).
Prompt: TypeAlias = str | list[int] | Callable[[ModelWorker], str]


def sampling_params(data: Mapping[str, Any], **overrides: Any) -> SamplingParams:
    """The SamplingParams of a validated request: its keys are the dataclass's field names
    (every request schema derives from schemas.SamplingSchema, which declares them all).
    `overrides` replace fields (best_of asks for logprobs the client may not want)."""
    values = {field.name: data[field.name] for field in fields(SamplingParams)}
    return SamplingParams(**{**values, **overrides})


class Submission:
    """One request's jobs (one per prompt, each with its n choices) and the channel they
    share: what the request side reads (tursi.api.streaming), cancels and abandons. The
    request is over when every choice has finished, or at the first Failed event (of any
    job: the answer would be incomplete, so the others are cancelled); whoever reads it
    then closes it (close()), which settles its token budget reservation."""

    def __init__(self, jobs: Sequence[GenerationJob], reservation: Reservation | None = None):
        self.jobs = list(jobs)
        self.events: Channel = self.jobs[0].events
        self.unfinished = sum(job.n for job in self.jobs)
        self.completion_tokens = 0  # over every finished choice
        self.reservation = reservation
        # Per job (by its first choice's index): its prompt tokens the prefix cache served.
        # Every choice's Finished carries its job's count: a job counts once, not per choice.
        self._cached: dict[int, int] = {}

    @property
    def prompt_tokens(self) -> int:
        return sum(len(job.prompt_ids) for job in self.jobs)

    @property
    def cached_tokens(self) -> int:
        """Of prompt_tokens, those whose KV came from the prefix cache (finished jobs')."""
        return sum(self._cached.values())

    def job_of(self, index: int) -> GenerationJob:
        """The job that generates choice `index`."""
        return next(job for job in self.jobs if job.index <= index < job.index + job.n)

    def next_event(self, timeout: float | None = None) -> Event:
        """The next event of any of the jobs (GenerationJob.next_event on the shared
        channel: the jobs share one worker, so asking one of them whether the engine still
        serves asks for all)."""
        return self.jobs[0].next_event(timeout)

    def finished(self, event: Finished) -> bool:
        """Count a finished choice; True when it was the last one."""
        self.unfinished -= 1
        self.completion_tokens += event.tokens_generated
        self._cached[self.job_of(event.index).index] = event.cached_tokens
        return self.unfinished == 0

    def cancel(self) -> None:
        for job in self.jobs:
            job.cancel()

    def close(self) -> None:
        """The request is over (answered, stream ended, client gone): cancel what still
        runs and charge the token budget the prompt and the tokens generated so far (the
        engine may finish the step under way; that step is not charged)."""
        self.cancel()
        if self.reservation is not None:
            self.reservation.settle(sum(job.tokens_generated for job in self.jobs))

    def abandon(self, error: TursiError) -> None:
        """Cancel every job, and wake the reader with `error` (tursi.api.disconnect)."""
        self.cancel()
        self.events.put(Failed(error))


def submit(
    worker: ModelWorker,
    data: Mapping[str, Any],
    prompts: Sequence[Prompt],
    max_tokens: int | None,
    *,
    chat: bool = False,
    n: int | None = None,
    sampling: SamplingParams | None = None,
) -> Submission:
    """Check that the model has room for the request now (a cheap 503 first); render and
    tokenize each prompt and check it against the context window and the server's caps
    (400s), off the gevent hub: that costs as much as the prompt is long; reserve its tokens
    in the client's token budget (429s: tursi.api.token_budget), then queue one job per
    prompt on `worker`, all or none (503 when full, and the reservation is given back).
    Prompt i's choices are numbered i*n .. i*n+n-1, as OpenAI numbers them; `n` defaults
    to the request's. A chat prompt comes from the model's template, which already holds
    its special tokens; without max_tokens a chat reply runs to its end (up to the context
    or the cap), any other request gets the engine's default. `cache_prompt` (default true)
    goes on each job: false keeps its prompt out of the prefix cache."""
    cap = current().settings.max_tokens
    n = data.get("n", 1) if n is None else n
    cache_prompt = data.get("cache_prompt", True)
    sampling = sampling_params(data) if sampling is None else sampling
    worker.check_room(n * len(prompts))
    events = Channel()  # made here: a channel belongs to the greenlet that reads it

    def new_jobs() -> list[GenerationJob]:
        return [
            worker.new_job(
                prompt(worker) if callable(prompt) else prompt,
                sampling,
                max_tokens=max_tokens,
                max_tokens_cap=cap,
                default_max_tokens=cap if chat else None,
                add_special_tokens=not chat,
                n=n,
                index=i * n,
                events=events,
            )
            for i, prompt in enumerate(prompts)
        ]

    jobs = off_hub(new_jobs)
    for job in jobs:
        job.cache_prompt = cache_prompt
    reservation = reserve(jobs)  # needs the prompt token counts: after tokenizing
    try:
        worker.submit_all(jobs)
    except BaseException:
        if reservation is not None:
            reservation.settle(None)
        raise
    return Submission(jobs, reservation)
