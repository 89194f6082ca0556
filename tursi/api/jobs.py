"""From validated request data to a submitted job: the one path both APIs (/api/v1 and the
OpenAI-compatible /v1) take into the engine."""

from __future__ import annotations

from collections.abc import Mapping
from dataclasses import fields
from typing import Any

from ..engine.jobs import GenerationJob, SamplingParams
from ..engine.worker import ModelWorker
from .state import current


def sampling_params(data: Mapping[str, Any]) -> SamplingParams:
    """The SamplingParams of a validated request: its keys are the dataclass's field names
    (every request schema derives from schemas.SamplingSchema, which declares them all)."""
    return SamplingParams(**{field.name: data[field.name] for field in fields(SamplingParams)})


def submit_job(
    worker: ModelWorker,
    data: Mapping[str, Any],
    prompt: str,
    max_tokens: int | None,
    *,
    chat: bool = False,
) -> GenerationJob:
    """Tokenize `prompt`, check it against the context window and the server's max_tokens cap
    (400s), and queue it on `worker` (503 when full). A chat prompt comes from the model's
    template, which already holds its special tokens; without max_tokens a chat reply runs to
    its end (up to the context or the cap), any other request gets the engine's default."""
    cap = current().settings.max_tokens
    job = worker.new_job(
        prompt,
        sampling_params(data),
        max_tokens=max_tokens,
        max_tokens_cap=cap,
        default_max_tokens=cap if chat else None,
        add_special_tokens=not chat,
    )
    worker.submit(job)
    return job
