"""The prefix cache (tursi.engine.prefix_cache): its bookkeeping, and the engine's output with
it against an outside reference.

Every engine test here runs a fused float32 Llama whose greedy tokens depend on the whole
context (the model of test_reference.py) through the Scheduler with a prefix cache, and
checks each request's greedy ids against transformers' own decoding of that prompt alone
(`transformers_greedy`, the stock model read from the same folder): for whole-block hits,
partial hits, hits of different lengths inside one prefill group, prompts that are prefixes
of cached ones, hits on a previous answer's generated tokens, and after evictions; on the
C++ decode step and the torch-ops one. `cached_tokens` (what the API reports) is checked to
be the hit the test set up, so a cache that silently missed would fail too.
"""

from __future__ import annotations

from typing import Any

import pytest
import torch

from tests.helpers import transformers_greedy
from tursi.engine import scheduler as scheduler_module
from tursi.engine.catalog import CatalogEntry
from tursi.engine.jobs import Finished, GenerationJob, GenerationParams
from tursi.engine.kvcache import PrefillCache
from tursi.engine.loading import LoadOptions, load_model
from tursi.engine.prefix_cache import BLOCK_TOKENS, Block, PrefixCache, place
from tursi.engine.scheduler import Scheduler
from tursi.telemetry import ModelStats

B = BLOCK_TOKENS

pytestmark = pytest.mark.usefixtures("one_torch_thread")


# --- the cache's bookkeeping ------------------------------------------------------------------


def kv_of(tokens: list[int]):
    """A KVReader whose block values name their tokens (so a test can tell blocks apart)."""

    def read(start: int, end: int) -> torch.Tensor:
        return torch.tensor(tokens[start:end], dtype=torch.float32).view(1, 1, 1, end - start, 1)

    return read


BLOCK_BYTES = B * 4  # kv_of's block: B float32 values


def store(cache: PrefixCache, tokens: list[int]) -> None:
    cache.store(tokens, len(tokens), kv_of(tokens))


def hit(cache: PrefixCache, tokens: list[int]) -> int:
    return len(cache.match(tokens, len(tokens))) * B


def test_only_whole_blocks_are_kept_and_found():
    cache = PrefixCache(100 * BLOCK_BYTES)
    tokens = list(range(2 * B + 5))
    store(cache, tokens)
    assert cache.bytes_held == 2 * BLOCK_BYTES
    assert hit(cache, tokens) == 2 * B
    assert hit(cache, tokens[: 2 * B - 1]) == B  # a prefix of a cached prompt
    assert hit(cache, tokens[:B] + [999] + tokens[B + 1 :]) == B  # differs in block 2
    assert hit(cache, [999] + tokens[1:]) == 0  # a block is keyed by every token before it
    assert len(cache.match(tokens, 2 * B - 1)) == 1  # the limit is respected
    chain = cache.match(tokens, len(tokens))
    assert [block.kv.view(-1).tolist() for block in chain] == [tokens[:B], tokens[B : 2 * B]]


def test_the_same_block_after_another_prefix_is_another_block():
    cache = PrefixCache(100 * BLOCK_BYTES)
    shared = list(range(B))
    store(cache, list(range(100, 100 + B)) + shared)
    assert hit(cache, shared + shared) == 0
    store(cache, shared + shared)
    assert hit(cache, shared + shared) == 2 * B
    assert cache.bytes_held == 4 * BLOCK_BYTES


def test_storing_again_only_touches():
    cache = PrefixCache(100 * BLOCK_BYTES)
    tokens = list(range(3 * B))
    store(cache, tokens)
    reads = []
    cache.store(tokens, len(tokens), lambda start, end: reads.append(start))
    assert reads == [] and cache.bytes_held == 3 * BLOCK_BYTES


def test_least_recently_used_chains_are_evicted_from_their_ends():
    cache = PrefixCache(4 * BLOCK_BYTES)
    old, new = list(range(2 * B)), list(range(1000, 1000 + 2 * B))
    store(cache, old)
    store(cache, new)
    assert hit(cache, old) == 2 * B  # old is now the more recent
    store(cache, list(range(5000, 5000 + B)))  # one block more than fits: new's last goes
    assert (hit(cache, old), hit(cache, new), cache.evictions) == (2 * B, B, 1)
    assert cache.bytes_held == 4 * BLOCK_BYTES


def test_evicting_a_block_drops_the_blocks_after_it():
    cache = PrefixCache(3 * BLOCK_BYTES)
    tokens = list(range(3 * B))
    store(cache, tokens)
    first = cache.match(tokens, B)[0]
    cache._evict(first)
    assert (hit(cache, tokens), cache.bytes_held, cache.evictions) == (0, 0, 3)


