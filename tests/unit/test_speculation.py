"""Speculative decoding (tursi.engine.speculation, Scheduler._verify_step) against outside
references.

- Greedy, float32, the embedded model: what the Scheduler generates with speculation on equals
  transformers' greedy decoding of each prompt alone (the stock model read from the same
  converted folder, a DynamicCache, one token per step), on a copy prompt (drafts accepted),
  a free prompt (drafts mostly rejected), alone and in one batch with speculation off for
  another request, and ended by a stop string or max_tokens inside an accepted draft.
- Sampling: the tokens drawn with speculation follow the distribution drawn without it (a
  chi-square test over many seeds, on a tiny model with repeated patterns so that drafts
  are made, kept and rejected).
- The drafter itself: the n-gram lookup and the cooldown.
"""

from __future__ import annotations

import collections
import dataclasses
import math
import random

import pytest
import torch
from transformers import AutoModelForCausalLM

from tests.helpers import build_llama, decoded, transformers_greedy, verify_every_draft
from tursi.engine.catalog import Catalog, CatalogEntry
from tursi.engine.constraints import Constraints
from tursi.engine.jobs import Constraint, Finished, GenerationJob, GenerationParams, TextChunk
from tursi.engine.loading import LoadOptions, load_model
from tursi.engine.loading.weights import converted_dir, embedded_gguf
from tursi.engine.prefix_cache import BLOCK_TOKENS
from tursi.engine.scheduler import Scheduler
from tursi.engine.speculation import (
    REFRESH,
    DraftState,
    NgramIndex,
    SpeculationSettings,
    Speculator,
    expected_tokens,
)
from tursi.engine.tokens import logits_width

pytestmark = pytest.mark.usefixtures("one_torch_thread")

PASSAGE = (
    "The lighthouse stood on a narrow point of rock at the mouth of the harbour. Every "
    "evening the keeper climbed the hundred and twelve steps, trimmed the wick, polished "
    "the great lens and lit the lamp, and every morning he wrote in his log how the wind "
    "had blown and which ships had passed in the night."
)
COPY = f"Repeat the following text word for word.\n\n{PASSAGE}"
FREE = "Write a short story about a robot who learns to paint."


# --- the drafter --------------------------------------------------------------------------


def test_propose_takes_what_followed_the_latest_occurrence_of_the_longest_suffix():
    tokens = NgramIndex([5, 6, 7, 1, 9, 6, 7, 2, 3, 8, 6, 7])
    # "6 7" occurs at 1 and 5: the latest one's continuation
    assert tokens.propose(3) == [2, 3, 8]
    # a longer suffix wins over a later shorter one: "9 6 7" occurred once, at 4
    assert NgramIndex([9, 6, 7, 4, 4, 6, 7, 0, 9, 6, 7]).propose(2) == [4, 4]
    assert tokens.propose(1) == [2]
    assert tokens.propose(0) == []


def test_propose_needs_two_matching_tokens_and_stops_at_the_end():
    assert NgramIndex([1, 2, 3, 4, 3]).propose(4) == []  # "3" alone is not enough
    assert NgramIndex([1, 2, 3, 4]).propose(4) == []
    # the match's continuation runs into the suffix itself: cut at the end
    assert NgramIndex([7, 7, 7]).propose(5) == [7]


def scanned(tokens: list[int], limit: int) -> list[int]:
    """The drafter's rule by a plain scan: what followed the latest earlier occurrence of the
    longest suffix of 4, 3 or 2 tokens."""
    for n in (4, 3, 2):
        if len(tokens) <= n:
            continue
        for start in range(len(tokens) - n - 1, -1, -1):
            if tokens[start : start + n] == tokens[-n:]:
                return tokens[start + n : start + n + limit]
    return []


def test_the_index_proposes_what_a_scan_finds_as_the_sequence_grows():
    generator = random.Random(7)
    for _ in range(50):
        tokens = [generator.randrange(4) for _ in range(generator.randrange(1, 60))]
        index = NgramIndex(tokens[:5])
        for end in range(5, len(tokens) + 1):
            index.extend(tokens[len(index.tokens) : end])
            limit = generator.randrange(1, 6)
            assert index.propose(limit) == scanned(tokens[:end], limit), (tokens[:end], limit)


