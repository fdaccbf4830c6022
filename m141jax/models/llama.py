"""The Llama-3 decoder (release.md E.1, E.3): the prompt encoder and LLaVA's language model, one set of weights.

Grouped-query attention with rotate-half RoPE (θ 500000), RMSNorm, SwiGLU, a causal + padding mask.
The decoder layers are stacked on a 'layers' axis and scanned (`models/stack.py`), and the forward runs
any number of them, because the two users read different layers:

- the prompt encoder: transformers' `hidden_states[-3]`, the output of layer 30 of 32, no final norm;
- the LLaVA VLM: `hidden_states[-1]`, the last layer after the final RMSNorm.

Parameter tree: {"embed_tokens": {"embedding"}, "layers": {...stacked}, "norm": {"scale"}}.
"""

from __future__ import annotations

import flax.linen as nn
import jax
import jax.numpy as jnp

from m141jax.axes import ACTIVATIONS
from m141jax.config import LlamaConfig, dtype_of
from m141jax.models import params as P
from m141jax.models.attention import attention, causal_padding_mask
from m141jax.models.layers import RMSNorm, dense
from m141jax.models.stack import init_stack, run_stack


def _kw(cfg: LlamaConfig):
    return dict(dtype=dtype_of(cfg.dtype), param_dtype=dtype_of(cfg.param_dtype))


def _norm(cfg: LlamaConfig, name: str | None = None) -> RMSNorm:
    return RMSNorm(eps=cfg.rms_eps, param_dtype=dtype_of(cfg.param_dtype), axis_name="norm", name=name)


def rope_tables(length: int, head_dim: int, theta: float):
    """cos, sin [L, head_dim] in fp32 for positions 0..L−1: frequencies θ^(−2k/d), halves repeated."""
    inv_freq = 1.0 / theta ** (jnp.arange(0, head_dim, 2, dtype=jnp.float32) / head_dim)
    angle = jnp.arange(length, dtype=jnp.float32)[:, None] * inv_freq[None]
    angle = jnp.concatenate([angle, angle], axis=-1)
    return jnp.cos(angle), jnp.sin(angle)


def apply_rope(x, cos, sin):
    """Rotate x [B, L, H, D] the Llama way (first half against second half), in fp32; returns x's dtype."""
    xf = x.astype(jnp.float32)
    x1, x2 = jnp.split(xf, 2, axis=-1)
    rotated = jnp.concatenate([-x2, x1], axis=-1)
    return (xf * cos[None, :, None] + rotated * sin[None, :, None]).astype(x.dtype)


class LlamaBlock(nn.Module):
    """One decoder layer: x + attn(RMSNorm(x)), then x + SwiGLU(RMSNorm(x))."""

    cfg: LlamaConfig

    @nn.compact
    def __call__(self, x, cos, sin, mask):
        c, kw = self.cfg, _kw(self.cfg)
        h = _norm(c, "input_layernorm")(x)
        q = dense((c.num_heads, c.head_dim), ("embed", "heads", "kv"), use_bias=False, name="q_proj", **kw)(h)
        k, v = (dense((c.num_kv_heads, c.head_dim), ("embed", "kv_heads", "kv"), use_bias=False, name=f"{n}_proj",
                      **kw)(h) for n in "kv")
        q, k = apply_rope(q, cos, sin), apply_rope(k, cos, sin)
        group = c.num_heads // c.num_kv_heads  # query heads per key/value head, consecutive
        o = attention(q, jnp.repeat(k, group, axis=2), jnp.repeat(v, group, axis=2), mask=mask)
        x = x + dense(c.hidden_size, ("heads", "kv", "embed"), axis=(-2, -1), use_bias=False, name="o_proj",
                      **kw)(o).astype(x.dtype)
        h = _norm(c, "post_attention_layernorm")(x)
        gate, up = (dense(c.mlp_hidden, ("embed", "mlp"), use_bias=False, name=f"{n}_proj", **kw)(h)
                    for n in ("gate", "up"))
        x = x + dense(c.hidden_size, ("mlp", "embed"), use_bias=False, name="down_proj", **kw)(nn.silu(gate) * up
                                                                                                ).astype(x.dtype)
        return nn.with_logical_constraint(x, ACTIVATIONS), None


def embed_tokens(params, cfg: LlamaConfig, input_ids):
    """Token embeddings [B, L, D] in the activation dtype."""
    return jnp.take(params["embed_tokens"]["embedding"], input_ids, axis=0).astype(dtype_of(cfg.dtype))


def llama_forward(params, cfg: LlamaConfig, inputs_embeds, attention_mask, n_layers: int | None = None,
                  final_norm: bool = True):
    """Hidden states [B, L, D] in fp32 after the first `n_layers` decoder layers (all when None), then
    the final RMSNorm if `final_norm`. attention_mask [B, L]: 1 for tokens, 0 for padding; positions 0..L−1."""
    cos, sin = rope_tables(inputs_embeds.shape[1], cfg.head_dim, cfg.rope_theta)
    x = inputs_embeds.astype(dtype_of(cfg.dtype))
    x = run_stack(LlamaBlock(cfg), params["layers"], x, cos, sin, causal_padding_mask(attention_mask), n=n_layers)
    if final_norm:
        x = _norm(cfg).apply({"params": params["norm"]}, x)
    return x.astype(jnp.float32)


def hidden_states(params, cfg: LlamaConfig, input_ids, attention_mask, skip_layer: int = 2):
    """transformers' `LlamaModel(...).hidden_states[-(skip_layer + 1)]` [B, L, D] in fp32.

    skip_layer 0: the last layer after the final norm; K ≥ 1: the output of layer num_layers − K,
    without the final norm (the release's prompt encoder uses K = 2).
    """
    if not 0 <= skip_layer <= cfg.num_layers:
        raise ValueError(f"skip_layer {skip_layer} is out of range; accepted: 0..{cfg.num_layers}")
    return llama_forward(params, cfg, embed_tokens(params, cfg, input_ids), attention_mask,
                         n_layers=cfg.num_layers - skip_layer, final_norm=skip_layer == 0)


def boxed_params(cfg: LlamaConfig, rng):
    """Randomly initialised parameters wrapped in their logical axis names."""
    r_embed, r_layers, r_norm = jax.random.split(rng, 3)
    x = jnp.zeros((1, 1, cfg.hidden_size), dtype_of(cfg.dtype))
    embed = nn.Embed(cfg.vocab_size, cfg.hidden_size, param_dtype=dtype_of(cfg.param_dtype),
                     embedding_init=nn.with_logical_partitioning(nn.initializers.normal(0.02), ("vocab", "embed")))
    return {"embed_tokens": embed.init(r_embed, jnp.zeros((1, 1), jnp.int32))["params"],
            "layers": init_stack(LlamaBlock(cfg), cfg.num_layers, r_layers, x, *rope_tables(1, cfg.head_dim, 1.0),
                                 jnp.ones((1, 1, 1, 1), bool)),
            "norm": _norm(cfg).init(r_norm, x)["params"]}


init_params, abstract_params, param_logical_axes, kernel_layouts = P.views(boxed_params)
