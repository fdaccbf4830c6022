"""The release's VAE tiling, rule for rule (release.md D.5b): spatial and temporal tiles, linear blends, cuts.

GroupNorm looks at a whole tile, so tiled and untiled results differ everywhere; parity with the
release needs exactly these tile slices, blend order and kept lengths:

- tiles start at every multiple of the stride below the size and are clipped at the border;
- spatial tiles are blended in raster order with the (already blended) tile above, then the tile to
  the left: b[k] = a[len_a − e + k]·(1 − k/e) + b[k]·(k/e), e = min(len_a, len_b, extent);
  each tile keeps [:keep, :keep], tiles are concatenated along W, rows along H;
- temporal tiles (tile + 1 frames or latents) drop their first output except in the first tile, are
  blended with the previous blended tile, and keep keep + 1 (first tile) or keep outputs;
- the temporal paths tile each temporal tile spatially when it is over the spatial threshold; the
  spatial paths never tile in time. Dispatch uses strict ">" and checks time first.

`fn` maps one input tile [B, F, H, W, C] to its output tile; the callers pass a jitted function,
so every tile of one shape reuses one compilation.
"""

from __future__ import annotations

import dataclasses
import functools
from typing import Callable

import jax
import jax.numpy as jnp
import numpy as np

from m141jax.config import VAEConfig

OVERLAP = 0.25  # the release's tile_overlap_factor


@dataclasses.dataclass(frozen=True)
class Rule:
    """One tiling direction: input tile length, input stride, blend extent and kept length (output units)."""

    tile: int
    stride: int
    extent: int
    keep: int


@dataclasses.dataclass(frozen=True)
class Rules:
    threshold_space: int  # tile spatially when H or W (input units) exceeds this
    threshold_time: int  # tile temporally when F (input units) exceeds this
    space: Rule
    time: Rule


def _rule(tile_in: int, tile_out: int, extra: int = 0) -> Rule:
    blend = int(tile_out * OVERLAP)
    return Rule(tile_in + extra, int(tile_in * (1 - OVERLAP)), blend, tile_out - blend)


def encode_rules(cfg: VAEConfig) -> Rules:
    """Spatial: 256 px tiles at 192 px, blend 8 latents, keep 24; temporal: 65 frames at 48, blend 4, keep 12."""
    lat, lat_t = _latent_tiles(cfg)
    return Rules(cfg.sample_size, cfg.sample_tsize, _rule(cfg.sample_size, lat), _rule(cfg.sample_tsize, lat_t, 1))


def decode_rules(cfg: VAEConfig) -> Rules:
    """Spatial: 32-latent tiles at 24, blend 64 px, keep 192; temporal: 17 latents at 12, blend 16, keep 48."""
    lat, lat_t = _latent_tiles(cfg)
    return Rules(lat, lat_t, _rule(lat, cfg.sample_size), _rule(lat_t, cfg.sample_tsize, 1))


def _latent_tiles(cfg: VAEConfig) -> tuple[int, int]:
    """The latent tile sizes: sample_size / spatial ratio (the release's sample_size / 2**(blocks − 1): its
    VAEs downsample space in every block but the last) and sample_tsize / time ratio."""
    return (cfg.sample_size // cfg.spatial_compression_ratio,
            cfg.sample_tsize // cfg.time_compression_ratio)


def starts(size: int, stride: int) -> list[int]:
    return list(range(0, size, stride))


@functools.partial(jax.jit, static_argnums=(2, 3))
def blend(a, b, axis: int, extent: int):
    """b with its first e slices along `axis` linearly blended from the last e slices of a."""
    e = min(a.shape[axis], b.shape[axis], extent)
    if e == 0:
        return b
    shape = [1] * b.ndim
    shape[axis] = e
    w = (np.arange(e) / e).reshape(shape)  # float64 weights, as the release's Python floats
    tail = jax.lax.slice_in_dim(a, a.shape[axis] - e, a.shape[axis], axis=axis).astype(jnp.float32)
    head = jax.lax.slice_in_dim(b, 0, e, axis=axis).astype(jnp.float32)
    mixed = (tail * (1 - w).astype(np.float32) + head * w.astype(np.float32)).astype(b.dtype)
    return jnp.concatenate([mixed, jax.lax.slice_in_dim(b, e, b.shape[axis], axis=axis)], axis=axis)


def spatial(x, fn: Callable, rule: Rule):
    """Tile H and W of x [B, F, H, W, C], map each tile by fn, blend in raster order, cut and join."""
    rows = [[fn(x[:, :, i:i + rule.tile, j:j + rule.tile]) for j in starts(x.shape[3], rule.stride)]
            for i in starts(x.shape[2], rule.stride)]
    joined = []
    for r, row in enumerate(rows):
        for c in range(len(row)):
            if r:
                row[c] = blend(rows[r - 1][c], row[c], 2, rule.extent)
            if c:
                row[c] = blend(row[c - 1], row[c], 3, rule.extent)
        joined.append(jnp.concatenate([t[:, :, :rule.keep, :rule.keep] for t in row], axis=3))
    return jnp.concatenate(joined, axis=2)


def temporal(x, fn: Callable, rule: Rule):
    """Tile F of x, map each tile by fn, drop the first output of later tiles, blend, cut and join."""
    outs = []
    for n, i in enumerate(starts(x.shape[1], rule.stride)):
        y = fn(x[:, i:i + rule.tile])
        outs.append(blend(outs[-1], y[:, 1:], 1, rule.extent) if n else y)
    return jnp.concatenate([outs[0][:, :rule.keep + 1]] + [y[:, :rule.keep] for y in outs[1:]], axis=1)


def _tiled(x, fn: Callable, rules: Rules):
    def space(t):
        if t.shape[2] > rules.threshold_space or t.shape[3] > rules.threshold_space:
            return spatial(t, fn, rules.space)
        return fn(t)

    return temporal(x, space, rules.time) if x.shape[1] > rules.threshold_time else space(x)


def encode(cfg: VAEConfig, fn: Callable, video):
    """Posterior moments of video [B, F, H, W, 3] with the release's tiling; fn encodes one tile."""
    return _tiled(video, fn, encode_rules(cfg))


def decode(cfg: VAEConfig, fn: Callable, latents):
    """Frames of latents [B, f, h, w, C] with the release's tiling; fn decodes one latent tile."""
    return _tiled(latents, fn, decode_rules(cfg))
