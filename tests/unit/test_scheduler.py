"""The Scheduler driven directly, one turn at a time, on a tiny Llama: how requests end (end
of sequence, stop strings, max_tokens, cancel, deadline, a failing request, fail_all and
close), what they stream (TextChunk texts, the Finished fields), what on_done hears, how
waiting prompts are grouped into prefills, and seeded sampling inside a batch.

Expected token ids come from transformers (the stock model read from the same folder, each
prompt alone), expected texts from the tokenizer decoding those ids in one go, finish reasons,
stop semantics and error details from docs/api.md. The scheduler's clock is a fake one, so
deadlines and durations are exact.
"""

from __future__ import annotations

import json
import re
import struct
from collections.abc import Callable
from typing import Any

import jsonschema
import llguidance
import llguidance.hf
import pytest
import torch
from transformers import AutoModelForCausalLM

import tursi.engine.scheduler as scheduler_module
from tests.helpers import (
    CORPUS,
    build_llama,
    decoded,
    transformers_greedy,
    verify_every_draft,
)
from tursi.engine.catalog import CatalogEntry
from tursi.engine.constraints import Constraints, GrammarError, grammar_text
from tursi.engine.cpu_kernels import fused_llama
from tursi.engine.jobs import (
    Constraint,
    Failed,
    Finished,
    GenerationJob,
    GenerationParams,
    PromptLogprobs,
    TextChunk,
)
from tursi.engine.kvcache import PrefillCache
from tursi.engine.loading import LoadedModel, LoadOptions, load_model
from tursi.engine.scheduler import Scheduler
from tursi.engine.speculation import Speculator
from tursi.engine.tokens import logits_width
from tursi.errors import GenerationFailed, RequestTimeout
from tursi.metrics import REGISTRY
from tursi.telemetry import ModelStats
from tursi.threads import Empty

NEW_TOKENS = 12  # max_tokens of most requests here


pytestmark = pytest.mark.usefixtures("one_torch_thread")


@pytest.fixture(scope="module")
def model_dir(tmp_path_factory):
    """A Llama whose greedy text varies (untied head, larger random weights)."""
    return build_llama(
        tmp_path_factory.mktemp("llama"), tie_word_embeddings=False, initializer_range=0.2
    )


@pytest.fixture(scope="module")
def loaded(model_dir, tmp_path_factory) -> LoadedModel:
    """The model loaded as the server loads it."""
    entry = CatalogEntry("llama", "local", str(model_dir), dtype="float32")
    return load_model(entry, LoadOptions().resolved(entry), str(tmp_path_factory.mktemp("home")))


@pytest.fixture(scope="module")
def stock(model_dir) -> Any:
    """The reference: transformers' own model from the same folder, not optimized by Tursi."""
    return AutoModelForCausalLM.from_pretrained(model_dir, dtype=torch.float32).eval()


@pytest.fixture(scope="module")
def prompts(loaded) -> list[list[int]]:
    """Four prompts of 16, 5, 9 and 3 tokens."""
    tokenizer = loaded.tokenizer
    return [
        tokenizer(text)["input_ids"][:n] for text, n in zip(CORPUS[:4], (16, 5, 9, 3), strict=True)
    ]


@pytest.fixture(autouse=True)
def no_eos(loaded, monkeypatch):
    """No end-of-sequence token unless a test names one: the random model may choose the
    tokenizer's, and each test decides where generation ends."""
    monkeypatch.setattr(loaded, "eos_ids", frozenset())


class FakeClock:
    """The scheduler module's `time`: monotonic and perf_counter read one value that only
    `advance` moves."""

    def __init__(self) -> None:
        self.now = 1000.0

    def monotonic(self) -> float:
        return self.now

    def perf_counter(self) -> float:
        return self.now

    def advance(self, seconds: float) -> None:
        self.now += seconds


@pytest.fixture(autouse=True)
def clock(monkeypatch) -> FakeClock:
    fake = FakeClock()
    monkeypatch.setattr(scheduler_module, "time", fake)
    return fake


class OnDone:
    """Records on_done's calls."""

    def __init__(self) -> None:
        self.calls: list[tuple[GenerationJob, float, bool]] = []

    def __call__(self, job: GenerationJob, seconds: float, ok: bool) -> None:
        self.calls.append((job, seconds, ok))

    def of(self, job: GenerationJob) -> list[tuple[float, bool]]:
        return [(seconds, ok) for done, seconds, ok in self.calls if done is job]


class Forwards:
    """Records the model's forward calls: the type of the cache each was given (a prefill's
    PrefillCache, or the BatchCache of a decode step on transformers' path) and the (rows,
    columns) of each prefill chunk. `during`, when set, runs inside each call, as a
    client's cancel that lands while the step runs."""

    def __init__(self) -> None:
        self.caches: list[type] = []
        self.prefill_chunks: list[tuple[int, int]] = []
        self.during: Callable[[], None] | None = None


@pytest.fixture
def forwards(loaded, monkeypatch) -> Forwards:
    calls, forward = Forwards(), loaded.model.forward

    def recording(*args: Any, **kwargs: Any) -> Any:
        cache = kwargs.get("past_key_values")
        calls.caches.append(type(cache))
        if isinstance(cache, PrefillCache):
            calls.prefill_chunks.append(tuple(kwargs["input_ids"].shape))
        if calls.during is not None:
            calls.during()
        return forward(*args, **kwargs)

    monkeypatch.setattr(loaded.model, "forward", recording)
    return calls


def make_scheduler(loaded: LoadedModel, max_batch: int = 8) -> tuple[Scheduler, OnDone]:
    on_done = OnDone()
    return Scheduler("test", loaded, max_batch, on_done), on_done


def greedy(prompt: list[int], max_tokens: int, **params: Any) -> GenerationJob:
    return GenerationJob(prompt, GenerationParams(max_tokens, temperature=0.0, **params))


def run(scheduler: Scheduler, *jobs: GenerationJob) -> None:
    """Add `jobs`, then turn until the scheduler is idle."""
    for job in jobs:
        scheduler.add(job)
    for _ in range(200):
        if scheduler.idle:
            return
        scheduler.turn()
    raise AssertionError("the scheduler never became idle")


def transformers_generate(stock: Any, prompt: list[int], max_tokens: int, **kwargs: Any) -> list:
    """transformers' generate on one prompt alone, never stopping early; a seed seeds the
    global generator as TokenChooser seeds its own."""
    seed = kwargs.pop("seed", 0)
    if not kwargs["do_sample"]:
        kwargs.pop("temperature")
    with torch.random.fork_rng(), torch.inference_mode():
        torch.manual_seed(seed)
        out = stock.generate(
            torch.tensor([prompt]),
            max_new_tokens=max_tokens,
            eos_token_id=None,
            pad_token_id=0,
            top_k=0,
            top_p=1.0,
            **kwargs,
        )
    return out[0, len(prompt) :].tolist()


def drain(job: GenerationJob) -> list:
    """Every event the job has received so far."""
    events = []
    while True:
        try:
            events.append(job.events.get(timeout=0))
        except Empty:
            return events


def streamed(events: list) -> str:
    """The text of TextChunk events, each of which must carry text."""
    assert all(isinstance(event, TextChunk) and event.text for event in events), events
    return "".join(event.text for event in events)


def finished(job: GenerationJob) -> tuple[str, Finished]:
    """(streamed text, Finished) of a job that ended well: chunks, then one Finished."""
    events = drain(job)
    assert events and isinstance(events[-1], Finished), events
    return streamed(events[:-1]), events[-1]


def failed(job: GenerationJob) -> tuple[str, Any]:
    """(streamed text, error) of a job that failed: chunks, then one Failed."""
    events = drain(job)
    assert events and isinstance(events[-1], Failed), events
    return streamed(events[:-1]), events[-1].error


def assert_idle(scheduler: Scheduler) -> None:
    assert scheduler.idle and scheduler.running == 0
    assert not scheduler.rows and not scheduler.waiting and scheduler.prefill is None
    assert scheduler.cache.size == 0


def whole_characters(text: str) -> str:
    """What a stream that was cut off has sent of `text`: chunks hold whole characters, so an
    incomplete one at the end (decoded as U+FFFD) is never sent."""
    return text.rstrip("\ufffd")


def first_new_token(ids: list[int], start: int) -> int:
    """The first index >= start whose token does not occur earlier in `ids`."""
    return next(k for k in range(start, len(ids)) if ids[k] not in ids[:k])


# --- how a request ends -------------------------------------------------------------------


@pytest.mark.parametrize("max_tokens", [1, 2, 7])
def test_max_tokens_ends_each_request_with_length_and_the_reference_text(
    loaded, stock, prompts, max_tokens
):
    scheduler, on_done = make_scheduler(loaded)
    jobs = [greedy(prompt, max_tokens) for prompt in prompts]
    run(scheduler, *jobs)
    for prompt, job in zip(prompts, jobs, strict=True):
        text, end = finished(job)
        expected = decoded(loaded.tokenizer, prompt, transformers_greedy(stock, prompt, max_tokens))
        assert (text, end.tokens_generated, end.finish_reason) == (expected, max_tokens, "length")
        assert on_done.of(job) == [(0.0, True)]  # the fake clock stood still
    assert_idle(scheduler)


