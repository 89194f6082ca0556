"""Calibration of quantized loads: SmoothQuant's smoothing, and static mode's scales.

The float32 model reads the first tokens of `tursi/data/calibration.txt` (public domain, see
tursi/data/README.md) while hooks record, per linear layer, the peak |activation| of each
input channel. On Llama models, SmoothQuant's smoothing then moves part of each channel's
range from the activations into the weights: channel c of a linear's input is divided by
s_c = peak_x(c)^alpha / peak_w(c)^(1 - alpha) and the weights' column c multiplied by it, the
division folded into what produces that input (the RMSNorm weight before q/k/v, gate/up and
the output head; the up projection's rows before the down projection; the value
projection's rows before the output projection, one s per key/value head channel), so the
float model computes the same function and nothing is added at run time. 8-bit loads are
smoothed (dynamic activations lose less to rounding too; alpha chosen per mode by held-out
perplexity, docs/quantization.md); 4-bit loads are not, so that weights already on a 4-bit
grid (a Q4_1 GGUF's) keep it exactly.

Static mode's step per layer: the smoothed model reads the text again, and each layer's
scale is the 99th percentile of its tokens' peaks / 127. The kernels widen it for a token
beyond it (tursi.engine.quantize), so the rare tokens with "massive activations" (a
sequence's first token reaches 18x the others' peak in some down projections of the
embedded model) keep their precision without coarsening every other token's step.
"""

from __future__ import annotations

from pathlib import Path
from typing import Any

import torch
from torch import nn

from .cpu_kernels import FUSABLE_MODEL_TYPES
from .quantize import linear_layers

CALIBRATION_TEXT = Path(__file__).resolve().parent.parent / "data" / "calibration.txt"
CALIBRATION_TOKENS = 1024
# SmoothQuant's migration strength: measured best of 0.3/0.5/0.7 (dynamic) and
# 0.5/0.7/0.85 (static) on the embedded model
DYNAMIC_ALPHA = 0.5
STATIC_ALPHA = 0.7
# the tokens' peak that static mode's step covers (measured on the embedded model, 8-bit,
# held-out perplexity: 100th 17.62, 99th 16.57, 90th 16.74, fp32 16.27)
STATIC_PERCENTILE = 0.99


def _calibration_ids(tokenizer: Any, max_tokens: int, text: str | None) -> torch.Tensor:
    text = CALIBRATION_TEXT.read_text() if text is None else text
    limit = min(max_tokens, CALIBRATION_TOKENS)
    return tokenizer(text, return_tensors="pt")["input_ids"][:, :limit]


def _record_inputs(model: nn.Module, ids: torch.Tensor, reduce: Any) -> dict[str, torch.Tensor]:
    """Run the model over `ids` with a hook on every linear layer: name -> reduce(the input
    as [tokens, features], what that name recorded so far or None)."""
    recorded: dict[str, torch.Tensor] = {}
    modules = dict(model.named_modules())
    hooks = []
    for name in linear_layers(model):

        def record(module: nn.Module, inputs: tuple, name: str = name) -> None:
            x = inputs[0].detach()
            recorded[name] = reduce(x.reshape(-1, x.shape[-1]).float(), recorded.get(name))

        hooks.append(modules[name].register_forward_pre_hook(record))
    try:
        with torch.inference_mode():
            model(input_ids=ids.to(model.device))
    finally:
        for hook in hooks:
            hook.remove()
    return recorded


def channel_peaks(
    model: nn.Module, tokenizer: Any, max_tokens: int = CALIBRATION_TOKENS, text: str | None = None
) -> dict[str, torch.Tensor]:
    """Per linear layer (by name), the largest |activation| of each input channel over the
    calibration text (its first `max_tokens` tokens, at most CALIBRATION_TOKENS)."""

    def channel_peak(x: torch.Tensor, before: torch.Tensor | None) -> torch.Tensor:
        peak = x.abs().amax(0)
        return peak if before is None else torch.maximum(before, peak)

    return _record_inputs(model, _calibration_ids(tokenizer, max_tokens, text), channel_peak)


def token_peaks(
    model: nn.Module, tokenizer: Any, max_tokens: int = CALIBRATION_TOKENS, text: str | None = None
) -> dict[str, torch.Tensor]:
    """Per linear layer, each calibration token's largest |activation| [tokens]."""

    def token_peak(x: torch.Tensor, before: torch.Tensor | None) -> torch.Tensor:
        peak = x.abs().amax(1)
        return peak if before is None else torch.cat([before, peak])

    return _record_inputs(model, _calibration_ids(tokenizer, max_tokens, text), token_peak)


