"""Token choice: greedy, temperature, top_p (nucleus against a full sort), seeds, and
choose_tokens on mixed greedy and sampled rows. No model, no app."""

import pytest
import torch
from torch.utils._python_dispatch import TorchDispatchMode
from torch.utils._pytree import tree_leaves

from tursi.engine.jobs import SamplingParams
from tursi.engine.sampling import (
    TokenChooser,
    best_tokens,
    choose_tokens,
    nucleus,
    score,
    top_tokens,
)


def chooser(temperature=1.0, top_p=1.0, seed=None, **settings):
    """A TokenChooser for these sampling parameters (the rest at SamplingParams' defaults)."""
    return TokenChooser(SamplingParams(temperature=temperature, top_p=top_p, seed=seed, **settings))


def pick(choose, logits):
    """The token `choose` picks from one logits vector (a batch of one row)."""
    return choose_tokens(logits[None], [choose])[0]


def test_temperature_zero_is_argmax():
    logits = torch.tensor([0.1, 2.5, -1.0, 2.4, 0.0])
    choose = chooser(temperature=0.0, top_p=0.5, seed=123)
    assert [pick(choose, logits) for _ in range(5)] == [1] * 5
    assert choose.generator is None


def test_top_p_keeps_smallest_nucleus():
    probs = torch.tensor([0.05, 0.5, 0.15, 0.3])

    def kept(top_p):
        ids, values = nucleus(probs, top_p)
        return dict(zip(ids.tolist(), values.tolist(), strict=True))

    assert kept(0.75) == {1: 0.5, 3: probs[3].item()}  # 0.5 + 0.3 reaches 0.75; not 0.15
    assert kept(0.5) == {1: 0.5}
    assert kept(0.9) == {1: 0.5, 3: probs[3].item(), 2: probs[2].item()}
    assert set(kept(1.0)) == {0, 1, 2, 3}


def test_top_p_always_keeps_the_top_token():
    probs = torch.tensor([0.2, 0.7, 0.1])
    assert nucleus(probs, 0.01)[0].tolist() == [1]


def test_top_p_below_float32_range_keeps_the_top_token():
    probs = torch.tensor([0.2, 0.7, 0.1])
    assert nucleus(probs, 1e-50)[0].tolist() == [1]


def test_tiny_temperature_behaves_like_greedy():
    logits = torch.tensor([0.1, 2.5, -1.0, 2.4])
    assert pick(chooser(temperature=1e-45, top_p=1.0, seed=0), logits) == 1


def test_sampling_never_picks_filtered_tokens():
    logits = torch.log(torch.tensor([0.05, 0.5, 0.15, 0.3]))
    choose = chooser(temperature=1.0, top_p=0.75, seed=0)
    picks = {pick(choose, logits) for _ in range(200)}
    assert picks == {1, 3}


def test_seeded_sampling_is_reproducible():
    logits = torch.zeros(50)  # uniform: every pick comes from the generator
    first = chooser(temperature=1.0, top_p=1.0, seed=42)
    second = chooser(temperature=1.0, top_p=1.0, seed=42)
    other = chooser(temperature=1.0, top_p=1.0, seed=43)
    a = [pick(first, logits) for _ in range(30)]
    b = [pick(second, logits) for _ in range(30)]
    c = [pick(other, logits) for _ in range(30)]
    assert a == b
    assert a != c
    assert len(set(a)) > 5


def test_temperature_sharpens_and_flattens():
    logits = torch.tensor([0.0, 1.0])
    cold = chooser(temperature=0.05, top_p=1.0, seed=1)
    assert [pick(cold, logits) for _ in range(50)] == [1] * 50
    hot = chooser(temperature=2.0, top_p=1.0, seed=1)
    assert {pick(hot, logits) for _ in range(100)} == {0, 1}


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


