"""Faster matmuls for float models on the CPU: prepacked oneDNN weights and fused projections.

A plain `nn.Linear` on the CPU hands its row-major weight to oneDNN (bf16) or MKL (fp32) at
every call, and oneDNN reorders it into its blocked layout each time. `PackedLinear` does that
reorder once, at load, and calls the packed-weight kernel that inductor uses for frozen graphs
(`torch.ops.mkldnn._linear_pointwise`); the results are the same numbers, and a 16-row decode
step of the embedded model spends about a quarter less time in matmuls (docs/performance.md).

On Llama-architecture models the q/k/v projections become one matmul (`FusedAttention`) and
the gate/up projections another (`FusedMLP`): fewer, wider matmuls. The fused modules keep
transformers' calling conventions, so the model's own forward (used for prefill) runs them, and
`tursi.engine.decode` runs them directly for one-token decode steps.

`optimize_for_cpu` makes these swaps after a load. It changes nothing on CUDA, on quantized
models, for dtypes this CPU's oneDNN does not run, or when a probe matmul disagrees with
`F.linear`. Quantized loads fuse the same way with their own linears (tursi.engine.quantize).
"""

from __future__ import annotations

import logging
import sys
from collections.abc import Callable
from typing import Any

import torch
import torch.nn.functional as F
from torch import nn

log = logging.getLogger(__name__)

# Model types whose attention and MLP modules follow transformers' Llama code exactly
# (q/k/v/o projections, rotary embeddings from the model, gate/up/down MLP).
FUSABLE_MODEL_TYPES = frozenset({"llama"})
_PROBE_ROWS = 3


def packing_supported(dtype: torch.dtype) -> bool:
    """Whether oneDNN on this CPU runs packed linears in `dtype`."""
    if not torch.backends.mkldnn.is_available():
        return False
    if dtype == torch.float32:
        return True
    if dtype == torch.bfloat16:
        return torch.ops.mkldnn._is_mkldnn_bf16_supported()
    if dtype == torch.float16:
        return torch.ops.mkldnn._is_mkldnn_fp16_supported()
    return False


class PackedLinear(nn.Module):
    """y = x W^T + b with W stored once in oneDNN's blocked layout (an opaque tensor)."""

    def __init__(self, weight: torch.Tensor, bias: torch.Tensor | None):
        super().__init__()
        weight = weight.detach()
        self.in_features, self.out_features = weight.shape[1], weight.shape[0]
        # The row count is only a hint for the blocking; any number of rows works.
        self.register_buffer(
            "packed",
            torch.ops.mkldnn._reorder_linear_weight(weight.contiguous(), 16),
            persistent=False,
        )
        self.register_buffer(
            "bias", None if bias is None else bias.detach().clone(), persistent=False
        )

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return torch.ops.mkldnn._linear_pointwise(x, self.packed, self.bias, "none", [], "")

    def extra_repr(self) -> str:
        return f"in={self.in_features}, out={self.out_features}, packed"


# (weight, bias, name of the first projection fused into it) -> the linear module to use.
LinearFactory = Callable[[torch.Tensor, "torch.Tensor | None", str], nn.Module]


def packed_linear(weight: torch.Tensor, bias: torch.Tensor | None, part: str) -> nn.Module:
    return PackedLinear(weight, bias)


class FusedMLP(nn.Module):
    """A gated MLP, down(act(gate(x)) * up(x)), with gate and up as one matmul (`linear`
    makes the matmuls: packed float ones by default)."""

    def __init__(self, mlp: nn.Module, linear: LinearFactory = packed_linear):
        super().__init__()
        self.intermediate = mlp.gate_proj.out_features
        self.gate_up = linear(
            torch.cat([mlp.gate_proj.weight, mlp.up_proj.weight]),
            _cat_biases(mlp.gate_proj, mlp.up_proj),
            "gate_proj",
        )
        self.down_proj = linear(mlp.down_proj.weight, mlp.down_proj.bias, "down_proj")
        self.act_fn = mlp.act_fn

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        gate, up = self.gate_up(x).split(self.intermediate, dim=-1)
        return self.down_proj(self.act_fn(gate) * up)


