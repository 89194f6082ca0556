"""Unit tests for the batching engine's building blocks: batched token choice
(sampling.nucleus, sampling.choose_tokens) and the running batch's KV cache (BatchCache).
No model, no app."""

import pytest
import torch
from transformers import DynamicCache

from tursi.engine.jobs import SamplingParams
from tursi.engine.kvcache import BatchCache
from tursi.engine.sampling import TokenChooser, choose_tokens, nucleus

# --- nucleus ---------------------------------------------------------------------------------


def nucleus_by_full_sort(probs, top_p):
    """The definition: sort everything, keep a token while the mass before it is < top_p."""
    values, ids = torch.sort(probs, descending=True)
    keep = (torch.cumsum(values, -1) - values) < top_p
    keep[0] = True
    return ids[keep], values[keep]


def distribution(size, shape, seed):
    """A shuffled float32 distribution with no two equal probabilities (so the expected
    nucleus is unique): "peaked" decays geometrically, "flat" is nearly uniform."""
    ranks = torch.arange(size, dtype=torch.float64)
    weights = torch.exp(-ranks / 8) if shape == "peaked" else 1000.0 + ranks
    probs = (weights / weights.sum()).float()
    return probs[torch.randperm(size, generator=torch.Generator().manual_seed(seed))]


@pytest.mark.parametrize("size", [5, 64, 65, 400, 513, 5000])
@pytest.mark.parametrize("shape", ["peaked", "flat"])
@pytest.mark.parametrize("top_p", [1e-9, 0.3, 0.9, 0.99])
def test_nucleus_equals_the_full_sort_definition(size, shape, top_p):
    probs = distribution(size, shape, seed=size)
    ids, kept = nucleus(probs, top_p)
    expected_ids, expected_kept = nucleus_by_full_sort(probs, top_p)
    assert torch.equal(ids, expected_ids)
    assert torch.equal(kept, expected_kept)


def test_nucleus_grows_past_the_first_partial_sorts():
    # The cases above reach beyond 64 and 512 tokens; make sure of it.
    assert len(nucleus(distribution(400, "flat", 0), 0.9)[0]) > 64
    assert len(nucleus(distribution(5000, "flat", 0), 0.9)[0]) > 512
    assert len(nucleus(distribution(5000, "flat", 0), 0.99)[0]) > 4096


# --- choose_tokens ---------------------------------------------------------------------------


def chooser(temperature, top_p=1.0, seed=None):
    return TokenChooser(SamplingParams(temperature=temperature, top_p=top_p, seed=seed))


def mixed_choosers():
    return [
        chooser(0.0),
        chooser(0.8, 0.9, seed=1),
        chooser(0.0),
        chooser(1.0, 1.0, seed=2),
        chooser(0.5, 0.5, seed=3),
        chooser(0.0),
    ]


def test_choose_tokens_mixes_greedy_and_sampled_rows():
    steps = [
        torch.randn(6, 300, generator=torch.Generator().manual_seed(step)) for step in range(30)
    ]
    choosers, again = mixed_choosers(), mixed_choosers()
    first = [choose_tokens(logits, choosers) for logits in steps]
    second = [choose_tokens(logits, again) for logits in steps]
    assert first == second  # seeded rows reproduce

    for logits, tokens in zip(steps, first, strict=False):
        assert [tokens[i] for i in (0, 2, 5)] == logits[[0, 2, 5]].argmax(-1).tolist()
    sampled = [[tokens[i] for tokens in first] for i in (1, 3, 4)]
    assert all(len(set(row)) > 3 for row in sampled)  # really sampled, not argmax
    assert [tokens[1] for tokens in first] != [tokens[3] for tokens in first]


def test_a_sampled_row_draws_the_same_alone_or_in_a_batch():
    steps = [
        torch.randn(6, 300, generator=torch.Generator().manual_seed(step)) for step in range(30)
    ]
    choosers = mixed_choosers()
    batched = [choose_tokens(logits, choosers) for logits in steps]
    for row in (1, 3, 4):
        alone = mixed_choosers()[row]
        assert [choose_tokens(logits[row][None], [alone])[0] for logits in steps] == [
            tokens[row] for tokens in batched
        ]


def test_choose_tokens_takes_half_precision_logits():
    logits = torch.randn(3, 100, generator=torch.Generator().manual_seed(0)).bfloat16()
    tokens = choose_tokens(logits, [chooser(0.0), chooser(1.0, 0.9, seed=0), chooser(0.0)])
    assert [tokens[0], tokens[2]] == logits[[0, 2]].float().argmax(-1).tolist()
    assert 0 <= tokens[1] < 100


# --- BatchCache ------------------------------------------------------------------------------

LAYERS, HEADS, DIM = 2, 2, 4