@pytest.mark.parametrize("first", [True, False], ids=["first-token", "later-token"])
def test_end_of_sequence_ends_with_stop_counting_the_token_but_not_its_text(
    loaded, stock, prompts, monkeypatch, first
):
    reference = transformers_greedy(stock, prompts[0], NEW_TOKENS)
    k = 1 if first else first_new_token(reference, 3) + 1  # EOS is the k-th token
    monkeypatch.setattr(loaded, "eos_ids", frozenset({reference[k - 1]}))
    others = [p for p in prompts[1:] if reference[k - 1] not in transformers_greedy(stock, p, 4)]
    scheduler, on_done = make_scheduler(loaded)
    job, other = greedy(prompts[0], NEW_TOKENS), greedy(others[0], 4)
    run(scheduler, job, other)
    text, end = finished(job)
    expected = decoded(loaded.tokenizer, prompts[0], reference[: k - 1])
    assert (text, end.tokens_generated, end.finish_reason) == (expected, k, "stop")
    text, end = finished(other)
    expected = decoded(loaded.tokenizer, others[0], transformers_greedy(stock, others[0], 4))
    assert (text, end.tokens_generated, end.finish_reason) == (expected, 4, "length")
    assert on_done.of(job) == on_done.of(other) == [(0.0, True)]
    assert_idle(scheduler)


def test_ignore_eos_generates_past_end_of_sequence_up_to_max_tokens(
    loaded, stock, prompts, monkeypatch
):
    reference = transformers_greedy(stock, prompts[0], NEW_TOKENS)
    monkeypatch.setattr(loaded, "eos_ids", frozenset({reference[0], reference[3]}))
    scheduler, _ = make_scheduler(loaded)
    job = greedy(prompts[0], NEW_TOKENS, ignore_eos=True)
    run(scheduler, job)
    text, end = finished(job)
    expected = decoded(loaded.tokenizer, prompts[0], reference)
    assert (text, end.tokens_generated, end.finish_reason) == (expected, NEW_TOKENS, "length")


def boundary_stop(loaded, reference: list[int], start: int) -> str:
    """A stop string across the boundary of two printable ASCII tokens at index >= start:
    the last character of one and the first of the next."""
    pieces = [loaded.tokenizer.decode([token]) for token in reference]
    for k in range(start, len(pieces) - 1):
        pair = pieces[k][-1:] + pieces[k + 1][:1]
        if len(pair) == 2 and pair.isascii() and pair.isprintable():
            return pair
    raise AssertionError(f"no printable boundary in {pieces}")


def stop_outcome(loaded, prompt: list[int], reference: list[int], stop: str) -> tuple[str, int]:
    """(text before the first occurrence of `stop`, tokens up to the one completing it)."""
    for n in range(1, len(reference) + 1):
        text = decoded(loaded.tokenizer, prompt, reference[:n])
        if stop in text:
            return text[: text.index(stop)], n
    raise AssertionError(f"{stop!r} is not in the reference text")


@pytest.mark.parametrize("start", [0, 4])
def test_stop_string_ends_with_stop_and_streams_only_the_text_before_it(
    loaded, stock, prompts, start
):
    scheduler, on_done = make_scheduler(loaded)
    jobs, expected = [], []
    for prompt in (prompts[0], prompts[1], prompts[3]):
        reference = transformers_greedy(stock, prompt, NEW_TOKENS)
        stop = boundary_stop(loaded, reference, start)
        jobs.append(greedy(prompt, NEW_TOKENS, stop=["never \x00 here", stop]))
        expected.append((*stop_outcome(loaded, prompt, reference, stop), "stop"))
    run(scheduler, *jobs)
    for job, want in zip(jobs, expected, strict=True):
        text, end = finished(job)
        assert (text, end.tokens_generated, end.finish_reason) == want
        assert on_done.of(job) == [(0.0, True)]


@pytest.mark.parametrize("ending", ["length", "end-of-sequence"])
def test_text_held_back_as_a_possible_stop_start_is_released_when_generation_ends(
    loaded, stock, prompts, monkeypatch, ending
):
    """The last token's text could start the stop string, which never comes: the text is
    held back, then released whole when generation ends."""
    reference = transformers_greedy(stock, prompts[1], NEW_TOKENS)
    if ending == "length":
        n = NEW_TOKENS
    else:  # the (n + 1)-th token is the end of sequence
        n = first_new_token(reference, 5)
        monkeypatch.setattr(loaded, "eos_ids", frozenset({reference[n]}))
    text = decoded(loaded.tokenizer, prompts[1], reference[:n])
    assert text[-1].isprintable() and text[-1] != "\ufffd"
    stop = text[-1] + "\x00\x01"
    assert stop not in decoded(loaded.tokenizer, prompts[1], reference)
    scheduler, _ = make_scheduler(loaded)
    job = greedy(prompts[1], NEW_TOKENS, stop=[stop])
    run(scheduler, job)
    got, end = finished(job)
    reason = "length" if ending == "length" else "stop"
    tokens = NEW_TOKENS if ending == "length" else n + 1
    assert (got, end.tokens_generated, end.finish_reason) == (text, tokens, reason)


def test_a_stop_string_in_the_text_released_at_the_end_still_ends_with_stop(loaded, stock, prompts):
    """The last token leaves an incomplete character (decoded as U+FFFD), held back until
    generation ends; the stop string is that U+FFFD."""
    reference = transformers_greedy(stock, prompts[0], NEW_TOKENS)
    n = next(
        n
        for n in range(1, NEW_TOKENS)
        if decoded(loaded.tokenizer, prompts[0], reference[:n])[-1:] == "\ufffd"
    )
    text = decoded(loaded.tokenizer, prompts[0], reference[:n])
    scheduler, _ = make_scheduler(loaded)
    job = greedy(prompts[0], n, stop=["\ufffd"])
    run(scheduler, job)
    got, end = finished(job)
    assert (got, end.tokens_generated, end.finish_reason) == (
        text[: text.index("\ufffd")],
        n,
        "stop",
    )


def test_generation_seconds_run_from_the_prefill_to_the_last_token_queue_excluded(
    loaded, stock, prompts, clock
):
    scheduler, on_done = make_scheduler(loaded, max_batch=1)
    first, second = greedy(prompts[0], 5), greedy(prompts[1], 3)
    scheduler.add(first)
    scheduler.add(second)
    started: dict[GenerationJob, float] = {}
    ended: dict[GenerationJob, float] = {}
    while not scheduler.idle:
        clock.advance(1.25)
        scheduler.turn()
        for job in (first, second):
            if job.tokens_generated and job not in started:
                started[job] = clock.now  # its prefill ran (in one piece) in this turn
            if job.tokens_generated == job.params.max_tokens and job not in ended:
                ended[job] = clock.now
    assert started[second] > ended[first]  # it waited: max_batch 1
    for job in (first, second):
        _, end = finished(job)
        seconds = ended[job] - started[job]
        assert seconds > 0 and end.generation_seconds == seconds
        assert on_done.of(job) == [(seconds, True)]


class RecordingStats(ModelStats):
    """ModelStats that also keeps what the scheduler reported per token."""

    def __init__(self) -> None:
        super().__init__("test")
        self.first: list[float] = []
        self.between: list[float] = []

    def first_token(self, seconds: float) -> None:
        self.first.append(seconds)
        super().first_token(seconds)

    def inter_token(self, seconds: float) -> None:
        self.between.append(seconds)
        super().inter_token(seconds)


def test_time_to_first_token_runs_from_submission_and_then_between_tokens(loaded, prompts, clock):
    """The latencies the model metrics report: the first token's from the request's
    submission (its wait in the queue included), each later one from the token before."""
    stats = RecordingStats()
    scheduler = Scheduler("test", loaded, 8, OnDone(), stats)
    job = greedy(prompts[0], 4)
    job.submitted = clock.now  # the job's own clock is the real one; align it with the fake
    scheduler.add(job)
    clock.advance(0.5)  # queued half a second before its prefill turn
    while not scheduler.idle:
        scheduler.turn()
        clock.advance(0.25)
    assert stats.first == [0.5]
    # The first turn prefills (token 1) and runs a decode step (token 2) at one instant.
    assert stats.between == [0.0, 0.25, 0.25]


def test_a_scheduler_made_without_stats_reports_its_latencies_under_its_name(
    loaded, prompts, clock
):
    """Without a ModelStats of its own it makes one for its model's name: the latency
    series it writes carry that name."""
    name = "scheduler-without-stats"
    series = ("tursi_time_to_first_token_seconds_count", {"model": name})
    before = REGISTRY.get_sample_value(*series) or 0.0
    scheduler = Scheduler(name, loaded, 8, OnDone())
    job = greedy(prompts[1], 2)
    job.submitted = clock.now
    run(scheduler, job)
    assert REGISTRY.get_sample_value(*series) == before + 1


@pytest.mark.parametrize("first", [True, False], ids=["first-token", "later-token"])
def test_a_request_whose_text_fails_to_decode_fails_alone(
    loaded, stock, prompts, caplog, monkeypatch, first
):
    """Its decoder breaks at its first token (chosen as its prefill completes: a failed
    request never joins the batch) or at a later one (chosen by a decode step)."""
    if first:  # the other prompt prefilled first, then this one in four turns
        monkeypatch.setattr(scheduler_module, "PREFILL_TOKENS", 4)
    scheduler, on_done = make_scheduler(loaded)
    broken, other = greedy(prompts[0], NEW_TOKENS), greedy(prompts[1], NEW_TOKENS)
    scheduler.add(other)
    scheduler.add(broken)
    while broken not in scheduler.live:
        scheduler.turn()
    assert (broken.tokens_generated == 0) == first

    def push(token: int) -> str:
        raise RuntimeError("tokenizer broke")

    (seq,) = scheduler.live[broken].choices
    seq.decoder.push = push
    run(scheduler)
    _, error = failed(broken)
    assert isinstance(error, GenerationFailed)
    assert error.message == "Generation failed: RuntimeError"
    # The operator's log names the model and keeps the traceback.
    (record,) = [r for r in caplog.records if r.name == "tursi.engine.scheduler"]
    assert record.getMessage() == "detokenizing failed on test" and record.exc_info
    assert on_done.of(broken) == [(0.0, False)]
    text, end = finished(other)
    expected = decoded(
        loaded.tokenizer, prompts[1], transformers_greedy(stock, prompts[1], NEW_TOKENS)
    )
    assert (text, end.finish_reason) == (expected, "length")
    assert on_done.of(other) == [(0.0, True)]
    assert_idle(scheduler)


