"""One native OS thread per loaded model: it owns the model and runs its batching scheduler.

The request side (any greenlet or thread) checks a request against the context window and
the admission limits, then hands the job over through a native queue; tokens come back on
each job's Channel. The thread runs `Scheduler.turn` while there is work and blocks on the
queue when there is none.
"""

from __future__ import annotations

import gc
import logging
import time
from dataclasses import dataclass

from ..errors import (
    ContextLengthExceeded,
    GenerationFailed,
    InvalidRequest,
    ModelUnloaded,
    Overloaded,
)
from ..telemetry import ModelStats
from ..threads import Channel, Empty, SimpleQueue, native_lock, start_native_thread
from .jobs import GenerationJob, GenerationParams, SamplingParams
from .loading import LoadedModel
from .scheduler import Scheduler

log = logging.getLogger(__name__)

DEFAULT_MAX_TOKENS = 100
OVERLOAD_RETRY_SECONDS = 1
_STOP = object()


@dataclass(frozen=True)
class BatchLimits:
    """Admission and deadline settings of each model's scheduler (TURSI_MAX_BATCH,
    TURSI_MAX_QUEUE, TURSI_REQUEST_TIMEOUT)."""

    max_batch: int = 32
    max_queue: int = 128
    request_timeout: float | None = 300.0