def test_a_store_larger_than_the_cache_keeps_what_fits_in_order():
    cache = PrefixCache(2 * BLOCK_BYTES)
    tokens = list(range(5 * B))
    store(cache, tokens)
    assert hit(cache, tokens) == 2 * B and cache.bytes_held == 2 * BLOCK_BYTES
    assert cache.evictions == 0  # its own chain is never evicted to make room for itself


def test_a_sequence_shorter_than_a_block_keeps_nothing():
    cache = PrefixCache(100 * BLOCK_BYTES)
    store(cache, list(range(B - 1)))
    assert cache.bytes_held == 0


def test_a_cache_of_one_block_holds_one():
    cache = PrefixCache(BLOCK_BYTES)
    store(cache, list(range(B)))
    assert hit(cache, list(range(B + 1))) == B


def test_a_store_that_fills_the_cache_still_makes_its_chain_the_most_recent():
    """The chain a store walked is touched even when the store stopped for room: it is
    evicted from its end, after older blocks."""
    cache = PrefixCache(3 * BLOCK_BYTES)
    z = list(range(4 * B))
    store(cache, list(range(1000, 1000 + B)))  # an older block
    store(cache, z)  # three blocks fit, evicting the older one; the fourth does not
    assert (cache.bytes_held, cache.evictions) == (3 * BLOCK_BYTES, 1)  # (a lookup would touch)
    store(cache, list(range(5000, 5000 + B)))  # one more block: z's last goes, not its first
    assert hit(cache, z) == 2 * B


def test_a_zero_size_cache_is_off():
    cache = PrefixCache(0)
    assert not cache.enabled
    store(cache, list(range(2 * B)))
    assert cache.bytes_held == 0


# --- the engine with the cache, against transformers -----------------------------------------


class Run:
    """A Scheduler with a prefix cache; `run` submits jobs together and runs them to the end."""

    def __init__(self, loaded: Any, capacity: int = 64 * 1024**2, max_batch: int = 16):
        self.stats = ModelStats("llama")
        self.scheduler = Scheduler(
            "llama", loaded, max_batch, lambda job, seconds, ok: None, self.stats, capacity
        )

    def run(self, prompts: list[list[int]], max_tokens: int = 8, **job) -> list[tuple]:
        """[(generated ids, cached_tokens)] per prompt, all submitted in the same turn."""
        jobs = [
            GenerationJob(
                prompt, GenerationParams(max_tokens, temperature=0.0, ignore_eos=True), **job
            )
            for prompt in prompts
        ]
        for item in jobs:
            self.scheduler.add(item)
        sequences: dict[GenerationJob, Any] = {}
        while not self.scheduler.idle:
            for live in self.scheduler.live.values():
                sequences[live.job] = live.choices[0]
            self.scheduler.turn()
        return [
            (sequences[item].decoder.ids[len(item.prompt_ids) :], finished(item)) for item in jobs
        ]


def finished(job: GenerationJob) -> int:
    """cached_tokens of the job's Finished event."""
    while True:
        event = job.events.get(timeout=1)
        if isinstance(event, Finished):
            return event.cached_tokens


def prompt(seed: int, length: int) -> list[int]:
    generator = torch.Generator().manual_seed(seed)
    return torch.randint(5, 200, (length,), generator=generator).tolist()


def check(stock: Any, prompts: list[list[int]], results: list[tuple], cached: list[int]) -> None:
    for index, (ids_and_hit, tokens, expected_hit) in enumerate(
        zip(results, prompts, cached, strict=True)
    ):
        ids, hit_tokens = ids_and_hit
        assert hit_tokens == expected_hit, f"prompt {index}"
        assert ids == transformers_greedy(stock, tokens, len(ids)), f"prompt {index}"


def test_whole_block_partial_and_prefix_hits_equal_transformers(engine):
    loaded, stock = engine
    run = Run(loaded)
    first = prompt(1, 2 * B + 10)
    check(stock, [first], run.run([first]), [0])
    again = first  # the same prompt: two whole blocks cached, 10 tokens prefilled
    partial = first[: B + 3] + prompt(2, 40)  # shares block 1 and 3 tokens of block 2
    shorter = first[: 2 * B]  # a prefix of the cached prompt: the last token is prefilled
    for tokens, hit_tokens in [(again, 2 * B), (partial, B), (shorter, B)]:
        check(stock, [tokens], run.run([tokens]), [hit_tokens])