def test_seeded_draw_without_a_cut_is_multinomial_over_the_softmax():
    # transformers' sampling step: torch.multinomial over softmax(logits / temperature), here
    # with a generator seeded with the request's seed. A max of 0 and temperature 1 make the
    # shift by the max and the division exact.
    logits = torch.tensor([-1.0, -0.5, -2.0, 0.0, -0.3, -1.5, -0.1, -0.8])
    choose = chooser(temperature=1.0, top_p=1.0, seed=7)
    generator = torch.Generator().manual_seed(7)
    probs = torch.softmax(logits, -1)
    expected = [int(torch.multinomial(probs, 1, generator=generator)) for _ in range(40)]
    assert [pick(choose, logits) for _ in range(40)] == expected


def test_nucleus_of_a_single_token():
    ids, values = nucleus(torch.tensor([1.0]), 0.5)
    assert (ids.tolist(), values.tolist()) == ([0], [1.0])


LAYERS, HEADS, DIM = 2, 2, 4


@pytest.mark.parametrize("vocab", [10, 49152])  # 49152: top_tokens goes through blocks
def test_scoring_no_rows_gives_no_entries(vocab):
    assert score(torch.zeros(0, vocab), [], []) == []


class OneDevice(TorchDispatchMode):
    """Fails any torch operation whose tensors lie on more than one device (a CPU scalar
    aside, which every device takes). Tests run the sampler on the meta device as a stand-in
    for the model's GPU; meta kernels accept CPU tensors next to meta ones where CUDA's
    refuse them (CUDA's gather, with a CPU index), so a tensor made on the CPU by mistake
    would pass there unnoticed."""

    def __torch_dispatch__(self, func, types, args=(), kwargs=None):
        devices = {
            leaf.device
            for leaf in tree_leaves((args, kwargs))
            if isinstance(leaf, torch.Tensor) and (leaf.dim() or leaf.device.type != "cpu")
        }
        assert len(devices) <= 1, f"{func} mixes devices: {devices}"
        return func(*args, **(kwargs or {}))


def test_best_and_top_tokens_stay_on_the_logits_device():
    meta = torch.device("meta")
    logits = torch.zeros(3, 50257, device=meta)
    with OneDevice():
        assert best_tokens(logits).device == meta
        values, ids = top_tokens(logits, 5)
    assert values.device == ids.device == meta


def test_scoring_stays_on_the_logits_device_until_its_copy_to_the_host():
    """score's one copy is its results' to the host at the end, which no meta tensor can
    make: everything before it runs on the logits' device."""
    with OneDevice(), pytest.raises(NotImplementedError, match="meta tensor"):
        score(torch.zeros(2, 64, device=torch.device("meta")), [1, 2], [3, 3])


# Vocabularies of a whole number of blocks (49152, SmolLM2's), of a part block (50257,
# GPT-2's) and of less than one block; in bfloat16, the models' dtype, many logits are equal.
@pytest.mark.parametrize("vocab", [49152, 50257, 300])
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
def test_best_tokens_is_argmax_first_of_equal_maxima(vocab, dtype):
    generator = torch.Generator().manual_seed(vocab)
    logits = (torch.randn(16, vocab, generator=generator) * 4).to(dtype)
    logits[3, 7] = logits[3, vocab - 5] = logits[3].max() + 1  # equal maxima: the first wins
    logits[5, vocab - 1] = logits[5].max() + 1  # in the part block (padding must not win)
    logits[6] = -1e30  # all equal
    assert best_tokens(logits).tolist() == logits.float().argmax(-1).tolist()
    assert best_tokens(logits)[3] == 7


@pytest.mark.parametrize("vocab", [49152, 50257, 300])
@pytest.mark.parametrize("k", [1, 5, 20])
def test_top_tokens_are_topk(vocab, k):
    generator = torch.Generator().manual_seed(vocab + k)
    logits = torch.randn(16, vocab, generator=generator) * 4
    # the k best of a row in one block, of another row spread over k blocks, and the last
    # token among a row's best (the part block)
    start = 1000 % vocab
    logits[0, start : start + k] = 20 + torch.arange(k, dtype=torch.float32)
    logits[1, torch.arange(k) * 599 % vocab] = 30 - torch.arange(k, dtype=torch.float32)
    logits[2, vocab - 1] = 50
    values, ids = top_tokens(logits, k)
    expected_values, expected_ids = logits.topk(k, -1)
    assert torch.equal(values, expected_values)
    assert torch.equal(ids, expected_ids)