@pytest.mark.parametrize("step", ["plain", "verify"])
def test_a_choice_that_fails_takes_its_sibling_choices_out_of_the_batch(
    loaded, stock, prompts, monkeypatch, step
):
    if step == "verify":  # every row drafts all it may, and every draft is verified
        verify_every_draft(monkeypatch, drafting=5)
    else:
        monkeypatch.setattr(Speculator, "choose", lambda self, proposals: [[] for _ in proposals])
    scheduler, on_done = make_scheduler(loaded)
    broken = GenerationJob(prompts[0], GenerationParams(NEW_TOKENS, temperature=0.0), n=2)
    other = greedy(prompts[1], NEW_TOKENS)
    scheduler.add(broken)
    scheduler.add(other)
    scheduler.turn()
    assert len(scheduler.rows) == 3

    def push(token: int) -> str:
        raise RuntimeError("tokenizer broke")

    scheduler.live[broken].choices[0].decoder.push = push
    scheduler.turn()
    assert (scheduler.stats.drafted_tokens > 0) == (step == "verify")  # the step that failed
    # both choices' rows left in the step that failed one of them, the other job's stayed
    assert [seq.job for seq in scheduler.rows] == [other]
    _, error = failed(broken)
    assert isinstance(error, GenerationFailed) and on_done.of(broken) == [(0.0, False)]
    run(scheduler)
    text, end = finished(other)
    expected = decoded(
        loaded.tokenizer, prompts[1], transformers_greedy(stock, prompts[1], NEW_TOKENS)
    )
    assert (text, end.finish_reason) == (expected, "length")
    assert_idle(scheduler)


# --- cancel and deadline --------------------------------------------------------------------


def test_a_choice_whose_grammar_fails_in_a_verify_step_keeps_none_of_its_draft(
    loaded, stock, prompts, monkeypatch
):
    """A row whose grammar fails on the very token its draft predicted ends there: the
    step counts none of its draft as kept, and the job fails with structured output's
    error."""
    reference = transformers_greedy(stock, prompts[0], NEW_TOKENS)
    scheduler, on_done = make_scheduler(loaded)
    job = greedy(prompts[0], NEW_TOKENS)
    scheduler.add(job)
    scheduler.turn()  # the prefill and the first token (and a decode step)
    (seq,) = scheduler.rows
    assert seq.next_token == reference[seq.tokens - 1]
    # every draft begins with the token the model chooses next
    verify_every_draft(monkeypatch, drafting=reference[seq.tokens])

    def remember(token: int) -> None:
        raise GrammarError("a work limit")

    seq.chooser.remember = remember
    scheduler.turn()
    _, error = failed(job)
    assert error.message == "Structured output failed: a work limit"
    assert on_done.of(job) == [(0.0, False)]
    assert scheduler.stats.drafted_tokens > 0
    assert scheduler.stats.accepted_tokens == 0
    assert_idle(scheduler)


def test_the_speculator_learns_each_decode_steps_rows_width_and_time(
    loaded, prompts, clock, monkeypatch
):
    """What the speculator's cost model is told of each decode step: its rows, its width
    and its time on the scheduler's clock (here each step takes 0.25 s)."""
    logits = scheduler_module.decode_logits

    def slow(*args: Any) -> torch.Tensor:
        clock.advance(0.25)
        return logits(*args)

    monkeypatch.setattr(scheduler_module, "decode_logits", slow)
    scheduler, _ = make_scheduler(loaded)
    told: list[tuple[int, int, float]] = []
    measured = scheduler.speculator.measured

    def spy(rows: int, width: int, seconds: float) -> None:
        told.append((rows, width, seconds))
        measured(rows, width, seconds)

    scheduler.speculator.measured = spy
    run(scheduler, *(greedy(prompt, 4, speculative=False) for prompt in prompts[:2]))
    # one prefill of both prompts (their first tokens), then three steps of both rows
    assert told == [(2, 1, 0.25)] * 3
    assert scheduler.speculator.plain == {2: 0.25}


def test_a_job_cancelled_while_waiting_ends_ok_with_no_events(loaded, stock, prompts):
    scheduler, on_done = make_scheduler(loaded, max_batch=1)
    running, cancelled = greedy(prompts[0], 4), greedy(prompts[1], 4)
    scheduler.add(running)
    scheduler.add(cancelled)
    scheduler.turn()
    cancelled.cancel()
    scheduler.turn()  # its place in the queue frees at the next turn, not when a row does
    assert on_done.of(cancelled) == [(0.0, True)] and running.tokens_generated < 4
    run(scheduler)
    assert drain(cancelled) == [] and cancelled.tokens_generated == 0
    assert on_done.of(cancelled) == [(0.0, True)]  # a client that went away is no failure
    text, _ = finished(running)
    assert text == decoded(loaded.tokenizer, prompts[0], transformers_greedy(stock, prompts[0], 4))
    assert_idle(scheduler)


@pytest.mark.parametrize("row", [0, 1, 3])
def test_a_job_cancelled_while_running_stops_at_once_and_the_others_go_on(
    loaded, stock, prompts, clock, row
):
    scheduler, on_done = make_scheduler(loaded)
    jobs = [greedy(prompt, NEW_TOKENS) for prompt in prompts]
    for job in jobs:
        scheduler.add(job)
    scheduler.turn()
    clock.advance(2.0)
    scheduler.turn()
    cancelled = scheduler.rows[row].job
    cancelled.cancel()
    tokens = cancelled.tokens_generated
    clock.advance(1.0)
    run(scheduler)
    assert cancelled.tokens_generated == tokens
    assert on_done.of(cancelled) == [(3.0, True)]
    index = jobs.index(cancelled)
    reference = transformers_greedy(stock, prompts[index], NEW_TOKENS)
    expected = whole_characters(decoded(loaded.tokenizer, prompts[index], reference[:tokens]))
    assert streamed(drain(cancelled)) == expected
    for prompt, job in zip(prompts, jobs, strict=True):
        if job is not cancelled:
            text, end = finished(job)
            reference = transformers_greedy(stock, prompt, NEW_TOKENS)
            assert (text, end.finish_reason) == (
                decoded(loaded.tokenizer, prompt, reference),
                "length",
            )
    assert_idle(scheduler)


def test_jobs_cancelled_together_all_leave_the_batch_at_the_next_turn(loaded, stock, prompts):
    scheduler, on_done = make_scheduler(loaded)
    jobs = [greedy(prompt, NEW_TOKENS) for prompt in prompts]
    for job in jobs:
        scheduler.add(job)
    scheduler.turn()
    scheduler.turn()
    assert len(scheduler.rows) == len(jobs) >= 4
    cancelled = [seq.job for seq in scheduler.rows[-3:]]  # three neighbouring rows
    for job in cancelled:
        job.cancel()
    scheduler.turn()
    assert sorted(jobs.index(seq.job) for seq in scheduler.rows) == sorted(
        jobs.index(job) for job in jobs if job not in cancelled
    )
    run(scheduler)
    for prompt, job in zip(prompts, jobs, strict=True):
        if job in cancelled:
            assert on_done.of(job) == [(0.0, True)]
        else:
            text, end = finished(job)
            reference = transformers_greedy(stock, prompt, NEW_TOKENS)
            assert (text, end.finish_reason) == (
                decoded(loaded.tokenizer, prompt, reference),
                "length",
            )
    assert_idle(scheduler)


def test_a_job_cancelled_during_its_groups_prefill_leaves_the_others_to_start(
    loaded, stock, prompts, forwards
):
    """The client of a prefill group's first job goes away while the group's forward runs:
    that job ends ok with no events, the later jobs of its group start and finish."""
    scheduler, on_done = make_scheduler(loaded)
    cancelled, others = greedy(prompts[0], 4), [greedy(prompt, 4) for prompt in prompts[1:3]]
    forwards.during = cancelled.cancel
    run(scheduler, cancelled, *others)
    assert [rows for rows, _ in forwards.prefill_chunks] == [3]  # one group
    assert drain(cancelled) == [] and on_done.of(cancelled) == [(0.0, True)]
    for prompt, job in zip(prompts[1:3], others, strict=True):
        text, end = finished(job)
        expected = decoded(loaded.tokenizer, prompt, transformers_greedy(stock, prompt, 4))
        assert (text, end.finish_reason) == (expected, "length")
    assert_idle(scheduler)


def assert_timed_out(job: GenerationJob, timeout: float, tokens: int) -> str:
    """The job failed with request_timeout (docs/api.md's details); its streamed text."""
    text, error = failed(job)
    assert isinstance(error, RequestTimeout)
    assert error.details == {"timeout_seconds": timeout, "tokens_generated": tokens}
    assert f"{timeout:g} s" in error.message and "TURSI_REQUEST_TIMEOUT" in error.message
    return text


def with_deadline(job: GenerationJob, clock: FakeClock, timeout: float) -> GenerationJob:
    """As the worker does at submission: the deadline counts from now."""
    job.timeout, job.deadline = timeout, clock.now + timeout
    return job


