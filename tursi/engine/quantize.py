"""CPU int8 quantization of a loaded float32 model (the 8-bit backend on CPU).

Every `nn.Linear` and GPT-2 `Conv1D`, the output head included, becomes an `Int8Linear`:
weights int8, symmetric, one scale per output channel; the matmul runs in int8 with int32
accumulation (`torch._int_mm`). Activations are quantized on the way in:

- mode "dynamic": one scale per token, computed from that token's activations at run time
  (no calibration);
- mode "static": one fixed scale per layer, the largest activation seen on calibration text.

The input embedding is kept in bfloat16 (a table lookup, exact enough) and widened to float32
on the way out; norms and attention stay float32. See docs/quantization.md for measurements.
"""

from __future__ import annotations

from pathlib import Path
from typing import Any

import torch
import torch.nn.functional as F
from torch import nn

CALIBRATION_TEXT = Path(__file__).resolve().parent.parent / "data" / "calibration.txt"
CALIBRATION_TOKENS = 1024


class Int8Linear(nn.Module):
    """y = x W^T + b with int8 W (per output channel scales) and int8 activations."""

    def __init__(
        self, weight: torch.Tensor, bias: torch.Tensor | None, input_scale: float | None = None
    ):
        super().__init__()
        weight = weight.detach().float()
        scale = weight.abs().amax(dim=1, keepdim=True).clamp(min=1e-8) / 127
        quantized = (weight / scale).round().clamp(-127, 127).to(torch.int8)
        self.register_buffer("weight_t", quantized.t().contiguous())  # [in, out] for _int_mm
        self.register_buffer("weight_scale", scale.t().contiguous())  # [1, out]
        self.register_buffer("bias", None if bias is None else bias.detach().float().clone())
        # None: dynamic (per token); a 0-d tensor: static (per layer, from calibration)
        self.register_buffer(
            "input_scale",
            None
            if input_scale is None
            else torch.tensor(max(input_scale, 1e-8) / 127, dtype=torch.float32),
        )
        self.in_features, self.out_features = weight.shape[1], weight.shape[0]

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        shape = x.shape
        rows = x.reshape(-1, shape[-1]).float()
        if self.input_scale is None:
            scale = rows.abs().amax(dim=-1, keepdim=True).clamp(min=1e-8) / 127
        else:
            scale = self.input_scale
        quantized = (rows / scale).round_().clamp_(-127, 127).to(torch.int8)
        out = torch._int_mm(quantized, self.weight_t).float() * (scale * self.weight_scale)
        if self.bias is not None:
            out = out + self.bias
        return out.reshape(*shape[:-1], self.out_features)

    def extra_repr(self) -> str:
        mode = "dynamic" if self.input_scale is None else "static"
        return f"in={self.in_features}, out={self.out_features}, activations={mode}"


class Bf16Embedding(nn.Module):
    """An embedding table stored in bfloat16 whose output is float32."""

    def __init__(self, embedding: nn.Embedding):
        super().__init__()
        self.weight = nn.Parameter(
            embedding.weight.detach().to(torch.bfloat16), requires_grad=False
        )
        self.padding_idx = embedding.padding_idx

    def forward(self, ids: torch.Tensor) -> torch.Tensor:
        return F.embedding(ids, self.weight, self.padding_idx).float()


def _linear_layers(model: nn.Module) -> dict[str, tuple[torch.Tensor, torch.Tensor | None]]:
    """name -> (weight [out, in], bias) for every Linear and GPT-2 Conv1D."""
    from transformers.pytorch_utils import Conv1D

    layers = {}
    for name, module in model.named_modules():
        if isinstance(module, nn.Linear):
            layers[name] = (module.weight, module.bias)
        elif isinstance(module, Conv1D):  # y = x W + b, W stored [in, out]
            layers[name] = (module.weight.t(), module.bias)
    return layers


def calibrate(
    model: nn.Module, tokenizer: Any, max_tokens: int = CALIBRATION_TOKENS, text: str | None = None
) -> dict[str, float]:
    """Largest |activation| entering each linear layer over the calibration text (its first
    `max_tokens` tokens: at most the model's context)."""
    text = CALIBRATION_TEXT.read_text() if text is None else text
    limit = min(max_tokens, CALIBRATION_TOKENS)
    ids = tokenizer(text, return_tensors="pt")["input_ids"][:, :limit]
    peaks: dict[str, float] = {}
    modules = dict(model.named_modules())
    hooks = []
    for name in _linear_layers(model):

        def record(module: nn.Module, inputs: tuple, name: str = name) -> None:
            peaks[name] = max(peaks.get(name, 0.0), float(inputs[0].abs().amax()))

        hooks.append(modules[name].register_forward_pre_hook(record))
    try:
        with torch.inference_mode():
            model(input_ids=ids.to(model.device))
    finally:
        for hook in hooks:
            hook.remove()
    return peaks


def int8_skeleton(model: nn.Module, static: bool) -> nn.Module:
    """Give a model built on the meta device the int8 layout, ready for `load_state_dict(...,
    assign=True)` of a saved int8 model (the values here are placeholders)."""
    peaks = {name: 1.0 for name in _linear_layers(model)} if static else None
    return quantize_int8(model, peaks)


def quantize_int8(model: nn.Module, peaks: dict[str, float] | None = None) -> nn.Module:
    """Replace the linear layers in place (static scales when `peaks` is given)."""
    with torch.no_grad():
        layers = _linear_layers(model)
        modules = dict(model.named_modules())
        for name, (weight, bias) in layers.items():
            parent_name, _, child = name.rpartition(".")
            parent = modules[parent_name] if parent_name else model
            scale = None if peaks is None else peaks[name]
            setattr(parent, child, Int8Linear(weight, bias, scale))
        embedding = model.get_input_embeddings()
        if isinstance(embedding, nn.Embedding):
            model.set_input_embeddings(Bf16Embedding(embedding))
        model.config.tie_word_embeddings = False  # the head has its own int8 copy now
    return model