def test_hits_of_different_lengths_in_one_prefill_group_equal_transformers(engine):
    loaded, stock = engine
    run = Run(loaded)
    base = prompt(3, 3 * B + 1)
    run.run([base])
    prompts = [
        base[: 3 * B] + prompt(4, 7),  # 3 blocks cached
        base[:B] + prompt(5, 50),  # 1 block
        prompt(6, 20),  # none
        base[: 2 * B] + prompt(7, 3),  # 2 blocks
    ]
    results = run.run(prompts)
    check(stock, prompts, results, [3 * B, B, 0, 2 * B])


@pytest.mark.parametrize("count", [3, 4])
def test_prompts_that_arrive_together_prefill_their_shared_prefix_once(engine, count):
    loaded, stock = engine
    run = Run(loaded)
    system = prompt(8, 2 * B + 4)
    prompts = [system + prompt(10 + i, 5 + i) for i in range(count)]
    results = run.run(prompts)
    check(stock, prompts, results, [0] + [2 * B] * (count - 1))
    assert run.stats.totals()["prefix_cached_tokens"] == 2 * B * (count - 1)


def rows_after_one_turn(run: Run, prompts: list[list[int]]) -> int:
    """How many of `prompts`, submitted together, are in the batch after one turn (were
    prefilled in the first group); the rest of the run is then finished."""
    for tokens in prompts:
        run.scheduler.add(GenerationJob(tokens, GenerationParams(4, temperature=0.0)))
    run.scheduler.turn()
    rows = len(run.scheduler.rows)
    while not run.scheduler.idle:
        run.scheduler.turn()
    return rows


def test_only_a_block_that_another_prompt_of_the_group_stores_makes_a_prompt_wait(llama):
    loaded, _ = llama
    short = prompt(80, 10)
    assert rows_after_one_turn(Run(loaded), [short, short]) == 2  # no whole block to share
    block = prompt(81, B)
    # a prompt that is one whole block stores it: the longer prompt waits, then hits it
    run = Run(loaded)
    assert rows_after_one_turn(run, [block, block + prompt(82, 5)]) == 1
    assert run.stats.totals()["prefix_cached_tokens"] == B
    # a prompt's first missing block is keyed by its cached chain: another prompt whose
    # FIRST block has the same tokens is another block, and does not wait
    run = Run(loaded)
    first, second = prompt(83, B), prompt(84, B)
    run.run([first + [7]])  # caches `first` (block id 1)
    assert rows_after_one_turn(run, [first + second + [9], second + [8]]) == 2


def test_a_previous_answer_is_cached_with_its_prompt(engine):
    """A conversation's next turn: the prompt is the last turn's prompt, its answer and a
    new question; the answer's tokens were generated, never prefilled."""
    loaded, stock = engine
    run = Run(loaded)
    turn = prompt(20, B + 5)
    ((answer, _),) = run.run([turn], max_tokens=2 * B)
    fed = answer[:-1]  # the last token was chosen but never run through the model
    following = turn + answer + prompt(21, 6)
    hit_tokens = (len(turn) + len(fed)) // B * B
    check(stock, [following], run.run([following]), [hit_tokens])


def test_outputs_hold_after_evictions(engine):
    loaded, stock = engine
    kv_bytes = 2 * 2 * 2 * 16 * 4  # layers, keys and values, kv heads, head size, float32
    run = Run(loaded, capacity=3 * B * kv_bytes)  # three blocks
    prompts = [prompt(30 + i, 2 * B + 3) for i in range(3)]
    for tokens in prompts:
        run.run([tokens])
    assert run.scheduler.prefix_cache.evictions > 0
    assert run.scheduler.prefix_cache.bytes_held <= 3 * B * kv_bytes
    again = run.run(prompts)  # the oldest were evicted: whatever is left is used, or none
    hits = [hit_tokens for _, hit_tokens in again]
    assert hits[-1] > 0 and hits[0] == 0
    check(stock, prompts, again, hits)


def test_cache_prompt_false_neither_uses_nor_keeps(engine):
    loaded, stock = engine
    run = Run(loaded)
    tokens = prompt(40, 2 * B + 2)
    check(stock, [tokens], run.run([tokens], cache_prompt=False), [0])
    assert run.scheduler.prefix_cache.bytes_held == 0
    run.run([tokens])
    check(stock, [tokens], run.run([tokens], cache_prompt=False), [0])