class FusedAttention(nn.Module):
    """Llama attention with q, k and v as one matmul; otherwise transformers' LlamaAttention
    forward (rotary embeddings, cache update, the configured attention function). `linear`
    makes the matmuls (packed float ones by default)."""

    def __init__(self, attention: nn.Module, linear: LinearFactory = packed_linear):
        super().__init__()
        self.config = attention.config
        self.layer_idx = attention.layer_idx
        self.head_dim = attention.head_dim
        self.num_key_value_groups = attention.num_key_value_groups
        self.scaling = attention.scaling
        self.attention_dropout = attention.attention_dropout
        self.is_causal = True
        q, k, v = attention.q_proj, attention.k_proj, attention.v_proj
        self.heads = q.out_features // self.head_dim
        self.kv_heads = k.out_features // self.head_dim
        self.qkv = linear(torch.cat([q.weight, k.weight, v.weight]), _cat_biases(q, k, v), "q_proj")
        self.o_proj = linear(attention.o_proj.weight, attention.o_proj.bias, "o_proj")
        code = sys.modules[type(attention).__module__]  # the model's own modeling code
        self._apply_rotary = code.apply_rotary_pos_emb
        self._eager = code.eager_attention_forward

    def project(self, x: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
        """q, k, v of `x` [batch, seq, hidden] as [batch, heads, seq, head_dim]."""
        qkv = self.qkv(x).view(*x.shape[:-1], -1, self.head_dim).transpose(1, 2)
        return qkv.split([self.heads, self.kv_heads, self.kv_heads], dim=1)

    def forward(
        self,
        hidden_states: torch.Tensor,
        position_embeddings: tuple[torch.Tensor, torch.Tensor],
        attention_mask: torch.Tensor | None = None,
        past_key_values: Any = None,
        **kwargs: Any,
    ) -> tuple[torch.Tensor, torch.Tensor | None]:
        from transformers.modeling_utils import ALL_ATTENTION_FUNCTIONS

        q, k, v = self.project(hidden_states)
        cos, sin = position_embeddings
        q, k = self._apply_rotary(q, k, cos, sin)
        if past_key_values is not None:
            k, v = past_key_values.update(k, v, self.layer_idx)
        if self.config._attn_implementation == "sdpa" and _boolean(attention_mask):
            # transformers' sdpa_attention_forward, less its copy of grouped kv heads: with a
            # mask, on the CPU, it repeats them to one per query head (3x the keys and values
            # of every layer for the embedded model, freshly allocated); enable_gqa reads
            # them as they are, with the same result.
            out = F.scaled_dot_product_attention(
                q,
                k,
                v,
                attn_mask=attention_mask,
                scale=self.scaling,
                enable_gqa=self.heads != self.kv_heads,
            ).transpose(1, 2)
            weights = None
        else:
            attend = ALL_ATTENTION_FUNCTIONS.get_interface(
                self.config._attn_implementation, self._eager
            )
            out, weights = attend(
                self, q, k, v, attention_mask, dropout=0.0, scaling=self.scaling, **kwargs
            )
        out = out.reshape(*hidden_states.shape[:-1], -1).contiguous()
        return self.o_proj(out), weights


def optimize_for_cpu(model: nn.Module) -> bool:
    """Swap in packed and fused modules, in place; True when it did. Loaded float models on
    the CPU only; the input embedding keeps its table (a tied output head gets its own packed
    copy)."""
    weight = model.get_input_embeddings().weight
    if weight.device.type != "cpu" or getattr(model, "is_quantized", False):
        return False
    dtype = weight.dtype
    if not packing_supported(dtype) or not _probe(dtype):
        return False
    with torch.no_grad():
        if getattr(model.config, "model_type", None) in FUSABLE_MODEL_TYPES:
            for layer in model.model.layers:
                layer.self_attn = FusedAttention(layer.self_attn)
                layer.mlp = FusedMLP(layer.mlp)
        for parent in list(model.modules()):
            for name, child in list(parent.named_children()):
                if type(child) is nn.Linear and child.weight.dtype == dtype:
                    setattr(parent, name, PackedLinear(child.weight, child.bias))
    return True


def fused_llama(model: nn.Module) -> bool:
    """Whether `optimize_for_cpu` fused this model's layers (tursi.engine.decode's fast path)."""
    layers = getattr(getattr(model, "model", None), "layers", None)
    return bool(layers) and isinstance(getattr(layers[0], "self_attn", None), FusedAttention)


def _boolean(mask: torch.Tensor | None) -> bool:
    return mask is not None and mask.dtype == torch.bool


def _cat_biases(*linears: nn.Linear) -> torch.Tensor | None:
    biases = [linear.bias for linear in linears]
    if all(bias is None for bias in biases):
        return None
    return torch.cat(
        [
            bias if bias is not None else linear.weight.new_zeros(linear.out_features)
            for bias, linear in zip(biases, linears, strict=False)
        ]
    )


def _probe(dtype: torch.dtype) -> bool:
    """Whether a packed matmul of small random input matches F.linear: a guard against a
    oneDNN build or CPU that accepts the call but computes something else."""
    try:
        generator = torch.Generator().manual_seed(0)
        weight = torch.randn(64, 32, generator=generator).to(dtype)
        x = torch.randn(_PROBE_ROWS, 32, generator=generator).to(dtype)
        got = PackedLinear(weight, None)(x).float()
        want = F.linear(x, weight).float()
    except RuntimeError as exc:
        log.info("packed CPU matmuls unavailable for %s: %s", dtype, exc)
        return False
    return bool(torch.allclose(got, want, rtol=2e-2, atol=2e-2))
