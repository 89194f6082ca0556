"""The sampling parameters against their definitions: top_k, top_p, min_p, temperature,
repetition_penalty and logit_bias against transformers' own logits processors, presence and
frequency penalties against OpenAI's formula, each alone and in mixed batches; seeds over
the int64 range (tests/app/test_sampling_params.py takes them through both APIs)."""

from __future__ import annotations

import collections
import ctypes

import pytest
import torch
from transformers.generation.logits_process import (
    MinPLogitsWarper,
    RepetitionPenaltyLogitsProcessor,
    SequenceBiasLogitsProcessor,
    TemperatureLogitsWarper,
    TopKLogitsWarper,
    TopPLogitsWarper,
)
from transformers.modeling_utils import local_torch_dtype

from tests.unit.test_sampling import OneDevice
from tursi.engine.jobs import SamplingParams
from tursi.engine.sampling import (
    TokenChooser,
    adjusted_logits,
    choice_seed,
    choose_tokens,
    tempered_probs,
)

# Ten tokens; the three most likely are 7, 2 and 5, and the rest are close behind, so that a
# draw without a cut lands outside the top three most of the time.
LOGITS = torch.tensor([1.0, 0.5, 2.6, 0.9, 1.1, 2.4, 0.8, 3.0, 1.2, 0.7])


TOP3 = {7, 2, 5}


def chooser(history=(), choice=0, **settings):
    return TokenChooser(SamplingParams(**settings), history, choice)


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
    assert not unpenalized.seen  # neither the prompt's tokens nor the output's
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


# --- the whole pipeline against transformers' processors ----------------------------------


def openai_penalties(logits, output, presence, frequency):
    """OpenAI's definition (its API reference, "Parameter details"): over the tokens
    generated so far, logit[j] -= count[j] * frequency_penalty + (count[j] > 0) *
    presence_penalty."""
    counts = collections.Counter(output)
    adjusted = logits.clone()
    for token, count in counts.items():
        adjusted[..., token] -= count * frequency + (count > 0) * presence
    return adjusted


def reference_distribution(logits, prompt, output, settings):
    """The sampling distribution of one row as transformers builds it (SequenceBias,
    RepetitionPenalty, then Temperature, TopK, TopP, MinP warpers, in generate's order), with
    OpenAI's presence and frequency penalties after the repetition penalty."""
    history = torch.tensor([prompt + output])
    scores = logits[None].clone()
    if settings.get("logit_bias"):
        bias = [[[token], value] for token, value in settings["logit_bias"].items()]
        scores = SequenceBiasLogitsProcessor(sequence_bias=bias)(history, scores)
    if settings.get("repetition_penalty", 1.0) != 1.0:
        scores = RepetitionPenaltyLogitsProcessor(settings["repetition_penalty"])(history, scores)
    scores = openai_penalties(
        scores,
        output,
        settings.get("presence_penalty", 0.0),
        settings.get("frequency_penalty", 0.0),
    )
    scores = TemperatureLogitsWarper(settings["temperature"])(history, scores)
    if settings.get("top_k", 0):
        scores = TopKLogitsWarper(settings["top_k"])(history, scores)
    if settings.get("top_p", 1.0) < 1.0:
        scores = TopPLogitsWarper(settings["top_p"])(history, scores)
    if settings.get("min_p", 0.0):
        scores = MinPLogitsWarper(settings["min_p"])(history, scores)
    return torch.softmax(scores, -1)[0]


def our_distribution(logits, chooser):
    """The distribution choose_tokens draws one row from, over the whole vocabulary."""
    adjusted = adjusted_logits(logits[None], [chooser])
    ids, weights = chooser.candidates(tempered_probs(adjusted, [chooser])[0])
    full = torch.zeros(logits.shape[-1])
    full[slice(None) if ids is None else ids] = weights
    return full / full.sum()


