"""The native decode kernels (tursi.engine.native): built by `make install` where a C++
compiler is, and computing what the torch ops of tursi.engine.decode.TorchOps compute."""

import copy
import shutil

import pytest
import torch

from tursi.engine import native
from tursi.engine.decode import TorchOps
from tursi.engine.kvcache import BatchCache

DTYPES = [torch.float32, torch.bfloat16, torch.float16]


def test_native_kernels_are_built_where_a_compiler_is():
    if shutil.which("c++") is None:
        pytest.skip("no C++ compiler: the server runs on torch ops")
    assert native.load() is not None, "run: python -m tursi.engine.native -v"


class Kernels:
    """The native kernels, called as TorchOps is; rope_store also takes the rows' positions
    (the native op writes the cache at them; TorchOps has them from the cache)."""

    def __init__(self, module):
        self.module = module

    def add_rms_norm(self, hidden, delta, norm):
        return self.module.add_rms_norm(hidden, delta, norm.weight, norm.variance_epsilon)

    def rope_store(self, cache, layer, qkv, cos, sin, positions, heads, kv_heads):
        return self.module.rope_store(
            qkv, cos, sin, positions, layer.keys, layer.values, heads, kv_heads
        )


@pytest.fixture(scope="module")
def kernels():
    module = native.load()
    if module is None:
        pytest.skip("native kernels not built")
    return Kernels(module)


class Norm:
    """What add_rms_norm reads of a LlamaRMSNorm."""

    def __init__(self, weight, eps=1e-5):
        self.weight, self.variance_epsilon = weight, eps


def close_in(dtype, got, want):
    """Equal for all but the odd element a last-bit rounding apart (float32: summation order
    of the mean of squares)."""
    if dtype == torch.float32:
        return torch.allclose(got, want, rtol=1e-6, atol=1e-6)
    same = (got == want).float().mean().item()
    return same > 0.99 and torch.allclose(got.float(), want.float(), rtol=1e-2, atol=1e-2)


@pytest.mark.parametrize("dtype", DTYPES, ids=str)
@pytest.mark.parametrize("rows", [1, 5])
def test_add_rms_norm_matches_torch_ops(kernels, dtype, rows):
    generator = torch.Generator().manual_seed(rows)
    hidden, delta = (torch.randn(rows, 1, 96, generator=generator).to(dtype) * 3 for _ in "hd")
    norm = Norm(torch.rand(96, generator=generator).to(dtype) + 0.5)
    for extra in (delta, None):
        got_sum, got = kernels.add_rms_norm(hidden, extra, norm)
        want_sum, want = TorchOps.add_rms_norm(hidden, extra, norm)
        assert torch.equal(got_sum, want_sum)  # one rounding of the same sum
        assert got.dtype == dtype and got.shape == want.shape
        assert close_in(dtype, got, want)
    assert kernels.add_rms_norm(hidden, None, norm)[0] is hidden


def cache_with_rows(lengths, dtype, heads=2, head_dim=8, capacity=32, width=1):
    """A one-layer BatchCache whose rows have these lengths, ready for a step of `width`
    tokens per row; and the step's positions [rows * width]."""
    cache = BatchCache(1, capacity - 1, boolean_mask=True)
    generator = torch.Generator().manual_seed(len(lengths))
    layer = cache.layers[0]
    shape = (len(lengths), heads, capacity, head_dim)
    layer.keys, layer.values = (torch.randn(shape, generator=generator).to(dtype) for _ in "kv")
    cache.lengths = list(lengths)
    positions, _ = cache.prepare_step(torch.device("cpu"), width)
    return cache, positions.view(-1)


@pytest.mark.parametrize("dtype", DTYPES, ids=str)
@pytest.mark.parametrize("width", [1, 4])
def test_rope_store_matches_torch_ops(kernels, dtype, width):
    """One token per row, or four (a verify pass), each at its own position."""
    heads, kv_heads, head_dim = 6, 2, 8
    torch_cache, positions = cache_with_rows([3, 9, 1], dtype, kv_heads, head_dim, width=width)
    native_cache = copy.deepcopy(torch_cache)
    generator = torch.Generator().manual_seed(7)
    features = (heads + 2 * kv_heads) * head_dim
    qkv = torch.randn(3, width, features, generator=generator).to(dtype)
    angles = positions.view(3, width, 1) * torch.linspace(0.1, 1.0, head_dim)
    cos, sin = angles.cos().to(dtype), angles.sin().to(dtype)  # [rows, width, head_dim]
    want = TorchOps.rope_store(torch_cache, torch_cache.layers[0], qkv, cos, sin, heads, kv_heads)
    got = kernels.rope_store(
        native_cache, native_cache.layers[0], qkv, cos, sin, positions, heads, kv_heads
    )
    assert got.shape == (3, heads, width, head_dim)
    # the same roundings in the same order: equal, not only close
    assert torch.equal(got, want)
    assert torch.equal(native_cache.layers[0].keys, torch_cache.layers[0].keys)
    assert torch.equal(native_cache.layers[0].values, torch_cache.layers[0].values)


def test_rope_store_refuses_what_does_not_fit(kernels):
    """A bad call raises instead of writing outside the cache."""
    cache, positions = cache_with_rows([3, 5], torch.float32)
    layer = cache.layers[0]
    width = (2 + 2 * 2) * 8  # 2 q heads, 2 kv heads of 8
    qkv, cos, sin = torch.zeros(2, 1, width), torch.zeros(2, 1, 8), torch.zeros(2, 1, 8)
    before = layer.keys.clone()
    kernels.rope_store(cache, layer, qkv, cos, sin, positions, 2, 2)  # fits
    layer.keys.copy_(before)
    for bad in (
        torch.tensor([3, 32]),
        torch.tensor([3, -1]),
        torch.tensor([3, 5], dtype=torch.int32),
    ):
        with pytest.raises(RuntimeError):
            kernels.rope_store(cache, layer, qkv, cos, sin, bad, 2, 2)
    with pytest.raises(RuntimeError):  # three rows in a two-row cache
        kernels.rope_store(
            cache,
            layer,
            torch.zeros(3, 1, width),
            torch.zeros(3, 1, 8),
            torch.zeros(3, 1, 8),
            torch.tensor([1, 2, 3]),
            2,
            2,
        )
    with pytest.raises(RuntimeError):  # positions for one token per row, qkv of two
        kernels.rope_store(
            cache, layer, torch.zeros(2, 2, width), *(torch.zeros(2, 2, 8),) * 2, positions, 2, 2
        )
    with pytest.raises(RuntimeError):  # another dtype
        kernels.rope_store(cache, layer, qkv.bfloat16(), cos, sin, positions, 2, 2)
    with pytest.raises(RuntimeError):  # q heads and kv heads that do not add up to qkv
        kernels.rope_store(cache, layer, qkv, cos, sin, positions, 3, 2)
    assert torch.equal(layer.keys, before)


def test_add_rms_norm_refuses_what_does_not_fit(kernels):
    hidden = torch.randn(2, 1, 16)
    for delta, weight in (
        (None, torch.ones(15)),  # weight of another size
        (None, torch.ones(16, dtype=torch.bfloat16)),  # another dtype
        (torch.randn(2, 1, 8), torch.ones(16)),  # delta of another shape
        (torch.randn(2, 1, 32)[..., ::2], torch.ones(16)),
    ):  # strided
        with pytest.raises(RuntimeError):
            kernels.module.add_rms_norm(hidden, delta, weight, 1e-5)
    with pytest.raises(RuntimeError):
        kernels.module.add_rms_norm(torch.zeros(2, 0), None, torch.ones(0), 1e-5)
