"""The CPU matmul kernels (tursi.engine.cpu_kernels) and the fused decode step
(tursi.engine.decode): a model after optimize_for_cpu computes what transformers computes,
in prefill (transformers' forward over the fused modules) and in decode steps (the direct
path, with the native kernels and with torch ops), and the direct path is the one the engine
takes. The reference is always the stock model (no optimize_for_cpu), and in decode steps
its own forward with a DynamicCache, one prompt at a time: never Tursi's BatchCache."""

import logging

import pytest
import torch
from torch import nn
from transformers import AutoModelForCausalLM, DynamicCache, LlamaConfig, LlamaForCausalLM
from transformers.models.llama.modeling_llama import LlamaRMSNorm

import tursi.engine.decode as decode_module
from tests.helpers import build_gpt2, build_llama, prefilled
from tursi.engine import native
from tursi.engine.cpu_kernels import (
    FusedAttention,
    FusedMLP,
    PackedLinear,
    fused_llama,
    optimize_for_cpu,
    packing_supported,
)
from tursi.engine.decode import TorchOps, decode_logits
from tursi.engine.kvcache import BatchCache
from tursi.engine.loading import model_bytes

DTYPES = [torch.float32] + ([torch.bfloat16] if packing_supported(torch.bfloat16) else [])


# bf16 keeps 8 bits of mantissa: the fused model's logits may differ in the last bit of
# intermediate sums; fp32 ones only by summation order.
TOLERANCE = {torch.float32: 1e-4, torch.bfloat16: 5e-2}


PROMPTS = [[5, 17, 42, 8, 99, 23, 61], [300, 7, 12]]


def pair(path, dtype):
    """(stock, optimized) copies of the model at `path`, in `dtype`."""
    stock = AutoModelForCausalLM.from_pretrained(path, dtype=dtype).eval()
    optimized = AutoModelForCausalLM.from_pretrained(path, dtype=dtype).eval()
    assert optimize_for_cpu(optimized)
    return stock, optimized


@pytest.fixture(scope="module", params=["tied", "untied-biases"])
def llama_path(request, tmp_path_factory):
    """A tiny Llama with tied embeddings, or with its own head and biases on every
    projection (so the fused q/k/v and gate/up biases are exercised). Three layers whose norms
    all differ (random weights), with an epsilon that weighs in the norm: a step that used
    another layer's norm, or another epsilon, would not match."""
    path = tmp_path_factory.mktemp(request.param)
    common = {"num_hidden_layers": 3, "rms_norm_eps": 0.1, "norm_spread": 0.5}
    if request.param == "tied":
        return build_llama(path, initializer_range=0.2, **common)
    return build_llama(
        path,
        tie_word_embeddings=False,
        attention_bias=True,
        mlp_bias=True,
        initializer_range=0.2,
        **common,
    )


@pytest.mark.parametrize("shape", [(5, 64), (5, 1, 64), (2, 3, 1, 64)], ids=str)
def test_torch_ops_add_rms_norm_is_llama_rms_norm_of_the_sum(shape):
    """Over the last dimension only, whatever the leading ones, with the norm's own epsilon
    and weight."""
    generator = torch.Generator().manual_seed(len(shape))
    hidden, delta = (torch.randn(shape, generator=generator) * 0.3 for _ in "hd")
    norm = LlamaRMSNorm(64, eps=0.1)
    with torch.no_grad():
        norm.weight.copy_(torch.rand(64, generator=generator) + 0.5)
        total, normed = TorchOps.add_rms_norm(hidden, delta, norm)
        assert torch.equal(total, hidden + delta)
        assert torch.allclose(normed, norm(hidden + delta), rtol=1e-5, atol=1e-6)


@pytest.fixture(params=["native", "torch-ops"])
def step_ops(request, monkeypatch):
    """The direct path's decoder layers: native `decode_layers` (when built), or the torch
    loop."""
    if request.param == "native" and native.load() is None:
        pytest.skip("native kernels not built (tests/test_native_kernels.py says why)")
    if request.param == "torch-ops":
        monkeypatch.setattr(native, "load", lambda: None)
    return request.param