def test_draft_state_copies_the_output_and_counts_what_was_kept():
    state = DraftState([1, 2, 3, 4])
    assert state.draft([1], 2, 4) == [3, 4, 1, 2]  # prompt 1 2 3 4, output 1, next 2
    assert state.keep_rate(0.5) == 0.5  # nothing verified yet: the prior
    state.verified(4, 4)  # all kept
    state.verified(4, 1)  # one kept, then a miss
    assert (state.drafted, state.accepted, state.misses) == (8, 5, 1)
    assert state.keep_rate(0.5) == 6 / 8  # (5 kept + 2 x 0.5) / (5 + 1 missed + 2)
    assert state.keep_rate(0.9) == pytest.approx(6.8 / 8)
    assert state.draft([1, 2, 3], 4, 2) == [1, 2]  # output now 1 2 3, next 4


def test_expected_tokens_counts_the_chosen_token_and_each_kept_prefix():
    assert expected_tokens(0.5, 0) == 1
    assert expected_tokens(0.5, 3) == 1 + 0.5 + 0.25 + 0.125
    assert expected_tokens(1.0, 8) == 9


def test_the_speculator_drafts_only_when_the_measured_cost_pays_off():
    speculator = Speculator(SpeculationSettings())
    copying, free = (0.95, [7] * 8), (0.2, [5, 6])
    assert speculator.choose([copying]) == [[]]  # no plain step measured yet
    speculator.measured(1, 1, 0.030)
    assert speculator.choose([copying]) == [[7] * 8]  # FIRST_EXTRA: worth all 8
    assert speculator.choose([(0.0, [])]) == [[]]  # nothing proposed
    speculator.measured(1, 9, 0.030 * (1 + 8 * 0.25))  # each verify column: 0.25 of a step
    assert speculator.extra[1] == pytest.approx(0.25)
    assert speculator.choose([free]) == [[]]  # 1.2 tokens for 1.25 the time: no
    assert speculator.choose([copying]) == [[7] * 8]
    assert speculator.choose([(0.5, [7] * 8)]) == [[7]]  # 1.5 for 1.25; 1.75 for 1.5...
    # Two rows: costs are per row count (unmeasured: the nearest row count's, 0.25), and the
    # width is the step's: at 7, (6.02 + 1.24) tokens for 2.5 the time (2.91 a unit) beat
    # the copying row's full draft ((7.40 + 1.24) / 3 = 2.88).
    assert speculator.choose([copying, free]) == [[], []]  # no plain 2-row step measured
    speculator.measured(2, 1, 0.035)
    assert speculator.choose([copying, free]) == [[7] * 6, [5, 6]]
    speculator.measured(2, 7, 0.035 * (1 + 6 * 0.5))  # measured: half a step a column
    assert speculator.extra == {1: pytest.approx(0.25), 2: pytest.approx(0.5)}
    # now at best 2.1 tokens a unit (width 2): not 10% more than 2
    assert speculator.choose([copying, free]) == [[], []]
    speculator.measured(2, 7, 0.035 * (1 + 6 * 1.5))  # a slower step: a running average
    assert speculator.extra[2] == pytest.approx(0.75 * 0.5 + 0.25 * 1.5)


def test_the_speculators_keep_rate_is_every_rows_so_far():
    speculator = Speculator(SpeculationSettings())
    assert speculator.keep_rate == 0.5
    speculator.verified(8, 8)
    speculator.verified(3, 0)
    speculator.verified(2, 2)
    assert speculator.keep_rate == (10 + 1) / (10 + 1 + 2)


def test_the_speculator_keeps_measuring_plain_steps():
    speculator = Speculator(SpeculationSettings())
    speculator.measured(2, 1, 0.05)
    rows = [(1.0, [1, 2, 3]), (1.0, [4])]
    for _ in range(REFRESH):
        assert speculator.choose(rows) == [[1, 2, 3], [4]]
        speculator.measured(2, 4, 0.06)
    assert speculator.choose(rows) == [[], []]  # a plain step is due
    speculator.measured(2, 1, 0.04)
    assert speculator.plain[2] == pytest.approx(0.75 * 0.05 + 0.25 * 0.04)
    assert speculator.choose(rows) == [[1, 2, 3], [4]]


# --- the embedded model in float32 -----------------------------------------------------------


@pytest.fixture(scope="module")
def embedded(embedded_home):
    """(the embedded model loaded as the server loads it in float32, the stock transformers
    model read from the same converted folder)."""
    entry = Catalog.load(None).get("smollm2-135m-instruct")
    home = str(embedded_home)
    loaded = load_model(entry, LoadOptions(dtype="float32").resolved(entry), home)
    folder = converted_dir(entry, home, embedded_gguf(entry))
    stock = AutoModelForCausalLM.from_pretrained(folder, dtype=torch.float32).eval()
    return loaded, stock