PIPELINES = {
    "min_p": {"temperature": 1.0, "min_p": 0.1},
    "min_p-hot": {"temperature": 1.7, "min_p": 0.05},
    "top_p": {"temperature": 0.9, "top_p": 0.8},
    "top_k-top_p-min_p": {"temperature": 1.2, "top_k": 20, "top_p": 0.9, "min_p": 0.02},
    "repetition-min_p": {"temperature": 0.7, "repetition_penalty": 1.5, "min_p": 0.05},
    "presence": {"temperature": 1.0, "presence_penalty": 1.5},
    "frequency": {"temperature": 1.0, "frequency_penalty": 0.8},
    "negative-penalties": {"temperature": 1.0, "presence_penalty": -1.0, "frequency_penalty": -0.5},
    "everything": {
        "temperature": 0.8,
        "logit_bias": {3: 5.0, 17: -2.5, 40: 1.0},
        "repetition_penalty": 1.3,
        "presence_penalty": 0.6,
        "frequency_penalty": 0.4,
        "top_k": 30,
        "top_p": 0.95,
        "min_p": 0.03,
    },
}


@pytest.mark.parametrize("name", list(PIPELINES))
def test_the_sampling_distribution_equals_transformers_processors(name):
    settings = PIPELINES[name]
    torch.manual_seed(7)
    logits = torch.randn(64) * 2.5
    prompt, output = [3, 9, 9, 40, 2], [17, 17, 17, 3, 50, 61]  # 3 in both, 9 prompt only
    ours = chooser(history=prompt, **settings)
    for token in output:
        ours.remember(token)
    expected = reference_distribution(logits, prompt, output, settings)
    got = our_distribution(logits, ours)
    torch.testing.assert_close(got, expected, atol=1e-6, rtol=1e-5)
    assert not torch.allclose(got, torch.softmax(logits, -1), rtol=0.01, atol=0)  # it acted


def test_presence_and_frequency_penalties_count_only_the_output():
    logits = torch.zeros(8)
    penalizing = chooser(
        history=[1, 1, 2], temperature=0.0, presence_penalty=0.5, frequency_penalty=0.25
    )
    for token in (2, 3, 3, 3):
        penalizing.remember(token)
    got = penalized(logits, penalizing)
    # 1: prompt only, untouched; 2: once in the output; 3: three times.
    assert got.tolist() == [0.0, 0.0, -0.75, -1.25, 0.0, 0.0, 0.0, 0.0]
    assert torch.equal(got, openai_penalties(logits, [2, 3, 3, 3], 0.5, 0.25))


def test_a_negative_logit_bias_of_100_on_the_best_token_means_it_never_appears():
    torch.manual_seed(8)
    steps = [torch.randn(40) * 3 for _ in range(50)]
    best = collections.Counter(int(logits.argmax()) for logits in steps).most_common(1)[0][0]
    for settings in ({"temperature": 0.0}, {"temperature": 1.5, "seed": 1}):
        banning = chooser(logit_bias={best: -100}, **settings)
        picks = [choose_tokens(logits[None], [banning])[0] for logits in steps]
        assert best not in picks
    assert best in [int(logits.argmax()) for logits in steps]  # it would have appeared


def test_a_logit_bias_of_100_forces_its_token():
    torch.manual_seed(9)
    for settings in ({"temperature": 0.0}, {"temperature": 1.0, "seed": 2, "top_p": 0.9}):
        forcing = chooser(logit_bias={11: 100}, **settings)
        picks = [choose_tokens((torch.randn(40) * 3)[None], [forcing])[0] for _ in range(50)]
        assert picks == [11] * 50