def test_optimized_llama_is_packed_and_fused(llama_path):
    _, model = pair(llama_path, torch.float32)
    assert fused_llama(model)
    for layer in model.model.layers:
        assert isinstance(layer.self_attn, FusedAttention)
        assert isinstance(layer.mlp, FusedMLP)
    assert isinstance(model.lm_head, PackedLinear)
    assert not any(type(m) is nn.Linear for m in model.modules())
    assert model_bytes(model) > 0


@pytest.mark.parametrize("dtype", DTYPES, ids=str)
def test_prefill_logits_match_transformers(llama_path, dtype):
    """Transformers' own forward over the fused modules: left-padded batch, causal mask."""
    stock, optimized = pair(llama_path, dtype)
    ids = torch.tensor([PROMPTS[0], [0] * 4 + PROMPTS[1]])
    mask = torch.tensor([[1] * 7, [0] * 4 + [1] * 3])
    with torch.inference_mode():
        want = stock(input_ids=ids, attention_mask=mask).logits.float()
        got = optimized(input_ids=ids, attention_mask=mask).logits.float()
    scale = want.abs().max()
    assert (got - want)[mask.bool()].abs().max() <= TOLERANCE[dtype] * scale


def transformers_steps(stock, prompts, steps):
    """The reference: the stock model's own greedy decoding of each prompt alone, its forward
    with a DynamicCache. Returns the tokens fed at each step [steps, rows, 1] and the
    logits each step gave [steps, rows, vocab]."""
    fed, logits = [], []
    for prompt in prompts:
        cache, row_fed, row_logits = DynamicCache(), [], []
        with torch.inference_mode():
            out = stock(input_ids=torch.tensor([prompt]), past_key_values=cache, use_cache=True)
            for _ in range(steps):
                row_fed.append(out.logits[0, -1].argmax().view(1))
                out = stock(input_ids=row_fed[-1][None], past_key_values=cache, use_cache=True)
                row_logits.append(out.logits[0, -1])
        fed.append(torch.stack(row_fed))
        logits.append(torch.stack(row_logits))
    return torch.stack(fed, 1), torch.stack(logits, 1)


def assert_close(got, want, dtype):
    """Equal up to the dtype's rounding, relative to the largest logit."""
    got, want = got.float(), want.float()
    assert (got - want).abs().max() <= TOLERANCE[dtype] * want.abs().max()


@pytest.mark.parametrize("dtype", DTYPES, ids=str)
def test_fused_decode_steps_match_transformers_forward(llama_path, dtype, step_ops):
    """Rows of different lengths, 4 steps: the direct path against transformers' stock
    model decoding each prompt alone with a DynamicCache, fed the same tokens."""
    stock, optimized = pair(llama_path, dtype)
    cache = prefilled(optimized, PROMPTS)
    fed, want = transformers_steps(stock, PROMPTS, 4)
    with torch.inference_mode():
        for ids, expected in zip(fed, want, strict=True):
            assert_close(decode_logits(optimized, ids, cache), expected, dtype)
    assert cache.lengths == [len(p) + 4 for p in PROMPTS]


def test_engine_takes_the_direct_path_for_fused_llama_with_sdpa(llama_path, step_ops, monkeypatch):
    """Not transformers' forward; the layers in C++ when the model has a native plan (the
    torch-ops loop never runs then), else in the torch-ops loop."""
    stock, model = pair(llama_path, torch.float32)
    assert (decode_module.native_plan(model) is not None) == (step_ops == "native")
    fed, want = transformers_steps(stock, PROMPTS, 1)
    cache = prefilled(model, PROMPTS)
    torch_loops = []
    torch_layers = decode_module._torch_layers

    def no_forward(*args, **kwargs):
        raise AssertionError("transformers' forward ran for a decode step")

    def counted_torch_layers(*args):
        torch_loops.append(args)
        return torch_layers(*args)

    with monkeypatch.context() as patch, torch.inference_mode():
        patch.setattr(type(model), "forward", no_forward)
        patch.setattr(decode_module, "_torch_layers", counted_torch_layers)
        assert_close(decode_logits(model, fed[0], cache), want[0], torch.float32)
    assert len(torch_loops) == (0 if step_ops == "native" else 1)


