"""One native OS thread per loaded model: it owns the model and runs its batching scheduler.

The request side (any greenlet or thread) checks a request against the context window and
the admission limits, then hands the job over through a native queue; tokens come back on
each job's Channel. The thread runs `Scheduler.turn` while there is work and blocks on the
queue when there is none.

A worker whose thread raises out of its loop, or whose turn runs past `step_timeout`, is
dead: every job it admitted ends at once with `model_failed`, new ones are refused, and
`on_failure` tells the manager why. Whoever waits on a job asks `failure()` every
`ENGINE_CHECK_SECONDS` (tursi.engine.jobs), so no client waits on a dead engine for long.
"""

from __future__ import annotations

import logging
import time
from collections.abc import Callable
from dataclasses import dataclass
from typing import Any

from ..errors import (
    ContextLengthExceeded,
    GenerationFailed,
    InsufficientMemory,
    InvalidRequest,
    ModelFailed,
    ModelUnloaded,
    Overloaded,
    TursiError,
)
from ..formatting import format_bytes
from ..telemetry import ModelStats
from ..threads import Channel, Empty, SimpleQueue, native_lock, off_hub, start_native_thread
from .allocator import release_memory
from .constraints import Constraints
from .jobs import GenerationJob, GenerationParams, SamplingParams
from .kvcache import KVBudget, measure_token_bytes
from .loading import LoadedModel
from .scheduler import Scheduler
from .speculation import SpeculationSettings
from .tokens import TokenTexts, logits_width, vocab_size

log = logging.getLogger(__name__)

DEFAULT_MAX_TOKENS = 100
OVERLOAD_RETRY_SECONDS = 1
_STOP = object()


@dataclass(frozen=True)
class BatchLimits:
    """Admission and deadline settings of each model's scheduler (TURSI_MAX_BATCH,
    TURSI_MAX_QUEUE, TURSI_REQUEST_TIMEOUT, TURSI_STEP_TIMEOUT, TURSI_MAX_PROMPT_TOKENS,
    TURSI_PREFIX_CACHE, TURSI_KV_CACHE, TURSI_SPECULATIVE, TURSI_SPECULATIVE_TOKENS)."""

    max_batch: int = 32
    max_queue: int = 128
    request_timeout: float | None = 300.0
    step_timeout: float | None = 300.0  # one turn of the loop longer than this: engine hung
    max_prompt_tokens: int | None = None  # None: the model's context length is the bound
    prefix_cache_bytes: int = 0  # each model's prefix cache (TURSI_PREFIX_CACHE); 0: off
    kv_cache_bytes: int | None = None  # each model's batch KV (TURSI_KV_CACHE); None: no bound
    # TURSI_SPECULATIVE, TURSI_SPECULATIVE_TOKENS (tursi.engine.speculation)
    speculation: SpeculationSettings = SpeculationSettings()


