"""One decode step of the running batch: new tokens for every row, each row at its own position.

`decode_logits` runs one token per row and advances the cache. `step_logits` runs `width`
tokens per row (a verify pass of speculative decoding: the next token and the drafts after
it, each seeing its row's cache and the row's tokens before it) and leaves advancing to the
caller, which counts only the tokens it accepted (`BatchCache.advance`).

Both run the model's own forward with the BatchCache as its cache, which works for every
architecture. For Llama models that `cpu_kernels.optimize_for_cpu` fused, with SDPA
attention, they run `_fused_llama_step` instead: the same computation as transformers' Llama
code, written for a few tokens per row, without the per-call plumbing (module hooks, argument
handling, mask building, output objects). Its decoder layers run
- in C++ (`decode_layers` of tursi.engine.native) when the native kernels were built and the
  model fits them (`native_plan`): the same ops with no Python between them, the residual add
  and RMSNorm fused into one call, the rotary embedding and the cache write into another;
- else in torch ops (`_torch_layers`, with `TorchOps` for those two fused steps).
Quantized Llama loads (tursi.engine.quantize) are fused too: their linears run the native
integer kernels in the C++ step, or their torch reference in the torch-ops step.
On a 2-core CPU the Python between the ops and the small ops are about a sixth of a 16-row
step of the embedded model (docs/performance.md).
"""

from __future__ import annotations

import logging
import weakref
from dataclasses import dataclass
from typing import Any

import torch
import torch.nn.functional as F

from . import native
from .cpu_kernels import fused_llama
from .kvcache import BatchCache, additive_mask

log = logging.getLogger(__name__)


def decode_logits(model: Any, ids: torch.Tensor, cache: BatchCache) -> torch.Tensor:
    """Logits [rows, vocab] for `ids` [rows, 1], one token per row of `cache`; advances it."""
    logits = step_logits(model, ids, cache)[:, 0]
    cache.advance()
    return logits


def step_logits(model: Any, ids: torch.Tensor, cache: BatchCache) -> torch.Tensor:
    """Logits [rows, width, vocab] for `ids` [rows, width]: row r's tokens at positions
    lengths[r] onwards, their keys and values written into the cache's next columns. Does not
    advance the cache: the caller advances each row by the tokens it keeps."""
    positions, mask = cache.prepare_step(ids.device, ids.shape[1])
    if cache.boolean_mask and fused_llama(model) and model.config._attn_implementation == "sdpa":
        return _fused_llama_step(model, ids, positions, mask, cache)
    return model(
        input_ids=ids,
        position_ids=positions,
        attention_mask=mask,
        past_key_values=cache,
        use_cache=True,
    ).logits


class TorchOps:
    """The step's fused operations as the torch ops transformers' Llama code runs."""

    @staticmethod
    def add_rms_norm(
        hidden: torch.Tensor, delta: torch.Tensor | None, norm: Any
    ) -> tuple[torch.Tensor, torch.Tensor]:
        """(hidden + delta, LlamaRMSNorm of that): normalized in float32, back to the
        dtype, then times the weight. Without delta, hidden itself."""
        if delta is not None:
            hidden = hidden + delta
        normalized = F.rms_norm(hidden.float(), hidden.shape[-1:], eps=norm.variance_epsilon)
        return hidden, norm.weight * normalized.to(hidden.dtype)

    @staticmethod
    def rope_store(
        cache: BatchCache,
        layer: Any,
        qkv: torch.Tensor,
        cos: torch.Tensor,
        sin: torch.Tensor,
        heads: int,
        kv_heads: int,
    ) -> torch.Tensor:
        """q [rows, heads, width, head_dim] of `qkv` [rows, width, features], rotated; k
        (rotated) and v go into the cache at each row's columns, which the cache's
        prepare_step set (cos, sin: [rows, width, head_dim])."""
        rows, width, _ = qkv.shape
        head_dim = cos.shape[-1]
        qkv = qkv.view(rows, width, -1, head_dim).transpose(1, 2)
        qk = _rotate(qkv[:, : heads + kv_heads], cos[:, None], sin[:, None])
        cache.write(layer, qk[:, heads:], qkv[:, heads + kv_heads :])
        return qk[:, :heads]


@dataclass(frozen=True)
class NativePlan:
    """A fused Llama's weights in the order the native `decode_layers` takes them: per
    layer, the input norm's weight, the packed qkv and o, the post-attention norm's weight,
    the packed gate_up and down, then the final norm's weight; the biases of qkv, o, gate_up
    and down per layer; for a quantized model, the rest of each of those linears (scale,
    correction, groups, input scale), else nothing."""

    weights: list[torch.Tensor]
    biases: list[torch.Tensor | None]
    quantized: list[list[torch.Tensor]]
    heads: int
    kv_heads: int
    intermediate: int
    scaling: float
    eps: float


_PLANS: weakref.WeakKeyDictionary[Any, NativePlan | None] = weakref.WeakKeyDictionary()


def native_plan(model: Any) -> NativePlan | None:
    """The model's NativePlan when the native kernels are built and can run it: SiLU MLPs,
    the same heads and norm epsilon in every layer, norm weights in the activations' dtype
    (the kernels take one dtype). Built once per model."""
    if native.load() is None:
        return None
    if model not in _PLANS:
        _PLANS[model] = _make_plan(model)
    return _PLANS[model]