def test_a_cache_belongs_to_one_scheduler(llama, tmp_path):
    """Models never share a cache: another scheduler (another model, or the same model
    loaded again after an unload) starts empty."""
    loaded, stock = llama
    tokens = prompt(50, 2 * B + 2)
    Run(loaded).run([tokens])
    check(stock, [tokens], Run(loaded).run([tokens]), [0])


def test_choices_of_one_prompt_share_its_hit(engine):
    """n > 1: a job's choices are rows of one prefill, so they share its hit."""
    loaded, stock = engine
    run = Run(loaded)
    tokens = prompt(60, 2 * B + 9)
    run.run([tokens])
    job = GenerationJob(tokens, GenerationParams(6, temperature=0.0, ignore_eos=True), n=3)
    run.scheduler.add(job)
    while not run.scheduler.idle:
        run.scheduler.turn()
    hits = []
    while len(hits) < 3:
        event = job.events.get(timeout=1)
        if isinstance(event, Finished):
            hits.append(event.cached_tokens)
    assert hits == [2 * B] * 3


def test_a_quantized_load_is_cached_too(llama_path, tmp_path):
    """int8: each token chosen after a hit is the best of transformers' forward of the same
    quantized model over prompt + output (within test_reference's tolerance for int8's
    rounding of near-ties)."""
    from tests.unit.test_reference import QUANTIZED_TOLERANCE, worst_deficit

    entry = CatalogEntry("llama", "local", str(llama_path), dtype="float32")
    options = LoadOptions(True, 8, "dynamic")
    quantized = load_model(entry, options.resolved(entry), str(tmp_path))
    run = Run(quantized)
    tokens = prompt(70, 2 * B + 5)
    run.run([tokens])
    ((ids, hit_tokens),) = run.run([tokens], max_tokens=12)
    assert hit_tokens == 2 * B
    assert worst_deficit(quantized.model, tokens, ids) <= QUANTIZED_TOLERANCE


@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float32])
def test_placed_blocks_keep_the_models_dtype_and_their_columns(dtype):
    """place() allocates the group's cache in the blocks' dtype (a bf16 model's KV stays
    bf16) and right-aligns each row's chain; a row with a shorter chain is zero on the left."""
    layers, heads, dim = 2, 3, 4
    first = Block(1, (0, (1,)), torch.randn(layers, 2, heads, BLOCK_TOKENS, dim).to(dtype))
    second = Block(2, (1, (2,)), torch.randn(layers, 2, heads, BLOCK_TOKENS, dim).to(dtype))
    cache = PrefillCache(layers, 2, 2 * BLOCK_TOKENS)
    place([[first, second], [second]], 2 * BLOCK_TOKENS, cache)
    assert cache.buffer.dtype == dtype and cache.filled == 2 * BLOCK_TOKENS
    rows = cache.buffer.shape
    assert rows == (layers, 2, 2, heads, 2 * BLOCK_TOKENS, dim)
    assert torch.equal(cache.buffer[:, :, 0, :, :BLOCK_TOKENS], first.kv)
    assert torch.equal(cache.buffer[:, :, 0, :, BLOCK_TOKENS:], second.kv)
    assert not cache.buffer[:, :, 1, :, :BLOCK_TOKENS].any()
    assert torch.equal(cache.buffer[:, :, 1, :, BLOCK_TOKENS:], second.kv)


def test_a_prompt_one_token_past_whole_blocks_hits_every_block(engine):
    """Every prompt token but the last may come from the cache (the last one's logits
    choose the first token): a prompt of two blocks and one token hits both blocks."""
    loaded, stock = engine
    run = Run(loaded)
    tokens = prompt(40, 2 * B + 1)
    run.run([tokens])
    check(stock, [tokens], run.run([tokens]), [2 * B])


def test_cached_tokens_do_not_count_against_a_groups_prefill_width(engine, monkeypatch):
    """A group's chunks cover what its prompts still prefill: four prompts of three cached
    blocks and 8 new tokens each fit one group under a 40-token prefill budget (4 x 8),
    which any one of them whole (104 tokens) would exceed alone."""
    loaded, stock = engine
    run = Run(loaded)
    base = prompt(8, 3 * B + 1)
    run.run([base])
    groups: list[int] = []
    made = scheduler_module._Prefill

    def counted(jobs, *args):
        groups.append(len(jobs))
        return made(jobs, *args)

    monkeypatch.setattr(scheduler_module, "PREFILL_TOKENS", 40)
    monkeypatch.setattr(scheduler_module, "_Prefill", counted)
    prompts = [base[: 3 * B] + prompt(50 + i, 8) for i in range(4)]
    results = run.run(prompts)
    assert groups == [4]
    check(stock, prompts, results, [3 * B] * 4)
