"""tursi.engine.quantize and tursi.engine.calibration on small tensors and the tiny Llama: the
packed layouts hold the quantized weights, a Q4_1 grid comes back exactly, the native kernel
computes its torch reference's numbers bit for bit (any row count, padded shapes, both
modes, bias), the reference is the plain math of int8 activations times the quantized
weights, static scales widen for a row beyond them, and SmoothQuant's smoothing leaves the
float model's function unchanged."""

from __future__ import annotations

import os
import subprocess
import sys

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
    pack_4bit,
    pack_8bit,
    pack_groups,
    quantize_4bit,
    quantize_8bit,
    unpack_4bit,
    unpack_8bit,
    unpack_groups,
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
    q4 = torch.randint(0, 16, (32, 64), dtype=torch.uint8)
    assert torch.equal(unpack_4bit(pack_4bit(q4)), q4)
    params = torch.randn(32, 2, 2).half()
    assert torch.equal(unpack_groups(pack_groups(params)), params)


def four_bit_values(q: torch.Tensor, channel: torch.Tensor, params: torch.Tensor) -> torch.Tensor:
    step, low = (params.float() * channel[:, None, None]).repeat_interleave(GROUP, 1).unbind(-1)
    return step * q.float() + low


def test_weights_quantize_within_half_a_step():
    w = weights(48, 64)
    q8, scale = quantize_8bit(w)
    assert (q8.float() * scale[:, None] - w).abs().le(scale[:, None] / 2 + 1e-7).all()
    q4, channel, params = quantize_4bit(w)
    assert q4.dtype == torch.uint8 and q4.max() <= 15 and params.dtype == torch.float16
    assert torch.equal(channel, torch.exp2(torch.log2(channel).round()))  # powers of two
    step = (params[..., 0].float() * channel[:, None]).repeat_interleave(GROUP, 1)
    # half a step, and what float16 rounding of the minimum moves
    error = (four_bit_values(q4, channel, params) - w).abs()
    assert (error <= step * 0.5 + w.abs().amax() * 2e-3).all()


def test_a_q4_1_grid_comes_back_exactly():
    """Weights on llama.cpp's Q4_1 grid (per 32 inputs, a float16 step d and minimum m,
    w = d * q + m with q in 0..15, both ends used), as a Q4_1 GGUF's dequantized weights are:
    4-bit quantization gives them back bit for bit."""
    generator = torch.Generator().manual_seed(3)
    out, groups = 48, 4
    d = (torch.rand(out, groups, 1, generator=generator) * 0.02 + 1e-3).half().float()
    m = (-torch.rand(out, groups, 1, generator=generator) * 0.1).half().float()
    q = torch.randint(0, 16, (out, groups, GROUP), generator=generator)
    q[..., 0], q[..., 1] = 0, 15
    w = (d * q + m).view(out, groups * GROUP)
    q4, channel, params = quantize_4bit(w)
    assert torch.equal(four_bit_values(q4, channel, params), w)


def plain_math(layer: QuantLinear, x: torch.Tensor) -> torch.Tensor:
    """What QuantLinear computes, from scratch, in float64: each row's int8 activations (its
    peak / 127, or the static step unless the row's peak goes beyond it) times the quantized
    weights (8-bit: q times the channel scale; 4-bit: step * q + minimum per group)."""
    width, out = x.shape[1], layer.out_features
    s = x.abs().amax(1, keepdim=True) / 127  # float32 steps, as the kernel's
    s = s.clamp(min=1e-8 / 127) if layer.input_scale is None else s.clamp(min=layer.input_scale)
    qx = (x / s).round().clamp(-127, 127).double()
    if layer.bits == 8:
        w = unpack_8bit(layer.packed)[:out].double() * layer.scale.double()[:, None]
    else:
        groups, q = unpack_groups(layer.groups)[:out], unpack_4bit(layer.packed)[:out]
        w = four_bit_values(q, layer.scale, groups).double()
    out = (qx @ w[:, :width].t()) * s.double()
    return out if layer.bias is None else out + layer.bias.double()


@pytest.mark.parametrize("bits", [8, 4])
@pytest.mark.parametrize("static", [False, True], ids=["dynamic", "static"])
@pytest.mark.parametrize("shape", SHAPES, ids=str)
def test_the_torch_reference_is_the_plain_math(bits, static, shape):
    width, out = shape
    bias = torch.randn(out) if out % 2 else None
    layer = QuantLinear(weights(out, width), bias, bits, 12.0 if static else None)
    x = activations(5, width)
    want = plain_math(layer, x)
    got = layer.reference(x).double()
    assert torch.allclose(got, want, rtol=1e-5, atol=1e-5 * want.abs().max())
    if not static:  # and it is a matmul: close to the float one
        x = activations(5, width, outlier=1.0)
        want = x @ weights(out, width).t() + (0 if bias is None else bias)
        error = (layer.reference(x) - want).norm() / want.norm()
        assert error < (0.02 if bits == 8 else 0.15), error


@pytest.mark.parametrize("bits", [8, 4])
def test_a_static_step_widens_for_a_row_beyond_it(bits):
    """Static mode: rows within the calibrated range use its step; a row beyond it is
    quantized with its own peak (as dynamic mode would), never clipped."""
    w = weights(40, 96)
    static, dynamic = QuantLinear(w, None, bits, 12.0), QuantLinear(w, None, bits)
    x = activations(6, 96, outlier=1.0)
    x = (
        x
        / x.abs().amax(1, keepdim=True)
        * torch.tensor([[3.0], [6.0], [11.0], [13.0], [40.0], [1e3]])
    )
    got, alone = static.reference(x), dynamic.reference(x)
    assert torch.equal(got[3:], alone[3:])
    assert not torch.equal(got[:3], alone[:3])
    assert torch.equal(static.activation_scale(x)[:3], torch.full((3, 1), 12.0 / 127))


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


def test_the_scalar_loops_compute_the_same_bits(kernels):
    """CPUs without AVX-512 VNNI run the scalar loops (forced here by TURSI_QUANTIZED_SCALAR)."""
    script = """
import torch
from tests.unit.test_quantize import activations, weights
from tursi.engine import native
from tursi.engine.quantize import QuantLinear
kernels = native.load()
assert kernels.quantized_isa() == "scalar"
for bits in (8, 4):
    for peak in (None, 12.0):
        layer = QuantLinear(weights(19, 70), torch.randn(19), bits, peak)
        x = activations(5, 70)
        got = kernels.quantized_linear(x, *layer.native_arguments(), layer.bias)
        assert torch.equal(got, layer.reference(x)), (bits, peak)
print("same")
"""
    env = {**os.environ, "TURSI_QUANTIZED_SCALAR": "1"}
    done = subprocess.run(
        [sys.executable, "-c", script], env=env, capture_output=True, text=True, timeout=300
    )
    assert done.stdout.strip() == "same", done.stderr


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
    peaks = calibrate(model, tokenizer, 8, True, 64)
    names = {name for name, m in model.named_modules() if isinstance(m, torch.nn.Linear)}
    assert set(peaks) == names and all(value > 0 for value in peaks.values())