def prefill_cache(rows, width):
    """A prefill cache whose entries say where they come from: keys[b, :, s, :] = 100 * b + s
    (values are the keys' negatives), plus 1000 * layer."""
    cache = DynamicCache()
    marks = (100 * torch.arange(rows)[:, None] + torch.arange(width)[None, :]).float()
    for layer in range(LAYERS):
        keys = (marks + 1000 * layer)[:, None, :, None].expand(rows, HEADS, width, DIM)
        cache.update(keys.clone(), -keys.clone(), layer)
    return cache


def row_marks(cache, row, layer=0):
    """The marks of one row's used columns (one number per column)."""
    keys = cache.layers[layer].keys[row, :, : cache.lengths[row]]
    values = cache.layers[layer].values[row, :, : cache.lengths[row]]
    assert torch.equal(values, -keys)
    assert (keys == keys[:1, :, :1]).all(-1).all(0).all()  # same mark over heads and dim
    return keys[0, :, 0].tolist()


def test_add_row_copies_the_unpadded_columns():
    source = prefill_cache(rows=3, width=6)
    cache = BatchCache(LAYERS, max_length=100, boolean_mask=True)
    assert cache.add_row(source, 1, start=2, length=4) == 0
    assert cache.add_row(source, 0, start=0, length=6) == 1
    assert cache.lengths == [4, 6]
    assert row_marks(cache, 0) == [102, 103, 104, 105]
    assert row_marks(cache, 1) == [0, 1, 2, 3, 4, 5]
    assert row_marks(cache, 0, layer=1) == [1102, 1103, 1104, 1105]


def test_rows_stay_packed_when_a_middle_row_leaves():
    source = prefill_cache(rows=5, width=8)
    cache = BatchCache(LAYERS, max_length=100, boolean_mask=True)
    for row, length in enumerate([3, 8, 5, 2, 7]):  # buffers grow while rows are added
        cache.add_row(source, row, start=8 - length, length=length)
    assert [row_marks(cache, row)[0] for row in range(5)] == [5, 100, 203, 306, 401]

    cache.remove_row(1)  # the last row (source row 4) moves into row 1
    assert cache.lengths == [3, 7, 5, 2]
    assert row_marks(cache, 1) == [401, 402, 403, 404, 405, 406, 407]
    assert row_marks(cache, 1, layer=1) == [1401, 1402, 1403, 1404, 1405, 1406, 1407]
    assert [row_marks(cache, row) for row in (0, 2, 3)] == [
        [5, 6, 7],
        [203, 204, 205, 206, 207],
        [306, 307],
    ]

    cache.remove_row(3)  # the last row leaves: nothing moves
    assert cache.lengths == [3, 7, 5]
    assert row_marks(cache, 2) == [203, 204, 205, 206, 207]

    for _ in range(3):
        assert cache.layers[0].keys is not None
        cache.remove_row(0)
    assert cache.size == 0
    assert all(layer.keys is None and layer.values is None for layer in cache.layers)
    assert cache.nbytes() == 0


def test_a_step_writes_each_row_at_its_own_column():
    source = prefill_cache(rows=2, width=5)
    cache = BatchCache(LAYERS, max_length=100, boolean_mask=True)
    cache.add_row(source, 0, start=0, length=5)
    cache.add_row(source, 1, start=3, length=2)

    positions, mask = cache.prepare_step(torch.device("cpu"))
    assert positions.tolist() == [[5], [2]]
    assert mask.shape == (2, 1, 1, 6)
    assert mask[:, 0, 0].tolist() == [[True] * 6, [True] * 3 + [False] * 3]
    new = torch.tensor([50.0, 150.0])[:, None, None, None].expand(2, HEADS, 1, DIM)
    for layer in cache.layers:
        keys, values = layer.update(new.clone(), -new.clone(), layer_idx=0)
        assert keys.shape == values.shape == (2, HEADS, 6, DIM)
    cache.advance()

    assert cache.lengths == [6, 3]
    assert row_marks(cache, 0) == [0, 1, 2, 3, 4, 50]
    assert row_marks(cache, 1) == [103, 104, 150]


def test_additive_mask_for_eager_attention():
    cache = BatchCache(LAYERS, max_length=100, boolean_mask=False)
    source = prefill_cache(rows=2, width=3)
    cache.add_row(source, 0, start=0, length=3)
    cache.add_row(source, 1, start=2, length=1)
    _, mask = cache.prepare_step(torch.device("cpu"))
    assert mask.dtype == torch.float32
    assert mask[0, 0, 0].tolist() == [0.0] * 4
    assert mask[1, 0, 0, :2].tolist() == [0.0, 0.0]
    assert (mask[1, 0, 0, 2:] == torch.finfo(torch.float32).min).all()
