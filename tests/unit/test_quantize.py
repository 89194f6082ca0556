"""tursi.engine.quantize and tursi.engine.calibration on small tensors and the tiny Llama: the
packed layouts hold the quantized weights, the native integer kernel computes its torch
reference's numbers bit for bit (any row count, padded shapes, both modes, bias), the
reference is the plain integer math of per-token int8 activations times the quantized
weights, and SmoothQuant's smoothing leaves the float model's function unchanged."""

from __future__ import annotations

import pytest
import torch
from transformers import AutoModelForCausalLM, AutoTokenizer

from tests.helpers import build_llama
from tursi.engine import native
from tursi.engine.calibration import calibrate, channel_peaks, smooth_llama
from tursi.engine.quantize import (
    GROUP,
    QuantEmbedding,
    QuantLinear,
    four_bit_multiplier_limit,
    pack_4bit,
    pack_8bit,
    quantize_4bit,
    quantize_8bit,
    unpack_4bit,
    unpack_8bit,
)

# (in, out): whole blocks, and inputs / outputs that need padding (not a multiple of 4, 32, 16)
SHAPES = [(64, 48), (96, 40), (70, 19), (576, 1536 // 8)]
ROWS = [1, 2, 3, 5, 8, 16, 17, 33]


def weights(out: int, width: int, seed: int = 0) -> torch.Tensor:
    generator = torch.Generator().manual_seed(seed)
    return torch.randn(out, width, generator=generator) * 0.05


def activations(rows: int, width: int, seed: int = 1, outlier: float = 20.0) -> torch.Tensor:
    generator = torch.Generator().manual_seed(seed)
    x = torch.randn(rows, width, generator=generator)
    x[:, 3 % width] *= outlier  # an outlier channel, as real activations have
    return x


def test_the_packed_layouts_hold_the_quantized_weights():
    q8 = torch.randint(-127, 128, (32, 64), dtype=torch.int8)
    assert torch.equal(unpack_8bit(pack_8bit(q8)), q8)
    q4 = torch.randint(-8, 8, (32, 64), dtype=torch.int8)
    assert torch.equal(unpack_4bit(pack_4bit(q4)), q4.to(torch.int16))


def test_weights_quantize_within_half_a_step():
    w = weights(48, 64)
    q8, scale = quantize_8bit(w)
    assert (q8.float() * scale[:, None] - w).abs().le(scale[:, None] / 2 + 1e-7).all()
    q4, channel, multiplier = quantize_4bit(w)
    step = (multiplier * channel[:, None]).repeat_interleave(GROUP, dim=1)
    assert q4.min() >= -8 and q4.max() <= 7 and multiplier.min() >= 1
    assert multiplier.max() <= four_bit_multiplier_limit(64)
    error = (q4 * step - w).abs()
    # the rest: each group's extremes, clipped when a finer step had the least error
    assert error.le(step * 0.5 + 1e-7).float().mean() > 0.9
    assert (error <= step * 1.6).all()


def plain_integer_math(layer: QuantLinear, x: torch.Tensor) -> torch.Tensor:
    """What QuantLinear computes, from scratch: each row's int8 activations times the
    integer weights (4-bit: q times its group's multiplier), summed exactly, then scaled."""
    width = x.shape[1]
    if layer.input_scale is None:
        s = x.abs().amax(1, keepdim=True).clamp(min=1e-8) / 127
    else:
        s = layer.input_scale
    qx = (x / s).round().clamp(-127, 127).long()
    if layer.bits == 8:
        w = unpack_8bit(layer.packed).long()
    else:
        q = unpack_4bit(layer.packed).long()
        multiplier = layer.multiplier.transpose(1, 2).reshape(q.shape[0], -1).long()
        w = q * multiplier.repeat_interleave(GROUP, dim=1)
    exact = torch.stack([(qx * row[:width]).sum(1) for row in w[: layer.out_features]], 1)
    out = exact.float() * (s * layer.scale)
    return out if layer.bias is None else out + layer.bias


@pytest.mark.parametrize("bits", [8, 4])
@pytest.mark.parametrize("static", [False, True], ids=["dynamic", "static"])
@pytest.mark.parametrize("shape", SHAPES, ids=str)
def test_the_torch_reference_is_the_plain_integer_math(bits, static, shape):
    width, out = shape
    bias = torch.randn(out) if out % 2 else None
    layer = QuantLinear(weights(out, width), bias, bits, 12.0 if static else None)
    x = activations(5, width)
    assert torch.equal(layer.reference(x), plain_integer_math(layer, x))
    if not static:  # and it is a matmul: close to the float one
        x = activations(5, width, outlier=1.0)
        want = x @ weights(out, width).t() + (0 if bias is None else bias)
        error = (layer.reference(x) - want).norm() / want.norm()
        assert error < (0.02 if bits == 8 else 0.15), error


@pytest.fixture(scope="module")
def kernels():
    module = native.load()
    if module is None:
        pytest.skip("native kernels not built")
    return module


@pytest.mark.parametrize("bits", [8, 4])
@pytest.mark.parametrize("static", [False, True], ids=["dynamic", "static"])
@pytest.mark.parametrize("shape", SHAPES, ids=str)
def test_the_native_kernel_computes_the_reference_bit_for_bit(kernels, bits, static, shape):
    width, out = shape
    bias = torch.randn(out) if out % 2 else None
    layer = QuantLinear(weights(out, width), bias, bits, 12.0 if static else None)
    for rows in ROWS:
        x = activations(rows, width, seed=rows).view(rows, 1, width)  # the step's [rows, 1, in]
        got = kernels.quantized_linear(x, *layer.native_arguments(), layer.bias)
        assert got.shape == (rows, 1, out)
        assert torch.equal(got, layer.reference(x)), rows
    assert kernels.quantized_isa() in ("avx512-vnni", "scalar")


def test_the_native_kernel_refuses_what_does_not_fit(kernels):
    layer = QuantLinear(weights(48, 64), None, 8)
    arguments = layer.native_arguments()
    with pytest.raises(RuntimeError, match="features"):
        kernels.quantized_linear(torch.randn(2, 65), *arguments, None)
    with pytest.raises(RuntimeError, match="float32"):
        kernels.quantized_linear(torch.randn(2, 64).double(), *arguments, None)
    with pytest.raises(RuntimeError, match="bias"):
        kernels.quantized_linear(torch.randn(2, 64), *arguments, torch.zeros(47))


def test_the_quantized_embedding_is_close_to_the_table():
    table = torch.nn.Embedding(50, 64)
    ids = torch.tensor([[0, 7, 49]])
    got = QuantEmbedding(table)(ids)
    assert got.dtype == torch.float32
    assert torch.allclose(got, table(ids), atol=table.weight.abs().max().item() / 127)


@pytest.fixture(scope="module")
def llama(tmp_path_factory):
    path = build_llama(tmp_path_factory.mktemp("llama"), norm_spread=0.3, initializer_range=0.2)
    return path


def test_smoothing_keeps_the_float_model_and_flattens_the_peaks(llama):
    """SmoothQuant's factors fold into norms and projections: the float model's logits stay
    (within float rounding), and its layers' inputs have the smoothed peaks predicted."""
    model = AutoModelForCausalLM.from_pretrained(llama, dtype=torch.float32).eval()
    tokenizer = AutoTokenizer.from_pretrained(llama)
    text = "the quick brown fox jumps over the lazy dog " * 8
    ids = tokenizer(text, return_tensors="pt")["input_ids"]
    with torch.inference_mode():
        before = model(input_ids=ids).logits
    peaks = channel_peaks(model, tokenizer, text=text)
    smoothed = smooth_llama(model, peaks)
    with torch.inference_mode():
        after = model(input_ids=ids).logits
    assert torch.allclose(before, after, rtol=1e-4, atol=1e-4)
    assert model.lm_head.weight is not model.model.embed_tokens.weight  # untied first
    again = channel_peaks(model, tokenizer, text=text)
    assert again.keys() == peaks.keys()
    for name in peaks:  # the peaks recorded after smoothing are the ones predicted
        assert torch.allclose(again[name], smoothed[name], rtol=1e-3, atol=1e-5), name


def test_calibration_gives_one_peak_per_linear(llama):
    model = AutoModelForCausalLM.from_pretrained(llama, dtype=torch.float32).eval()
    tokenizer = AutoTokenizer.from_pretrained(llama)
    peaks = calibrate(model, tokenizer, True, 64)
    names = {name for name, m in model.named_modules() if isinstance(m, torch.nn.Linear)}
    assert set(peaks) == names and all(value > 0 for value in peaks.values())