def chat(tokenizer, text: str) -> list[int]:
    """The ids of one user turn in the model's chat template, ready for the answer."""
    rendered = tokenizer.apply_chat_template(
        [{"role": "user", "content": text}], add_generation_prompt=True, tokenize=False
    )
    return tokenizer(rendered, add_special_tokens=False)["input_ids"]


@pytest.fixture(scope="module")
def references(embedded):
    """{prompt name: (prompt ids, the stock model's 90 greedy ids)}."""
    loaded, stock = embedded
    found = {}
    for name, text in (("copy", COPY), ("free", FREE)):
        prompt = chat(loaded.tokenizer, text)
        found[name] = (prompt, transformers_greedy(stock, prompt, 90))
    return found


def run(loaded, jobs, settings=None, max_batch=8, drafting=None) -> Scheduler:
    """Every job through one Scheduler until all have ended, verifying every draft the rows
    propose (whatever the measured costs would choose: the output must not depend on it);
    with `drafting`, every row drafts that token as far as it may."""
    scheduler = Scheduler(
        "test", loaded, max_batch, lambda job, seconds, ok: None, speculation=settings
    )
    with pytest.MonkeyPatch.context() as patch:
        verify_every_draft(patch, drafting)
        for job in jobs:
            scheduler.add(job)
        while not scheduler.idle:
            scheduler.turn()
    return scheduler


def outcome(job) -> tuple[str, Finished]:
    pieces = []
    while True:
        event = job.events.get(timeout=1)
        if isinstance(event, Finished):
            return "".join(pieces), event
        assert isinstance(event, TextChunk), event
        pieces.append(event.text)


def greedy(prompt, max_tokens, **params) -> GenerationJob:
    return GenerationJob(
        prompt, GenerationParams(max_tokens, temperature=0.0, ignore_eos=True, **params)
    )


def test_greedy_copy_and_free_prompts_equal_transformers_with_drafts_kept(embedded, references):
    loaded, _ = embedded
    for name in ("copy", "free"):
        prompt, expected = references[name]
        job = greedy(prompt, len(expected))
        scheduler = run(loaded, [job])
        text, finished = outcome(job)
        assert text == decoded(loaded.tokenizer, prompt, expected), name
        assert finished.tokens_generated == len(expected)
        stats = scheduler.stats
        if name == "copy":  # most of the copy came from drafts
            assert stats.accepted_tokens >= len(expected) // 2, vars(stats)
            assert stats.accepted_tokens <= stats.drafted_tokens
        else:  # the free text drafted rarely, and kept little of it
            assert stats.drafted_tokens > 0, vars(stats)
            assert stats.accepted_tokens < stats.drafted_tokens / 2, vars(stats)


def test_a_batch_with_and_without_speculation_equals_each_prompt_alone(embedded, references):
    loaded, _ = embedded
    copy_prompt, copy_ids = references["copy"]
    free_prompt, free_ids = references["free"]
    jobs = [
        greedy(copy_prompt, 90),
        greedy(free_prompt, 90),
        greedy(copy_prompt, 90, speculative=False),
        greedy(free_prompt, 60),
    ]
    scheduler = run(loaded, jobs, None)
    wanted = [copy_ids, free_ids, copy_ids, free_ids[:60]]
    prompts = [copy_prompt, free_prompt, copy_prompt, free_prompt]
    for index, (job, prompt, ids) in enumerate(zip(jobs, prompts, wanted, strict=True)):
        text, finished = outcome(job)
        assert text == decoded(loaded.tokenizer, prompt, ids), index
        assert (finished.tokens_generated, finished.finish_reason) == (len(ids), "length")
    assert scheduler.stats.accepted_tokens > 40


def test_a_stop_string_or_max_tokens_inside_an_accepted_draft_ends_the_choice_there(
    embedded, references
):
    """The copy's drafts run past where the stop string and max_tokens end it: nothing after
    is sent, the tokens counted are those before."""
    loaded, _ = embedded
    prompt, expected = references["copy"]
    full = decoded(loaded.tokenizer, prompt, expected)
    stop = "hundred and"  # in the middle of the passage
    assert stop in full
    stopped = greedy(prompt, 90, stop=[stop])
    cut = greedy(prompt, 37)
    scheduler = run(loaded, [stopped, cut])
    text, finished = outcome(stopped)
    assert (text, finished.finish_reason) == (full[: full.index(stop)], "stop")
    assert finished.tokens_generated < len(expected)
    text, finished = outcome(cut)
    assert (text, finished.finish_reason) == (
        decoded(loaded.tokenizer, prompt, expected[:37]),
        "length",
    )
    assert finished.tokens_generated == 37
    assert scheduler.stats.accepted_tokens > 10
    assert not scheduler.rows and scheduler.cache.size == 0


