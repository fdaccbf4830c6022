"""The DiT on a mesh: parameter shardings, the sequence-parallel method, the sharded forward."""

from __future__ import annotations

import dataclasses
import functools

from jax.sharding import Mesh

from m141jax.axes import SEQUENCE, TENSOR
from m141jax.models.conditioning import Conditioning
from m141jax.models.dit import abstract_params, dit_forward, param_logical_axes
from m141jax.parallel.jit import MeshFunction, jit_sharded
from m141jax.parallel.rules import DEFAULT, Strategy, batch_sharding, tree_shardings


@functools.lru_cache(maxsize=8)
def _dit_layout(cfg):
    return param_logical_axes(cfg), abstract_params(cfg)


def dit_param_shardings(cfg, mesh: Mesh, abstract=None, strategy: Strategy = DEFAULT):
    """Shardings of the DiT parameters (shapes from `abstract`, default the config's)."""
    names, shapes = _dit_layout(cfg)
    return tree_shardings(names, shapes if abstract is None else abstract, mesh, strategy)


def sequence_parallel_method(cfg, mesh: Mesh, requested: str) -> str:
    """'auto': Ulysses when each tensor shard's heads split over the sequence axis, else ring."""
    if requested != "auto":
        return requested
    n, t = mesh.shape[SEQUENCE], mesh.shape[TENSOR]
    if n == 1:
        return "none"
    local_heads = cfg.num_heads // t if cfg.num_heads % t == 0 else cfg.num_heads
    return "ulysses" if local_heads % n == 0 else "ring"


def dit_on_mesh(cfg, mesh: Mesh, sequence_parallel: str = "auto"):
    """(config with the sequence-parallel method for `mesh`, parameter shardings) of a DiT."""
    cfg = dataclasses.replace(cfg, sequence_parallel=sequence_parallel_method(cfg, mesh, sequence_parallel))
    return cfg, dit_param_shardings(cfg, mesh)


def dit_forward_fn(cfg, mesh: Mesh, batch: int, param_shardings) -> MeshFunction:
    """`dit_forward(params, cfg, latents, timestep, cond, ref_latents, guidance)` jitted on `mesh`, called
    as fn(params, latents, timestep, cond, ref_latents, guidance); inputs and the velocity are split over
    the batch axes."""
    rows = lambda n: batch_sharding(mesh, n, batch)  # noqa: E731
    cond = Conditioning(rows(3), rows(2), rows(2))
    return jit_sharded(lambda p, *a: dit_forward(p, cfg, *a), mesh, (param_shardings, rows(5), rows(1), cond, rows(5),
                                                                     rows(1)), rows(5), batch=batch)
