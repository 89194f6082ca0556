"""top_k and repetition_penalty: the sampling code against transformers' reference
processors (tests/app/test_sampling_params.py takes them through both APIs)."""

from __future__ import annotations

import collections

import pytest
import torch
from transformers.generation.logits_process import (
    RepetitionPenaltyLogitsProcessor,
    TopKLogitsWarper,
)

from tursi.engine.jobs import SamplingParams
from tursi.engine.sampling import TokenChooser, adjusted_logits, choose_tokens

# Ten tokens; the three most likely are 7, 2 and 5, and the rest are close behind, so that a
# draw without a cut lands outside the top three most of the time.
LOGITS = torch.tensor([1.0, 0.5, 2.6, 0.9, 1.1, 2.4, 0.8, 3.0, 1.2, 0.7])


TOP3 = {7, 2, 5}


def chooser(history=(), **settings):
    return TokenChooser(SamplingParams(**settings), history)


def pick(logits, **settings):
    """The token a fresh chooser with `settings` picks from one logits vector."""
    return choose_tokens(logits[None], [chooser(**settings)])[0]


def penalized(logits, chooser):
    """One logits vector after `chooser`'s bias and penalties."""
    return adjusted_logits(logits[None], [chooser])[0]


def draws(seeds=range(400), **settings):
    return [pick(LOGITS.clone(), seed=seed, **settings) for seed in seeds]


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
        drawn = {pick(logits.clone(), temperature=2.0, top_k=k, seed=s) for s in range(300)}
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
                assert pick(logits, temperature=temperature, seed=seed, top_k=1) == best


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
            chooser(temperature=1.0, seed=seed, top_k=1),
            chooser(temperature=1.0, seed=seed),
            chooser(temperature=0.0),
            chooser(temperature=1.0, seed=seed, top_k=2),
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
    penalizing = chooser(temperature=0, repetition_penalty=penalty, history=history)
    ours = penalized(logits, penalizing)
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
        chooser(temperature=0.0, repetition_penalty=4.0, history=history[:2]),
        chooser(temperature=0.0, repetition_penalty=1.0, history=history),
        chooser(temperature=0.0, repetition_penalty=4.0, history=history[:2]),
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
    unpenalized = chooser(temperature=0.0, repetition_penalty=1.0, history=[1, 2, 3])
    unpenalized.remember(4)
    assert unpenalized.plain  # choose_tokens takes the plain argmax for it
    logits = torch.tensor([0.5, 3.0, -1.0, 2.0, 1.0])
    assert torch.equal(penalized(logits, unpenalized), logits)


def test_repetition_penalty_on_logits_between_0_and_1_matches_transformers():
    # Positive logits below 1 are divided like any other positive logit, not multiplied.
    logits = torch.tensor([-2.0, -0.5, 0.0, 0.25, 0.5, 0.99, 1.0, 3.0])
    history = list(range(8))
    ours = penalized(logits, chooser(temperature=0, repetition_penalty=2.0, history=history))
    reference = RepetitionPenaltyLogitsProcessor(2.0)(
        torch.tensor([history]), logits[None].clone()
    )[0]
    torch.testing.assert_close(ours, reference)


def test_repetition_penalty_with_nothing_seen_leaves_logits_alone():
    logits = torch.tensor([-2.0, 0.5, 3.0])
    ours = penalized(logits, chooser(temperature=0, repetition_penalty=2.0))
    reference = RepetitionPenaltyLogitsProcessor(2.0)(
        torch.zeros((1, 0), dtype=torch.long), logits[None].clone()
    )[0]
    assert torch.equal(ours, reference)
    assert torch.equal(ours, logits)


def test_repetition_penalty_when_every_row_is_greedy_matches_transformers():
    torch.manual_seed(4)
    logits = torch.randn(2, 32) * 3
    histories = [[int(logits[row].argmax())] for row in range(2)]  # each row's top token
    choosers = [chooser(temperature=0.0, repetition_penalty=10.0, history=h) for h in histories]
    tokens = choose_tokens(logits.clone(), choosers)
    expected = [
        int(
            RepetitionPenaltyLogitsProcessor(10.0)(
                torch.tensor([h]), logits[row : row + 1].clone()
            ).argmax()
        )
        for row, h in enumerate(histories)
    ]
    assert tokens == expected
    assert tokens != logits.argmax(-1).tolist()  # the penalty changed the picks


@pytest.mark.parametrize("top_p", [0.1, 0.9])
def test_top_k_1_with_top_p_is_greedy(top_p):
    torch.manual_seed(5)
    logits = torch.randn(50)
    best = torch.nonzero(torch.isfinite(TopKLogitsWarper(1)(None, logits[None].clone())[0]))
    for seed in range(5):
        assert pick(logits, temperature=1.0, seed=seed, top_k=1, top_p=top_p) == int(best)
