"""Unit tests for the pure parts: stop strings, detokenization, sampling, formatting,
settings, the catalog file and request counters. No app, no model weights (except the
tiny tokenizer for the decoder tests)."""

from __future__ import annotations

import collections

import pytest
import torch
from transformers.generation.logits_process import (
    RepetitionPenaltyLogitsProcessor,
    TopKLogitsWarper,
)

from tursi.engine.sampling import TokenChooser, choose_tokens, nucleus, top_p_filter


def test_temperature_zero_is_argmax():
    logits = torch.tensor([0.1, 2.5, -1.0, 2.4, 0.0])
    choose = TokenChooser(temperature=0.0, top_p=0.5, seed=123)
    assert [choose(logits) for _ in range(5)] == [1] * 5
    assert choose.generator is None


def test_top_p_keeps_smallest_nucleus():
    probs = torch.tensor([0.05, 0.5, 0.15, 0.3])
    kept = top_p_filter(probs, 0.75)  # 0.5 + 0.3 reaches 0.75; 0.15 is not needed
    assert torch.allclose(kept, torch.tensor([0.0, 0.5 / 0.8, 0.0, 0.3 / 0.8]))
    assert torch.allclose(top_p_filter(probs, 0.5), torch.tensor([0.0, 1.0, 0.0, 0.0]))
    assert torch.allclose(top_p_filter(probs, 0.9), torch.tensor([0.0, 0.5, 0.15, 0.3]) / 0.95)
    assert torch.allclose(top_p_filter(probs, 1.0), probs)


def test_top_p_always_keeps_the_top_token():
    probs = torch.tensor([0.2, 0.7, 0.1])
    assert torch.allclose(top_p_filter(probs, 0.01), torch.tensor([0.0, 1.0, 0.0]))


def test_top_p_below_float32_range_keeps_the_top_token():
    probs = torch.tensor([0.2, 0.7, 0.1])
    assert torch.equal(top_p_filter(probs, 1e-50), torch.tensor([0.0, 1.0, 0.0]))


def test_tiny_temperature_behaves_like_greedy():
    logits = torch.tensor([0.1, 2.5, -1.0, 2.4])
    assert TokenChooser(temperature=1e-45, top_p=1.0, seed=0)(logits) == 1


def test_sampling_never_picks_filtered_tokens():
    logits = torch.log(torch.tensor([0.05, 0.5, 0.15, 0.3]))
    choose = TokenChooser(temperature=1.0, top_p=0.75, seed=0)
    picks = {choose(logits) for _ in range(200)}
    assert picks == {1, 3}


def test_seeded_sampling_is_reproducible():
    logits = torch.zeros(50)  # uniform: every pick comes from the generator
    first = TokenChooser(temperature=1.0, top_p=1.0, seed=42)
    second = TokenChooser(temperature=1.0, top_p=1.0, seed=42)
    other = TokenChooser(temperature=1.0, top_p=1.0, seed=43)
    a = [first(logits) for _ in range(30)]
    b = [second(logits) for _ in range(30)]
    c = [other(logits) for _ in range(30)]
    assert a == b
    assert a != c
    assert len(set(a)) > 5


def test_temperature_sharpens_and_flattens():
    logits = torch.tensor([0.0, 1.0])
    cold = TokenChooser(temperature=0.05, top_p=1.0, seed=1)
    assert [cold(logits) for _ in range(50)] == [1] * 50
    hot = TokenChooser(temperature=2.0, top_p=1.0, seed=1)
    assert {hot(logits) for _ in range(100)} == {0, 1}


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