def test_mixed_rows_in_one_batch_each_follow_their_own_settings():
    """Plain greedy rows take the plain argmax; greedy rows with penalties or a bias take the
    argmax of transformers' processed logits; sampled rows draw only from their reference
    distribution's support, and a seeded row draws as it does alone."""
    settings = [
        {"temperature": 0.0},
        {"temperature": 0.0, "repetition_penalty": 2.0, "presence_penalty": 1.0},
        {"temperature": 0.9, "seed": 3, "min_p": 0.2},
        {"temperature": 0.0, "logit_bias": {5: 3.0}, "frequency_penalty": 0.5},
        {"temperature": 1.1, "seed": 4, "top_k": 5, "presence_penalty": 2.0},
        {"temperature": 0.0},
    ]
    prompt = [1, 2, 3]
    choosers = [chooser(history=prompt, **s) for s in settings]
    alone = [chooser(history=prompt, **s) for s in settings]
    outputs: list[list[int]] = [[] for _ in settings]
    generator = torch.Generator().manual_seed(10)
    for _ in range(40):
        logits = torch.randn(len(settings), 30, generator=generator) * 2
        tokens = choose_tokens(logits.clone(), choosers)
        for row, (token, s) in enumerate(zip(tokens, settings, strict=True)):
            if s["temperature"] == 0.0:  # greedy: the argmax of the processed logits
                greedy = {**s, "temperature": 1.0}
                expected = reference_distribution(logits[row], prompt, outputs[row], greedy)
                assert token == int(expected.argmax())
            else:
                expected = reference_distribution(logits[row], prompt, outputs[row], s)
                assert expected[token] > 0, (row, token)
            assert choose_tokens(logits[row][None], [alone[row]]) == [token]
            choosers[row].remember(token)
            alone[row].remember(token)
            outputs[row].append(token)
        assert [tokens[0], tokens[5]] == logits[[0, 5]].argmax(-1).tolist()
    assert outputs[1] != [int(row) for row in outputs[0]]  # the penalties changed the picks
    assert len(set(outputs[2])) > 3 and len(set(outputs[4])) > 3  # really sampled


def test_negative_and_int64_edge_seeds_draw_reproducibly_and_differ_per_choice():
    logits = torch.zeros(50)
    for seed in (-1, -(2**63), 2**63 - 1):
        first = [chooser(temperature=1.0, seed=seed, choice=i) for i in range(3)]
        again = [chooser(temperature=1.0, seed=seed, choice=i) for i in range(3)]
        picks = [[pick_with(c, logits) for _ in range(20)] for c in first]
        assert picks == [[pick_with(c, logits) for _ in range(20)] for c in again]
        assert len({tuple(p) for p in picks}) == 3
    # choice i of seed s draws as choice 0 of seed s + i (wrapped into int64)
    wrapped = chooser(temperature=1.0, seed=2**63 - 1, choice=1)
    lowest = chooser(temperature=1.0, seed=-(2**63))
    assert [pick_with(wrapped, logits) for _ in range(20)] == [
        pick_with(lowest, logits) for _ in range(20)
    ]


def pick_with(choose, logits):
    return choose_tokens(logits[None], [choose])[0]


@pytest.mark.parametrize(
    ("seed", "choice"), [(0, 0), (5, 2), (-1, 1), (-(2**63), 0), (2**63 - 1, 1), (2**63 - 2, 3)]
)
def test_choice_seeds_add_in_int64_and_seed_the_generator_as_torch_reads_them(seed, choice):
    wrapped = ctypes.c_int64(seed + choice).value  # int64 addition, two's complement wrap
    assert choice_seed(seed, choice) == wrapped
    generator = chooser(temperature=1.0, seed=seed, choice=choice).generator
    # torch keeps a generator's seed as a uint64 (-1 reads as 2**64 - 1)
    assert generator.initial_seed() == torch.Generator().manual_seed(wrapped).initial_seed()
    assert generator.initial_seed() == wrapped % 2**64


