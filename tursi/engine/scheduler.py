"""Continuous batching: one loop per loaded model, on the model's native thread.

Each turn of the loop:
1. takes newly submitted jobs from the inbox (blocking only when there is nothing to do);
2. ends jobs that were cancelled (client gone) or ran past their deadline, whether waiting
   or prefilling (a prefill none of whose jobs is left is dropped before its next chunk);
3. runs one prefill chunk: waiting prompts, oldest first, are prefilled together as one
   left-padded batch of at most PREFILL_TOKENS (padded) tokens; a longer prompt is prefilled
   alone, PREFILL_TOKENS columns per turn. When a prefill completes, each choice of each job
   samples its first token and joins the running batch: a job of n choices is one prefill
   row whose cache is copied into n rows of the batch. A prompt's prefill starts after the
   blocks of it that the model's prefix cache holds (tursi.engine.prefix_cache), and its
   blocks are kept there when its prefill ends and, with its generated tokens, when it
   leaves the batch;
4. runs one decode step for every running choice: one token each, one forward pass,
   each row at its own position in the BatchCache, each with its own sampling settings.
A choice leaves the batch at the step where it finishes (end of sequence, stop token, stop
string, max_tokens, or its grammar complete for structured output); a job ends when all of
its choices have, or at once when it is cancelled or runs past its deadline. So a running
stream waits at most one prefill chunk per token, a new request waits at most for the
prefills queued before it, and a job whose client left or whose deadline passed costs at
most one more chunk of prefill (a long prompt's prefill is checked before each of its
chunks, not only when it completes).
"""

from __future__ import annotations

import collections
import logging
import time
from collections.abc import Callable
from dataclasses import dataclass, field
from typing import Any

import torch

from ..errors import GenerationFailed, RequestTimeout, TursiError
from ..telemetry import ModelStats
from .constraints import GrammarError
from .decode import decode_logits, step_logits
from .detokenize import IncrementalDecoder
from .jobs import Failed, Finished, GenerationJob, PromptLogprobs, TextChunk, TokenLogprob
from .kvcache import BatchCache, KVBudget, PrefillCache
from .loading import LoadedModel, num_layers
from .prefix_cache import BLOCK_TOKENS, Block, PrefixCache, place, read_rows
from .sampling import TokenChooser, choose_tokens, score, token_logprobs
from .speculation import DraftState, SpeculationSettings, Speculator
from .stopping import StopMatcher

log = logging.getLogger(__name__)

PREFILL_TOKENS = 512


@dataclass(eq=False)
class Sequence:
    """One choice of a job: its decoding state, and a row of the batch once prefilled."""

    job: GenerationJob
    index: int  # the choice's index in the request's answer
    chooser: TokenChooser
    decoder: IncrementalDecoder
    matcher: StopMatcher
    next_token: int = -1
    tokens: int = 0  # generated so far (max_tokens counts per choice)
    last_token: float = 0.0  # time.monotonic() of its latest token
    cumulative_logprob: float = 0.0
    chars: int = 0  # characters of text the decoder has given so far
    fed: list[int] = field(default_factory=list)  # generated tokens run through the model
    sent: int = 0  # characters of text sent
    # (characters of text up to the token's end, its logprob entry), not yet sent: an entry
    # goes with the chunk that completes its token's text
    entries: collections.deque[tuple[int, TokenLogprob]] = field(default_factory=collections.deque)
    draft: DraftState | None = None  # speculative decoding's state, from its first draft


@dataclass(eq=False)
class Live:
    """A job taken from the queue and not yet ended: its choices, and when its prefill began."""

    job: GenerationJob
    choices: list[Sequence]
    started: float
    running: int  # choices not yet finished
    cached: int = 0  # prompt tokens whose KV came from the prefix cache


