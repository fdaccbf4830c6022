"""Where training arrays live on a (data, fsdp) device mesh.

Parameters and optimizer states are fully sharded (ZeRO-3 style): each array is split along its largest
axis divisible by the fsdp size and replicated over `data`; arrays with no such axis (norm scales of odd
size) are replicated. Batches are split along their leading axis over data × fsdp.
"""

from __future__ import annotations

import jax
import numpy as np
from jax.sharding import Mesh, NamedSharding, PartitionSpec as P

AXES = ("data", "fsdp")


def make_mesh(spec: str | None = None, devices=None) -> Mesh:
    """A (data, fsdp) mesh from 'data=2,fsdp=4'; the default puts every device on fsdp."""
    devices = jax.devices() if devices is None else devices
    sizes = {"data": 1, "fsdp": len(devices)}
    if spec:
        sizes = {"data": 1, "fsdp": 1}
        for item in spec.split(","):
            name, _, value = item.partition("=")
            if name not in AXES or not value.isdigit():
                raise ValueError(f"mesh item {item!r} must be data=N or fsdp=N")
            sizes[name] = int(value)
    if sizes["data"] * sizes["fsdp"] != len(devices):
        raise ValueError(f"mesh {sizes} needs {sizes['data'] * sizes['fsdp']} devices, but {len(devices)} are "
                         f"available")
    return Mesh(np.asarray(devices).reshape(sizes["data"], sizes["fsdp"]), AXES)


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