def test_min_p_1_keeps_exactly_the_most_likely_tokens_as_transformers_does():
    logits = torch.tensor([1.0, 3.0, 0.5, 3.0, 2.9])  # two tokens tie at the top
    kept = torch.isfinite(MinPLogitsWarper(1.0)(None, logits[None].clone())[0])
    allowed = set(torch.nonzero(kept).flatten().tolist())
    assert allowed == {1, 3}
    drawn = {pick(logits.clone(), temperature=1.0, min_p=1.0, seed=seed) for seed in range(100)}
    assert drawn == allowed


def test_half_precision_logits_are_penalized_in_float32_as_transformers_generate_does():
    # generate() takes each step's logits .to(copy=True, dtype=torch.float32) before its
    # processors; bfloat16 arithmetic would round the penalized logits to 3 digits.
    torch.manual_seed(12)
    logits = (torch.randn(64) * 4).bfloat16()
    history = [3, 7, 12, 40, 63, 0]
    ours = penalized(logits, chooser(temperature=0, repetition_penalty=1.3, history=history))
    reference = RepetitionPenaltyLogitsProcessor(1.3)(
        torch.tensor([history]), logits[None].float()
    )[0]
    torch.testing.assert_close(ours, reference)  # float32, and the same values


def test_the_penalties_state_and_the_probabilities_stay_on_the_logits_device():
    """In production the logits live on the model's device (a GPU). The meta device stands
    in for it, and OneDevice fails any operation that meets a tensor made on the CPU by
    mistake."""
    meta = torch.device("meta")
    everything = PIPELINES["everything"]
    penalizing = chooser(history=[1, 2, 3], seed=0, **everything)
    for token in (4, 4, 6):
        penalizing.remember(token)
    with OneDevice():
        logits = adjusted_logits(torch.zeros(2, 64, device=meta), [penalizing, penalizing])
        probs = tempered_probs(logits, [penalizing, penalizing])
    assert logits.device == probs.device == meta


def test_the_penalties_do_not_take_torchs_default_dtype():
    """transformers' from_pretrained sets torch's process-wide default dtype to the model's
    while it builds the model (transformers.modeling_utils.local_torch_dtype), and the
    server loads a model in a background thread while the others generate: the logit_bias
    and the penalties must come out as they do under float32, as transformers' processors
    and OpenAI's formula give them. A token generated 300 times passes bfloat16's range of
    exact integers (256)."""
    torch.manual_seed(13)
    logits = torch.randn(64) * 2.5
    prompt, output = [3, 9, 40], [17] * 300 + [3, 50]
    bias = {3: 5.0, 17: -2.5, 40: 1.0}
    penalizing = chooser(
        history=prompt,
        temperature=0.0,
        logit_bias=bias,
        repetition_penalty=1.3,
        presence_penalty=0.6,
        frequency_penalty=0.01,
    )
    for token in output:
        penalizing.remember(token)
    with local_torch_dtype(torch.bfloat16):
        got = penalized(logits, penalizing)
    history = torch.tensor([prompt + output])
    expected = SequenceBiasLogitsProcessor(
        sequence_bias=[[[token], value] for token, value in bias.items()]
    )(history, logits[None].clone())
    expected = RepetitionPenaltyLogitsProcessor(1.3)(history, expected)
    expected = openai_penalties(expected, output, 0.6, 0.01)[0]
    torch.testing.assert_close(got, expected)


def test_the_temperature_does_not_take_torchs_default_dtype():
    """As the penalties (above): the temperature divides in float32, as transformers'
    TemperatureLogitsWarper does, whatever the default dtype (0.7 in bfloat16 is 0.69921875)."""
    torch.manual_seed(14)
    logits = torch.randn(2, 64) * 2.5
    rows = [chooser(temperature=0.7, seed=0), chooser(temperature=1.3, seed=0)]
    with local_torch_dtype(torch.bfloat16):
        got = tempered_probs(logits, rows)
    expected = [
        torch.softmax(TemperatureLogitsWarper(t)(None, logits[row : row + 1].clone())[0], -1)
        for row, t in enumerate((0.7, 1.3))
    ]
    torch.testing.assert_close(got, torch.stack(expected))
