"""Device meshes on the four axes of `m141jax.axes.MESH_AXES`, on one host or many.

On several hosts the hosts are grouped on the outermost axes (`data`, then `fsdp`), so the inner axes,
which communicate most, stay inside a host.
"""

from __future__ import annotations

import math
from typing import Any, Mapping, Sequence

import jax
from jax.experimental import mesh_utils
from jax.sharding import AxisType, Mesh

from m141jax.axes import MESH_AXES


def parse_mesh(spec: str | Mapping[str, int], n_devices: int) -> dict[str, int]:
    """Axis sizes from 'data=2,fsdp=-1,...': missing axes are 1, one -1 takes the remaining devices."""
    if isinstance(spec, str):
        items = {}
        for part in filter(None, (p.strip() for p in spec.split(","))):
            name, eq, value = part.partition("=")
            try:
                items[name.strip()] = int(value)
            except ValueError:
                raise ValueError(f"bad mesh entry {part!r}; expected AXIS=INT with AXIS in {MESH_AXES}") from None
            if not eq:
                raise ValueError(f"bad mesh entry {part!r}; expected AXIS=INT with AXIS in {MESH_AXES}")
        spec = items
    unknown = sorted(set(spec) - set(MESH_AXES))
    if unknown:
        raise ValueError(f"unknown mesh axes {unknown}; accepted: {MESH_AXES}")
    sizes = {a: int(spec.get(a, 1)) for a in MESH_AXES}
    if any(s == 0 or s < -1 for s in sizes.values()) or list(sizes.values()).count(-1) > 1:
        raise ValueError(f"mesh sizes {sizes} must be positive, with at most one -1 (fill)")
    known = math.prod(s for s in sizes.values() if s != -1)
    for a, s in sizes.items():
        if s == -1:
            if n_devices % known:
                raise ValueError(f"mesh {format_mesh(sizes)}: {n_devices} devices do not divide by {known}")
            sizes[a] = n_devices // known
    if math.prod(sizes.values()) != n_devices:
        raise ValueError(f"mesh {format_mesh(sizes)} needs {math.prod(sizes.values())} devices, "
                         f"but {n_devices} are available (use -1 on one axis to fill)")
    return sizes


def format_mesh(sizes: Mapping[str, int] | Mesh) -> str:
    """'data=1,fsdp=8,sequence=1,tensor=1' for a mesh or a dict of axis sizes."""
    sizes = dict(sizes.shape) if isinstance(sizes, Mesh) else sizes
    return ",".join(f"{a}={sizes[a]}" for a in MESH_AXES if a in sizes)


def host_split(sizes: Sequence[int], n_hosts: int) -> tuple[list[int], list[int]]:
    """(per-axis host counts, per-axis devices within a host): hosts fill the outermost axes first."""
    dcn, rest = [], n_hosts
    for s in sizes:
        g = math.gcd(rest, s)
        dcn.append(g)
        rest //= g
    if rest != 1:
        raise ValueError(f"mesh {list(sizes)} cannot be split over {n_hosts} hosts")
    return dcn, [s // d for s, d in zip(sizes, dcn)]


def make_mesh(spec: str | Mapping[str, int], devices: Sequence[Any] | None = None) -> Mesh:
    """A mesh with the four axes of MESH_AXES over `devices` (default: every device of every process)."""
    devices = list(jax.devices() if devices is None else devices)
    sizes = list(parse_mesh(spec, len(devices)).values())
    n_hosts = len({d.process_index for d in devices})
    if n_hosts > 1:
        dcn, ici = host_split(sizes, n_hosts)
        grid = mesh_utils.create_hybrid_device_mesh(ici, dcn, devices, process_is_granule=True,
                                                    allow_split_physical_axes=True)
    else:
        grid = mesh_utils.create_device_mesh(sizes, devices, allow_split_physical_axes=True)
    return Mesh(grid, MESH_AXES, axis_types=(AxisType.Auto,) * len(MESH_AXES))
