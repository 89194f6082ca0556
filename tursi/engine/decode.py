"""One decode step of the running batch: one new token per row, each row at its own position.

`decode_logits` runs the model's own forward with the BatchCache as its cache, which works for
every architecture. For Llama models that `cpu_kernels.optimize_for_cpu` fused, with SDPA
attention, it runs `_fused_llama_step` instead: the same computation as transformers' Llama
code, written for one token per row, without the per-call plumbing (module hooks, argument
handling, mask building, output objects) and with q and k rotated together. On a 2-core CPU
that plumbing is several milliseconds of a ~50 ms step (docs/performance.md).
"""
from __future__ import annotations

from typing import Any

import torch
import torch.nn.functional as F

from .cpu_kernels import fused_llama
from .kvcache import BatchCache, additive_mask


def decode_logits(model: Any, ids: torch.Tensor, cache: BatchCache) -> torch.Tensor:
    """Logits [rows, vocab] for `ids` [rows, 1], one token per row of `cache`; advances it."""
    positions, mask = cache.prepare_step(ids.device)
    if (cache.boolean_mask and fused_llama(model)
            and model.config._attn_implementation == "sdpa"):
        logits = _fused_llama_step(model, ids, positions, mask, cache)
    else:
        logits = model(input_ids=ids, position_ids=positions, attention_mask=mask,
                       past_key_values=cache, use_cache=True).logits[:, -1]
    cache.advance()
    return logits


def _fused_llama_step(model: Any, ids: torch.Tensor, positions: torch.Tensor,
                      mask: torch.Tensor, cache: BatchCache) -> torch.Tensor:
    """LlamaForCausalLM's forward for one token per row, on fused layers (see module doc)."""
    inner = model.model
    n = ids.shape[0]
    hidden = inner.embed_tokens(ids)  # [n, 1, hidden]
    cos, sin = inner.rotary_emb(hidden, positions)  # [n, 1, head_dim]
    cos, sin = cos[:, None], sin[:, None]  # broadcast over heads
    # The additive form of the mask, once per step (SDPA would convert a boolean one per layer).
    bias = additive_mask(mask, hidden.dtype)
    for layer, slots in zip(inner.layers, cache.layers):
        attention, mlp = layer.self_attn, layer.mlp
        heads, kv_heads = attention.heads, attention.kv_heads
        qkv = attention.qkv(_rms_norm(layer.input_layernorm, hidden)).view(n, -1, 1,
                                                                          attention.head_dim)
        qk = _rotate(qkv[:, :heads + kv_heads], cos, sin)  # [n, heads + kv_heads, 1, head_dim]
        keys, values = cache.write(slots, qk[:, heads:], qkv[:, heads + kv_heads:])
        out = F.scaled_dot_product_attention(
            qk[:, :heads], keys, values, attn_mask=bias, scale=attention.scaling,
            enable_gqa=heads != kv_heads)
        hidden = hidden + attention.o_proj(out.transpose(1, 2).reshape(n, 1, -1))
        gate, up = mlp.gate_up(_rms_norm(layer.post_attention_layernorm, hidden)).split(
            mlp.intermediate, dim=-1)
        hidden = hidden + mlp.down_proj(mlp.act_fn(gate) * up)
    return model.lm_head(_rms_norm(inner.norm, hidden))[:, -1]


def _rms_norm(norm: Any, x: torch.Tensor) -> torch.Tensor:
    """LlamaRMSNorm: normalized in float32, back to x's dtype, then times the weight."""
    normalized = F.rms_norm(x.float(), x.shape[-1:], eps=norm.variance_epsilon)
    return norm.weight * normalized.to(x.dtype)


def _rotate(x: torch.Tensor, cos: torch.Tensor, sin: torch.Tensor) -> torch.Tensor:
    """Llama's rotary embedding (x * cos + rotate_half(x) * sin) of x [..., head_dim]."""
    half = x.shape[-1] // 2
    return x * cos + torch.cat((-x[..., half:], x[..., :half]), dim=-1) * sin