def mixed_choosers():
    return [
        TokenChooser(0.0),
        TokenChooser(0.8, 0.9, seed=1),
        TokenChooser(0.0),
        TokenChooser(1.0, 1.0, seed=2),
        TokenChooser(0.5, 0.5, seed=3),
        TokenChooser(0.0),
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
        assert [alone(logits[row]) for logits in steps] == [tokens[row] for tokens in batched]


def test_choose_tokens_takes_half_precision_logits():
    logits = torch.randn(3, 100, generator=torch.Generator().manual_seed(0)).bfloat16()
    tokens = choose_tokens(
        logits, [TokenChooser(0.0), TokenChooser(1.0, 0.9, seed=0), TokenChooser(0.0)]
    )
    assert [tokens[0], tokens[2]] == logits[[0, 2]].float().argmax(-1).tolist()
    assert 0 <= tokens[1] < 100


LAYERS, HEADS, DIM = 2, 2, 4


# Ten tokens; the three most likely are 7, 2 and 5, and the rest are close behind, so that a
# draw without a cut lands outside the top three most of the time.
LOGITS = torch.tensor([1.0, 0.5, 2.6, 0.9, 1.1, 2.4, 0.8, 3.0, 1.2, 0.7])


TOP3 = {7, 2, 5}


def draws(seeds=range(400), **settings):
    return [TokenChooser(seed=seed, **settings)(LOGITS.clone()) for seed in seeds]


def test_top_k_keeps_only_the_k_most_likely_tokens():
    for k, allowed in [(1, {7}), (2, {7, 2}), (3, TOP3)]:
        drawn = collections.Counter(draws(temperature=1.0, top_k=k))
        assert set(drawn) == allowed, (k, drawn)  # every one of them, and only them
    uncut = collections.Counter(draws(temperature=1.0))
    assert set(uncut) - TOP3  # the test would notice a missing cut
    assert collections.Counter(draws(temperature=1.0, top_k=0)) == uncut  # 0 = off


def test_top_k_draws_follow_the_renormalized_distribution():
    expected = torch.softmax(LOGITS / 0.7, -1)[[7, 2, 5]]
    expected = (expected / expected.sum()).tolist()
    drawn = collections.Counter(draws(seeds=range(3000), temperature=0.7, top_k=3))
    for token, p in zip((7, 2, 5), expected, strict=False):
        assert abs(drawn[token] / 3000 - p) < 0.04, (token, drawn[token] / 3000, p)


def test_top_k_matches_transformers_top_k_warper():
    torch.manual_seed(0)
    logits = torch.randn(50)
    for k in (1, 5, 17):
        kept = torch.isfinite(TopKLogitsWarper(k)(None, logits[None].clone())[0])
        allowed = set(torch.nonzero(kept).flatten().tolist())
        assert len(allowed) == k
        drawn = {TokenChooser(temperature=2.0, top_k=k, seed=s)(logits.clone()) for s in range(300)}
        assert drawn <= allowed
        assert len(drawn) > min(k, 3) - 1


@pytest.mark.parametrize("top_k", [10, 11, 1_000_000])
def test_top_k_at_or_above_the_vocabulary_is_no_cut(top_k):
    assert draws(temperature=1.0, top_k=top_k) == draws(temperature=1.0)


def test_top_k_1_is_greedy_at_any_temperature():
    torch.manual_seed(1)
    for _ in range(20):
        logits = torch.randn(300) * 3
        best = int(logits.argmax())
        for temperature in (0.3, 1.0, 2.0):
            for seed in range(5):
                assert TokenChooser(temperature, seed=seed, top_k=1)(logits) == best


def test_top_k_then_top_p():
    # Within the top 3 (renormalized), token 7 alone has less than 0.9 of the mass: the
    # nucleus keeps 7 and 2, never 5 (and never anything outside the top 3).
    drawn = collections.Counter(draws(seeds=range(600), temperature=1.0, top_k=3, top_p=0.6))
    assert set(drawn) == {7, 2}


def test_top_k_per_row_in_a_batch():
    """One choose_tokens call with rows that use different settings: each keeps its own."""
    batch = LOGITS[None].repeat(4, 1)
    counts = [collections.Counter() for _ in range(4)]
    for seed in range(300):
        choosers = [
            TokenChooser(1.0, seed=seed, top_k=1),
            TokenChooser(1.0, seed=seed),
            TokenChooser(0.0),
            TokenChooser(1.0, seed=seed, top_k=2),
        ]
        for row, token in enumerate(choose_tokens(batch.clone(), choosers)):
            counts[row][token] += 1
    assert set(counts[0]) == {7}
    assert set(counts[1]) - TOP3
    assert set(counts[2]) == {7}
    assert set(counts[3]) == {7, 2}


@pytest.mark.parametrize("penalty", [0.5, 1.3, 2.0, 5.0])
def test_repetition_penalty_matches_transformers(penalty):
    torch.manual_seed(2)
    logits = torch.randn(64) * 4  # positive and negative logits
    history = [3, 7, 7, 12, 40, 63, 0, 12]
    chooser = TokenChooser(temperature=0, repetition_penalty=penalty, history=history)
    ours = logits.clone()
    chooser.penalize(ours)
    reference = RepetitionPenaltyLogitsProcessor(penalty)(
        torch.tensor([history]), logits[None].clone()
    )[0]
    torch.testing.assert_close(ours, reference)
    assert not torch.equal(ours, logits)


def test_repetition_penalty_in_choose_tokens_matches_transformers():
    """Greedy picks after the penalty, per row of a batch, over prompt + generated tokens."""
    torch.manual_seed(3)
    logits = torch.randn(3, 32) * 3
    history = [int(i) for i in logits[0].topk(4).indices] + [5]  # the top tokens of row 0
    original = logits.clone()
    choosers = [
        TokenChooser(0.0, repetition_penalty=4.0, history=history[:2]),
        TokenChooser(0.0, repetition_penalty=1.0, history=history),
        TokenChooser(0.0, repetition_penalty=4.0, history=history[:2]),
    ]
    for token in history[2:]:
        choosers[2].remember(token)  # generated tokens count as well as the prompt's
    tokens = choose_tokens(logits, choosers)
    assert torch.equal(logits, original)  # the caller's logits are left alone

    def reference(row, penalty, ids):
        scores = RepetitionPenaltyLogitsProcessor(penalty)(
            torch.tensor([ids]), logits[row : row + 1]
        )
        return int(scores.argmax())

    assert tokens[0] == reference(0, 4.0, history[:2])
    assert tokens[1] == int(logits[1].argmax())  # penalty 1: none
    assert tokens[2] == reference(2, 4.0, history)
    assert tokens[0] != int(logits[0].argmax())  # the penalty changed the pick


def test_repetition_penalty_1_keeps_no_history():
    chooser = TokenChooser(0.0, repetition_penalty=1.0, history=[1, 2, 3])
    chooser.remember(4)
    assert chooser.seen == set()
