"""T2V -> I2V initialisation: the public HunyuanVideo-T2V DiT turned into the 33-channel Magic141 I2V
architecture, with the same velocity at initialisation.

Two exact rewrites of the parameters (models/dit.py):

- the patch embedding `img_in` (kernel [(pt, ph, pw, c), D], c the input channels in the order
  noise ‖ reference ‖ mask of `assemble_input`) gains 16 reference + 1 mask channels whose rows are
  zero, so the reference latent and the mask do not reach the model until training moves them;
- the embedded-guidance branch `guidance_in` (a TimestepEmbedder of guidance × 1000) is evaluated once at
  the chosen scale and its output vector added to the bias of `time_in`'s last linear layer: the model sums
  time_in(t) + vector_in(pooled) + guidance_in(g) before anything nonlinear (the SiLU of each
  modulation), so time_in'(t) = time_in(t) + guidance_in(g) is the same sum; `guidance_in` is dropped.

The I2V model's velocity at initialisation is therefore the T2V model's at guidance g, for any reference
latent (tests/test_init_i2v.py checks it against diffusers' T2V forward).
"""

from __future__ import annotations

import dataclasses
from pathlib import Path

import jax
import jax.numpy as jnp
import numpy as np

from m141jax import checkpoint, parallel
from m141jax.config import DiTConfig, to_json_dict
from m141jax.convert.destination import check_destination
from m141jax.models.layers import TimestepEmbedder

DEFAULT_GUIDANCE = 6.0  # HunyuanVideo-T2V's default embedded guidance scale


def i2v_config(t2v: DiTConfig) -> DiTConfig:
    """The I2V architecture of a plain (T2V) DiT config: noise ‖ reference ‖ mask input, no guidance input."""
    if t2v.in_channels != t2v.out_channels:
        raise ValueError(f"the source DiT has in_channels={t2v.in_channels}; a T2V DiT takes its "
                         f"{t2v.out_channels} latent channels only (in_channels == out_channels)")
    return dataclasses.replace(t2v, in_channels=2 * t2v.out_channels + 1, guidance_embed=False)


def guidance_vector(params, cfg: DiTConfig, guidance: float) -> np.ndarray:
    """guidance_in's output [hidden] at the embedded scale `guidance` (its input is guidance × 1000), in fp32."""
    p = jax.tree_util.tree_map(lambda a: jnp.asarray(a, jnp.float32), params["guidance_in"])
    g = jnp.full((1,), guidance * 1000.0, jnp.float32)
    return np.asarray(TimestepEmbedder(cfg.hidden_size).apply({"params": p}, g))[0]


def t2v_to_i2v(params, cfg: DiTConfig, guidance: float = DEFAULT_GUIDANCE):
    """(I2V config, I2V parameters as numpy arrays in their stored dtypes) from a T2V DiT's parameters."""
    out_cfg = i2v_config(cfg)
    params = jax.tree_util.tree_map(np.asarray, params)
    new = dict(params)
    pt, ph, pw = cfg.patch_size
    k = params["img_in"]["kernel"]
    k5 = k.reshape(pt, ph, pw, cfg.in_channels, k.shape[-1])
    pad = np.zeros((pt, ph, pw, out_cfg.in_channels - cfg.in_channels, k.shape[-1]), k.dtype)
    new["img_in"] = {**params["img_in"], "kernel": np.concatenate([k5, pad], axis=3).reshape(-1, k.shape[-1])}
    if cfg.guidance_embed:
        if not np.isfinite(guidance):
            raise ValueError(f"guidance {guidance} must be a finite number")
        vec = guidance_vector(params, cfg, guidance)
        bias = params["time_in"]["mlp_2"]["bias"]
        folded = (bias.astype(np.float32) + vec).astype(bias.dtype)
        new["time_in"] = {**params["time_in"], "mlp_2": {**params["time_in"]["mlp_2"], "bias": folded}}
        del new["guidance_in"]
    return out_cfg, new


def init_i2v(src: str | Path, dst: str | Path, guidance: float = DEFAULT_GUIDANCE, overwrite: bool = False) -> Path:
    """Read the T2V DiT checkpoint `src` (checked, on the host CPU, dtype as stored), write its I2V form to
    `dst` atomically; returns dst. DST is checked before any weight is read."""
    dst = check_destination(dst, "dit", src, overwrite)
    if checkpoint.read_meta(src, "dit").get("compressed"):
        raise ValueError(f"{src} holds a compressed DiT; init-i2v takes a dense T2V checkpoint")
    _, stored = checkpoint.read_config(src, ("dit",))
    i2v_config(stored)  # one-line error before reading weights
    if not stored.guidance_embed:
        print(f"note: {src} has no guidance embedding; only the input channels are extended")
    cpu = parallel.make_mesh("fsdp=1", devices=[jax.devices("cpu")[0]])  # a 13B DiT fits no single accelerator
    _, cfg, params = checkpoint.load(src, ("dit",), None, mesh=cpu)
    cfg = dataclasses.replace(cfg, sequence_parallel=stored.sequence_parallel)
    out_cfg, params = t2v_to_i2v(params, cfg, guidance)
    return checkpoint.save(dst, "dit", to_json_dict(out_cfg), params, overwrite=overwrite)
