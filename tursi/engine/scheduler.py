"""Continuous batching: one loop per loaded model, on the model's native thread.

Each turn of the loop:
1. takes newly submitted jobs from the inbox (blocking only when there is nothing to do);
2. ends jobs that were cancelled (client gone) or ran past their deadline;
3. runs one prefill chunk: waiting prompts, oldest first, are prefilled together as one
   left-padded batch of at most PREFILL_TOKENS (padded) tokens; a longer prompt is prefilled
   alone, PREFILL_TOKENS columns per turn. When a prefill completes, each request samples
   its first token and joins the running batch;
4. runs one decode step for every running request: one token each, one forward pass,
   each row at its own position in the BatchCache, each with its own sampling settings.
A request leaves the batch at the step where it finishes (end of sequence, stop string,
max_tokens, cancel, deadline). So a running stream waits at most one prefill chunk per
token, and a new request waits at most for the prefills queued before it.
"""

from __future__ import annotations

import collections
import logging
import time
from collections.abc import Callable
from dataclasses import dataclass
from typing import Any

import torch
from transformers import DynamicCache

from ..errors import GenerationFailed, RequestTimeout, TursiError
from ..telemetry import ModelStats
from .decode import decode_logits
from .detokenize import IncrementalDecoder
from .jobs import Failed, Finished, GenerationJob, TextChunk
from .kvcache import BatchCache
from .loading import LoadedModel, num_layers
from .sampling import TokenChooser, choose_tokens
from .stopping import StopMatcher

log = logging.getLogger(__name__)

PREFILL_TOKENS = 512


@dataclass(eq=False)
class Sequence:
    """A job's decoding state while it is being prefilled or decoded."""

    job: GenerationJob
    chooser: TokenChooser
    decoder: IncrementalDecoder
    matcher: StopMatcher
    started: float
    next_token: int = -1