def test_without_the_direct_path_the_engine_matches_too(llama_path, step_ops, monkeypatch):
    """decode_logits with the direct path switched off runs transformers' forward over the
    fused modules and the BatchCache, with SDPA (a boolean mask) and eager attention (an
    additive one): the stock model's logits too."""
    stock, model = pair(llama_path, torch.float32)
    fed, want = transformers_steps(stock, PROMPTS, 1)
    monkeypatch.setattr(decode_module, "fused_llama", lambda model: False)
    with torch.inference_mode():
        assert_close(
            decode_logits(model, fed[0], prefilled(model, PROMPTS)), want[0], torch.float32
        )
        model.model.set_attn_implementation("eager")
        cache = prefilled(model, PROMPTS, boolean_mask=False)
        assert_close(decode_logits(model, fed[0], cache), want[0], torch.float32)


@pytest.mark.parametrize("attention", ["sdpa", "eager"])
def test_a_step_runs_on_the_model_device(attention):
    """In production the model, its cache and the step's ids live on a GPU. The meta device
    stands in for it (shapes without data): decode_logits makes the step's positions and
    mask where the ids are, or a CPU tensor meets the model's meta ones and raises."""
    config = LlamaConfig(
        vocab_size=50,
        hidden_size=32,
        intermediate_size=64,
        num_hidden_layers=2,
        num_attention_heads=4,
        num_key_value_heads=2,
        attn_implementation=attention,
    )
    meta = torch.device("meta")
    with meta:
        model = LlamaForCausalLM(config)
        source = DynamicCache()
        for layer in range(config.num_hidden_layers):
            source.update(torch.zeros(2, 2, 4, 8), torch.zeros(2, 2, 4, 8), layer)
        ids = torch.zeros(2, 1, dtype=torch.long)
    cache = BatchCache(config.num_hidden_layers, 100, boolean_mask=attention == "sdpa")
    cache.add_row(source, 0, torch.arange(4))
    cache.add_row(source, 1, torch.arange(1, 4))
    logits = decode_logits(model, ids, cache)
    assert logits.device == meta
    assert logits.shape == (2, config.vocab_size)
    assert cache.lengths == [5, 4]


def test_gpt2_gets_packed_linears_only(tmp_path):
    """GPT-2 is not fused (its Conv1D projections stay); its output head is packed."""
    path = build_gpt2(tmp_path)
    stock, optimized = pair(path, torch.float32)
    assert not fused_llama(optimized)
    assert isinstance(optimized.lm_head, PackedLinear)
    ids = torch.tensor([PROMPTS[0]])
    with torch.inference_mode():
        assert torch.allclose(
            optimized(input_ids=ids).logits, stock(input_ids=ids).logits, atol=1e-4
        )


def test_nothing_changes_for_a_dtype_onednn_does_not_pack(llama_path):
    model = AutoModelForCausalLM.from_pretrained(llama_path, dtype=torch.float64)
    assert not optimize_for_cpu(model)
    assert not fused_llama(model)
    assert type(model.lm_head) is nn.Linear


def test_a_llama_the_native_step_cannot_run_uses_torch_ops(tmp_path):
    """The native decode_layers runs SiLU MLPs only: a GELU Llama gets the torch-ops loop,
    and still computes what transformers computes."""
    path = build_llama(tmp_path, hidden_act="gelu", initializer_range=0.2)
    stock, optimized = pair(path, torch.float32)
    assert fused_llama(optimized) and decode_module.native_plan(optimized) is None
    fed, want = transformers_steps(stock, PROMPTS, 1)
    with torch.inference_mode():
        got = decode_logits(optimized, fed[0], prefilled(optimized, PROMPTS))
    assert_close(got, want[0], torch.float32)


