"""Stacks of identical blocks: parameters on a leading 'layers' axis, run by a scan over the first n.

The encoders read intermediate layers (Llama's layer 30 of 32, CLIP-ViT's layer 23 of 24), so the
forward takes the number of blocks to run. It scans over layer indices and slices each block's
weights inside the loop, so running fewer blocks than stored never copies the stacked weights.

A block is a linen module called as `block(x, *args) -> (x, None)` (the `nn.scan` convention).
"""

from __future__ import annotations

import dataclasses

import flax.linen as nn
import jax
import jax.numpy as jnp


def _fields(block: nn.Module) -> dict:
    return {f.name: getattr(block, f.name) for f in dataclasses.fields(block) if f.name not in ("parent", "name")}


def init_stack(block: nn.Module, depth: int, rng, x, *args):
    """Boxed parameters of `depth` independently initialised copies of `block` ('layers' axis first)."""
    scanned = nn.scan(type(block), variable_axes={"params": 0}, split_rngs={"params": True},
                      in_axes=(nn.broadcast,) * len(args), length=depth,
                      metadata_params={nn.PARTITION_NAME: "layers"})
    return scanned(**_fields(block)).init(rng, x, *args)["params"]


def run_stack(block: nn.Module, params, x, *args, n: int | None = None):
    """x after the first `n` blocks (all when None) of the stacked `params`; args are shared by every block."""
    depth = jax.tree_util.tree_leaves(params)[0].shape[0]
    n = depth if n is None else n
    if not 0 <= n <= depth:
        raise ValueError(f"cannot run {n} blocks of a stack of {depth}")

    def step(h, i):
        layer = jax.tree_util.tree_map(lambda a: jax.lax.dynamic_index_in_dim(a, i, keepdims=False), params)
        return block.apply({"params": layer}, h, *args)[0], None

    return jax.lax.scan(step, x, jnp.arange(n))[0]
