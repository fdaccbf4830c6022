"""Training on a device mesh, placed by the same logical-axis rules as inference (`m141jax.parallel`).

The mesh has the four axes of `parallel.make_mesh` (data, fsdp, tensor, sequence). Parameters,
optimizer moments, EMA and N:M masks take the logical names of the DiT parameters they mirror
(`parallel.state_shardings`): split along `embed` over fsdp (and sequence), along heads / MLP channels
over tensor; step counters and arrays below `run.shard_min_size` elements are replicated. Optimizer
states with `state_memory: host` are split the same way in the backend's pinned host memory, where the
backend has one (`strategy`). Batches are split along their leading axis over data × fsdp; the step
functions are traced inside the mesh and the rule table (`parallel.jit_sharded`), so block activations
are split along their tokens over `sequence` and the DiT's attention runs Ulysses or ring over it
(`dit_config`), forward and backward.
"""

from __future__ import annotations

import dataclasses

from jax.sharding import Mesh, NamedSharding
from jax.sharding import PartitionSpec as P

from m141jax import parallel
from m141jax.axes import BATCH_AXES
from m141jax.config import DiTConfig
from m141jax.models.dit import param_logical_axes


def make_mesh(spec: str | None = None, devices=None) -> Mesh:
    """The four-axis mesh of `parallel.make_mesh` from 'data=2,fsdp=2,tensor=2,sequence=-1' (default: every
    device on fsdp)."""
    return parallel.make_mesh(spec or "fsdp=-1", devices)


def dit_config(model: DiTConfig, mesh: Mesh) -> DiTConfig:
    """The model config with its sequence-parallel method for `mesh` (as inference's `dit_on_mesh`): the
    configured one, or when it is 'none'/'auto', Ulysses where each tensor shard's heads split over the
    sequence axis, else ring ('none' on a mesh without a sequence split)."""
    requested = "auto" if model.sequence_parallel in ("none", "auto") else model.sequence_parallel
    return dataclasses.replace(model, sequence_parallel=parallel.sequence_parallel_method(model, mesh, requested))


def strategy(mesh: Mesh, min_size: int, host: tuple[str, ...] = ()) -> parallel.Strategy:
    """The run's placement strategy on `mesh`: the rule table, arrays below `min_size` elements replicated,
    the state fields named in `host` (optimizer states) in host memory — refused where the backend has none."""
    if host:
        device = mesh.devices.flat[0]
        kinds = sorted(m.kind for m in device.addressable_memories())
        if parallel.HOST not in kinds:
            raise ValueError(f"optimizer.state_memory host needs the {parallel.HOST!r} memory kind, which the "
                             f"{device.platform} backend lacks (it has {', '.join(kinds)}); use device")
    return parallel.Strategy(min_size=min_size, host=tuple(host))


def check_batch(batch_size: int, mesh: Mesh) -> None:
    """The global batch must split evenly over data × fsdp."""
    n = mesh.shape["data"] * mesh.shape["fsdp"]
    if batch_size % n:
        raise ValueError(f"data.batch_size {batch_size} does not split over the {n} devices of the mesh "
                         f"data={mesh.shape['data']},fsdp={mesh.shape['fsdp']}: use a multiple of {n}")


def state_shardings(state, model: DiTConfig, mesh: Mesh, strategy: parallel.Strategy = parallel.DEFAULT):
    """NamedShardings of a training state (arrays or ShapeDtypeStructs) holding DiT parameter trees."""
    return parallel.state_shardings(state, param_logical_axes(model), mesh, strategy)


def batch_shardings(mesh: Mesh) -> dict[str, NamedSharding]:
    """{'batch': leading axis over data × fsdp, 'replicated': everywhere}."""
    return {"batch": NamedSharding(mesh, P(BATCH_AXES)), "replicated": NamedSharding(mesh, P())}
