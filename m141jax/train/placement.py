"""Where training arrays live on a (data, fsdp) device mesh.

Parameters and optimizer states are fully sharded (ZeRO-3 style): each array is split along its largest
axis divisible by the fsdp size and replicated over `data`; arrays with no such axis (norm scales of odd
size) are replicated. Batches are split along their leading axis over data × fsdp.
"""

from __future__ import annotations

import jax
import numpy as np
from jax.sharding import Mesh, NamedSharding, PartitionSpec as P

from m141jax.sharding import format_mesh, parse_mesh

AXES = ("data", "fsdp")


def make_mesh(spec: str | None = None, devices=None) -> Mesh:
    """A (data, fsdp) mesh from 'data=2,fsdp=-1' (parsed as `m141jax.sharding` parses --mesh; the
    sequence and tensor axes are not used by training); the default puts every device on fsdp."""
    devices = jax.devices() if devices is None else devices
    sizes = parse_mesh(spec or "fsdp=-1", len(devices))
    unused = [a for a in sizes if a not in AXES and sizes[a] > 1]
    if unused:
        raise ValueError(f"training meshes have the axes data and fsdp only; got {format_mesh(sizes)}")
    return Mesh(np.asarray(devices).reshape(sizes["data"], sizes["fsdp"]), AXES)


def check_batch(batch_size: int, mesh: Mesh) -> None:
    """The global batch must split evenly over data × fsdp."""
    n = mesh.shape["data"] * mesh.shape["fsdp"]
    if batch_size % n:
        raise ValueError(f"data.batch_size {batch_size} does not split over the {n} devices of the mesh "
                         f"data={mesh.shape['data']},fsdp={mesh.shape['fsdp']}: use a multiple of {n}")


def fsdp_spec(shape: tuple[int, ...], n: int) -> P:
    """Shard the largest axis divisible by n (the first such on ties); replicate if none."""
    axes = [i for i in np.argsort([-d for d in shape], kind="stable") if shape[i] % n == 0 and shape[i] >= n]
    if n == 1 or not axes:
        return P()
    spec = [None] * len(shape)
    spec[int(axes[0])] = "fsdp"
    return P(*spec)


def state_shardings(tree, mesh: Mesh):
    """NamedShardings for a pytree of arrays / ShapeDtypeStructs (parameters, optimizer states)."""
    n = mesh.shape["fsdp"]
    return jax.tree.map(lambda a: NamedSharding(mesh, fsdp_spec(tuple(a.shape), n)), tree)


def batch_shardings(mesh: Mesh) -> dict[str, NamedSharding]:
    """{'batch': leading axis over data × fsdp, 'replicated': everywhere}."""
    return {"batch": NamedSharding(mesh, P(AXES)), "replicated": NamedSharding(mesh, P())}


def batch_tree_shardings(batch: dict, mesh: Mesh) -> dict:
    """Per-entry shardings of a batch dict: `null_*` (the unbatched empty prompt) replicated."""
    s = batch_shardings(mesh)
    return {k: s["replicated" if k.startswith("null_") else "batch"] for k in batch}
