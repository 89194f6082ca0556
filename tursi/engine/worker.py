"""One native OS thread per loaded model: it owns the model and runs every decode step.

Jobs arrive on a native queue; tokens leave through each job's Channel. Jobs run one at a
time here; the loop is written as prefill + single-token steps over an explicit KV cache
so that a batching scheduler can replace `_serve` without touching the HTTP side.
"""
from __future__ import annotations

import gc
import logging
import time
from typing import Any

from ..errors import ContextLengthExceeded, GenerationFailed, InvalidRequest, ModelUnloaded
from ..telemetry import ModelStats
from .detokenize import IncrementalDecoder
from .jobs import Failed, Finished, GenerationJob, GenerationParams, TextChunk
from .loader import LoadedModel
from .sampling import TokenChooser
from .stopping import StopMatcher
from .threads import Channel, SimpleQueue, native_lock, start_native_thread

log = logging.getLogger(__name__)

DEFAULT_MAX_TOKENS = 100
_STOP = object()


class ModelWorker:
    def __init__(self, name: str, loaded: LoadedModel, stats: ModelStats):
        self.name = name
        self.loaded: LoadedModel | None = loaded
        self.stats = stats
        self.context_length = loaded.context_length
        self.running = 0
        self._inbox: SimpleQueue = SimpleQueue()
        self._lock = native_lock()
        self._stopping = False
        self._exited: Channel | None = None

    # --- request side (any thread or greenlet) ------------------------------------------

    def start(self) -> None:
        start_native_thread(self._run)

    @property
    def waiting(self) -> int:
        return self._inbox.qsize()

    def new_job(self, prompt: str, *, max_tokens: int | None, max_tokens_cap: int,
                temperature: float, top_p: float, stop: list[str],
                seed: int | None) -> GenerationJob:
        """Tokenize and check a request against the context window; raise 400s here."""
        loaded = self.loaded
        if loaded is None or self._stopping:
            raise ModelUnloaded(f"Model '{self.name}' was unloaded")
        prompt_ids = loaded.tokenizer(prompt)["input_ids"]
        if not prompt_ids:
            raise InvalidRequest("The prompt is empty once tokenized", {"field": "prompt"})
        room = self.context_length - len(prompt_ids)
        numbers = {"prompt_tokens": len(prompt_ids), "context_length": self.context_length,
                   "max_tokens_limit": max_tokens_cap}
        if room < 1:
            raise ContextLengthExceeded(
                f"The prompt ({len(prompt_ids)} tokens) fills the context length of "
                f"'{self.name}' ({self.context_length} tokens)", numbers)
        if max_tokens is None:
            max_tokens = min(DEFAULT_MAX_TOKENS, max_tokens_cap, room)
        elif max_tokens > max_tokens_cap:
            raise InvalidRequest(f"max_tokens={max_tokens} is above this server's limit of "
                                 f"{max_tokens_cap}", {**numbers, "max_tokens": max_tokens})
        if max_tokens > room:
            raise ContextLengthExceeded(
                f"The prompt ({len(prompt_ids)} tokens) plus max_tokens ({max_tokens}) exceeds "
                f"the context length of '{self.name}' ({self.context_length} tokens)",
                {**numbers, "max_tokens": max_tokens})
        params = GenerationParams(max_tokens, temperature, top_p, tuple(stop), seed)
        return GenerationJob(prompt_ids, params)

    def submit(self, job: GenerationJob) -> None:
        with self._lock:
            if self._stopping:
                raise ModelUnloaded(f"Model '{self.name}' was unloaded")
            self._inbox.put(job)

    def stop(self) -> Channel:
        """Ask the thread to finish: jobs in flight or queued end with `model_unloaded`.
        The returned channel gets one item once the model's memory has been released."""
        exited = Channel()
        with self._lock:
            self._stopping = True
            self._exited = exited
            self._inbox.put(_STOP)
        return exited

    # --- worker thread ------------------------------------------------------------------

    def _run(self) -> None:
        try:
            while True:
                job = self._inbox.get()
                if job is _STOP:
                    break
                self._serve(job)
        finally:
            self._release()

    def _release(self) -> None:
        while True:
            try:
                job = self._inbox.get_nowait()
            except Exception:
                break
            if isinstance(job, GenerationJob):
                job.events.put(Failed(ModelUnloaded(f"Model '{self.name}' was unloaded")))
        self.loaded = None
        gc.collect()
        import torch
        if torch.cuda.is_available():
            torch.cuda.empty_cache()
        if self._exited is not None:
            self._exited.put(True)

    def _serve(self, job: GenerationJob) -> None:
        if job.cancelled:
            return
        self.running = 1
        started = time.perf_counter()
        ok = True
        try:
            reason = self._decode(job)
            job.events.put(Finished(job.tokens_generated, time.perf_counter() - started, reason))
        except ModelUnloaded as exc:
            ok = False
            job.events.put(Failed(exc))
        except Exception as exc:  # a model error must end this job, not the worker
            log.exception("generation failed on %s", self.name)
            ok = False
            job.events.put(Failed(GenerationFailed(f"Generation failed: {type(exc).__name__}")))
        finally:
            self.stats.record(job.tokens_generated, time.perf_counter() - started, ok)
            self.running = 0

    def _decode(self, job: GenerationJob) -> str:
        """Prefill the prompt, then one token per step; returns the finish reason."""
        import torch
        loaded = self.loaded
        assert loaded is not None
        params = job.params
        choose = TokenChooser(params.temperature, params.top_p, params.seed)
        decoder = IncrementalDecoder(loaded.tokenizer, job.prompt_ids)
        matcher = StopMatcher(list(params.stop))
        with torch.inference_mode():
            logits, cache = self._forward(loaded, job.prompt_ids, None)
            while True:
                if self._stopping:
                    raise ModelUnloaded(f"Model '{self.name}' was unloaded during generation")
                if job.cancelled:
                    return "cancelled"
                token = choose(logits)
                job.tokens_generated += 1
                if token in loaded.eos_ids:
                    return self._finish(job, decoder.flush(), matcher, "stop")
                if self._emit(job, matcher, decoder.push(token)):
                    return "stop"
                if job.tokens_generated >= params.max_tokens:
                    return self._finish(job, decoder.flush(), matcher, "length")
                logits, cache = self._forward(loaded, [token], cache)

    @staticmethod
    def _emit(job: GenerationJob, matcher: StopMatcher, piece: str) -> bool:
        """Send what the stop matcher releases; True when a stop string was hit."""
        check = matcher.feed(piece)
        if check.text:
            job.events.put(TextChunk(check.text))
        return check.stopped

    def _finish(self, job: GenerationJob, tail: str, matcher: StopMatcher, reason: str) -> str:
        """End of generation: release the decoder's and the matcher's held-back text."""
        if self._emit(job, matcher, tail):
            return "stop"
        rest = matcher.flush()
        if rest:
            job.events.put(TextChunk(rest))
        return reason

    @staticmethod
    def _forward(loaded: LoadedModel, ids: list[int], cache: Any) -> tuple[Any, Any]:
        import torch
        input_ids = torch.tensor([ids], device=loaded.device)
        out = loaded.model(input_ids=input_ids, past_key_values=cache, use_cache=True,
                           logits_to_keep=1)
        return out.logits[0, -1], out.past_key_values
