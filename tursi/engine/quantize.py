"""CPU quantization of a loaded float32 model: 8-bit and 4-bit integer weights.

Every `nn.Linear` and GPT-2 `Conv1D` becomes a `QuantLinear`; on Llama models the q/k/v and
gate/up projections are fused first (tursi.engine.cpu_kernels), so that the decode step runs
them in C++ as it runs a float model's (tursi.engine.decode). Weights:
- 8 bits: int8, symmetric, one scale per output channel;
- 4 bits: 0..15 in groups of 32 inputs, w = d * q + m with a float16 step d and minimum m per
  group (llama.cpp's Q4_1 grid: a Q4_1 GGUF's weights come back exactly), both relative to
  a power-of-two scale per output channel. The output head stays 8-bit (it is most of the
  logits' error).
Activations are quantized to int8 on the way in, per row:
- mode "dynamic": one scale per token, from that token's peak (no calibration);
- mode "static": one calibrated scale per layer (tursi.engine.calibration), widened to a
  token's own peak / 127 for a token beyond it (never clipped).
8-bit sums its products exactly in int32, then scales: y = acc * (s_x * s_w) + b. 4-bit sums
each group exactly in int32, then y = (sum_g acc_g * d_g + sum_x(g) * m_g) * (s_x * s_w) + b,
the groups added in order in float32.

`QuantLinear` runs tursi.engine.native's `quantized_linear` (AVX-512 VNNI) when the native
kernels are built, else `reference`, the same integer math in torch ops, bit for bit. The
input embedding is int8 rows with one scale per row, widened to float32 on lookup; norms and
attention stay float32. docs/quantization.md has the measurements and the weight layout.
"""

from __future__ import annotations

from collections.abc import Callable

import torch
import torch.nn.functional as F
from torch import nn

from . import native
from .cpu_kernels import FUSABLE_MODEL_TYPES, FusedAttention, FusedMLP

BLOCK = 16  # output channels per block of the packed layout
GROUP = 32  # inputs per 4-bit group
LEVELS = 15  # a 4-bit group's steps from its minimum to its maximum
HEAD_BITS = 8  # the output head's weights, whatever the bits of the rest
_NO_TENSOR = torch.empty(0)


def _pad(weight: torch.Tensor, rows: int, columns: int) -> torch.Tensor:
    return F.pad(weight, (0, columns - weight.shape[1], 0, rows - weight.shape[0]))