def test_a_deadline_passed_while_waiting_fails_the_job_with_request_timeout(
    loaded, stock, prompts, clock
):
    scheduler, on_done = make_scheduler(loaded, max_batch=1)
    running = greedy(prompts[0], 4)
    late = with_deadline(greedy(prompts[1], 4), clock, 5.0)
    in_time = with_deadline(greedy(prompts[2], 4), clock, 5.5)
    scheduler.add(running)
    scheduler.add(late)
    scheduler.add(in_time)
    scheduler.turn()
    clock.advance(5.0)  # exactly `late`'s deadline
    scheduler.turn()  # the client hears at once, not when the running job frees its row
    assert on_done.of(late) == [(0.0, False)] and running.tokens_generated < 4
    run(scheduler)
    assert assert_timed_out(late, 5.0, 0) == ""
    assert on_done.of(late) == [(0.0, False)]
    for prompt, job, seconds in [(prompts[0], running, 5.0), (prompts[2], in_time, 0.0)]:
        text, end = finished(job)
        assert text == decoded(loaded.tokenizer, prompt, transformers_greedy(stock, prompt, 4))
        assert on_done.of(job) == [(seconds, True)]
    assert_idle(scheduler)


@pytest.mark.parametrize("row", [0, 1])
def test_a_deadline_passed_while_running_fails_the_job_and_the_others_go_on(
    loaded, stock, prompts, clock, row
):
    scheduler, on_done = make_scheduler(loaded)
    jobs = [greedy(prompt, NEW_TOKENS) for prompt in prompts[:2]]
    late = with_deadline(jobs[row], clock, 10.0)
    for job in jobs:
        scheduler.add(job)
    scheduler.turn()
    scheduler.turn()
    assert scheduler.rows[row].job is late  # one prefill group: rows in order
    clock.advance(10.0)
    tokens = late.tokens_generated
    run(scheduler)
    reference = transformers_greedy(stock, prompts[row], NEW_TOKENS)
    text = assert_timed_out(late, 10.0, tokens)
    assert text == whole_characters(decoded(loaded.tokenizer, prompts[row], reference[:tokens]))
    assert on_done.of(late) == [(10.0, False)]
    other, prompt = jobs[1 - row], prompts[1 - row]
    text, _ = finished(other)
    assert text == decoded(loaded.tokenizer, prompt, transformers_greedy(stock, prompt, NEW_TOKENS))
    assert on_done.of(other) == [(10.0, True)]
    assert_idle(scheduler)


@pytest.mark.parametrize("n", [1, 3])
@pytest.mark.parametrize("how", ["cancel", "deadline"])
def test_a_job_ended_during_its_chunked_prefill_leaves_before_its_next_chunk(
    loaded, stock, prompts, clock, monkeypatch, prefill_chunks, how, n
):
    """A 16-token prompt prefilled 4 columns a turn (its n choices share that prefill) ends
    after its first chunk: the next turn ends it without another chunk of it (no event when
    cancelled: its client is gone; request_timeout at its deadline) and starts the prompt
    queued behind it, in that same turn. A job decoding all along and the queued one
    generate what transformers generates for each alone."""
    monkeypatch.setattr(scheduler_module, "PREFILL_TOKENS", 4)
    scheduler, on_done = make_scheduler(loaded)
    decoding, queued = greedy(prompts[3], NEW_TOKENS), greedy(prompts[1][:4], NEW_TOKENS)
    long = GenerationJob(prompts[0], GenerationParams(NEW_TOKENS, temperature=0.0), n=n)
    if how == "deadline":
        with_deadline(long, clock, 2.0)
    scheduler.add(decoding)
    scheduler.turn()
    scheduler.add(long)
    scheduler.add(queued)
    scheduler.turn()
    assert prefill_chunks == [(1, 3), (1, 4)] and scheduler.prefill.jobs == [long]
    if how == "cancel":
        long.cancel()
    else:
        clock.advance(2.0)
    scheduler.turn()
    assert prefill_chunks[2:] == [(1, 4)] and queued.tokens_generated == 2  # queued's chunk
    assert on_done.of(long) == ([(0.0, True)] if how == "cancel" else [(2.0, False)])
    assert scheduler.running == 2 and long not in scheduler.live
    run(scheduler)
    assert len(prefill_chunks) == 3  # long's prefill never ran again
    assert long.tokens_generated == 0 and len(on_done.of(long)) == 1
    if how == "cancel":
        assert drain(long) == []
    else:
        assert assert_timed_out(long, 2.0, 0) == ""
    for job in (decoding, queued):
        text, _ = finished(job)
        reference = transformers_greedy(stock, job.prompt_ids, NEW_TOKENS)
        assert text == decoded(loaded.tokenizer, job.prompt_ids, reference)
    assert_idle(scheduler)


def test_a_job_that_ends_in_a_group_prefill_spanning_turns_leaves_and_the_rest_go_on(
    loaded, stock, prompts, monkeypatch, prefill_chunks
):
    """The scheduler's prefill groups fit one chunk, so only a lone prompt spans turns; were
    a group's chunks narrower (4 columns here), a job of it that is cancelled ends at the
    next turn and the others' prefill goes on, to what transformers generates."""
    init = scheduler_module._Prefill.__init__

    def narrow(self: Any, *args: Any) -> None:
        init(self, *args)
        self.chunk = 4

    monkeypatch.setattr(scheduler_module._Prefill, "__init__", narrow)
    scheduler, on_done = make_scheduler(loaded)
    jobs = [greedy(prompt, NEW_TOKENS) for prompt in prompts[1:3]]  # 5 and 9 tokens
    for job in jobs:
        scheduler.add(job)
    scheduler.turn()
    jobs[0].cancel()
    scheduler.turn()
    assert on_done.of(jobs[0]) == [(0.0, True)] and scheduler.prefill is not None
    run(scheduler)
    assert prefill_chunks == [(2, 4), (2, 4), (2, 1)]
    assert drain(jobs[0]) == [] and jobs[0].tokens_generated == 0
    text, _ = finished(jobs[1])
    reference = transformers_greedy(stock, prompts[2], NEW_TOKENS)
    assert text == decoded(loaded.tokenizer, prompts[2], reference)
    assert on_done.of(jobs[0]) == [(0.0, True)]
    assert_idle(scheduler)


def test_a_job_without_deadline_never_times_out(loaded, stock, prompts, clock):
    scheduler, on_done = make_scheduler(loaded)
    job = greedy(prompts[1], 4)
    scheduler.add(job)
    scheduler.turn()
    clock.advance(1e9)
    run(scheduler)
    text, end = finished(job)
    assert text == decoded(loaded.tokenizer, prompts[1], transformers_greedy(stock, prompts[1], 4))
    assert on_done.of(job) == [(1e9, True)]


# --- fail_all and close -----------------------------------------------------------------


def busy_scheduler(loaded, prompts, clock, monkeypatch) -> tuple[Scheduler, OnDone, list]:
    """Two jobs decoding, one in a chunked prefill, one waiting."""
    monkeypatch.setattr(scheduler_module, "PREFILL_TOKENS", 10)
    scheduler, on_done = make_scheduler(loaded, max_batch=3)
    jobs = [greedy(prompts[i], NEW_TOKENS) for i in (3, 1, 0, 2)]  # 3, 5, 16 and 9 tokens
    for job in jobs:
        scheduler.add(job)
    scheduler.turn()  # the 3- and 5-token prompts: one prefill of width 5, two rows
    clock.advance(1.0)
    scheduler.turn()  # the 16-token prompt's prefill starts; no room for the last
    assert [job.tokens_generated > 0 for job in jobs] == [True, True, False, False]
    assert len(scheduler.rows) == 2 and scheduler.prefill is not None
    assert scheduler.running == 3 and len(scheduler.waiting) == 1
    clock.advance(1.0)
    return scheduler, on_done, jobs


@pytest.mark.parametrize("how", ["fail_all", "close"])
def test_fail_all_and_close_fail_every_job_once_and_leave_the_scheduler_empty(
    loaded, prompts, clock, monkeypatch, how
):
    scheduler, on_done, jobs = busy_scheduler(loaded, prompts, clock, monkeypatch)
    error = GenerationFailed("the model was unloaded")
    getattr(scheduler, how)(error)
    for job in jobs:
        _, got = failed(job)
        assert got is error
    assert [on_done.of(job) for job in jobs] == [
        [(2.0, False)],
        [(2.0, False)],
        [(1.0, False)],
        [(0.0, False)],  # never started
    ]
    assert_idle(scheduler)
    assert not scheduler.live and scheduler.cache.layers[0].keys is None
    assert (scheduler.loaded is None) == (how == "close")


def test_after_fail_all_the_scheduler_serves_new_jobs(loaded, stock, prompts, clock, monkeypatch):
    scheduler, on_done, _ = busy_scheduler(loaded, prompts, clock, monkeypatch)
    scheduler.fail_all(GenerationFailed("engine failure"))
    jobs = [greedy(prompt, 6) for prompt in prompts[:2]]
    run(scheduler, *jobs)
    for prompt, job in zip(prompts[:2], jobs, strict=True):
        text, _ = finished(job)
        assert text == decoded(loaded.tokenizer, prompt, transformers_greedy(stock, prompt, 6))


# --- admission and prefill groups ---------------------------------------------------------


