"""Training on a device mesh, placed by the same logical-axis rules as inference (`m141jax.parallel`).

Parameters, optimizer moments, EMA and N:M masks take the logical names of the DiT parameters they
mirror (`parallel.state_shardings`): split along `embed` over fsdp (and sequence), along heads / MLP
channels over tensor; step counters and other small leaves are replicated. Batches are split along
their leading axis over data × fsdp.
"""

from __future__ import annotations

from jax.sharding import Mesh, NamedSharding
from jax.sharding import PartitionSpec as P

from m141jax import parallel
from m141jax.axes import BATCH_AXES
from m141jax.config import DiTConfig
from m141jax.models.dit import param_logical_axes

TRAINING_AXES = BATCH_AXES  # the mesh axes training splits today


def make_mesh(spec: str | None = None, devices=None) -> Mesh:
    """The four-axis mesh of `parallel.make_mesh` from 'data=2,fsdp=-1' (default: every device on fsdp);
    training uses its data and fsdp axes."""
    mesh = parallel.make_mesh(spec or "fsdp=-1", devices)
    unused = [a for a, n in mesh.shape.items() if a not in TRAINING_AXES and n > 1]
    if unused:
        raise ValueError(f"training meshes split over {' and '.join(TRAINING_AXES)} only; got "
                         f"{parallel.format_mesh(mesh)}")
    return mesh


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
