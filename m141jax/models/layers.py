"""The shared vocabulary of the DiT: named dense layers, norms, modulation, MLPs, timestep embedding.

Every parameter is created with logical axis names (`nn.with_logical_partitioning`), so one rule table
in `m141jax/parallel.py` decides how it is laid out on a mesh. Norms run in fp32 and cast back.
"""

from __future__ import annotations

import math
from typing import Callable, Sequence

import flax.linen as nn
import flax.struct
import jax
import jax.numpy as jnp
import numpy as np

Dtype = jnp.dtype


class DenseKernel(nn.LogicallyPartitioned):
    """Logical names of a DenseGeneral parameter, and for its kernel the number of contracted input axes
    (`inputs`, stored here so that compression never has to infer it from the names). DenseGeneral creates
    multi-axis kernels flat and then reshapes them, so the sharding constraint waits until the value has
    one dimension per name."""

    inputs: int = flax.struct.field(pytree_node=False, default=0)  # 0 for a bias

    def unbox(self, apply_constraint=True):
        return super().unbox(apply_constraint and jnp.ndim(self.value) == len(self.names))


def _logical(init, names, inputs: int = 0):
    return lambda *args, **kwargs: DenseKernel(init(*args, **kwargs), tuple(names), inputs=inputs)


def dense(features, names: Sequence[str | None], *, axis=-1, use_bias: bool = True, dtype=jnp.float32,
          param_dtype=jnp.float32, precision=None, name: str | None = None) -> nn.DenseGeneral:
    """A DenseGeneral whose kernel carries the logical axis names `names` (input axes, then output axes).

    The bias takes the names of the output axes. `precision` is the matmul precision (None: default).
    """
    n_out = 1 if isinstance(features, int) else len(features)
    return nn.DenseGeneral(
        features=features, axis=axis, use_bias=use_bias, dtype=dtype, param_dtype=param_dtype, precision=precision,
        name=name,
        kernel_init=_logical(nn.initializers.lecun_normal(), names, 1 if isinstance(axis, int) else len(axis)),
        bias_init=_logical(nn.initializers.zeros_init(), names[-n_out:]))


class LayerNorm(nn.Module):
    """LayerNorm over the last axis computed in fp32 (eps 1e-6), optionally affine; returns fp32."""

    affine: bool = False
    eps: float = 1e-6
    param_dtype: Dtype = jnp.float32

    @nn.compact
    def __call__(self, x):
        x = x.astype(jnp.float32)
        mean = x.mean(-1, keepdims=True)
        var = jnp.square(x - mean).mean(-1, keepdims=True)
        y = (x - mean) * jax.lax.rsqrt(var + self.eps)
        if self.affine:
            d = x.shape[-1]
            scale = self.param("scale", nn.with_logical_partitioning(nn.initializers.ones_init(), ("norm",)),
                               (d,), self.param_dtype)
            bias = self.param("bias", nn.with_logical_partitioning(nn.initializers.zeros_init(), ("norm",)),
                              (d,), self.param_dtype)
            y = y * scale.astype(jnp.float32) + bias.astype(jnp.float32)
        return y


class RMSNorm(nn.Module):
    """RMSNorm over the last axis: normalise in fp32, cast back, multiply by the weight.

    Defaults are the DiT's QK norm (eps 1e-6, over the head dim); Llama uses it on the hidden size.
    """

    eps: float = 1e-6
    param_dtype: Dtype = jnp.float32
    axis_name: str = "kv"

    @nn.compact
    def __call__(self, x):
        scale = self.param("scale", nn.with_logical_partitioning(nn.initializers.ones_init(), (self.axis_name,)),
                           (x.shape[-1],), self.param_dtype)
        xf = x.astype(jnp.float32)
        y = (xf * jax.lax.rsqrt(jnp.mean(jnp.square(xf), -1, keepdims=True) + self.eps)).astype(x.dtype)
        return y * scale.astype(x.dtype)


def modulate(x, shift, scale):
    """x·(1 + scale) + shift with per-sample shift/scale [B, D] broadcast over tokens."""
    return x * (1 + scale[:, None]) + shift[:, None]


def gelu_tanh(x):
    return jax.nn.gelu(x, approximate=True)


class MLP(nn.Module):
    """fc1 -> activation -> fc2 (the release's `Mlp`)."""

    hidden: int
    out: int
    act: Callable = gelu_tanh
    dtype: Dtype = jnp.float32
    param_dtype: Dtype = jnp.float32

    @nn.compact
    def __call__(self, x):
        kw = dict(dtype=self.dtype, param_dtype=self.param_dtype)
        h = self.act(dense(self.hidden, ("embed", "mlp"), name="fc1", **kw)(x))
        return dense(self.out, ("mlp", "embed"), name="fc2", **kw)(h)


def timestep_sinusoid(t, dim: int = 256, max_period: float = 10000.0):
    """The release's sinusoidal embedding of raw timesteps t [B] (0..1000): [cos | sin], fp32 [B, dim]."""
    # The frequency table is a host constant rounded as the release's float32 arithmetic rounds it (the
    # exponent in float32, then exp): at t = 1000 a one-ulp difference in a frequency moves the
    # embedding by ~1e-4, so it must not depend on the backend's exp.
    half = dim // 2
    exponent = np.float32(-math.log(max_period)) * np.arange(half, dtype=np.float32) / np.float32(half)
    freqs = np.exp(exponent.astype(np.float64)).astype(np.float32)
    args = t.astype(jnp.float32)[:, None] * freqs[None]
    return jnp.concatenate([jnp.cos(args), jnp.sin(args)], axis=-1)


class TimestepEmbedder(nn.Module):
    """Sinusoid (cos first, 256 dims) -> Linear -> SiLU -> Linear (`time_in`, `guidance_in`, refiner)."""

    hidden: int
    dtype: Dtype = jnp.float32
    param_dtype: Dtype = jnp.float32

    @nn.compact
    def __call__(self, t):
        kw = dict(dtype=self.dtype, param_dtype=self.param_dtype)
        h = timestep_sinusoid(t).astype(self.dtype)
        h = nn.silu(dense(self.hidden, (None, "embed"), name="mlp_0", **kw)(h))
        return dense(self.hidden, ("mlp", "embed"), name="mlp_2", **kw)(h)


class TextProjection(nn.Module):
    """Linear -> SiLU -> Linear for pooled vectors (`vector_in`, the refiner's `c_embedder`)."""

    hidden: int
    names: tuple[str, str] = ("in_layer", "out_layer")
    dtype: Dtype = jnp.float32
    param_dtype: Dtype = jnp.float32

    @nn.compact
    def __call__(self, x):
        kw = dict(dtype=self.dtype, param_dtype=self.param_dtype)
        h = nn.silu(dense(self.hidden, ("text_embed", "embed"), name=self.names[0], **kw)(x))
        return dense(self.hidden, ("mlp", "embed"), name=self.names[1], **kw)(h)


class Modulation(nn.Module):
    """SiLU(vec) -> Linear(D -> n·D), split into n per-sample vectors [B, D] in the release's chunk order."""

    n: int
    hidden: int
    dtype: Dtype = jnp.float32
    param_dtype: Dtype = jnp.float32

    @nn.compact
    def __call__(self, vec):
        out = dense((self.n, self.hidden), ("embed", None, "mlp"), dtype=self.dtype,
                    param_dtype=self.param_dtype, name="linear")(nn.silu(vec))
        return tuple(out[:, i] for i in range(self.n))