def _make_plan(model: Any) -> NativePlan | None:
    inner = model.model
    layers = list(inner.layers)
    norms = [inner.norm] + [
        n for layer in layers for n in (layer.input_layernorm, layer.post_attention_layernorm)
    ]
    # The activations' dtype: a quantized embedding's output, else its table's.
    dtype = getattr(inner.embed_tokens, "output_dtype", inner.embed_tokens.weight.dtype)
    linears = [
        linear
        for layer in layers
        for linear in (
            layer.self_attn.qkv,
            layer.self_attn.o_proj,
            layer.mlp.gate_up,
            layer.mlp.down_proj,
        )
    ]
    quantized = [hasattr(linear, "native_arguments") for linear in linears]
    shape = {
        (
            layer.self_attn.heads,
            layer.self_attn.kv_heads,
            layer.self_attn.head_dim,
            layer.self_attn.scaling,
            layer.mlp.intermediate,
        )
        for layer in layers
    }
    if (
        getattr(model.config, "hidden_act", None) != "silu"
        or len(shape) != 1
        or len({norm.variance_epsilon for norm in norms}) != 1
        or any(norm.weight.dtype != dtype for norm in norms)
        or len(set(quantized)) != 1
    ):
        log.info(
            "decode steps in torch ops: the native layers need SiLU MLPs, the same "
            "heads and norm epsilon in every layer, norm weights in %s, all linears "
            "quantized or none",
            dtype,
        )
        return None
    weights: list[torch.Tensor] = []
    for layer in layers:
        attention, mlp = layer.self_attn, layer.mlp
        weights += [
            layer.input_layernorm.weight,
            attention.qkv.packed,
            attention.o_proj.packed,
            layer.post_attention_layernorm.weight,
            mlp.gate_up.packed,
            mlp.down_proj.packed,
        ]
    biases = [linear.bias for linear in linears]
    extra = [linear.native_arguments()[1:] for linear in linears] if quantized[0] else []
    heads, kv_heads, _, scaling, intermediate = shape.pop()
    log.info("decode steps in C++ (tursi.engine.native): %d layers", len(layers))
    return NativePlan(
        weights + [inner.norm.weight],
        biases,
        extra,
        heads,
        kv_heads,
        intermediate,
        scaling,
        inner.norm.variance_epsilon,
    )


def _fused_llama_step(
    model: Any, ids: torch.Tensor, positions: torch.Tensor, mask: torch.Tensor, cache: BatchCache
) -> torch.Tensor:
    """LlamaForCausalLM's forward for a few tokens per row, on fused layers (see module
    doc): logits [rows, width, vocab] of `ids` at `positions` [rows, width]."""
    inner = model.model
    hidden = inner.embed_tokens(ids)  # [n, width, hidden]
    cos, sin = inner.rotary_emb(hidden, positions)  # [n, width, head_dim]
    # The additive form of the mask, once per step (SDPA would convert a boolean one per layer).
    bias = additive_mask(mask, hidden.dtype)
    plan = native_plan(model)
    if plan is None:
        normed = _torch_layers(inner, hidden, cos, sin, bias, cache)
    else:
        normed = native.load().decode_layers(
            hidden,
            plan.weights,
            plan.biases,
            plan.quantized,
            [layer.keys for layer in cache.layers],
            [layer.values for layer in cache.layers],
            cos,
            sin,
            positions.view(-1),
            bias,
            cache.window,
            plan.heads,
            plan.kv_heads,
            plan.intermediate,
            plan.scaling,
            plan.eps,
        )
    return model.lm_head(normed)


def _torch_layers(
    inner: Any,
    hidden: torch.Tensor,
    cos: torch.Tensor,
    sin: torch.Tensor,
    bias: torch.Tensor,
    cache: BatchCache,
) -> torch.Tensor:
    """The decoder layers in torch ops; returns the final norm of the last hidden state."""
    ops, layers, (n, width, _) = TorchOps, inner.layers, hidden.shape
    hidden, normed = ops.add_rms_norm(hidden, None, layers[0].input_layernorm)
    for index, (layer, slots) in enumerate(zip(layers, cache.layers, strict=False)):
        attention = layer.self_attn
        heads = attention.heads
        q = ops.rope_store(cache, slots, attention.qkv(normed), cos, sin, heads, attention.kv_heads)
        keys, values = cache.visible(slots)
        out = F.scaled_dot_product_attention(
            q,
            keys,
            values,
            attn_mask=bias,
            scale=attention.scaling,
            enable_gqa=heads != attention.kv_heads,
        )
        hidden, normed = ops.add_rms_norm(
            hidden,
            attention.o_proj(out.transpose(1, 2).reshape(n, width, -1)),
            layer.post_attention_layernorm,
        )
        following = layers[index + 1].input_layernorm if index + 1 < len(layers) else inner.norm
        hidden, normed = ops.add_rms_norm(hidden, layer.mlp(normed), following)
    return normed


def _rotate(x: torch.Tensor, cos: torch.Tensor, sin: torch.Tensor) -> torch.Tensor:
    """Llama's rotary embedding (x * cos + rotate_half(x) * sin) of x [..., head_dim]."""
    half = x.shape[-1] // 2
    return x * cos + torch.cat((-x[..., half:], x[..., :half]), dim=-1) * sin