class _Prefill:
    """A group of prompts prefilled together, processed in column chunks. Rows whose job
    asks for prompt_logprobs are scored chunk by chunk (the group's forward then keeps the
    logits of every column, not just the last).

    Columns: [0, past) hold the KV of each row's prefix cache hit, right-aligned (`chains`:
    each row's cached blocks, maybe none); [past, width) the rest of each prompt,
    left-padded. So a row with a shorter hit or prompt has masked columns on the left of
    both parts; positions count only its unmasked columns. `columns[row]`: where each of the
    row's prompt tokens sits, in order (what the batch and the prefix cache copy)."""

    def __init__(
        self,
        jobs: list[GenerationJob],
        chains: list[list[Block]],
        layers: int,
        device: torch.device,
        pad_id: int,
    ):
        self.jobs = jobs
        hits = [len(chain) * BLOCK_TOKENS for chain in chains]
        rests = [len(job.prompt_ids) - hit for job, hit in zip(jobs, hits, strict=True)]
        self.past = max(hits)
        self.width = self.past + max(rests)
        self.starts = [self.width - rest for rest in rests]  # each row's first new column
        ids = torch.full((len(jobs), self.width), pad_id, dtype=torch.long)
        mask = torch.zeros((len(jobs), self.width), dtype=torch.long)
        self.columns: list[torch.Tensor] = []
        for row, (job, hit, start) in enumerate(zip(jobs, hits, self.starts, strict=True)):
            ids[row, start:] = torch.tensor(job.prompt_ids[hit:])
            mask[row, self.past - hit : self.past] = 1
            mask[row, start:] = 1
            self.columns.append(mask[row].nonzero().view(-1).to(device))
        self.ids, self.mask = ids.to(device), mask.to(device)
        self.positions = (self.mask.cumsum(-1) - 1).clamp(min=0)
        self.chunk = max(1, PREFILL_TOKENS // len(jobs))
        self.done = self.past
        self.cache = PrefillCache(layers, len(jobs), self.width)
        place(chains, self.past, self.cache)
        self.prompt_logprobs: list[list[TokenLogprob] | None] = [
            [] if job.params.prompt_logprobs is not None else None for job in jobs
        ]

    def step(self, model: Any) -> torch.Tensor | None:
        """Run the next chunk; returns the last column's logits once the prompts are done."""
        end = min(self.done + self.chunk, self.width)
        scoring = any(entries is not None for entries in self.prompt_logprobs)
        out = model(
            input_ids=self.ids[:, self.done : end],
            attention_mask=self.mask[:, :end],
            position_ids=self.positions[:, self.done : end],
            past_key_values=self.cache,
            use_cache=True,
            logits_to_keep=0 if scoring else 1,  # 0: all columns
        )
        self.cache.advance(end - self.done)
        for row, entries in enumerate(self.prompt_logprobs):
            if entries is not None:
                entries.extend(self._score(row, out.logits[row], end))
        self.done = end
        return out.logits[:, -1] if end == self.width else None

    def _score(self, row: int, logits: torch.Tensor, end: int) -> list[TokenLogprob]:
        """The prompt tokens that this chunk's columns [done, end) of `row` predict: the
        logits at column c score the token at c + 1 (the last column's predict the first
        new token, not a prompt token)."""
        first, last = max(self.done, self.starts[row]), min(end, self.width - 1)
        if first >= last:
            return []
        targets = self.ids[row, first + 1 : last + 1].tolist()
        top = self.jobs[row].params.prompt_logprobs or 0
        return score(logits[first - self.done : last - self.done], targets, [top] * len(targets))


class Scheduler:
    """Owns the running batch of one model. Only the model's thread calls it."""

    def __init__(
        self,
        name: str,
        loaded: LoadedModel,
        max_batch: int,
        on_done: Callable[[GenerationJob, float, bool], None],
        stats: ModelStats | None = None,
        prefix_cache_bytes: int = 0,
        kv_budget: KVBudget | None = None,
        speculation: SpeculationSettings | None = None,
    ):
        self.name = name
        self.speculation = speculation or SpeculationSettings()
        self.speculator = Speculator(self.speculation)
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
        self.live: dict[GenerationJob, Live] = {}
        attention = getattr(loaded.model.config, "_attn_implementation", "sdpa")
        self.kv_budget = kv_budget
        self.cache = BatchCache(
            num_layers(loaded.model.config),
            loaded.context_length,
            boolean_mask=attention == "sdpa",
            limit_bytes=kv_budget.bytes if kv_budget else None,
        )
        tokenizer = loaded.tokenizer
        self.pad_id = tokenizer.pad_token_id if tokenizer.pad_token_id is not None else 0
        self.prefix_cache = PrefixCache(prefix_cache_bytes)

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
        self._drop_ended_prefill()
        with torch.inference_mode():
            if self.prefill is None and self.waiting and self.waiting[0].n <= self._free_rows():
                self.prefill = self._start_prefill()  # None: the KV budget is full
            if self.prefill is not None:
                self._prefill_step()
            self._drop_ended_rows()
            if self.rows:
                self._decode_step()

    def fail_all(self, error: TursiError) -> None:
        """End every job this scheduler holds with `error` (unload, engine failure)."""
        self.rows, self.prefill = [], None
        self.cache.clear()
        for live in list(self.live.values()):
            self._fail(live, error)
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

    def _free_rows(self) -> int:
        """Rows of the batch not taken by running choices (a prefill runs only when none is
        in progress, so nothing else holds rows)."""
        return self.max_batch - len(self.rows)

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

    def _drop_ended_prefill(self) -> None:
        """End the prefilling jobs that were cancelled or ran past their deadline, before the
        prefill's next chunk; drop the prefill (its cache) once none of its jobs is left, so
        that the next waiting prompt starts in this same turn. Only a lone prompt spans
        several turns (a group's padded prompts fit one chunk), so a prompt longer than
        PREFILL_TOKENS costs a client that left at most the one chunk that was running."""
        prefill = self.prefill
        if prefill is None:
            return
        for job in prefill.jobs:
            reason = _ended(job) if job in self.live else None
            if reason is not None:
                self._end(self.live[job], reason)
        if not any(job in self.live for job in prefill.jobs):
            self.prefill = None

    def _drop_ended_rows(self) -> None:
        """End the running jobs that were cancelled or ran past their deadline, all of their
        choices at once."""
        ended: dict[GenerationJob, str] = {}
        for seq in self.rows:
            reason = ended.get(seq.job) or _ended(seq.job)
            if reason is not None:
                ended[seq.job] = reason
        if ended:
            self._remove_rows(lambda seq: seq.job in ended)
            for job, reason in ended.items():
                self._end(self.live[job], reason)

    def _remove_rows(self, leaving: Callable[[Sequence], bool]) -> None:
        for row in range(len(self.rows) - 1, -1, -1):
            if leaving(self.rows[row]):
                self._remove_row(row)

    def _remove_row(self, row: int) -> None:
        """Drop a row of the batch; the prefix cache keeps the whole blocks of its prompt
        and the tokens generated after it (a conversation's next turn starts with them)."""
        seq = self.rows[row]
        if self._caching(seq.job):
            length = self.cache.lengths[row]
            columns = torch.arange(length, device=self.loaded.device)
            self._store(seq.job.prompt_ids + seq.fed, length, self.cache.layers, row, columns)
        self.cache.remove_row(row)
        last = self.rows.pop()
        if row < len(self.rows):
            self.rows[row] = last

    # --- prefill --------------------------------------------------------------------------

    def _start_prefill(self) -> _Prefill | None:
        """The next prefill group: waiting jobs, oldest first, while their choices fit the
        free rows and the KV budget, and their padded prompts, less what the prefix cache
        holds of them, fit PREFILL_TOKENS. A prompt whose first uncached block is one an
        earlier prompt of the group will store waits for the next group, which finds that
        block cached: prompts that arrive together with a shared prefix prefill it once.
        None when the oldest job does not fit the KV budget yet (it waits for rows to end)."""
        room = self._free_rows()
        jobs: list[GenerationJob] = []
        chains: list[list[Block]] = []
        storing: set[tuple] = set()
        width = 0
        while self.waiting and self.waiting[0].n <= room:
            job = self.waiting[0]
            chain = self._lookup(job)
            new_width = max(width, len(job.prompt_ids) - len(chain) * BLOCK_TOKENS)
            if jobs and new_width * (len(jobs) + 1) > PREFILL_TOKENS:
                break
            if not self._kv_fits([*jobs, job]):
                break
            if self._caching(job):
                missing = self.prefix_cache.first_missing(job.prompt_ids, chain)
                if missing in storing:
                    break
                if missing is not None:
                    storing.add(missing)
            live = self._live(job)  # before the job leaves `waiting`: it may raise
            self.waiting.popleft()
            live.cached = len(chain) * BLOCK_TOKENS
            self.live[job] = live
            if self._caching(job):
                self.stats.prefix_lookup(len(job.prompt_ids), live.cached)
            width, room = new_width, room - job.n
            jobs.append(job)
            chains.append(chain)
        if not jobs:
            return None
        layers = num_layers(self.loaded.model.config)
        return _Prefill(jobs, chains, layers, self.loaded.device, self.pad_id)

    def _kv_fits(self, group: list[GenerationJob]) -> bool:
        """Whether the running rows and `group`'s choices, each grown to the most it may
        (KVBudget.columns), fit the KV budget next to the group's own prefill cache. The
        batch's buffers are a rectangle, so every row counts at the longest one."""
        budget = self.kv_budget
        if budget is None:
            return True
        context = self.loaded.context_length
        longest = max(budget.columns(job, context) for job in group)
        if self.rows:
            longest = max(longest, max(budget.columns(seq.job, context) for seq in self.rows))
        rows = len(self.rows) + sum(job.n for job in group)
        prefill = len(group) * max(len(job.prompt_ids) for job in group)
        return (rows * longest + prefill) * budget.token_bytes <= budget.bytes

    # --- prefix cache ---------------------------------------------------------------------

    def _caching(self, job: GenerationJob) -> bool:
        return self.prefix_cache.enabled and job.cache_prompt

    def _lookup(self, job: GenerationJob) -> list[Block]:
        """The job's prompt's cached blocks. At least the last prompt token is left to
        prefill (its logits choose the first new token); prompts to be scored take none
        (every prompt token's logits are needed)."""
        if not self._caching(job) or job.params.prompt_logprobs is not None:
            return []
        return self.prefix_cache.match(job.prompt_ids, len(job.prompt_ids) - 1)

    def _store(self, tokens: list[int], length: int, layers: Any, row: int, columns: Any) -> None:
        """Keep the whole blocks of the first `length` of `tokens`, whose KV is row `row` of
        a cache's `layers`, token i at columns[i]."""
        self.prefix_cache.store(tokens, length, read_rows(layers, row, columns))

    def _live(self, job: GenerationJob) -> Live:
        params, tokenizer = job.params, self.loaded.tokenizer
        choices = [
            Sequence(
                job,
                job.index + choice,
                TokenChooser(
                    params, job.prompt_ids, choice, job.matchers[choice] if job.matchers else None
                ),
                IncrementalDecoder(tokenizer, job.prompt_ids),
                StopMatcher(list(params.stop)),
            )
            for choice in range(job.n)
        ]
        return Live(job, choices, time.perf_counter(), job.n)

    def _prefill_step(self) -> None:
        prefill = self.prefill
        assert prefill is not None
        logits = prefill.step(self.loaded.model)
        if logits is None:
            return
        # If anything below raises (add_row allocates), the jobs not yet in the batch are
        # still in self.live: the worker's fail_all ends them with the rest.
        self.prefill = None
        joining = self._first_tokens(prefill, logits)
        # The first tokens are out; what follows is for the second ones: the prefix cache
        # keeps the prompts, and the continuing choices join the batch.
        for row, job in enumerate(prefill.jobs):
            if self._caching(job):
                length = len(job.prompt_ids)
                self._store(job.prompt_ids, length, prefill.cache.layers, row, prefill.columns[row])
        joining = [(row, seq) for row, seq in joining if seq.job in self.live]
        if not joining:
            return
        longest = max(len(prefill.columns[row]) for row, _ in joining)
        # Room for the waiting choices too, as far as the budget goes: they join at the next
        # prefills, and growing the batch's buffers copies every row (one growth rather
        # than two, for a burst).
        rows = min(len(joining) + sum(job.n for job in self.waiting), self._free_rows())
        if self.kv_budget is not None:
            columns = max([longest, *self.cache.lengths]) + 1  # what the rows need now
            fitting = self.kv_budget.bytes // (columns * self.kv_budget.token_bytes)
            rows = max(len(joining), min(rows, fitting - len(self.rows)))
        self.cache.reserve_rows(rows, longest, prefill.cache)
        for row, seq in joining:
            self.cache.add_row(prefill.cache, row, prefill.columns[row])
            self.rows.append(seq)

    def _first_tokens(self, prefill: _Prefill, logits: torch.Tensor) -> list[tuple[int, Sequence]]:
        """Send each choice of the group its first token (and a job its prompt's logprobs);
        returns the (prefill row, choice) pairs that go on."""
        starting: list[tuple[int, Sequence]] = []  # (prefill row, choice)
        for row, job in enumerate(prefill.jobs):
            live = self.live.get(job)
            if live is None:  # ended during the prefill (_drop_ended_prefill)
                continue
            reason = _ended(job)
            if reason is not None:
                self._end(live, reason)
                continue
            entries = prefill.prompt_logprobs[row]
            if entries is not None:
                job.events.put(PromptLogprobs((None, *entries), job.index))
            if job.params.max_tokens == 0:  # the prompt was to be scored, nothing generated
                for seq in live.choices:
                    self._choice_done(seq, "length")
                continue
            starting.extend((row, seq) for seq in live.choices)
        if not starting:
            return []
        first = logits[[row for row, _ in starting]]  # each job's row once per choice
        choosers = [seq.chooser for _, seq in starting]
        tokens = choose_tokens(first, choosers)
        logprobs = token_logprobs(first, tokens, choosers)
        going_on = []
        for (row, seq), token, entry in zip(starting, tokens, logprobs, strict=True):
            if seq.job in self.live and not self._accept(seq, token, entry):
                going_on.append((row, seq))
        return going_on

    # --- decode ---------------------------------------------------------------------------

    def _decode_step(self) -> None:
        started, rows = time.perf_counter(), len(self.rows)
        drafts = self._drafts()
        width = 1 + max(len(draft) for draft in drafts)
        if width > 1:
            self._verify_step(drafts)
        else:
            self._plain_step()
        self.speculator.measured(rows, width, time.perf_counter() - started)

    def _plain_step(self) -> None:
        """One token per row."""
        device = self.loaded.device
        for seq in self.rows:
            seq.fed.append(seq.next_token)
        ids = torch.tensor([[seq.next_token] for seq in self.rows], device=device)
        logits = decode_logits(self.loaded.model, ids, self.cache)
        choosers = [seq.chooser for seq in self.rows]
        tokens = choose_tokens(logits, choosers)
        logprobs = token_logprobs(logits, tokens, choosers)
        for row in range(len(self.rows) - 1, -1, -1):
            seq = self.rows[row]
            if seq.job in self.live and self._accept(seq, tokens[row], logprobs[row]):
                self._remove_row(row)
        self._remove_rows(lambda seq: seq.job not in self.live)  # a sibling choice failed

    # --- speculative decoding (tursi.engine.speculation) -----------------------------------

    def _drafts(self) -> list[list[int]]:
        """Each row's draft for this step ([] for none), as the speculator chooses from the
        rows' proposals: at most TURSI_SPECULATIVE_TOKENS each, within the row's max_tokens
        (a row never runs a token it could not keep), the context and the KV budget's
        columns (every row of a step takes the step's width of columns)."""
        if not self.speculation.enabled:
            return [[] for _ in self.rows]
        context = self.loaded.context_length
        room = context + 1
        if self.kv_budget is not None:
            room = max(self.kv_budget.columns(seq.job, context) for seq in self.rows)
        most = min(self.speculation.tokens, room - max(self.cache.lengths) - 1)
        proposals = []
        for seq in self.rows:
            params = seq.job.params
            limit = min(most, params.max_tokens - seq.tokens - 1)
            if limit <= 0 or not params.speculative:
                proposals.append((0.0, []))
                continue
            if seq.draft is None:
                seq.draft = DraftState(seq.job.prompt_ids)
            draft = seq.draft.draft(seq.fed, seq.next_token, limit)
            proposals.append((seq.draft.keep_rate(self.speculator.keep_rate), draft))
        return self.speculator.choose(proposals)

    def _verify_step(self, drafts: list[list[int]]) -> None:
        """One forward pass over each row's next token and its draft (padded to the longest);
        then, position after position, each row's sampler chooses its token as a step
        without drafts would, and the row goes on to the next position while that token is
        its draft's. A row keeps the drafted tokens so chosen plus the one chosen where it
        parted from its draft; its cache keeps the columns of the tokens it kept (the rest
        are overwritten by later steps, and masked until then)."""
        rows = self.rows
        width = 1 + max(len(draft) for draft in drafts)
        ids = torch.full((len(rows), width), self.pad_id, dtype=torch.long)
        for row, (seq, draft) in enumerate(zip(rows, drafts, strict=True)):
            seq.fed.append(seq.next_token)
            ids[row, : 1 + len(draft)] = torch.tensor([seq.next_token, *draft])
        logits = step_logits(self.loaded.model, ids.to(self.loaded.device), self.cache)
        kept = [0] * len(rows)  # drafted tokens each row keeps
        ended: list[int] = []
        verifying = list(range(len(rows)))
        for column in range(width):
            choosers = [rows[row].chooser for row in verifying]
            here = logits[verifying, column]
            tokens = choose_tokens(here, choosers)
            entries = token_logprobs(here, tokens, choosers)
            going_on = []
            for row, token, entry in zip(verifying, tokens, entries, strict=True):
                seq = rows[row]
                if seq.job not in self.live:
                    continue
                if self._accept(seq, token, entry):
                    ended.append(row)
                elif column < len(drafts[row]) and token == drafts[row][column]:
                    kept[row] += 1
                    going_on.append(row)
            verifying = going_on
            if not verifying:
                break
        for seq, draft, count in zip(rows, drafts, kept, strict=True):
            if draft:
                seq.draft.verified(len(draft), count)
                self.speculator.verified(len(draft), count)
                seq.fed.extend(draft[:count])
        self.stats.speculated(sum(len(draft) for draft in drafts), sum(kept))
        self.cache.advance([1 + count for count in kept])
        for row in sorted(ended, reverse=True):
            self._remove_row(row)
        self._remove_rows(lambda seq: seq.job not in self.live)  # a sibling choice failed

    def _accept(self, seq: Sequence, token: int, entry: TokenLogprob | None) -> bool:
        """Take the next token of choice `seq` and send its text; True when it has ended.
        A constrained choice also ends with "stop" once its grammar is complete (even with
        ignore_eos: nothing but end of sequence could follow); max_tokens reached before
        that ends it with "length", its output cut inside the structure."""
        job = seq.job
        now = time.monotonic()
        if job.tokens_generated == 0:
            self.stats.first_token(now - job.submitted)
        elif seq.tokens:  # a sibling's first token came at the same moment as this one
            self.stats.inter_token(now - seq.last_token)
        seq.last_token = job.last_token = now
        try:
            job.tokens_generated += 1
            seq.tokens += 1
            if entry is not None:
                seq.cumulative_logprob += entry.logprob
            seq.chooser.remember(token)  # penalties and grammar: raises if the grammar refuses
            reason = None
            if self._is_stop_token(job, token) or seq.chooser.ends_output(token):
                if entry is not None:  # scored like any token (lm-eval reads it), no text
                    seq.entries.append((seq.chars, entry))
                reason = self._finish(seq, seq.decoder.flush(), "stop")
            else:
                piece = seq.decoder.push(token)
                seq.chars += len(piece)
                if entry is not None:  # a token inside a character goes with that character
                    seq.entries.append((seq.chars + seq.decoder.incomplete, entry))
                if self._emit(seq, piece):
                    reason = "stop"
                elif seq.chooser.complete:
                    reason = self._finish(seq, seq.decoder.flush(), "stop")
                elif seq.tokens >= job.params.max_tokens:
                    reason = self._finish(seq, seq.decoder.flush(), "length")
        except GrammarError as exc:  # this request's grammar failed (its work limits)
            log.warning("structured output failed on %s: %s", self.name, exc)
            self._fail(
                self.live[job],
                GenerationFailed(
                    f"Structured output failed: {exc}", {"field": "structured_outputs"}
                ),
            )
            return True
        except Exception as exc:  # one request's failure must not end the batch
            log.exception("detokenizing failed on %s", self.name)
            self._fail(self.live[job], GenerationFailed(f"Generation failed: {type(exc).__name__}"))
            return True
        if reason is None:
            seq.next_token = token
            return False
        self._choice_done(seq, reason)
        return True

    def _is_stop_token(self, job: GenerationJob, token: int) -> bool:
        """End of sequence (unless ignore_eos) or one of the request's stop_token_ids: the
        choice ends with "stop", the token counted and its logprob listed, its text never sent."""
        params = job.params
        eos = token in self.loaded.eos_ids and not params.ignore_eos
        return eos or token in params.stop_token_ids

    def _emit(self, seq: Sequence, piece: str) -> bool:
        """Send what the stop matcher releases; True when a stop string was hit."""
        check = seq.matcher.feed(piece)
        self._send(seq, check.text, last=check.stopped)
        return check.stopped

    def _finish(self, seq: Sequence, tail: str, reason: str) -> str:
        """End of the choice: release the decoder's and the matcher's held-back text."""
        check = seq.matcher.feed(tail)
        if check.stopped:
            self._send(seq, check.text, last=True)
            return "stop"
        self._send(seq, check.text + seq.matcher.flush(), last=True)
        return reason

    @staticmethod
    def _send(seq: Sequence, text: str, last: bool) -> None:
        """Send released text with the logprob entries of the tokens it completes. The last
        send of a choice takes every entry whose text was sent, even without text of its
        own (tokens with no text, such as special ones), and drops the rest (a stop string's
        tokens)."""
        seq.sent += len(text)
        if not text and not last:
            return
        entries = []
        while seq.entries and seq.entries[0][0] <= seq.sent:
            entries.append(seq.entries.popleft()[1])
        if last:
            seq.entries.clear()
        if text or entries:
            seq.job.events.put(TextChunk(text, seq.index, tuple(entries)))

    def _choice_done(self, seq: Sequence, reason: str) -> None:
        """A choice finished; the job ends with its last choice."""
        live = self.live[seq.job]
        params = seq.job.params
        finished = Finished(
            seq.tokens,
            time.perf_counter() - live.started,
            reason,
            seq.index,
            seq.cumulative_logprob if params.logprobs is not None else None,
            live.cached,
        )
        live.running -= 1
        if live.running == 0:
            self._done(live, True)  # counted before the client hears of it
        seq.job.events.put(finished)

    def _end(self, live: Live, reason: str) -> None:
        """A started job ended from outside: its deadline passed or it was cancelled."""
        if reason == "timeout":
            self._fail(live, _timeout(live.job))
        else:
            self._done(live, True)

    def _fail(self, live: Live, error: TursiError) -> None:
        live.job.events.put(Failed(error))
        self._done(live, False)

    def _done(self, live: Live, ok: bool) -> None:
        """A job left (a client that went away counts as ok: nothing failed here). The
        worker's admitted count drops before `running` does, so that no reader ever sees the
        job as waiting."""
        self.on_done(live.job, time.perf_counter() - live.started, ok)
        del self.live[live.job]


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