# --- sampling ---------------------------------------------------------------------------

PATTERN = "lazy dog lazy dog lazy dog lazy"  # ends " dog", " lazy": one token each


@pytest.fixture(scope="module")
def tiny(tmp_path_factory):
    """A tiny random Llama in float32."""
    path = build_llama(tmp_path_factory.mktemp("tiny"), seed=3)
    entry = CatalogEntry("tiny", "local", str(path), dtype="float32")
    home = str(tmp_path_factory.mktemp("home"))
    return load_model(entry, LoadOptions().resolved(entry), home)


def sample_runs(loaded, seeds, speculative) -> tuple[list[tuple[int, ...]], Scheduler]:
    """Four tokens sampled (temperature 1) after PATTERN for each seed, the
    pattern's last two tokens given a logit bias of +20: the draws are between those two, as
    the model's logits weigh them, so n-gram drafts of the pattern are sometimes kept and
    sometimes not."""
    prompt = loaded.tokenizer(PATTERN)["input_ids"]
    bias = dict.fromkeys(prompt[-2:], 20.0)
    jobs = [
        GenerationJob(
            prompt,
            GenerationParams(
                4,
                temperature=1.0,
                seed=seed,
                ignore_eos=True,
                logit_bias=bias,
                speculative=speculative,
            ),
        )
        for seed in seeds
    ]
    scheduler = run(loaded, jobs, SpeculationSettings(tokens=3), max_batch=16)
    texts = []
    for job in jobs:
        text, finished = outcome(job)
        assert finished.tokens_generated == 4
        texts.append(text)
    return texts, scheduler


def test_sampled_tokens_follow_the_same_distribution_with_and_without_drafts(tiny):
    on, scheduler = sample_runs(tiny, range(800), True)
    drafted, kept = scheduler.stats.drafted_tokens, scheduler.stats.accepted_tokens
    assert 0.1 * drafted < kept < 0.9 * drafted  # drafts were made, kept and rejected
    off, scheduler = sample_runs(tiny, range(800, 1600), False)
    assert scheduler.stats.drafted_tokens == 0
    # chi-square test of homogeneity over the outputs seen at least 10 times in all, the
    # rest pooled
    counts_on, counts_off = collections.Counter(on), collections.Counter(off)
    common = [text for text in counts_on | counts_off if counts_on[text] + counts_off[text] >= 10]
    assert len(common) >= 6
    rest = (
        len(on) - sum(counts_on[text] for text in common),
        len(off) - sum(counts_off[text] for text in common),
    )
    table = [(counts_on[text], counts_off[text]) for text in common] + [rest]
    statistic = sum((a - b) ** 2 / (a + b) for a, b in table if a + b)  # equal sample sizes
    dof = len(table) - 1
    # the 0.999 quantile of chi-square(dof) (Wilson-Hilferty): a false failure in 1,000 runs
    bound = dof * (1 - 2 / (9 * dof) + 3.09 * math.sqrt(2 / (9 * dof))) ** 3
    assert statistic < bound, (statistic, bound, table)


def test_a_seeded_request_draws_the_same_tokens_with_and_without_drafts(tiny):
    """Each kept token is one draw of the row's generator, as without speculation."""
    on, scheduler = sample_runs(tiny, range(40), True)
    assert scheduler.stats.accepted_tokens > 0
    off, _ = sample_runs(tiny, range(40), False)
    assert on == off


# --- the other request features ---------------------------------------------------------------


def shape(event) -> tuple:
    """An event without its float figures: (text or finish, index, token ids listed)."""
    if isinstance(event, Finished):
        return (event.finish_reason, event.index, event.tokens_generated)
    ids = [(e.token_id, [token for token, _ in e.top]) for e in event.logprobs]
    return (event.text, event.index, ids)


def numbers(events) -> list[float]:
    """Every logprob in `events`, in order (cumulative ones included)."""
    found = []
    for event in events:
        if isinstance(event, Finished):
            found.append(event.cumulative_logprob or 0.0)
        else:
            for entry in event.logprobs:
                found += [entry.logprob, *(value for _, value in entry.top)]
    return found


def events_of(job) -> list:
    """Every event of a finished job (until each of its choices has finished), their time
    fields zeroed."""
    found, running = [], job.n
    while running:
        event = job.events.get(timeout=1)
        if isinstance(event, Finished):
            event = dataclasses.replace(event, generation_seconds=0.0)
            running -= 1
        found.append(event)
    return found


