"""One decode step of the running batch: one new token per row, each row at its own position.

`decode_logits` runs the model's own forward with the BatchCache as its cache, which works for
every architecture. For Llama models that `cpu_kernels.optimize_for_cpu` fused, with SDPA
attention, it runs `_fused_llama_step` instead: the same computation as transformers' Llama
code, written for one token per row, without the per-call plumbing (module hooks, argument
handling, mask building, output objects). Its elementwise work goes through two fused
operations, each one call per use: `add_rms_norm` (residual add, then RMSNorm) and
`rope_store` (rotary embedding of q and k, then k and v into the cache). The native C++
kernels (tursi.engine.native) do them when they were built, else `TorchOps` does, with the
same torch ops as transformers. On a 2-core CPU the plumbing and the small ops are about a
fifth of a ~50 ms step (docs/performance.md).
"""
from __future__ import annotations

from types import ModuleType
from typing import Any

import torch
import torch.nn.functional as F

from . import native
from .cpu_kernels import fused_llama
from .kvcache import BatchCache, additive_mask


def decode_logits(model: Any, ids: torch.Tensor, cache: BatchCache) -> torch.Tensor:
    """Logits [rows, vocab] for `ids` [rows, 1], one token per row of `cache`; advances it."""
    positions, mask = cache.prepare_step(ids.device)
    if (cache.boolean_mask and fused_llama(model)
            and model.config._attn_implementation == "sdpa"):
        logits = _fused_llama_step(model, ids, positions.view(-1), mask, cache)
    else:
        logits = model(input_ids=ids, position_ids=positions, attention_mask=mask,
                       past_key_values=cache, use_cache=True).logits[:, -1]
    cache.advance()
    return logits


class TorchOps:
    """The step's fused operations as the torch ops transformers' Llama code runs."""

    @staticmethod
    def add_rms_norm(hidden: torch.Tensor, delta: torch.Tensor | None,
                     norm: Any) -> tuple[torch.Tensor, torch.Tensor]:
        """(hidden + delta, LlamaRMSNorm of that): normalized in float32, back to the
        dtype, then times the weight. Without delta, hidden itself."""
        if delta is not None:
            hidden = hidden + delta
        normalized = F.rms_norm(hidden.float(), hidden.shape[-1:], eps=norm.variance_epsilon)
        return hidden, norm.weight * normalized.to(hidden.dtype)

    @staticmethod
    def rope_store(cache: BatchCache, layer: Any, qkv: torch.Tensor, cos: torch.Tensor,
                   sin: torch.Tensor, positions: torch.Tensor, heads: int,
                   kv_heads: int) -> torch.Tensor:
        """q [rows, heads, 1, head_dim] of `qkv` [rows, 1, width], rotated; k (rotated) and
        v go into the cache at each row's position (cos, sin: [rows, 1, head_dim])."""
        head_dim = cos.shape[-1]
        qkv = qkv.view(qkv.shape[0], -1, 1, head_dim)
        qk = _rotate(qkv[:, :heads + kv_heads], cos[:, None], sin[:, None])
        cache.write(layer, qk[:, heads:], qkv[:, heads + kv_heads:])
        return qk[:, :heads]


class NativeOps:
    """The same operations by the C++ kernels of tursi.engine.native."""

    def __init__(self, kernels: ModuleType):
        self.kernels = kernels

    def add_rms_norm(self, hidden: torch.Tensor, delta: torch.Tensor | None,
                     norm: Any) -> tuple[torch.Tensor, torch.Tensor]:
        return self.kernels.add_rms_norm(hidden, delta, norm.weight, norm.variance_epsilon)

    def rope_store(self, cache: BatchCache, layer: Any, qkv: torch.Tensor, cos: torch.Tensor,
                   sin: torch.Tensor, positions: torch.Tensor, heads: int,
                   kv_heads: int) -> torch.Tensor:
        return self.kernels.rope_store(qkv, cos, sin, positions, layer.keys, layer.values,
                                       heads, kv_heads)


def step_ops(model: Any) -> TorchOps | NativeOps:
    """The native kernels when they were built, else torch ops. The kernels take one dtype
    for all their tensors: the norms' weights must have the activations' dtype."""
    kernels = native.load()
    inner = model.model
    if kernels is None or inner.norm.weight.dtype != inner.embed_tokens.weight.dtype:
        return TorchOps()
    return NativeOps(kernels)


def _fused_llama_step(model: Any, ids: torch.Tensor, positions: torch.Tensor,
                      mask: torch.Tensor, cache: BatchCache) -> torch.Tensor:
    """LlamaForCausalLM's forward for one token per row, on fused layers (see module doc)."""
    ops = step_ops(model)
    inner = model.model
    layers = inner.layers
    n = ids.shape[0]
    hidden = inner.embed_tokens(ids)  # [n, 1, hidden]
    cos, sin = inner.rotary_emb(hidden, positions[:, None])  # [n, 1, head_dim]
    # The additive form of the mask, once per step (SDPA would convert a boolean one per layer).
    bias = additive_mask(mask, hidden.dtype)
    hidden, normed = ops.add_rms_norm(hidden, None, layers[0].input_layernorm)
    for index, (layer, slots) in enumerate(zip(layers, cache.layers)):
        attention, mlp = layer.self_attn, layer.mlp
        heads = attention.heads
        q = ops.rope_store(cache, slots, attention.qkv(normed), cos, sin, positions, heads,
                           attention.kv_heads)
        keys, values = cache.visible(slots)
        out = F.scaled_dot_product_attention(q, keys, values, attn_mask=bias,
                                             scale=attention.scaling,
                                             enable_gqa=heads != attention.kv_heads)
        hidden, normed = ops.add_rms_norm(
            hidden, attention.o_proj(out.transpose(1, 2).reshape(n, 1, -1)),
            layer.post_attention_layernorm)
        gate, up = mlp.gate_up(normed).split(mlp.intermediate, dim=-1)
        following = layers[index + 1].input_layernorm if index + 1 < len(layers) else inner.norm
        hidden, normed = ops.add_rms_norm(hidden, mlp.down_proj(mlp.act_fn(gate) * up),
                                          following)
    return model.lm_head(normed)[:, -1]


def _rotate(x: torch.Tensor, cos: torch.Tensor, sin: torch.Tensor) -> torch.Tensor:
    """Llama's rotary embedding (x * cos + rotate_half(x) * sin) of x [..., head_dim]."""
    half = x.shape[-1] // 2
    return x * cos + torch.cat((-x[..., half:], x[..., :half]), dim=-1) * sin