def test_native_decode_layers_refuses_a_plan_that_does_not_fit(llama_path):
    kernels = native.load()
    if kernels is None:
        pytest.skip("native kernels not built")
    _, model = pair(llama_path, torch.float32)
    plan = decode_module.native_plan(model)
    cache = prefilled(model, PROMPTS)
    ids = torch.tensor([[prompt[-1]] for prompt in PROMPTS])  # any tokens: shapes matter here
    positions, mask = cache.prepare_step(torch.device("cpu"))
    hidden = model.model.embed_tokens(ids)
    cos, sin = model.model.rotary_emb(hidden, positions)
    bias = torch.zeros(mask.shape)
    keys = [layer.keys for layer in cache.layers]
    values = [layer.values for layer in cache.layers]
    args = (cos, sin, positions.view(-1), bias)
    sizes = (plan.heads, plan.kv_heads, plan.intermediate, plan.scaling, plan.eps)
    linears = (plan.weights, plan.biases, plan.quantized)
    short = (plan.weights[:-1], plan.biases, plan.quantized)
    with torch.inference_mode():
        kernels.decode_layers(hidden, *linears, keys, values, *args, cache.window, *sizes)  # fits
        with pytest.raises(RuntimeError):  # a weight short
            kernels.decode_layers(hidden, *short, keys, values, *args, cache.window, *sizes)
        with pytest.raises(RuntimeError):  # quantized tensors for a float model's linears
            kernels.decode_layers(
                hidden,
                plan.weights,
                plan.biases,
                [[torch.empty(0)] * 4] * len(plan.biases),
                keys,
                values,
                *args,
                cache.window,
                *sizes,
            )
        with pytest.raises(RuntimeError):  # a window past the cache's columns
            kernels.decode_layers(
                hidden, *linears, keys, values, *args, keys[0].shape[2] + 1, *sizes
            )


def break_native_fit(model, mismatch):
    """Give one norm of `model` another epsilon, or a weight in another dtype (bfloat16 in a
    float32 model: LlamaRMSNorm then gives float32, as TorchOps does)."""
    norm = model.model.layers[1].post_attention_layernorm
    if mismatch == "epsilon":
        norm.variance_epsilon = 0.3
    else:
        norm.weight = nn.Parameter(norm.weight.detach().bfloat16(), requires_grad=False)


@pytest.mark.parametrize("mismatch", ["epsilon", "dtype"])
def test_a_layer_norm_unlike_the_others_gets_torch_ops(llama_path, mismatch):
    """The native decode_layers takes one epsilon and one dtype for every norm: a model with
    one norm of another epsilon or weight dtype runs the torch-ops loop, and still computes
    what transformers computes."""
    if native.load() is None:
        pytest.skip("native kernels not built: every model gets torch ops")
    stock, model = pair(llama_path, torch.float32)
    break_native_fit(stock, mismatch)
    break_native_fit(model, mismatch)
    assert decode_module.native_plan(model) is None
    fed, want = transformers_steps(stock, PROMPTS, 2)
    cache = prefilled(model, PROMPTS)
    with torch.inference_mode():
        for ids, expected in zip(fed, want, strict=True):
            assert_close(decode_logits(model, ids, cache), expected, torch.float32)


def test_the_log_says_which_decode_path_a_model_takes(llama_path, caplog):
    """What an operator reads: C++ and the layer count, or torch ops and what C++ needs."""
    if native.load() is None:
        pytest.skip("native kernels not built")
    _, fits = pair(llama_path, torch.float32)
    _, does_not_fit = pair(llama_path, torch.float32)
    break_native_fit(does_not_fit, "epsilon")
    with caplog.at_level(logging.INFO, logger=decode_module.__name__):
        decode_module.native_plan(fits)
        decode_module.native_plan(does_not_fit)
    assert caplog.messages == [
        "decode steps in C++ (tursi.engine.native): 3 layers",
        "decode steps in torch ops: the native layers need SiLU MLPs, the same heads and norm "
        "epsilon in every layer, norm weights in torch.float32, all linears quantized or none",
    ]