def test_logprobs_penalties_grammar_and_n_see_the_same_tokens_with_drafts(tiny):
    """Every feature a kept token passes through (logprobs with their top tokens, the three
    penalties, a grammar, several choices of one prompt, sampling with a seed, stop strings)
    gives the same events with every draft verified as with speculation off, on prompts the
    tiny model repeats (so drafts are made and kept)."""
    constraints = Constraints(tiny.tokenizer, logits_width(tiny.model), [0])
    prompt = tiny.tokenizer(PATTERN)["input_ids"]
    regex = Constraint("regex", "( lazy| dog){3,40}")
    cases = [
        {"logprobs": 3},
        {"frequency_penalty": 0.4, "presence_penalty": 0.2, "repetition_penalty": 1.1},
        {"temperature": 0.8, "seed": 11, "logprobs": 1},
        {"constraint": regex},
        {"stop": ["dog dog"]},
    ]

    def jobs(speculative: bool) -> list[GenerationJob]:
        made = []
        for params in cases:
            n = 2 if "seed" in params else 1
            matchers = (
                constraints.matchers(params["constraint"], n) if "constraint" in params else None
            )
            settings = {"temperature": 0.0, **params, "speculative": speculative}
            made.append(
                GenerationJob(prompt, GenerationParams(30, **settings), n=n, matchers=matchers)
            )
        return made

    with_drafts = jobs(True)
    scheduler = run(tiny, with_drafts)
    assert scheduler.stats.accepted_tokens > 0
    without = jobs(False)
    run(tiny, without)
    for index, (a, b) in enumerate(zip(with_drafts, without, strict=True)):
        # per choice: two choices' events interleave otherwise when one keeps drafts
        got, expected = (sorted(events_of(job), key=lambda e: e.index) for job in (a, b))
        # the same events, tokens and texts; logprobs equal to float32 precision (a verify
        # pass runs its matmuls on another shape than a one-token step)
        assert [shape(event) for event in got] == [shape(e) for e in expected], cases[index]
        assert numbers(got) == pytest.approx(numbers(expected), rel=1e-5, abs=1e-5)


# --- the context and the prefix cache -------------------------------------------------------


def test_a_row_at_the_end_of_the_context_bounds_the_others_drafts(tmp_path):
    """Every row of a verify step writes the step's width of columns, padding included: a
    row four columns before the end of the context lets the other row draft no further than
    the last column. Each row drafts as much as it may (a token the model rarely chooses:
    drafts are rejected, their width is the point). The output still equals transformers'
    greedy decoding of each prompt alone."""
    path = build_llama(tmp_path / "model", seed=3, max_position_embeddings=64)
    entry = CatalogEntry("short", "local", str(path), dtype="float32")
    loaded = load_model(entry, LoadOptions().resolved(entry), str(tmp_path / "home"))
    assert loaded.context_length == 64
    stock = AutoModelForCausalLM.from_pretrained(path, dtype=torch.float32).eval()
    pattern = loaded.tokenizer(PATTERN)["input_ids"]
    near_the_end = (pattern * 10)[:60]
    repeating = pattern * 3
    jobs = [greedy(near_the_end, 4), greedy(repeating, 30)]
    scheduler = run(loaded, jobs, SpeculationSettings(tokens=8), drafting=5)
    for job in jobs:
        text, _ = outcome(job)
        expected = transformers_greedy(stock, job.prompt_ids, job.params.max_tokens)
        assert text == decoded(loaded.tokenizer, job.prompt_ids, expected)
    assert scheduler.stats.drafted_tokens > 0


def test_tokens_run_in_verify_steps_are_cached_with_the_prompt(tiny, monkeypatch):
    """A conversation's next turn hits the previous answer in the prefix cache: the tokens
    run in verify steps (each row's next token and the drafts it kept) are stored too."""
    scheduler = Scheduler(
        "test", tiny, 8, lambda job, seconds, ok: None, prefix_cache_bytes=64 * 1024**2
    )
    verify_every_draft(monkeypatch)
    prompt = tiny.tokenizer(PATTERN)["input_ids"] * 4
    first = greedy(prompt, 40)
    scheduler.add(first)
    while not scheduler.idle:
        for live in scheduler.live.values():
            choice = live.choices[0]
        scheduler.turn()
    assert scheduler.stats.accepted_tokens > 0
    answer = choice.decoder.ids[len(prompt) :]
    assert len(answer) == 40
    following = greedy(prompt + answer + [5, 6, 7], 1)
    scheduler.add(following)
    while not scheduler.idle:
        scheduler.turn()
    _, finished = outcome(following)
    run_through = len(prompt) + len(answer) - 1  # the last token was chosen, never run
    assert finished.cached_tokens == run_through // BLOCK_TOKENS * BLOCK_TOKENS
