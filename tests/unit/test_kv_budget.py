"""The KV budget (TURSI_KV_CACHE): the Scheduler admits no more rows than fit it, the batch's
buffers never grow past it, and what waits runs later with the same output.

The engine runs a fused float32 Llama whose greedy tokens depend on the whole context (the
model of test_reference.py) and each request's greedy ids are checked against transformers'
own decoding of that prompt alone (`transformers_greedy`): a budget that mixed up rows while
holding them back would fail there."""

from __future__ import annotations

import gc
import weakref

import pytest
import torch

from tests.helpers import transformers_greedy
from tursi.engine import kvcache
from tursi.engine.jobs import GenerationJob, GenerationParams
from tursi.engine.kvcache import BatchCache, KVBudget, measure_token_bytes
from tursi.engine.scheduler import Scheduler
from tursi.telemetry import ModelStats

pytestmark = pytest.mark.usefixtures("one_torch_thread")

PROMPT, MAX_TOKENS = 120, 6


def prompt(seed: int) -> list[int]:
    generator = torch.Generator().manual_seed(seed)
    return torch.randint(5, 200, (PROMPT,), generator=generator).tolist()


def test_token_bytes_are_the_models_keys_and_values_per_token(llama):
    loaded, _ = llama
    config = loaded.model.config
    head_dim = config.hidden_size // config.num_attention_heads
    expected = config.num_hidden_layers * 2 * config.num_key_value_heads * head_dim * 4
    assert measure_token_bytes(loaded.model, loaded.device) == expected


@pytest.mark.parametrize(("short", "rows"), [(0, 3), (1, 2)])
def test_a_budget_runs_as_many_rows_as_fit_beside_one_prefill(engine, short, rows):
    """Eight requests under a budget for three rows grown to the most beside one prompt's
    prefill (not a fourth), or one token short of that (then the third row's prefill does
    not fit: two at a time)."""
    loaded, stock = engine
    token_bytes = measure_token_bytes(loaded.model, loaded.device)
    columns = PROMPT + MAX_TOKENS + 1
    budget = KVBudget((3 * columns + PROMPT - short) * token_bytes, token_bytes)
    scheduler = Scheduler(
        "llama", loaded, 16, lambda job, seconds, ok: None, ModelStats("llama"), 0, budget
    )
    prompts = [prompt(seed) for seed in range(8)]
    jobs = [
        GenerationJob(p, GenerationParams(MAX_TOKENS, temperature=0.0, ignore_eos=True))
        for p in prompts
    ]
    for job in jobs:
        scheduler.add(job)
    sequences, most_rows, most_bytes = {}, 0, 0
    while not scheduler.idle:
        scheduler.turn()
        for live in scheduler.live.values():
            sequences[live.job] = live.choices[0]
        most_rows = max(most_rows, len(scheduler.rows))
        most_bytes = max(most_bytes, scheduler.cache.reserved_bytes)
    assert most_rows == rows  # the budget, not max_batch (16), held the rest back
    assert most_bytes <= budget.bytes
    for job, tokens in zip(jobs, prompts, strict=True):
        ids = sequences[job].decoder.ids[PROMPT:]
        assert ids == transformers_greedy(stock, tokens, MAX_TOKENS)


def test_the_buffers_take_only_what_the_rows_need_once_doubling_would_pass_the_limit():
    column = 2 * 2 * 4 * 4  # layers x (keys, values) x heads x head_dim over float32: one row
    cache = BatchCache(2, max_length=1000, boolean_mask=True, limit_bytes=3 * 300 * column)
    assert cache._shape(2, 200, 0, 0, column) == (2, 256)  # doubling fits
    assert cache._shape(3, 300, 2, 256, column) == (3, 300)  # doubling (4 x 512) would not
    cache.limit_bytes = None
    assert cache._shape(3, 300, 2, 256, column) == (4, 512)


def test_a_finished_prefills_cache_is_freed_at_once(llama, monkeypatch):
    """A prefill group's cache (a prompt's whole KV) is freed when the prefill ends, by
    reference counting: with the cyclic garbage collector off, none is left alive. (Its layers
    once pointed back at it, a cycle that kept each buffer until the collector ran: a burst of
    long prompts under a 40 MiB budget grew a worker by ~290 MiB.)"""
    loaded, _ = llama
    created: list[weakref.ref] = []
    make = kvcache.PrefillCache.__init__

    def tracked(self, *args):
        make(self, *args)
        created.append(weakref.ref(self))

    monkeypatch.setattr(kvcache.PrefillCache, "__init__", tracked)
    scheduler = Scheduler("llama", loaded, 4, lambda job, seconds, ok: None, ModelStats("llama"))
    gc.collect()
    gc.disable()
    try:
        for seed in range(3):
            params = GenerationParams(MAX_TOKENS, temperature=0.0, ignore_eos=True)
            scheduler.add(GenerationJob(prompt(seed), params))
            while not scheduler.idle:
                scheduler.turn()
        alive = [ref for ref in created if ref() is not None]
    finally:
        gc.enable()
    assert len(created) == 3 and alive == []


def test_a_request_alone_needs_every_choice_grown_to_the_most_and_its_prefill():
    budget = KVBudget(10**9, token_bytes=8)
    job = GenerationJob(list(range(100)), GenerationParams(20), n=3)
    assert budget.alone(job, 1000) == (3 * (100 + 20 + 1) + 100) * 8
    long = GenerationJob(list(range(100)), GenerationParams(2000))
    assert budget.alone(long, 512) == (512 + 1 + 100) * 8  # the context bounds the growth


def test_used_bytes_are_the_running_rows_tokens(llama):
    """What the batch's rows fill: every row's columns times one token's keys and values over
    every layer (measured by transformers' own cache), whatever the buffers reserve."""
    loaded, _ = llama
    token_bytes = measure_token_bytes(loaded.model, loaded.device)
    scheduler = Scheduler("llama", loaded, 4, lambda job, seconds, ok: None, ModelStats("llama"))
    for seed, length in enumerate((30, 70)):
        params = GenerationParams(MAX_TOKENS, temperature=0.0, ignore_eos=True)
        scheduler.add(GenerationJob(prompt(seed)[:length], params))
    while not scheduler.cache.size == 2:
        scheduler.turn()
    for _ in range(3):
        cache = scheduler.cache
        assert cache.used_bytes() == sum(cache.lengths) * token_bytes
        assert sorted(cache.lengths)[0] >= 30 and cache.reserved_bytes > cache.used_bytes()
        scheduler.turn()