class ModelWorker:
    def __init__(
        self, name: str, loaded: LoadedModel, stats: ModelStats, limits: BatchLimits = BatchLimits()
    ):
        self.name = name
        self.loaded: LoadedModel | None = loaded
        self.stats = stats
        self.context_length = loaded.context_length
        self.max_batch, self.max_queue = limits.max_batch, limits.max_queue
        self.request_timeout = limits.request_timeout
        self._scheduler = Scheduler(name, loaded, limits.max_batch, self._job_done, stats)
        self._inbox: SimpleQueue = SimpleQueue()
        self._lock = native_lock()
        self._admitted = 0  # jobs submitted and not yet ended: running + waiting
        self._stopping = False
        self._exited: Channel | None = None

    # --- request side (any thread or greenlet) ------------------------------------------

    def start(self) -> None:
        start_native_thread(self._run)

    def counts(self) -> tuple[int, int]:
        """(running, waiting): jobs in the batch (being prefilled or decoded), and jobs
        admitted but not started. Read without a lock from the engine thread's two counters:
        `active` first, then `admitted`, the reverse of the order in which a job's end
        lowers them, so an ending job is never read as waiting."""
        active = self._scheduler.running
        admitted = self._admitted
        return min(active, admitted), max(0, admitted - active)

    @property
    def running(self) -> int:
        return self.counts()[0]

    @property
    def waiting(self) -> int:
        return self.counts()[1]

    def new_job(
        self,
        prompt: str,
        sampling: SamplingParams,
        *,
        max_tokens: int | None,
        max_tokens_cap: int,
        default_max_tokens: int | None = None,
        add_special_tokens: bool = True,
    ) -> GenerationJob:
        """Tokenize and check a request against the context window; raise 400s here.
        Without max_tokens a job gets default_max_tokens (DEFAULT_MAX_TOKENS when None),
        within the cap and the context. A prompt rendered by a chat template already holds
        its special tokens."""
        loaded = self._loaded()
        prompt_ids = loaded.tokenizer(prompt, add_special_tokens=add_special_tokens)["input_ids"]
        if not prompt_ids:
            raise InvalidRequest("The prompt is empty once tokenized", {"field": "prompt"})
        room = self.context_length - len(prompt_ids)
        numbers = {
            "prompt_tokens": len(prompt_ids),
            "context_length": self.context_length,
            "max_tokens_limit": max_tokens_cap,
        }
        if room < 1:
            raise ContextLengthExceeded(
                f"The prompt ({len(prompt_ids)} tokens) fills the context length of "
                f"'{self.name}' ({self.context_length} tokens)",
                numbers,
            )
        if max_tokens is None:
            max_tokens = min(default_max_tokens or DEFAULT_MAX_TOKENS, max_tokens_cap, room)
        elif max_tokens > max_tokens_cap:
            raise InvalidRequest(
                f"max_tokens={max_tokens} is above this server's limit of {max_tokens_cap}",
                {**numbers, "max_tokens": max_tokens},
            )
        if max_tokens > room:
            raise ContextLengthExceeded(
                f"The prompt ({len(prompt_ids)} tokens) plus max_tokens ({max_tokens}) exceeds "
                f"the context length of '{self.name}' ({self.context_length} tokens)",
                {**numbers, "max_tokens": max_tokens},
            )
        return GenerationJob(prompt_ids, GenerationParams.of(sampling, max_tokens))

    def chat_prompt(self, messages: list[dict[str, str]]) -> str:
        """The prompt text for chat `messages` ({"role", "content"}), rendered with the
        model's chat template; a 400 when the model has none or the template refuses them."""
        tokenizer = self._loaded().tokenizer
        if not getattr(tokenizer, "chat_template", None):
            raise InvalidRequest(
                f"Model '{self.name}' has no chat template; use /v1/completions with a prompt",
                {"model": self.name},
            )
        try:
            return tokenizer.apply_chat_template(
                messages, tokenize=False, add_generation_prompt=True
            )
        except Exception as exc:  # jinja2 errors: the template rejects these messages
            raise InvalidRequest(
                f"The chat template of '{self.name}' rejected the messages: {exc}",
                {"model": self.name},
            ) from None

    def _loaded(self) -> LoadedModel:
        loaded = self.loaded
        if loaded is None or self._stopping:
            raise ModelUnloaded(f"Model '{self.name}' was unloaded")
        return loaded

    def submit(self, job: GenerationJob) -> None:
        """Queue a job, or refuse it when max_batch running + max_queue waiting are taken."""
        with self._lock:
            if self._stopping:
                raise ModelUnloaded(f"Model '{self.name}' was unloaded")
            if self._admitted >= self.max_batch + self.max_queue:
                raise Overloaded(
                    f"Model '{self.name}' is at capacity ({self.max_batch} running, "
                    f"{self.max_queue} waiting); retry shortly",
                    {"max_batch": self.max_batch, "max_queue": self.max_queue},
                    {"Retry-After": str(OVERLOAD_RETRY_SECONDS)},
                )
            self._admitted += 1
            job.submitted = time.monotonic()
            if self.request_timeout is not None:
                job.timeout = self.request_timeout
                job.deadline = job.submitted + self.request_timeout
            self._inbox.put(job)

    def stop(self, exited: Channel | None = None) -> None:
        """Ask the thread to finish: jobs in flight or queued end with `model_unloaded`, and
        from now on it moves none of its stats' gauges (the manager zeroes them). `exited`,
        when given, gets one item once the model's memory has been released: its waiter
        builds it (a Channel belongs to the greenlet that makes it, and a native thread must
        not make one: tursi.threads). Non-blocking, safe from any thread."""
        with self._lock:
            self._stopping = True
            self._exited = exited
            self._inbox.put(_STOP)

    # --- worker thread ------------------------------------------------------------------

    def _job_done(self, job: GenerationJob, seconds: float, ok: bool) -> None:
        self.stats.record(job.tokens_generated, seconds, ok)
        with self._lock:
            self._admitted -= 1

    def _run(self) -> None:
        scheduler = self._scheduler
        try:
            while not self._stopping:
                if scheduler.idle:
                    self._report_sizes(0, 0)
                if not self._take_jobs(block=scheduler.idle):
                    break
                try:
                    scheduler.turn()
                except Exception as exc:  # a model error ends the batch, not the worker
                    log.exception("generation failed on %s", self.name)
                    scheduler.fail_all(GenerationFailed(f"Generation failed: {type(exc).__name__}"))
                self._report_sizes(*self.counts())
        finally:
            self._release()

    def _report_sizes(self, running: int, waiting: int) -> None:
        """Move the batch gauges, unless stopped: the manager zeroed them then, and a reload's
        worker may own them already."""
        with self._lock:
            if not self._stopping:
                self.stats.batch_sizes(running, waiting)

    def _take_jobs(self, block: bool) -> bool:
        """Move jobs from the inbox to the scheduler; False once asked to stop."""
        while True:
            try:
                job = self._inbox.get() if block else self._inbox.get_nowait()
            except Empty:
                return True
            if job is _STOP:
                return False
            self._scheduler.add(job)
            block = False

    def _release(self) -> None:
        unloaded = ModelUnloaded(f"Model '{self.name}' was unloaded")
        while True:
            try:
                job = self._inbox.get_nowait()
            except Empty:
                break
            if isinstance(job, GenerationJob):
                self._scheduler.add(job)
        self._scheduler.close(unloaded)
        self.loaded = None
        gc.collect()
        import torch

        if torch.cuda.is_available():
            torch.cuda.empty_cache()
        if self._exited is not None:
            self._exited.put(True)