class ModelWorker:
    def __init__(
        self,
        name: str,
        loaded: LoadedModel,
        stats: ModelStats,
        limits: BatchLimits = BatchLimits(),
        on_failure: Callable[[ModelWorker, str], None] | None = None,
    ):
        self.name = name
        self.loaded: LoadedModel | None = loaded
        self.stats = stats
        self.context_length = loaded.context_length
        self.max_batch, self.max_queue = limits.max_batch, limits.max_queue
        self.request_timeout = limits.request_timeout
        self.step_timeout = limits.step_timeout
        self.max_prompt_tokens = limits.max_prompt_tokens
        self.kv_budget = kv_budget(loaded, limits)
        if self.kv_budget is not None:
            stats.kv_budget(self.kv_budget.bytes)
        self._scheduler = Scheduler(
            name,
            loaded,
            limits.max_batch,
            self._job_done,
            stats,
            limits.prefix_cache_bytes,
            self.kv_budget,
            limits.speculation,
        )
        self.vocab_size = vocab_size(loaded.tokenizer, loaded.model)
        self._token_texts = TokenTexts(loaded.tokenizer)
        self.constraints = Constraints(loaded.tokenizer, logits_width(loaded.model), loaded.eos_ids)
        self._inbox: SimpleQueue = SimpleQueue()
        self._lock = native_lock()
        # jobs submitted and not yet ended (running + waiting): the worker's own list, so
        # that it can end them from any thread when its engine thread is dead or stuck
        self._admitted: dict[GenerationJob, None] = {}
        self._stopping = False
        self._cache_bytes = 0  # the prefix cache's size last reported
        self._exited: Channel | None = None
        self._released = False  # the thread has ended its jobs and dropped the model
        self._on_failure = on_failure
        self._failure: ModelFailed | None = None
        self._turn_started: float | None = None  # time.monotonic() while a turn runs

    # --- request side (any thread or greenlet) ------------------------------------------

    def start(self) -> None:
        start_native_thread(self._run)

    def counts(self) -> tuple[int, int]:
        """(running, waiting): jobs in the batch (being prefilled or decoded), and jobs
        admitted but not started. Read without a lock from the engine thread's two counts:
        the scheduler's first, then the admitted jobs, the reverse of the order in which a
        job's end lowers them, so an ending job is never read as waiting."""
        active = self._scheduler.running
        admitted = len(self._admitted)
        return min(active, admitted), max(0, admitted - active)

    def failure(self) -> ModelFailed | None:
        """Why this worker can no longer serve, or None while it can. A turn that has run
        past step_timeout is found here (by whoever asks first) and kills the worker."""
        started = self._turn_started
        if (
            self._failure is None
            and started is not None
            and self.step_timeout is not None
            and time.monotonic() - started > self.step_timeout
        ):
            self._die(
                f"one step ran for more than {self.step_timeout:g} s (TURSI_STEP_TIMEOUT); "
                "the engine is stuck"
            )
        return self._failure

    def new_job(
        self,
        prompt: str | list[int],
        sampling: SamplingParams,
        *,
        max_tokens: int | None,
        max_tokens_cap: int,
        default_max_tokens: int | None = None,
        add_special_tokens: bool = True,
        n: int = 1,
        index: int = 0,
        events: Channel | None = None,
    ) -> GenerationJob:
        """Tokenize and check a request against the vocabulary, the batch, the context
        window and the server's prompt cap (max_prompt_tokens); raise 400s here. `prompt` is
        text, or token ids used as they are. Without max_tokens a job gets
        default_max_tokens (DEFAULT_MAX_TOKENS when None), within the cap and the context;
        max_tokens counts per choice, and 0 is for scoring the prompt (prompt_logprobs)
        only. A prompt rendered by a chat template already holds its special tokens. The
        `n` choices are numbered from `index`; the jobs of one request may share one
        `events` channel (None: a channel of the job's own, which only a greenlet may make:
        tursi.threads). A constraint (structured output) is compiled here into one matcher
        per choice: an unusable one is a 400 (tursi.engine.constraints).

        All of it costs as much as the prompt is long: the request side calls this off the
        gevent hub (tursi.api.jobs.submit), and the compiling goes off the hub too when it
        is called on it."""
        self._loaded()  # refused once unloaded or failed, token-id prompts included
        if isinstance(prompt, str):
            prompt_ids = self.tokenize(prompt, add_special_tokens)
        else:
            prompt_ids = list(prompt)
            self._check_token_ids("prompt", prompt_ids)
        if not prompt_ids:
            raise InvalidRequest("The prompt is empty once tokenized", {"field": "prompt"})
        self._check_sampling(sampling, n, max_tokens)
        cap = self.max_prompt_tokens
        if cap is not None and len(prompt_ids) > cap:
            raise InvalidRequest(
                f"The prompt ({len(prompt_ids)} tokens) is longer than this server's limit of "
                f"{cap} tokens (TURSI_MAX_PROMPT_TOKENS)",
                {"prompt_tokens": len(prompt_ids), "max_prompt_tokens": cap},
            )
        scoring_only = max_tokens == 0
        room = self.context_length - len(prompt_ids)
        numbers = {
            "prompt_tokens": len(prompt_ids),
            "context_length": self.context_length,
            "max_tokens_limit": max_tokens_cap,
        }
        if room < (0 if scoring_only else 1):
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
        matchers = None
        if sampling.constraint is not None:
            matchers = off_hub(self.constraints.matchers, sampling.constraint, n)
        return GenerationJob(
            prompt_ids,
            GenerationParams.of(sampling, max_tokens),
            events if events is not None else Channel(),
            n=n,
            index=index,
            matchers=matchers,
        )

    def _check_sampling(self, sampling: SamplingParams, n: int, max_tokens: int | None) -> None:
        """400s for what the engine cannot do: token ids outside the vocabulary, more
        choices than the batch has rows, nothing to generate and nothing to score."""
        self._check_token_ids("logit_bias", [token for token, _ in sampling.logit_bias])
        self._check_token_ids("stop_token_ids", list(sampling.stop_token_ids))
        if not 1 <= n <= self.max_batch:
            raise InvalidRequest(
                f"n={n} choices do not fit: this server runs at most {self.max_batch} "
                "sequences at once (TURSI_MAX_BATCH)",
                {"field": "n", "n": n, "max_batch": self.max_batch},
            )
        if max_tokens == 0 and sampling.prompt_logprobs is None:
            raise InvalidRequest(
                "max_tokens=0 generates nothing: it is allowed only to score the prompt "
                "(echo with logprobs, or prompt_logprobs)",
                {"field": "max_tokens", "max_tokens": 0},
            )

    def _check_token_ids(self, name: str, ids: list[int]) -> None:
        """A 400 naming the field unless every id is a token of the model (a prompt's ids
        can be many: checked by built-ins first, the first bad one found only if needed)."""
        vocab = self.vocab_size
        if all(type(token) is int for token in ids) and (
            not ids or (min(ids) >= 0 and max(ids) < vocab)
        ):
            return
        for token in ids:
            if isinstance(token, bool) or not isinstance(token, int) or not 0 <= token < vocab:
                raise InvalidRequest(
                    f"{name}: {token!r} is not a token id of '{self.name}' "
                    f"(ids run from 0 to {vocab - 1})",
                    {"field": name, "token_id": token, "vocab_size": vocab},
                )

    def token_texts(self, ids: list[int]) -> list[tuple[str, bytes]]:
        """Each token's own text and raw bytes (logprobs' `token` and `bytes`): for
        byte-level BPE tokenizers the true bytes, even of half a UTF-8 character
        (tursi.engine.tokens)."""
        self._loaded()
        return self._token_texts(ids)

    def chat_prompt(
        self,
        messages: list[dict[str, Any]],
        add_generation_prompt: bool = True,
        tools: list[dict[str, Any]] | None = None,
    ) -> str:
        """The prompt text for chat `messages` ({"role", "content"}, plus tool calls and
        results: tursi.api.tools), rendered with the model's chat template, with `tools`
        (OpenAI's function definitions) when given; a 400 when the model has none or the
        template refuses them."""
        tokenizer = self._loaded().tokenizer
        if not getattr(tokenizer, "chat_template", None):
            raise InvalidRequest(
                f"Model '{self.name}' has no chat template; use /v1/completions with a prompt",
                {"model": self.name},
            )
        try:
            return tokenizer.apply_chat_template(
                messages,
                tools=tools,
                tokenize=False,
                add_generation_prompt=add_generation_prompt,
            )
        except Exception as exc:  # jinja2 errors: the template rejects these messages
            raise InvalidRequest(
                f"The chat template of '{self.name}' rejected the messages: {_refusal(exc)}",
                {"model": self.name},
            ) from None

    def tokenize(self, text: str, add_special_tokens: bool = True) -> list[int]:
        """`text`'s token ids, as a prompt would be tokenized (tursi.api.tokenize)."""
        return list(
            self._loaded().tokenizer(text, add_special_tokens=add_special_tokens)["input_ids"]
        )

    def detokenize(self, ids: list[int]) -> str:
        """The text of token ids; a 400 for an id that is no token of the model (which
        would decode to nothing, or raise)."""
        tokenizer = self._loaded().tokenizer
        self._check_token_ids("tokens", ids)
        return tokenizer.decode(ids)

    def _loaded(self) -> LoadedModel:
        loaded = self.loaded
        if loaded is None or self._stopping:
            raise self._refusal()
        return loaded

    def _refusal(self) -> TursiError:
        return self._failure or ModelUnloaded(f"Model '{self.name}' was unloaded")

    def submit(self, job: GenerationJob) -> None:
        """Queue a job, or refuse it when the batch and the queue are full (submit_all)."""
        self.submit_all([job])

    def check_room(self, rows: int) -> None:
        """Refuse now what submit_all would refuse for want of room: `rows` more sequences
        while the batch and the queue are full (503), or a worker that no longer serves.
        Cheap, and a hint only (submit_all decides, under the lock): the request side asks
        before tokenizing, which costs as much as the prompt is long, so that a full server
        spends nothing on requests it must refuse."""
        with self._lock:
            if self._stopping:
                raise self._refusal()
            self._refuse_when_full(rows)

    def _refuse_when_full(self, rows: int) -> None:
        """The 503 when `rows` more sequences do not fit beside those admitted (call with
        the lock held); a request that never fits is submit_all's 400."""
        capacity = self.max_batch + self.max_queue
        if rows <= capacity and sum(job.n for job in self._admitted) + rows > capacity:
            raise Overloaded(
                f"Model '{self.name}' is at capacity ({self.max_batch} running, "
                f"{self.max_queue} waiting); retry shortly",
                {"max_batch": self.max_batch, "max_queue": self.max_queue},
                {"Retry-After": str(OVERLOAD_RETRY_SECONDS)},
            )

    def _refuse_beyond_kv_budget(self, jobs: list[GenerationJob]) -> None:
        """The 507 for a job whose KV would not fit the model's budget even alone (one that
        fits waits in the queue until the running rows leave it room)."""
        budget = self.kv_budget
        if budget is None:
            return
        for job in jobs:
            needed = budget.alone(job, self.context_length)
            if needed > budget.bytes:
                raise InsufficientMemory(
                    f"The request's KV cache (its prompt and max_tokens, {job.n} "
                    f"sequence(s)) needs about {format_bytes(needed)}, more than the "
                    f"{format_bytes(budget.bytes)} that '{self.name}' may hold "
                    "(TURSI_KV_CACHE); lower max_tokens or n",
                    {"needed_bytes": needed, "budget_bytes": budget.bytes},
                )

    def submit_all(self, jobs: list[GenerationJob]) -> None:
        """Queue the jobs of one request together, or refuse them all: each choice takes a
        row, and max_batch rows running + max_queue waiting are all there is (a 503 when
        they are taken now, a 400 when the request needs more than that)."""
        capacity = self.max_batch + self.max_queue
        rows = sum(job.n for job in jobs)
        self._refuse_beyond_kv_budget(jobs)
        if rows > capacity:
            raise InvalidRequest(
                f"The request needs {rows} sequences; '{self.name}' admits at most "
                f"{capacity} ({self.max_batch} running, {self.max_queue} waiting)",
                {"sequences": rows, "max_batch": self.max_batch, "max_queue": self.max_queue},
            )
        with self._lock:
            if self._stopping:
                raise self._refusal()
            self._refuse_when_full(rows)
            now = time.monotonic()
            for job in jobs:
                self._admitted[job] = None
                job.engine_failure = self.failure
                job.submitted = now
                if self.request_timeout is not None:
                    job.timeout = self.request_timeout
                    job.deadline = now + self.request_timeout
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
            if self._released and exited is not None:  # the thread already ended (it died)
                exited.put(True)

    def _die(self, reason: str) -> None:
        """Mark the worker dead (from any thread): end every job it admitted with
        `model_failed`, refuse new ones, tell the manager. Only the first reason counts."""
        failure = ModelFailed(
            f"The engine of model '{self.name}' stopped: {reason}. Load the model again",
            {"model": self.name, "reason": reason},
        )
        with self._lock:
            if self._failure is not None:
                return
            self._failure, self._stopping = failure, True
            self._inbox.put(_STOP)  # a thread blocked on an empty inbox wakes up and exits
            jobs = list(self._admitted)
        log.error("model %s failed: %s", self.name, reason)
        for job in jobs:
            job.abandon(failure)
        if self._on_failure is not None:
            self._on_failure(self, reason)

    # --- worker thread ------------------------------------------------------------------

    def _job_done(self, job: GenerationJob, seconds: float, ok: bool) -> None:
        self.stats.record(job.tokens_generated, seconds, ok)
        with self._lock:
            self._admitted.pop(job, None)

    def _run(self) -> None:
        try:
            self._serve()
        except BaseException as exc:  # nothing may end this thread silently: clients wait on it
            log.critical("the engine thread of %s crashed", self.name, exc_info=True)
            # The type only: the traceback (logged above) has the message, which may name
            # the server's files; clients see the reason (ModelFailed, GET /models).
            self._die(f"its thread crashed ({type(exc).__name__})")
        finally:
            self._release()

    def _serve(self) -> None:
        scheduler = self._scheduler
        while not self._stopping:
            if scheduler.idle:
                self._report_sizes(0, 0)
            if not self._take_jobs(block=scheduler.idle):
                break
            self._turn_started = time.monotonic()
            try:
                scheduler.turn()
            except Exception as exc:  # a model error ends the batch, not the worker
                log.exception("generation failed on %s", self.name)
                scheduler.fail_all(GenerationFailed(f"Generation failed: {type(exc).__name__}"))
            finally:
                self._turn_started = None
            self._report_sizes(*self.counts())

    def _report_sizes(self, running: int, waiting: int) -> None:
        """Move the batch and prefix cache gauges, unless stopped or dead: the manager zeroed
        them then, and a reload's worker may own them already."""
        cache = self._scheduler.prefix_cache
        with self._lock:
            if not self._stopping:
                self.stats.batch_sizes(running, waiting)
                if cache.evictions or cache.bytes_held != self._cache_bytes:
                    self.stats.prefix_cache(cache.bytes_held, cache.evictions)
                    cache.evictions, self._cache_bytes = 0, cache.bytes_held
                batch = self._scheduler.cache
                self.stats.kv_cache(batch.used_bytes(), batch.reserved_bytes)

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
        while True:
            try:
                job = self._inbox.get_nowait()
            except Empty:
                break
            if isinstance(job, GenerationJob):
                self._scheduler.add(job)
        error = self._refusal()
        try:
            self._scheduler.close(error)
        except Exception:  # a dead engine's state may be broken: end its jobs below
            log.exception("closing the engine of %s failed", self.name)
        with self._lock:
            leftovers = list(self._admitted)
            self._admitted.clear()
        for job in leftovers:  # none unless closing failed: nobody may wait on a gone thread
            job.abandon(error)
        self.loaded = None
        # The scheduler dropped the model and its batch's KV (close); the manager dropped
        # this worker before stopping it. Collect, then give the freed memory back.
        release_memory()
        with self._lock:
            self._released = True
            exited = self._exited
        if exited is not None:
            exited.put(True)


def _refusal(exc: Exception) -> str:
    """Why a chat template refused messages, for the client: a template's own words (its
    raise_exception, jinja2's errors about the template), else only the exception's type;
    a Python error's text is no message for a client. The log keeps it (debug)."""
    from jinja2 import TemplateError

    log.debug("a chat template refused the messages: %r", exc)
    if isinstance(exc, TemplateError):
        return str(exc)
    return f"it failed with {type(exc).__name__}"


def kv_budget(loaded: LoadedModel, limits: BatchLimits) -> KVBudget | None:
    """The model's KV budget: TURSI_KV_CACHE, or what the model can use when that is less
    (max_batch rows at its whole context, and one prompt's prefill beside them)."""
    if limits.kv_cache_bytes is None:
        return None
    token_bytes = measure_token_bytes(loaded.model, loaded.device)
    context = loaded.context_length
    usable = (limits.max_batch * (context + 1) + context) * token_bytes
    return KVBudget(min(limits.kv_cache_bytes, usable), token_bytes)