@pytest.mark.parametrize(
    ("budget", "lengths", "group"),
    [
        (12, [4, 4, 4, 4], 3),  # 3 x 4 fits 12, 4 x 4 does not
        (10, [5, 5, 5], 2),  # 2 x 5 is exactly the budget
        (10, [2, 5, 2], 2),  # padded to the widest: 3 x 5 does not fit
        (4, [16, 2], 1),  # a prompt wider than the budget goes alone, in chunks
        (1, [3, 2], 1),  # one column per turn
    ],
)
def test_waiting_prompts_share_a_prefill_while_their_padded_size_fits_prefill_tokens(
    loaded, stock, prompts, monkeypatch, budget, lengths, group
):
    monkeypatch.setattr(scheduler_module, "PREFILL_TOKENS", budget)
    long = prompts[0] * 2
    scheduler, _ = make_scheduler(loaded)
    jobs = [greedy(long[i : i + n], 4) for i, n in enumerate(lengths)]
    for job in jobs:
        scheduler.add(job)
    turns = 1 if lengths[0] <= budget else -(-lengths[0] // budget)  # the first group's
    for _ in range(turns):
        scheduler.turn()
    assert [job.tokens_generated > 0 for job in jobs] == [i < group for i in range(len(jobs))]
    run(scheduler)
    for job in jobs:
        text, _ = finished(job)
        expected = transformers_greedy(stock, job.prompt_ids, 4)
        assert text == decoded(loaded.tokenizer, job.prompt_ids, expected)


def test_a_long_prefill_runs_one_chunk_per_turn_between_decode_steps(
    loaded, stock, prompts, monkeypatch, prefill_chunks
):
    """A prompt longer than PREFILL_TOKENS holds the engine one chunk at a time: every turn
    of its prefill, the running job gets its token too."""
    monkeypatch.setattr(scheduler_module, "PREFILL_TOKENS", 4)
    scheduler, _ = make_scheduler(loaded)
    decoding, long = greedy(prompts[3], NEW_TOKENS), greedy(prompts[0], NEW_TOKENS)
    scheduler.add(decoding)
    scheduler.turn()
    scheduler.add(long)
    for turn in range(1, 5):  # 16 tokens: 4 chunks
        scheduler.turn()
        assert len(prefill_chunks) == 1 + turn and decoding.tokens_generated == 2 + turn
    assert prefill_chunks[1:] == [(1, 4)] * 4 and long.tokens_generated == 2
    run(scheduler)
    for job in (decoding, long):
        text, _ = finished(job)
        reference = transformers_greedy(stock, job.prompt_ids, NEW_TOKENS)
        assert text == decoded(loaded.tokenizer, job.prompt_ids, reference)


def test_a_prefill_takes_only_as_many_prompts_as_the_batch_has_room_for(loaded, stock, prompts):
    scheduler, on_done = make_scheduler(loaded, max_batch=2)
    jobs = [greedy(prompt, n) for prompt, n in zip(prompts, (3, 8, 4, 4), strict=True)]
    for job in jobs:
        scheduler.add(job)
    assert scheduler.running == 0 and not scheduler.idle  # waiting jobs are not running
    scheduler.turn()
    assert [job.tokens_generated > 0 for job in jobs] == [True, True, False, False]
    assert scheduler.running == 2 and len(scheduler.waiting) == 2
    while not scheduler.idle:
        scheduler.turn()
        assert len(scheduler.rows) <= 2 and scheduler.running <= 2
    for prompt, job in zip(prompts, jobs, strict=True):
        text, end = finished(job)
        reference = transformers_greedy(stock, prompt, job.params.max_tokens)
        assert (text, end.tokens_generated) == (
            decoded(loaded.tokenizer, prompt, reference),
            len(reference),
        )
        assert len(on_done.of(job)) == 1
    assert_idle(scheduler)


def test_the_decode_steps_of_a_fused_llama_with_sdpa_take_the_direct_path(
    loaded, stock, prompts, forwards
):
    """The Scheduler's BatchCache gives SDPA the boolean mask that decode_logits' direct
    path needs (docs/performance.md): transformers' forward runs for the prefill only."""
    assert fused_llama(loaded.model) and loaded.model.config._attn_implementation == "sdpa"
    scheduler, _ = make_scheduler(loaded)
    jobs = [greedy(prompt, 6) for prompt in prompts[:2]]
    run(scheduler, *jobs)
    assert forwards.caches == [PrefillCache]  # the two prompts' prefill, then no forward
    for prompt, job in zip(prompts[:2], jobs, strict=True):
        text, _ = finished(job)
        assert text == decoded(loaded.tokenizer, prompt, transformers_greedy(stock, prompt, 6))


# --- sampling ---------------------------------------------------------------------------


def test_seeded_sampling_and_repetition_penalty_in_a_batch_match_transformers_alone(
    loaded, stock, prompts
):
    """Each row samples with its own settings and generator: in a batch of mixed settings a
    request draws what transformers' generate draws for it alone from the same seed."""
    settings = [
        {"temperature": 0.8, "seed": 1},
        {"temperature": 1.3, "seed": 7},
        {"temperature": 1.0, "seed": 1, "repetition_penalty": 1.3},
        {"temperature": 0.0, "repetition_penalty": 3.0},
    ]
    scheduler, _ = make_scheduler(loaded)
    jobs = [
        GenerationJob(prompt, GenerationParams(NEW_TOKENS, **params))
        for prompt, params in zip(prompts, settings, strict=True)
    ]
    run(scheduler, *jobs)
    for prompt, params, job in zip(prompts, settings, jobs, strict=True):
        sample = params["temperature"] > 0
        reference = transformers_generate(stock, prompt, NEW_TOKENS, do_sample=sample, **params)
        text, end = finished(job)
        assert (text, end.tokens_generated) == (
            decoded(loaded.tokenizer, prompt, reference),
            NEW_TOKENS,
        )


# --- n choices from one prefill -------------------------------------------------------------


def choices_of(job: GenerationJob) -> dict[int, tuple[str, Finished]]:
    """{choice index: (its streamed text, its Finished)} of a job that ended well."""
    events = drain(job)
    texts: dict[int, list[str]] = {}
    ends: dict[int, Finished] = {}
    for event in events:
        assert isinstance(event, TextChunk | Finished), event
        assert event.index not in ends, "an event after its choice's Finished"
        if isinstance(event, TextChunk):
            texts.setdefault(event.index, []).append(event.text)
        else:
            ends[event.index] = event
    return {index: ("".join(texts.get(index, [])), end) for index, end in ends.items()}


@pytest.fixture
def prefill_chunks(forwards) -> list[tuple[int, int]]:
    """(prompt rows, columns) of each prefill forward (one chunk) the model runs."""
    return forwards.prefill_chunks


def test_n_greedy_choices_share_one_prefill_row_and_equal_transformers(
    loaded, stock, prompts, prefill_chunks
):
    scheduler, on_done = make_scheduler(loaded)
    job = GenerationJob(prompts[0], GenerationParams(NEW_TOKENS, temperature=0.0), n=4, index=3)
    other = greedy(prompts[1], 5)
    run(scheduler, job, other)
    assert prefill_chunks == [(2, 16)]  # the two prompts, once each: one group, one chunk
    expected = decoded(
        loaded.tokenizer, prompts[0], transformers_greedy(stock, prompts[0], NEW_TOKENS)
    )
    choices = choices_of(job)
    assert sorted(choices) == [3, 4, 5, 6]
    for index, (text, end) in choices.items():
        assert (text, end.tokens_generated, end.finish_reason) == (expected, NEW_TOKENS, "length")
        assert end.index == index and end.cumulative_logprob is None
    assert job.tokens_generated == 4 * NEW_TOKENS
    assert on_done.of(job) == [(0.0, True)]  # once, for all its choices
    text, end = finished(other)
    assert text == decoded(loaded.tokenizer, prompts[1], transformers_greedy(stock, prompts[1], 5))
    assert_idle(scheduler)


@pytest.mark.parametrize("seed", [11, -3, 2**63 - 2])
def test_n_sampled_choices_draw_with_seed_plus_i_each_as_transformers_does(
    loaded, stock, prompts, prefill_chunks, seed
):
    """Choice i of a seeded job draws what transformers' generate draws alone with seed + i
    (wrapped into int64): the choices differ, and the same seed gives the same choices."""
    params = GenerationParams(NEW_TOKENS, temperature=1.2, seed=seed)
    scheduler, _ = make_scheduler(loaded, max_batch=9)
    jobs = [GenerationJob(prompts[2], params, n=4), GenerationJob(prompts[2], params, n=4)]
    plain = greedy(prompts[3], 6)
    run(scheduler, jobs[0], plain, jobs[1])
    assert prefill_chunks == [(3, 9)]
    first, again = choices_of(jobs[0]), choices_of(jobs[1])
    assert first == again
    texts = [first[i][0] for i in range(4)]
    assert len(set(texts)) == 4
    for i, text in enumerate(texts):
        wrapped = (seed + i + 2**63) % 2**64 - 2**63
        reference = transformers_generate(
            stock, prompts[2], NEW_TOKENS, do_sample=True, temperature=1.2, seed=wrapped
        )
        assert text == decoded(loaded.tokenizer, prompts[2], reference), i
    text, _ = finished(plain)
    assert text == decoded(loaded.tokenizer, prompts[3], transformers_greedy(stock, prompts[3], 6))


def test_a_job_waits_until_the_batch_has_a_row_for_each_of_its_choices(loaded, stock, prompts):
    scheduler, on_done = make_scheduler(loaded, max_batch=4)
    running = greedy(prompts[1], 6)
    wide = GenerationJob(prompts[0], GenerationParams(3, temperature=0.0), n=4)
    scheduler.add(running)
    scheduler.add(wide)
    scheduler.turn()
    assert len(scheduler.rows) == 1 and list(scheduler.waiting) == [wide]
    while running.tokens_generated < 6:
        assert wide.tokens_generated == 0  # 3 rows free, 4 needed
        scheduler.turn()
    run(scheduler)
    expected = decoded(loaded.tokenizer, prompts[0], transformers_greedy(stock, prompts[0], 3))
    assert {text for text, _ in choices_of(wide).values()} == {expected}
    assert len(on_done.of(wide)) == 1
    assert_idle(scheduler)


def test_a_prefill_group_takes_jobs_while_their_choices_fit_the_free_rows(loaded, stock, prompts):
    scheduler, on_done = make_scheduler(loaded, max_batch=4)
    jobs = [
        GenerationJob(prompt, GenerationParams(3, temperature=0.0), n=n)
        for prompt, n in zip(prompts[:3], (3, 2, 1), strict=True)
    ]
    for job in jobs:
        scheduler.add(job)
    scheduler.turn()
    assert len(scheduler.rows) == 3 and list(scheduler.waiting) == jobs[1:]  # 3 + 2 > 4
    while not scheduler.idle:
        scheduler.turn()
        assert len(scheduler.rows) <= 4
    for prompt, job in zip(prompts[:3], jobs, strict=True):
        expected = decoded(loaded.tokenizer, prompt, transformers_greedy(stock, prompt, 3))
        assert [text for text, _ in choices_of(job).values()] == [expected] * job.n
    assert_idle(scheduler)


def test_cancel_ends_every_choice_of_a_job_and_on_done_runs_once(loaded, prompts):
    scheduler, on_done = make_scheduler(loaded)
    job = GenerationJob(prompts[0], GenerationParams(NEW_TOKENS, temperature=0.0), n=3)
    other = greedy(prompts[1], NEW_TOKENS)
    scheduler.add(job)
    scheduler.add(other)
    scheduler.turn()
    assert len(scheduler.rows) == 4
    job.cancel()
    scheduler.turn()
    assert [seq.job for seq in scheduler.rows] == [other]
    assert on_done.of(job) == [(0.0, True)]
    run(scheduler)
    assert not any(isinstance(event, Finished) for event in drain(job))
    assert_idle(scheduler)


def test_a_deadline_fails_a_job_of_n_choices_once(loaded, prompts, clock):
    scheduler, on_done = make_scheduler(loaded)
    job = with_deadline(
        GenerationJob(prompts[1], GenerationParams(NEW_TOKENS, temperature=0.0), n=2), clock, 4.0
    )
    scheduler.add(job)
    scheduler.turn()
    clock.advance(4.0)
    run(scheduler)
    events = drain(job)
    assert [type(event) for event in events].count(Failed) == 1
    assert isinstance(events[-1], Failed) and isinstance(events[-1].error, RequestTimeout)
    assert events[-1].error.details == {"timeout_seconds": 4.0, "tokens_generated": 4}
    assert on_done.of(job) == [(4.0, False)]
    assert_idle(scheduler)


# --- stop_token_ids and max_tokens 0 ----------------------------------------------------------


def test_a_stop_token_id_ends_the_choice_with_stop_without_its_text_but_with_its_score(
    loaded, stock, prompts
):
    reference = transformers_greedy(stock, prompts[0], NEW_TOKENS)
    k = first_new_token(reference, 3)  # the token at k is the stop token
    scheduler, _ = make_scheduler(loaded)
    unused = next(token for token in range(10, 400) if token not in reference)
    job = greedy(prompts[0], NEW_TOKENS, stop_token_ids=[unused, reference[k]], logprobs=0)
    run(scheduler, job)
    text, entries, end = with_entries(drain(job))[0]
    assert (text, end.tokens_generated, end.finish_reason) == (
        decoded(loaded.tokenizer, prompts[0], reference[:k]),
        k + 1,
        "stop",
    )
    # The stop token is scored though its text is not sent (lm-eval reads that score).
    assert [entry.token_id for entry in entries] == reference[: k + 1]


def test_max_tokens_0_scores_the_prompt_and_ends_each_choice_at_once(loaded, stock, prompts):
    scheduler, on_done = make_scheduler(loaded)
    job = GenerationJob(
        prompts[0], GenerationParams(0, temperature=0.0, prompt_logprobs=2, logprobs=1), n=2
    )
    other = greedy(prompts[1], 3)
    run(scheduler, job, other)
    events = drain(job)
    assert isinstance(events[0], PromptLogprobs) and len(events[0].entries) == len(prompts[0])
    assert events[1:] == [
        Finished(0, 0.0, "length", 0, 0.0),
        Finished(0, 0.0, "length", 1, 0.0),
    ]
    assert job.tokens_generated == 0 and on_done.of(job) == [(0.0, True)]
    text, _ = finished(other)
    assert text == decoded(loaded.tokenizer, prompts[1], transformers_greedy(stock, prompts[1], 3))
    assert_idle(scheduler)


# --- logprobs against transformers' forward -------------------------------------------------


def with_entries(events: list) -> dict[int, tuple[str, list, Finished]]:
    """{choice index: (text, logprob entries in order, Finished)} from a job's events (its
    PromptLogprobs left out)."""
    texts: dict[int, list[str]] = {}
    entries: dict[int, list] = {}
    ends: dict[int, Finished] = {}
    for event in events:
        if isinstance(event, TextChunk):
            texts.setdefault(event.index, []).append(event.text)
            entries.setdefault(event.index, []).extend(event.logprobs)
        elif isinstance(event, Finished):
            ends[event.index] = event
        else:
            assert isinstance(event, PromptLogprobs), event
    return {i: ("".join(texts.get(i, [])), entries.get(i, []), end) for i, end in ends.items()}


def forward_logprobs(stock: Any, ids: list[int]) -> torch.Tensor:
    """log_softmax of transformers' forward over `ids` in one pass: row t scores token t + 1."""
    with torch.inference_mode():
        return torch.log_softmax(stock(input_ids=torch.tensor([ids])).logits[0].float(), -1)


def assert_entry(entry: Any, token: int, row: torch.Tensor, top: int) -> None:
    """The entry scores `token` and lists the `top` best under the reference row to 1e-4."""
    assert entry.token_id == token
    assert abs(entry.logprob - float(row[token])) < 1e-4
    values, ids = row.topk(top) if top else (row[:0], row[:0].long())
    assert [token_id for token_id, _ in entry.top] == ids.tolist()
    for (_, got), want in zip(entry.top, values.tolist(), strict=True):
        assert abs(got - want) < 1e-4


# (prompt words, settings): ten prompts of 1 to 30 words; greedy and sampled rows, some
# penalized (logprobs stay those of the raw distribution), various top counts.
LOGPROB_REQUESTS = [
    (1, {"temperature": 0.0, "logprobs": 5, "prompt_logprobs": 5}),
    (4, {"temperature": 0.0, "logprobs": 0}),
    (9, {"temperature": 0.9, "seed": 1, "logprobs": 3, "prompt_logprobs": 0}),
    (30, {"temperature": 0.0, "logprobs": 20, "prompt_logprobs": 20}),
    (2, {"temperature": 0.0, "repetition_penalty": 1.8, "logprobs": 2}),
    (12, {"temperature": 1.3, "seed": 2, "min_p": 0.05, "logprobs": 1, "prompt_logprobs": 1}),
    (6, {"temperature": 0.0, "presence_penalty": 1.5, "logprobs": 4, "prompt_logprobs": 4}),
    (17, {"temperature": 0.0, "logprobs": 5}),
    (3, {"temperature": 0.7, "seed": 3, "logit_bias": {5: 4.0}, "logprobs": 5}),
    (22, {"temperature": 0.0, "prompt_logprobs": 3}),
]


PROCESSING = {"repetition_penalty", "presence_penalty", "logit_bias"}


@pytest.mark.parametrize("prefill_tokens", [512, 7], ids=["one-chunk", "chunked"])
def test_logprobs_equal_transformers_forward_for_ten_prompts_in_one_batch(
    loaded, stock, monkeypatch, prefill_tokens
):
    """Each entry's logprob and top alternatives equal log_softmax of transformers' forward
    over prompt + output, to 1e-4; the entries spell the output; a greedy token's logprob is
    the best of its top; prompt entries score each prompt token after the first."""
    monkeypatch.setattr(scheduler_module, "PREFILL_TOKENS", prefill_tokens)
    words = " ".join(CORPUS[:6]).split()
    tokenizer = loaded.tokenizer
    prompts = [
        tokenizer(" ".join(words[i : i + n]))["input_ids"]
        for i, (n, _) in enumerate(LOGPROB_REQUESTS)
    ]
    jobs = [
        GenerationJob(prompt, GenerationParams(NEW_TOKENS, **settings))
        for prompt, (_, settings) in zip(prompts, LOGPROB_REQUESTS, strict=True)
    ]
    scheduler, _ = make_scheduler(loaded)
    run(scheduler, *jobs)
    for prompt, job, (_, settings) in zip(prompts, jobs, LOGPROB_REQUESTS, strict=True):
        events = drain(job)
        scored = [event for event in events if isinstance(event, PromptLogprobs)]
        text, entries, end = with_entries(events)[0]
        top = settings.get("logprobs")
        ids = [entry.token_id for entry in entries]
        assert (len(ids), end.finish_reason) == (NEW_TOKENS if top is not None else 0, "length")
        if top is None:
            assert end.cumulative_logprob is None
            ids = [int(t) for t in transformers_greedy(stock, prompt, NEW_TOKENS)]
        assert text == decoded(loaded.tokenizer, prompt, ids)
        reference = forward_logprobs(stock, prompt + ids)
        for t, entry in enumerate(entries):
            assert_entry(entry, ids[t], reference[len(prompt) + t - 1], top)
            if settings["temperature"] == 0.0 and not set(settings) & PROCESSING and top:
                assert entry.top[0] == (entry.token_id, entry.logprob)  # greedy: the best
        if top is not None:
            assert abs(end.cumulative_logprob - sum(e.logprob for e in entries)) < 1e-4
        if settings.get("prompt_logprobs") is None:
            assert scored == []
            continue
        assert isinstance(events[0], PromptLogprobs)  # before any text
        (prompt_scores,) = scored
        assert prompt_scores.index == 0 and len(prompt_scores.entries) == len(prompt)
        assert prompt_scores.entries[0] is None
        for t in range(1, len(prompt)):
            assert_entry(
                prompt_scores.entries[t], prompt[t], reference[t - 1], settings["prompt_logprobs"]
            )
    assert min(len(p) for p in prompts) == 1  # a one-token prompt: only the None entry


def test_logprob_entries_of_tokens_cut_by_a_stop_string_are_not_sent(loaded, stock, prompts):
    prompt = prompts[0]
    reference = transformers_greedy(stock, prompt, NEW_TOKENS)
    stop = boundary_stop(loaded, reference, 2)
    before, n = stop_outcome(loaded, prompt, reference, stop)
    # the tokens whose whole text lies before the stop string
    whole = [
        k
        for k in range(1, n + 1)
        if len(decoded(loaded.tokenizer, prompt, reference[:k])) <= len(before)
    ]
    scheduler, _ = make_scheduler(loaded)
    job = greedy(prompt, NEW_TOKENS, stop=[stop], logprobs=1)
    run(scheduler, job)
    text, entries, end = with_entries(drain(job))[0]
    assert (text, end.tokens_generated, end.finish_reason) == (before, n, "stop")
    assert [entry.token_id for entry in entries] == reference[: max(whole, default=0)]
    assert len(entries) < n
    reference_scores = forward_logprobs(stock, prompt + reference)
    cumulative = sum(float(reference_scores[len(prompt) + t - 1, reference[t]]) for t in range(n))
    assert abs(end.cumulative_logprob - cumulative) < 1e-4  # every generated token counts


@pytest.mark.parametrize(
    ("stop", "max_tokens", "tokens"),
    [
        ("~", 8, 2),  # the stop string is the next token's text
        ("~\ufffd", 3, 3),  # completed by the text released at the end (max_tokens)
    ],
    ids=["in-a-token", "at-the-end"],
)
def test_a_token_without_text_before_a_stop_string_keeps_its_logprob_entry(
    loaded, stock, prompts, monkeypatch, stop, max_tokens, tokens
):
    """An end-of-sequence token under ignore_eos has no text; a stop string right after it
    cuts the tokens that spell it, not that token, whose entry is listed (docs/api.md).
    The model is steered by logit_bias and repetition_penalty, which the entries do not see
    (raw logprobs): end of sequence (bias 100) first, then, once it is divided by the
    penalty 4, "~" (70), then a lone byte of a UTF-8 character (40, released as U+FFFD)."""
    eos, tokenizer = loaded.tokenizer.eos_token_id, loaded.tokenizer
    tilde = tokenizer.convert_tokens_to_ids("~")
    byte = next(token for token in range(len(tokenizer)) if tokenizer.decode([token]) == "\ufffd")
    prompt = prompts[1]
    assert not {eos, tilde, byte} & set(prompt)  # the penalty starts with the output
    monkeypatch.setattr(loaded, "eos_ids", frozenset({eos}))
    bias = {eos: 100.0, tilde: 70.0, byte: 40.0}
    job = greedy(
        prompt,
        max_tokens,
        stop=[stop],
        ignore_eos=True,
        logit_bias=bias,
        repetition_penalty=4.0,
        logprobs=2,
    )
    scheduler, _ = make_scheduler(loaded)
    run(scheduler, job)
    text, entries, end = with_entries(drain(job))[0]
    assert (text, end.tokens_generated, end.finish_reason) == ("", tokens, "stop")
    assert len(entries) == 1
    assert_entry(entries[0], eos, forward_logprobs(stock, prompt)[-1], 2)


def test_the_entries_of_a_character_split_over_tokens_go_with_that_character(loaded, prompts):
    """A stop string that begins with a character whose UTF-8 bytes are two tokens cuts
    both tokens: neither entry is listed, although the first token's text (an incomplete
    character, held back) was empty when it came. logit_bias steers the model to "é" as its
    two byte tokens (0xC3 first, then 0xA9 once the penalty has divided 0xC3's logit)."""
    tokenizer = loaded.tokenizer
    lead, tail = (tokenizer.convert_tokens_to_ids(byte) for byte in ("Ã", "©"))
    assert tokenizer.decode([lead, tail]) == "é"
    prompt = prompts[1]
    assert not {lead, tail} & set(prompt)
    job = greedy(
        prompt,
        4,
        stop=["é"],
        logit_bias={lead: 100.0, tail: 70.0},
        repetition_penalty=4.0,
        logprobs=1,
    )
    scheduler, _ = make_scheduler(loaded)
    run(scheduler, job)
    text, entries, end = with_entries(drain(job))[0]
    assert (text, end.tokens_generated, end.finish_reason) == ("", 2, "stop")
    assert entries == []


def test_each_choice_gets_its_own_logprobs(loaded, stock, prompts):
    job = GenerationJob(
        prompts[2],
        GenerationParams(6, temperature=1.0, seed=5, logprobs=2, prompt_logprobs=1),
        n=3,
        index=2,
    )
    scheduler, _ = make_scheduler(loaded)
    run(scheduler, job)
    events = drain(job)
    assert [type(event) for event in events].count(PromptLogprobs) == 1
    assert isinstance(events[0], PromptLogprobs) and events[0].index == 2
    choices = with_entries(events)
    assert sorted(choices) == [2, 3, 4]
    for text, entries, end in choices.values():
        ids = [entry.token_id for entry in entries]
        assert len(ids) == end.tokens_generated == 6
        assert text == decoded(loaded.tokenizer, prompts[2], ids)
        reference = forward_logprobs(stock, prompts[2] + ids)
        for t, entry in enumerate(entries):
            assert_entry(entry, ids[t], reference[len(prompts[2]) + t - 1], 2)
    assert len({text for text, _, _ in choices.values()}) == 3


def test_a_tokenizer_without_a_pad_token_still_prefills_prompts_of_different_lengths(
    loaded, stock, prompts, monkeypatch
):
    """Left padding needs some id in the padded columns (they are masked out): a tokenizer
    with no pad token (GPT-2's, many base models') gets 0."""
    monkeypatch.setattr(loaded.tokenizer, "pad_token", None)
    assert loaded.tokenizer.pad_token_id is None
    scheduler, _ = make_scheduler(loaded)
    jobs = [greedy(prompts[0], 4), greedy(prompts[1], 4)]  # 16 and 5 tokens: one padded
    run(scheduler, *jobs)
    for job in jobs:
        text, _ = finished(job)
        expected = transformers_greedy(stock, job.prompt_ids, 4)
        assert text == decoded(loaded.tokenizer, job.prompt_ids, expected)


# --- structured output ----------------------------------------------------------------------

# JSON schemas a random model completes within STRUCTURED_TOKENS (bounded strings, numbers
# and arrays, no extra properties): nested objects, arrays, enums, bounded numbers, optional
# fields, anyOf.
SCHEMAS = [
    {
        "type": "object",
        "properties": {
            "name": {"type": "string", "maxLength": 8},
            "age": {"type": "integer", "minimum": 0, "maximum": 120},
            "ok": {"type": "boolean"},
        },
        "required": ["name", "age", "ok"],
        "additionalProperties": False,
    },
    {"type": "array", "items": {"enum": ["red", "green", "blue"]}, "minItems": 1, "maxItems": 4},
    {
        "type": "object",
        "properties": {
            "point": {
                "type": "object",
                "properties": {
                    "x": {"type": "integer", "minimum": -9, "maximum": 9},
                    "y": {"type": "integer", "minimum": -9, "maximum": 9},
                },
                "required": ["x", "y"],
                "additionalProperties": False,
            },
            "label": {"enum": ["a", "b", None]},
        },
        "required": ["point", "label"],
        "additionalProperties": False,
    },
    {
        "type": "object",
        "properties": {
            "a": {"type": "integer", "minimum": 0, "maximum": 9},
            "b": {"type": "string", "maxLength": 3},
        },
        "required": ["a"],
        "additionalProperties": False,
    },
    {
        "anyOf": [
            {"type": "integer", "minimum": 0, "maximum": 999},
            {"type": "string", "maxLength": 5},
        ]
    },
]
STRUCTURED_TOKENS = 120
CHOICES = ("Once upon", "The quick", "Models load")  # none a prefix of another
PATTERN = "[0-9]{3}-[a-z]{2,5}"


@pytest.fixture(scope="module")
def grammars(loaded) -> Constraints:
    """The model's constraint compiler, as its worker makes it (end of sequence: the
    tokenizer's, since each test here decides about eos_ids)."""
    width = logits_width(loaded.model)
    return Constraints(loaded.tokenizer, width, [loaded.tokenizer.eos_token_id])


def json_constraint(schema: dict) -> Constraint:
    return Constraint("json_schema", json.dumps(schema, separators=(",", ":")))


def constrained(
    grammars: Constraints, prompt: list[int], constraint: Constraint, max_tokens: int, **params
) -> GenerationJob:
    """A job whose choices are constrained, each with its own matcher (as new_job makes it)."""
    n = params.pop("n", 1)
    params = {"temperature": 0.0, "constraint": constraint, **params}
    return GenerationJob(
        prompt,
        GenerationParams(max_tokens, **params),
        n=n,
        matchers=grammars.matchers(constraint, n),
    )


@pytest.mark.parametrize("sampling", [{}, {"temperature": 1.0, "seed": 5}], ids=["greedy", "seed"])
def test_constrained_json_of_a_random_model_parses_and_validates(
    loaded, grammars, prompts, sampling
):
    scheduler, _ = make_scheduler(loaded, max_batch=len(SCHEMAS) * len(prompts))
    jobs = [
        (schema, constrained(grammars, p, json_constraint(schema), STRUCTURED_TOKENS, **sampling))
        for schema in SCHEMAS
        for p in prompts
    ]
    run(scheduler, *(job for _, job in jobs))
    for schema, job in jobs:
        text, end = finished(job)
        assert end.finish_reason == "stop", (schema, text)
        jsonschema.validate(json.loads(text), schema)
    assert_idle(scheduler)


@pytest.mark.parametrize("sampling", [{}, {"temperature": 1.3, "seed": 2}], ids=["greedy", "seed"])
def test_regex_and_choice_outputs_match(loaded, grammars, prompts, sampling):
    scheduler, _ = make_scheduler(loaded)
    pattern, choices = Constraint("regex", PATTERN), Constraint("choice", CHOICES)
    regex = [constrained(grammars, p, pattern, 30, **sampling) for p in prompts]
    choice = [constrained(grammars, p, choices, 30, **sampling) for p in prompts]
    run(scheduler, *regex, *choice)
    for job in regex:
        text, end = finished(job)
        assert re.fullmatch(PATTERN, text) and end.finish_reason == "stop", text
    for job in choice:
        text, end = finished(job)
        assert text in CHOICES and end.finish_reason == "stop", text


def transformers_constrained(
    stock: Any, tokenizer: Any, prompt: list[int], constraint: Constraint, max_tokens: int, **kw
) -> list[int]:
    """transformers' generate on one prompt alone, constrained through its own hook
    (prefix_allowed_tokens_fn) by an llguidance matcher of the constraint's grammar, the
    bitmask read bit by bit: the grammar library's answer applied by transformers, not by
    Tursi's sampler. The output ends where the grammar does (end of sequence not listed)."""
    width = stock.config.vocab_size
    matcher = llguidance.LLMatcher(
        llguidance.hf.from_tokenizer(tokenizer, n_vocab=width), grammar_text(constraint)
    )
    consumed: list[int] = []

    def allowed(_: int, ids: torch.Tensor) -> list[int]:
        for token in ids[len(prompt) + len(consumed) :].tolist():
            assert matcher.consume_token(token)
            consumed.append(token)
        bits = matcher.compute_bitmask()
        words = struct.unpack(f"<{len(bits) // 4}I", bits)
        return [i for i in range(width) if words[i // 32] >> (i % 32) & 1]

    eos = tokenizer.eos_token_id
    with torch.random.fork_rng(), torch.inference_mode():
        torch.manual_seed(kw.pop("seed", 0))
        out = stock.generate(
            torch.tensor([prompt]),
            max_new_tokens=max_tokens,
            eos_token_id=eos,
            pad_token_id=0,
            prefix_allowed_tokens_fn=allowed,
            top_k=0,
            **kw,
        )[0, len(prompt) :].tolist()
    return out[: out.index(eos)] if eos in out else out


@pytest.mark.parametrize("ignore_eos", [False, True])
def test_constrained_rows_in_a_batch_equal_transformers_with_the_grammar_alone(
    loaded, stock, grammars, prompts, ignore_eos
):
    """Greedy and seeded rows of several constraints in one batch (prefills included) choose
    what transformers chooses for each alone under the same grammar. A row ends with stop at
    the token that completes its grammar (no end-of-sequence step), with ignore_eos too."""
    cases = [
        (Constraint("choice", CHOICES), {"do_sample": False}),
        (Constraint("choice", CHOICES), {"do_sample": True, "temperature": 1.0, "seed": 3}),
        (json_constraint(SCHEMAS[0]), {"do_sample": False}),
        (json_constraint(SCHEMAS[2]), {"do_sample": True, "temperature": 0.7, "seed": 8}),
        (Constraint("regex", PATTERN), {"do_sample": True, "temperature": 1.2, "seed": 1}),
    ]
    jobs = []
    for i, (constraint, kw) in enumerate(cases):
        params = {"temperature": kw.get("temperature", 0.0), "seed": kw.get("seed")}
        job = constrained(
            grammars, prompts[i % 4], constraint, STRUCTURED_TOKENS, ignore_eos=ignore_eos, **params
        )
        jobs.append(job)
    scheduler, _ = make_scheduler(loaded)
    run(scheduler, *jobs)
    for i, ((constraint, kw), job) in enumerate(zip(cases, jobs, strict=True)):
        prompt = prompts[i % 4]
        reference = transformers_constrained(
            stock, loaded.tokenizer, prompt, constraint, STRUCTURED_TOKENS, **dict(kw)
        )
        text, end = finished(job)
        assert text == decoded(loaded.tokenizer, prompt, reference), (constraint, kw)
        assert (end.tokens_generated, end.finish_reason) == (len(reference), "stop")


@pytest.mark.parametrize("ignore_eos", [False, True])
def test_an_end_of_sequence_the_grammar_allows_ends_the_output_without_text(
    loaded, grammars, prompts, ignore_eos
):
    """[0-9]{1,5}: after one digit the grammar accepts, so it allows end of sequence; the
    bias makes the model take it. It ends the choice (with ignore_eos too: the grammar
    ends there), counted, its text never sent."""
    eos = loaded.tokenizer.eos_token_id
    job = constrained(
        grammars,
        prompts[1],
        Constraint("regex", "[0-9]{1,5}"),
        10,
        logit_bias={eos: 100.0},
        ignore_eos=ignore_eos,
    )
    scheduler, _ = make_scheduler(loaded)
    run(scheduler, job)
    text, end = finished(job)
    assert re.fullmatch("[0-9]", text)
    assert (end.finish_reason, end.tokens_generated) == ("stop", 2)


def test_max_tokens_inside_the_structure_ends_with_length(loaded, grammars, prompts):
    scheduler, _ = make_scheduler(loaded)
    job = constrained(grammars, prompts[0], json_constraint(SCHEMAS[0]), 3)
    run(scheduler, job)
    text, end = finished(job)
    assert (end.finish_reason, end.tokens_generated) == ("length", 3)
    assert text.startswith('{"')
    with pytest.raises(ValueError):
        json.loads(text)


def test_n_constrained_choices_each_follow_the_grammar_with_their_own_matcher(
    loaded, grammars, prompts
):
    scheduler, _ = make_scheduler(loaded)
    job = constrained(
        grammars,
        prompts[2],
        json_constraint(SCHEMAS[0]),
        STRUCTURED_TOKENS,
        n=3,
        temperature=1.0,
        seed=4,
    )
    run(scheduler, job)
    choices = choices_of(job)
    assert sorted(choices) == [0, 1, 2]
    for text, end in choices.values():
        assert end.finish_reason == "stop"
        jsonschema.validate(json.loads(text), SCHEMAS[0])
    assert len({text for text, _ in choices.values()}) > 1  # seed + i: different draws


def test_unconstrained_greedy_rows_are_the_same_alone_and_beside_eight_constrained_rows(
    loaded, stock, grammars, prompts
):
    """Issue 15's batch correctness: the masks of constrained rows change nothing in the
    rows beside them (fp32; the reference is transformers' own greedy decoding)."""
    tokens = 24
    plain_prompts = [prompts[0], prompts[3]]
    references = [transformers_greedy(stock, p, tokens) for p in plain_prompts]
    for prompt, reference in zip(plain_prompts, references, strict=True):  # alone
        scheduler, _ = make_scheduler(loaded)
        job = greedy(prompt, tokens)
        run(scheduler, job)
        assert finished(job)[0] == decoded(loaded.tokenizer, prompt, reference)
    kinds = [
        json_constraint(SCHEMAS[0]),
        json_constraint(SCHEMAS[2]),
        Constraint("regex", PATTERN),
        Constraint("choice", CHOICES),
    ]
    beside = [
        constrained(grammars, prompts[i % 4], kind, tokens, **sampling)
        for i, kind in enumerate(kinds)
        for sampling in ({}, {"temperature": 1.0, "seed": i})
    ]
    assert len(beside) == 8
    plain = [greedy(p, tokens) for p in plain_prompts]
    scheduler, _ = make_scheduler(loaded, max_batch=10)
    run(scheduler, beside[0], plain[0], *beside[1:5], plain[1], *beside[5:])
    for prompt, reference, job in zip(plain_prompts, references, plain, strict=True):
        text, end = finished(job)
        assert (text, end.finish_reason) == (decoded(loaded.tokenizer, prompt, reference), "length")
    for job in beside:
        assert finished(job)[1].tokens_generated <= tokens


def test_a_choice_whose_grammar_fails_fails_alone(loaded, stock, grammars, prompts, caplog):
    """A matcher that fails mid-generation (a work limit in a step; here a refused token fed
    to it) fails its request with generation_failed; the batch goes on."""
    scheduler, on_done = make_scheduler(loaded)
    broken = constrained(grammars, prompts[0], Constraint("choice", CHOICES), 20)
    other = greedy(prompts[1], NEW_TOKENS)
    scheduler.add(broken)
    scheduler.add(other)
    scheduler.turn()
    with pytest.raises(GrammarError):
        broken.matchers[0].advance(loaded.tokenizer("zzz")["input_ids"][0])
    run(scheduler)
    _, error = failed(broken)
    assert isinstance(error, GenerationFailed)
    assert error.message.startswith("Structured output failed: ")
    assert error.details == {"field": "structured_outputs"}
    assert on_done.of(broken) == [(0.0, False)]
    text, end = finished(other)
    expected = decoded(
        loaded.tokenizer, prompts[1], transformers_greedy(stock, prompts[1], NEW_TOKENS)
    )
    assert (text, end.finish_reason) == (expected, "length")
    assert_idle(scheduler)