class _Prefill:
    """A group of prompts prefilled together: left-padded, processed in column chunks."""

    def __init__(self, seqs: list[Sequence], device: torch.device, pad_id: int):
        self.seqs = seqs
        lengths = [len(s.job.prompt_ids) for s in seqs]
        self.width = max(lengths)
        self.starts = [self.width - n for n in lengths]
        ids = torch.full((len(seqs), self.width), pad_id, dtype=torch.long)
        mask = torch.zeros((len(seqs), self.width), dtype=torch.long)
        for row, (seq, start) in enumerate(zip(seqs, self.starts, strict=False)):
            ids[row, start:] = torch.tensor(seq.job.prompt_ids)
            mask[row, start:] = 1
        self.ids, self.mask = ids.to(device), mask.to(device)
        self.positions = (self.mask.cumsum(-1) - 1).clamp(min=0)
        self.chunk = max(1, PREFILL_TOKENS // len(seqs))
        self.done = 0
        self.cache = DynamicCache()

    def step(self, model: Any) -> torch.Tensor | None:
        """Run the next chunk; returns the last column's logits once the prompts are done."""
        end = min(self.done + self.chunk, self.width)
        out = model(
            input_ids=self.ids[:, self.done : end],
            attention_mask=self.mask[:, :end],
            position_ids=self.positions[:, self.done : end],
            past_key_values=self.cache,
            use_cache=True,
            logits_to_keep=1,
        )
        self.done = end
        return out.logits[:, -1] if end == self.width else None


class Scheduler:
    """Owns the running batch of one model. Only the model's thread calls it."""

    def __init__(
        self,
        name: str,
        loaded: LoadedModel,
        max_batch: int,
        on_done: Callable[[GenerationJob, float, bool], None],
        stats: ModelStats | None = None,
    ):
        self.name = name
        self.stats = stats or ModelStats(name)
        self.loaded = loaded
        self.max_batch = max_batch
        # called once per job when it ends: (job, seconds since its prefill began, ok)
        self.on_done = on_done
        self.waiting: collections.deque[GenerationJob] = collections.deque()
        self.rows: list[Sequence] = []  # row i of self.cache belongs to rows[i]
        self.prefill: _Prefill | None = None
        # Every job taken from `waiting` and not yet ended (prefilling, being handed to the
        # batch, or decoding), in one place, so that whatever raises, fail_all ends them all.
        self.live: dict[Sequence, None] = {}
        attention = getattr(loaded.model.config, "_attn_implementation", "sdpa")
        self.cache = BatchCache(
            num_layers(loaded.model.config), loaded.context_length, boolean_mask=attention == "sdpa"
        )
        tokenizer = loaded.tokenizer
        self.pad_id = tokenizer.pad_token_id if tokenizer.pad_token_id is not None else 0

    @property
    def running(self) -> int:
        return len(self.live)

    @property
    def idle(self) -> bool:
        return not self.rows and not self.waiting and self.prefill is None

    def add(self, job: GenerationJob) -> None:
        self.waiting.append(job)

    def turn(self) -> None:
        """One turn of the loop (steps 2-4 in the module docstring)."""
        self._drop_ended_waiting()
        with torch.inference_mode():
            if self.prefill is None and self.waiting and len(self.rows) < self.max_batch:
                self.prefill = self._start_prefill()
            if self.prefill is not None:
                self._prefill_step()
            self._drop_ended_rows()
            if self.rows:
                self._decode_step()

    def fail_all(self, error: TursiError) -> None:
        """End every job this scheduler holds with `error` (unload, engine failure)."""
        self.rows, self.prefill = [], None
        self.cache.clear()
        for seq in list(self.live):
            self._fail(seq, error)
        while self.waiting:
            job = self.waiting.popleft()
            job.events.put(Failed(error))
            self.on_done(job, 0.0, False)

    def close(self, error: TursiError) -> None:
        """End every job and drop the model (the worker is exiting)."""
        try:
            self.fail_all(error)
        finally:
            self.loaded = None

    # --- admission and ending ---------------------------------------------------------------

    def _drop_ended_waiting(self) -> None:
        keep: collections.deque[GenerationJob] = collections.deque()
        for job in self.waiting:
            reason = _ended(job)
            if reason is None:
                keep.append(job)
                continue
            if reason == "timeout":
                job.events.put(Failed(_timeout(job)))
            self.on_done(job, 0.0, reason != "timeout")
        if len(keep) != len(self.waiting):
            self.waiting = keep

    def _drop_ended_rows(self) -> None:
        for row in range(len(self.rows) - 1, -1, -1):
            seq = self.rows[row]
            reason = _ended(seq.job)
            if reason is None:
                continue
            self._remove_row(row)
            self._end(seq, reason)

    def _remove_row(self, row: int) -> None:
        self.cache.remove_row(row)
        last = self.rows.pop()
        if row < len(self.rows):
            self.rows[row] = last

    # --- prefill --------------------------------------------------------------------------

    def _start_prefill(self) -> _Prefill:
        room = self.max_batch - len(self.rows)
        seqs: list[Sequence] = []
        width = 0
        while self.waiting and len(seqs) < room:
            job = self.waiting[0]
            new_width = max(width, len(job.prompt_ids))
            if seqs and new_width * (len(seqs) + 1) > PREFILL_TOKENS:
                break
            seq = self._sequence(job)  # before the job leaves `waiting`: it may raise
            self.waiting.popleft()
            self.live[seq] = None
            width = new_width
            seqs.append(seq)
        return _Prefill(seqs, self.loaded.device, self.pad_id)

    def _sequence(self, job: GenerationJob) -> Sequence:
        params = job.params
        return Sequence(
            job,
            TokenChooser(params, job.prompt_ids),
            IncrementalDecoder(self.loaded.tokenizer, job.prompt_ids),
            StopMatcher(list(params.stop)),
            time.perf_counter(),
        )

    def _prefill_step(self) -> None:
        prefill = self.prefill
        assert prefill is not None
        logits = prefill.step(self.loaded.model)
        if logits is None:
            return
        tokens = choose_tokens(logits, [seq.chooser for seq in prefill.seqs])
        # If anything below raises (add_row allocates), the jobs not yet in the batch are
        # still in self.live: the worker's fail_all ends them with the rest.
        self.prefill = None
        for row, seq in enumerate(prefill.seqs):
            reason = _ended(seq.job)
            if reason is not None:
                self._end(seq, reason)
            elif not self._accept(seq, tokens[row]):
                length = len(seq.job.prompt_ids)
                self.cache.add_row(prefill.cache, row, prefill.starts[row], length)
                self.rows.append(seq)

    # --- decode ---------------------------------------------------------------------------

    def _decode_step(self) -> None:
        device = self.loaded.device
        ids = torch.tensor([[seq.next_token] for seq in self.rows], device=device)
        logits = decode_logits(self.loaded.model, ids, self.cache)
        tokens = choose_tokens(logits, [seq.chooser for seq in self.rows])
        for row in range(len(self.rows) - 1, -1, -1):
            if self._accept(self.rows[row], tokens[row]):
                self._remove_row(row)

    def _accept(self, seq: Sequence, token: int) -> bool:
        """Take the next token of `seq` and send its text; True when the job has ended."""
        job = seq.job
        now = time.monotonic()
        if job.tokens_generated == 0:
            self.stats.first_token(now - job.submitted)
        else:
            self.stats.inter_token(now - job.last_token)
        job.last_token = now
        try:
            job.tokens_generated += 1
            reason = None
            if token in self.loaded.eos_ids and not job.params.ignore_eos:
                reason = self._finish(seq, seq.decoder.flush(), "stop")
            elif self._emit(seq, seq.decoder.push(token)):
                reason = "stop"
            elif job.tokens_generated >= job.params.max_tokens:
                reason = self._finish(seq, seq.decoder.flush(), "length")
        except Exception as exc:  # one request's failure must not end the batch
            log.exception("detokenizing failed on %s", self.name)
            self._fail(seq, GenerationFailed(f"Generation failed: {type(exc).__name__}"))
            return True
        if reason is None:
            seq.next_token = token
            seq.chooser.remember(token)
            return False
        finished = Finished(job.tokens_generated, time.perf_counter() - seq.started, reason)
        self._done(seq, True)  # counted before the client hears of it
        job.events.put(finished)
        return True

    @staticmethod
    def _emit(seq: Sequence, piece: str) -> bool:
        """Send what the stop matcher releases; True when a stop string was hit."""
        check = seq.matcher.feed(piece)
        if check.text:
            seq.job.events.put(TextChunk(check.text))
        return check.stopped

    def _finish(self, seq: Sequence, tail: str, reason: str) -> str:
        """End of generation: release the decoder's and the matcher's held-back text."""
        if self._emit(seq, tail):
            return "stop"
        rest = seq.matcher.flush()
        if rest:
            seq.job.events.put(TextChunk(rest))
        return reason

    def _end(self, seq: Sequence, reason: str) -> None:
        """A started job ended from outside: its deadline passed or it was cancelled."""
        if reason == "timeout":
            self._fail(seq, _timeout(seq.job))
        else:
            self._done(seq, True)

    def _fail(self, seq: Sequence, error: TursiError) -> None:
        seq.job.events.put(Failed(error))
        self._done(seq, False)

    def _done(self, seq: Sequence, ok: bool) -> None:
        """A job left (a client that went away counts as ok: nothing failed here). The
        worker's admitted count drops before `running` does, so that no reader ever sees the
        job as waiting."""
        self.on_done(seq.job, time.perf_counter() - seq.started, ok)
        del self.live[seq]


def _ended(job: GenerationJob) -> str | None:
    if job.cancelled:
        return "cancelled"
    if job.deadline is not None and time.monotonic() >= job.deadline:
        return "timeout"
    return None


def _timeout(job: GenerationJob) -> RequestTimeout:
    return RequestTimeout(
        f"The request ran past its deadline of {job.timeout:g} s (TURSI_REQUEST_TIMEOUT)",
        {"timeout_seconds": job.timeout, "tokens_generated": job.tokens_generated},
    )