def _factors(x_peak: torch.Tensor, w_peak: torch.Tensor, alpha: float) -> torch.Tensor:
    s = x_peak.clamp(min=1e-5).pow(alpha) / w_peak.clamp(min=1e-5).pow(1 - alpha)
    return s.clamp(min=1e-5)


def _scale_columns(linears: list[nn.Linear], x_peak: torch.Tensor, alpha: float) -> torch.Tensor:
    """The smoothing factors of the linears that share one input; their columns multiplied."""
    w_peak = torch.stack([linear.weight.abs().amax(0) for linear in linears]).amax(0)
    s = _factors(x_peak, w_peak, alpha)
    for linear in linears:
        linear.weight.mul_(s)
    return s


def _divide_rows(linear: nn.Linear, s: torch.Tensor) -> None:
    linear.weight.div_(s[:, None])
    if linear.bias is not None:
        linear.bias.div_(s)


def smooth_llama(
    model: nn.Module, peaks: dict[str, torch.Tensor], alpha: float = DYNAMIC_ALPHA
) -> dict[str, torch.Tensor]:
    """Smooth a transformers Llama in place (module doc); the peaks of the smoothed inputs."""
    head = model.get_output_embeddings()
    if head.weight is model.get_input_embeddings().weight:  # a tied head gets its own copy
        head.weight = nn.Parameter(head.weight.detach().clone(), requires_grad=False)
        model.config.tie_word_embeddings = False
    smoothed = dict(peaks)
    with torch.no_grad():
        for index, layer in enumerate(model.model.layers):
            prefix = f"model.layers.{index}."
            attention, mlp = layer.self_attn, layer.mlp
            qkv = [attention.q_proj, attention.k_proj, attention.v_proj]
            s = _scale_columns(qkv, peaks[prefix + "self_attn.q_proj"], alpha)
            layer.input_layernorm.weight.div_(s)
            for part in ("q_proj", "k_proj", "v_proj"):
                smoothed[prefix + "self_attn." + part] = peaks[prefix + "self_attn." + part] / s

            s = _scale_columns([mlp.gate_proj, mlp.up_proj], peaks[prefix + "mlp.gate_proj"], alpha)
            layer.post_attention_layernorm.weight.div_(s)
            for part in ("gate_proj", "up_proj"):
                smoothed[prefix + "mlp." + part] = peaks[prefix + "mlp." + part] / s

            name = prefix + "mlp.down_proj"
            s = _scale_columns([mlp.down_proj], peaks[name], alpha)
            _divide_rows(mlp.up_proj, s)
            smoothed[name] = peaks[name] / s

            # o_proj's input channel (head h, dim d) is value head h // repeats, dim d: one
            # factor per value channel, from the peaks of the heads that share it.
            name = prefix + "self_attn.o_proj"
            kv_heads = attention.v_proj.out_features // attention.head_dim
            shape = (kv_heads, -1, attention.head_dim)
            x_peak = peaks[name].view(shape).amax(1)
            w_peak = attention.o_proj.weight.abs().amax(0).view(shape).amax(1)
            s_value = _factors(x_peak, w_peak, alpha)  # [kv_heads, head_dim]
            repeats = attention.o_proj.in_features // attention.v_proj.out_features
            s = s_value.repeat_interleave(repeats, dim=0).reshape(-1)
            attention.o_proj.weight.mul_(s)
            _divide_rows(attention.v_proj, s_value.reshape(-1))
            smoothed[name] = peaks[name] / s

        name = next(n for n, m in model.named_modules() if m is head)
        s = _scale_columns([head], peaks[name], alpha)
        model.model.norm.weight.div_(s)
        smoothed[name] = peaks[name] / s
    return smoothed


def calibrate(
    model: nn.Module,
    tokenizer: Any,
    bits: int,
    static: bool,
    max_tokens: int = CALIBRATION_TOKENS,
    text: str | None = None,
) -> dict[str, float] | None:
    """Smooth an 8-bit Llama load in place (the mode's alpha); static mode's peak per
    linear layer (the STATIC_PERCENTILE of its tokens' peaks, after smoothing), else None."""
    if bits == 8 and getattr(model.config, "model_type", None) in FUSABLE_MODEL_TYPES:
        peaks = channel_peaks(model, tokenizer, max_tokens, text)
        smooth_llama(model, peaks, STATIC_ALPHA if static else DYNAMIC_ALPHA)
    if not static:
        return None
    tokens = token_peaks(model, tokenizer, max_tokens, text)
    return {name: float(peak.quantile(STATIC_PERCENTILE)) for name, peak in tokens.items()}