def _round_up(value: int, step: int) -> int:
    return -(-value // step) * step


def quantize_8bit(weight: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """(int8 q [out, in], scale [out]): symmetric, one scale per output channel."""
    scale = weight.abs().amax(dim=1).clamp(min=1e-8) / 127
    q = (weight / scale[:, None]).round().clamp(-127, 127)
    return q.to(torch.int8), scale


def quantize_4bit(weight: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """(q in 0..15 [out, in], channel scale [out], float16 step and minimum [out, in / 32, 2])
    of a weight whose inputs are a multiple of 32: each group's step is (max - min) / 15 and
    w ~ (step * q + minimum) * channel, the channel scale a power of two that brings the
    group values into float16's range without rounding them."""
    out, width = weight.shape
    groups = weight.view(out, width // GROUP, GROUP)
    low = groups.amin(-1)
    step = (groups.amax(-1) - low) / LEVELS
    largest = torch.maximum(step, low.abs()).amax(1).clamp(min=1e-30)
    channel = torch.exp2(torch.ceil(torch.log2(largest)))
    params = torch.stack([step, low], -1) / channel[:, None, None]
    params = params.half()
    step, low = params.float().unbind(-1)
    offsets = (groups - (low * channel[:, None])[..., None]) / (step * channel[:, None])[..., None]
    q = torch.nan_to_num(offsets, nan=0.0, posinf=0.0, neginf=0.0).round().clamp(0, LEVELS)
    return q.view(out, width).to(torch.uint8), channel, params


def pack_8bit(q: torch.Tensor) -> torch.Tensor:
    """int8 [out, in] (padded to 16, 4) -> [blocks, in / 4, 64]: per 4 inputs, the block's 16
    channels' 4 bytes (vpdpbusd's operand)."""
    out, width = q.shape
    blocks = q.reshape(out // BLOCK, BLOCK, width // 4, 4).permute(0, 2, 1, 3)
    return blocks.reshape(out // BLOCK, width // 4, 4 * BLOCK).contiguous()


def unpack_8bit(packed: torch.Tensor) -> torch.Tensor:
    blocks, steps, _ = packed.shape
    q = packed.view(blocks, steps, BLOCK, 4).permute(0, 2, 1, 3)
    return q.reshape(blocks * BLOCK, steps * 4)


def pack_4bit(q: torch.Tensor) -> torch.Tensor:
    """q in 0..15 [out, in] (padded to 16, 32) -> uint8 [blocks, in / 32, 4, 64]: per group, 4
    vectors laid out as pack_8bit's, whose low nibbles hold inputs 8v..8v+3 of the group and
    high nibbles 8v+4..8v+7."""
    out, width = q.shape
    nibbles = q.to(torch.uint8).view(out // BLOCK, BLOCK, width // GROUP, 4, 2, 4)
    nibbles = nibbles.permute(0, 2, 3, 1, 5, 4)  # block, group, vector, channel, input, half
    packed = nibbles[..., 0] | (nibbles[..., 1] << 4)
    return packed.reshape(out // BLOCK, width // GROUP, 4, 4 * BLOCK).contiguous()


def unpack_4bit(packed: torch.Tensor) -> torch.Tensor:
    blocks, groups = packed.shape[:2]
    bytes_ = packed.view(blocks, groups, 4, BLOCK, 4)
    nibbles = torch.stack([bytes_ & 0x0F, bytes_ >> 4], dim=-1)  # ..., channel, input, half
    return nibbles.permute(0, 3, 1, 2, 5, 4).reshape(blocks * BLOCK, groups * GROUP)


def pack_groups(params: torch.Tensor) -> torch.Tensor:
    """float16 step and minimum [out, groups, 2] -> [blocks, groups, 2, 16]: per block and
    group, the 16 channels' steps, then their minimums (one vector load)."""
    out, groups, _ = params.shape
    return params.view(out // BLOCK, BLOCK, groups, 2).permute(0, 2, 3, 1).contiguous()


def unpack_groups(packed: torch.Tensor) -> torch.Tensor:
    blocks, groups = packed.shape[:2]
    return packed.permute(0, 3, 1, 2).reshape(blocks * BLOCK, groups, 2)


class QuantLinear(nn.Module):
    """y = x W^T + b with integer W (8 or 4 bits) and int8 activations (module doc)."""

    def __init__(
        self,
        weight: torch.Tensor,
        bias: torch.Tensor | None,
        bits: int,
        input_peak: float | None = None,
    ):
        super().__init__()
        weight = weight.detach().float()
        self.out_features, self.in_features = weight.shape
        self.bits = bits
        out = _round_up(self.out_features, BLOCK)
        width = _round_up(self.in_features, 4 if bits == 8 else GROUP)
        weight = _pad(weight, out, width)
        if bits == 8:
            q, scale = quantize_8bit(weight)
            packed, groups = pack_8bit(q), None
            # 128 * each channel's sum: what the activations' +128 offset adds to the sums
            correction = (128 * q.long().sum(1)).to(torch.int32)
        else:
            q, scale, params = quantize_4bit(weight)
            packed, groups, correction = pack_4bit(q), pack_groups(params), None
        self.register_buffer("packed", packed)
        self.register_buffer("scale", scale[: self.out_features].clone())
        self.register_buffer("correction", correction)
        self.register_buffer("groups", groups)
        self.register_buffer("bias", None if bias is None else bias.detach().float().clone())
        # None: dynamic (per token); a 0-d tensor: static (per layer, from calibration)
        self.register_buffer(
            "input_scale",
            None
            if input_peak is None
            else torch.tensor(max(input_peak, 1e-8) / 127, dtype=torch.float32),
        )

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        kernels = native.load()
        if kernels is None or x.device.type != "cpu":
            return self.reference(x)
        return kernels.quantized_linear(x.float(), *self.native_arguments(), self.bias)

    def native_arguments(self) -> list[torch.Tensor]:
        """packed, scale, correction (8-bit), groups (4-bit), input scale (static): what the
        native kernels take (empty tensors for what this layer does not have)."""
        return [
            self.packed,
            self.scale,
            *(_NO_TENSOR if t is None else t for t in (self.correction, self.groups)),
            _NO_TENSOR if self.input_scale is None else self.input_scale,
        ]

    def activation_scale(self, rows: torch.Tensor) -> torch.Tensor:
        """Each row's int8 step: its peak / 127 (dynamic), or the calibrated step widened to
        that for a row beyond it (static)."""
        peak = rows.abs().amax(dim=-1, keepdim=True)
        if self.input_scale is None:
            return peak.clamp(min=1e-8) / 127
        return torch.maximum(self.input_scale, peak / 127)

    def reference(self, x: torch.Tensor) -> torch.Tensor:
        """The kernel's math in torch ops, bit for bit: integer sums from float matmuls,
        float32 where no sum can reach 2^24 (then every partial sum is an exact integer, in
        any order), else float64; 4-bit groups scaled and added in the kernel's order."""
        shape = x.shape
        rows = x.reshape(-1, shape[-1]).float()
        scale = self.activation_scale(rows)
        q = (rows / scale).round_().clamp_(-127, 127)
        if self.bits == 8:
            width = self.packed.shape[1] * 4
            exact = torch.float32 if width * 127 * 127 < 2**24 else torch.float64
            weight = unpack_8bit(self.packed).to(exact)
            q = F.pad(q.to(exact), (0, width - q.shape[1]))
            acc = (q @ weight.t()).float()
        else:
            acc = self._four_bit_sums(q)
        out = acc[:, : self.out_features] * (scale * self.scale)
        if self.bias is not None:
            out = out + self.bias
        return out.reshape(*shape[:-1], self.out_features)

    def _four_bit_sums(self, q: torch.Tensor) -> torch.Tensor:
        """sum_g (acc_g * step_g + sum(q_g) * minimum_g) per row and channel, group by group
        (float32: a group's sums, |q| <= 127 times 15 over 32 inputs, are exact)."""
        groups = self.packed.shape[1]
        q = F.pad(q, (0, groups * GROUP - q.shape[1])).view(-1, groups, GROUP)
        weight = unpack_4bit(self.packed).float().view(-1, groups, GROUP)
        params = unpack_groups(self.groups).float()
        acc = torch.zeros(q.shape[0], weight.shape[0])
        for g in range(groups):
            acc = acc + (q[:, g] @ weight[:, g].t()) * params[:, g, 0]
            acc = acc + q[:, g].sum(-1, keepdim=True) * params[:, g, 1]
        return acc

    def extra_repr(self) -> str:
        mode = "dynamic" if self.input_scale is None else "static"
        return (
            f"in={self.in_features}, out={self.out_features}, bits={self.bits}, activations={mode}"
        )


class QuantEmbedding(nn.Module):
    """An embedding table stored as int8 rows, one scale per row; its output is float32."""

    output_dtype = torch.float32

    def __init__(self, embedding: nn.Embedding):
        super().__init__()
        q, scale = quantize_8bit(embedding.weight.detach().float())
        self.register_buffer("weight", q)
        self.register_buffer("scale", scale)
        self.padding_idx = embedding.padding_idx

    def forward(self, ids: torch.Tensor) -> torch.Tensor:
        return F.embedding(ids, self.weight).float() * self.scale[ids][..., None]


def linear_layers(model: nn.Module) -> dict[str, tuple[torch.Tensor, torch.Tensor | None]]:
    """name -> (weight [out, in], bias) for every Linear and GPT-2 Conv1D."""
    from transformers.pytorch_utils import Conv1D

    layers = {}
    for name, module in model.named_modules():
        if isinstance(module, nn.Linear):
            layers[name] = (module.weight, module.bias)
        elif isinstance(module, Conv1D):  # y = x W + b, W stored [in, out]
            layers[name] = (module.weight.t(), module.bias)
    return layers


def quantize_model(model: nn.Module, bits: int, peaks: dict[str, float] | None = None) -> nn.Module:
    """Quantize the model in place: Llama layers fused, then every linear a QuantLinear (the
    output head 8-bit), the embedding int8. `peaks`: static mode's calibrated input peak per
    linear (tursi.engine.calibration, by the unfused names), else dynamic."""
    output = model.get_output_embeddings()

    def linear(name: str, head: bool = False) -> Callable[..., nn.Module]:
        def make(weight: torch.Tensor, bias: torch.Tensor | None, part: str = "") -> nn.Module:
            peak = None if peaks is None else peaks[name + part]
            return QuantLinear(weight, bias, HEAD_BITS if head else bits, peak)

        return make

    with torch.no_grad():
        if getattr(model.config, "model_type", None) in FUSABLE_MODEL_TYPES:
            for index, layer in enumerate(model.model.layers):
                prefix = f"model.layers.{index}."
                layer.self_attn = FusedAttention(layer.self_attn, linear(prefix + "self_attn."))
                layer.mlp = FusedMLP(layer.mlp, linear(prefix + "mlp."))
        modules = dict(model.named_modules())
        for name, (weight, bias) in linear_layers(model).items():
            parent_name, _, child = name.rpartition(".")
            parent = modules[parent_name] if parent_name else model
            setattr(parent, child, linear(name, modules[name] is output)(weight, bias))
        embedding = model.get_input_embeddings()
        if isinstance(embedding, nn.Embedding):
            model.set_input_embeddings(QuantEmbedding(embedding))
        model.config.tie_word_embeddings = False  # the head has its own copy now
    return model


def quantized_skeleton(model: nn.Module, bits: int, static: bool) -> nn.Module:
    """Give a model built on the meta device the quantized layout, ready for
    `load_state_dict(..., assign=True)` of a saved quantized model (placeholder values)."""
    peaks = {name: 1.0 for name in linear_layers(model)} if static else None
    return quantize_model(model, bits, peaks)
