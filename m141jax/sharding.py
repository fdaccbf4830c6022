"""Device meshes, the one table of logical-axis rules, and shardings derived from logical names.

Mesh axes, outermost first: `data` (replicas: independent batch rows, CFG's cond/uncond pair),
`fsdp` (batch rows, with the parameters split along `embed`), `sequence` (the token axis; attention
runs as Ulysses or ring attention, models/sequence_parallel.py; parameters split along `embed` as
well, so a sequence-parallel mesh needs no separate FSDP axis to fit) and `tensor` (heads and MLP
channels, Megatron style). On several hosts the hosts are grouped on the outermost axes, so the
inner axes, which communicate most, stay inside a host.

Every parameter and block-boundary activation carries logical axis names; `RULES` maps them to mesh
axes. A mesh axis that does not divide an array dimension is left out for that array (it stays
replicated there), so the same table serves every model and every shape.
"""

from __future__ import annotations

import argparse
import contextlib
import dataclasses
import functools
import math
import os
import uuid
from typing import Any, Callable, Mapping, Sequence

import flax.linen as nn
import jax
import numpy as np
from jax.experimental import mesh_utils, multihost_utils
from jax.sharding import AxisType, Mesh, NamedSharding, PartitionSpec as P

MESH_AXES = ("data", "fsdp", "sequence", "tensor")
BATCH_AXES = ("data", "fsdp")

# logical name -> mesh axes; the first rule whose mesh axes are still free in an array wins (flax)
RULES: tuple[tuple[str, Any], ...] = (
    # activations (nn.with_logical_constraint at block boundaries)
    ("activation_batch", BATCH_AXES),
    ("activation_length", "sequence"),
    ("activation_embed", None),
    # parameters (nn.with_logical_partitioning at creation)
    ("layers", None),
    ("embed", ("fsdp", "sequence")),
    ("mlp", "tensor"),
    ("heads", "tensor"),
    ("kv", None),
    ("text_embed", None),
    ("norm", None),
)


# ----------------------------------------------------------------------------------------- meshes

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


# ------------------------------------------------------------------------------------- shardings

def fit_axes(axes, size: int, mesh) -> str | tuple[str, ...] | None:
    """The mesh axes (a name, a tuple or None) reduced to those present, of size > 1, whose product
    divides `size`."""
    keep, prod = [], 1
    for a in (axes,) if isinstance(axes, str) else (axes or ()):
        n = mesh.shape.get(a, 1)
        if n > 1 and size % (prod * n) == 0:
            keep.append(a)
            prod *= n
    return None if not keep else keep[0] if len(keep) == 1 else tuple(keep)


def logical_sharding(names: Sequence[str | None], shape: Sequence[int], mesh: Mesh,
                     rules=RULES) -> NamedSharding:
    """The sharding of one array whose dimensions carry logical `names`."""
    spec = nn.logical_to_mesh_axes(tuple(names), rules) if names else P()
    axes = list(spec) + [None] * (len(shape) - len(spec))
    return NamedSharding(mesh, P(*(fit_axes(a, n, mesh) for a, n in zip(axes, shape))))


def tree_shardings(logical_axes, abstract, mesh: Mesh, rules=RULES):
    """NamedShardings for a parameter tree from its logical names (a pytree of PartitionSpec, as
    `nn.get_partition_spec` gives) and its shapes: the DiT, the VAE or an encoder alike."""
    return jax.tree.map(lambda names, a: logical_sharding(tuple(names), a.shape, mesh, rules),
                        logical_axes, abstract, is_leaf=lambda x: isinstance(x, P))


def batch_axes(mesh: Mesh, batch: int):
    """The batch mesh axes (data, then fsdp) that split `batch` rows evenly."""
    return fit_axes(BATCH_AXES, batch, mesh)


def batch_sharding(mesh: Mesh, ndim: int, batch: int) -> NamedSharding:
    """Arrays [batch, ...] split over the batch axes, replicated over the rest."""
    return NamedSharding(mesh, P(batch_axes(mesh, batch), *([None] * (ndim - 1))))


def rules_for_batch(mesh: Mesh, batch: int, rules=RULES):
    """`rules` with `activation_batch` limited to the batch axes that divide `batch` (batch 1 on an
    fsdp mesh keeps whole activations instead of padding the batch to the axis size)."""
    return tuple((name, batch_axes(mesh, batch) if name == "activation_batch" else axes) for name, axes in rules)


@contextlib.contextmanager
def activate(mesh: Mesh, batch: int):
    """Run and trace inside `mesh` with the rule table for `batch` rows: what jitted model code reads
    while tracing (`nn.with_logical_constraint`, the sequence-parallel `shard_map`)."""
    with jax.set_mesh(mesh), nn.logical_axis_rules(rules_for_batch(mesh, batch)):
        yield


class MeshFunction:
    """A jitted function traced and run inside its mesh and rule table, which is what
    `nn.with_logical_constraint` and the sequence-parallel `shard_map` read while tracing."""

    def __init__(self, fn: Callable, mesh: Mesh, rules, **jit_kwargs):
        def traced(*args):
            with nn.logical_axis_rules(rules):
                return fn(*args)

        self.mesh = mesh
        self._jitted = jax.jit(traced, **jit_kwargs)

    def __call__(self, *args):
        with jax.set_mesh(self.mesh):
            return self._jitted(*args)

    def lower(self, *args):
        with jax.set_mesh(self.mesh):
            return self._jitted.lower(*args)


def jit_sharded(fn: Callable, mesh: Mesh, in_shardings, out_shardings, *, batch: int,
                donate_argnums=()) -> MeshFunction:
    """`jax.jit(fn)` with explicit in/out shardings on `mesh` and the rules for `batch` rows."""
    return MeshFunction(fn, mesh, rules_for_batch(mesh, batch), in_shardings=in_shardings,
                        out_shardings=out_shardings, donate_argnums=donate_argnums)


# ------------------------------------------------------------------------------------------ DiT

@functools.lru_cache(maxsize=8)
def _dit_layout(cfg):
    from m141jax.models.dit import abstract_params, param_logical_axes

    return param_logical_axes(cfg), abstract_params(cfg)


def dit_param_shardings(cfg, mesh: Mesh, abstract=None):
    """Shardings of the DiT parameters (shapes from `abstract`, default the config's)."""
    names, shapes = _dit_layout(cfg)
    return tree_shardings(names, shapes if abstract is None else abstract, mesh)


def dit_on_mesh(cfg, mesh: Mesh, sequence_parallel: str = "auto"):
    """(config with the sequence-parallel method for `mesh`, parameter shardings) of a DiT."""
    cfg = dataclasses.replace(cfg, sequence_parallel=sequence_parallel_method(cfg, mesh, sequence_parallel))
    return cfg, dit_param_shardings(cfg, mesh)


def dit_forward_fn(cfg, mesh: Mesh, batch: int, param_shardings) -> MeshFunction:
    """`dit_forward(params, cfg, latents, ref_latents, timestep, text_states, text_mask, text_states_2,
    guidance)` jitted on `mesh`; inputs and the velocity are split over the batch axes."""
    from m141jax.models.dit import dit_forward

    rows = [batch_sharding(mesh, n, batch) for n in (5, 5, 1, 3, 2, 2, 1)]
    return jit_sharded(lambda p, *a: dit_forward(p, cfg, *a), mesh, (param_shardings, *rows), rows[0],
                       batch=batch)


def sequence_parallel_method(cfg, mesh: Mesh, requested: str) -> str:
    """'auto': Ulysses when each tensor shard's heads split over the sequence axis, else ring."""
    if requested != "auto":
        return requested
    n, t = mesh.shape["sequence"], mesh.shape["tensor"]
    if n == 1:
        return "none"
    local_heads = cfg.num_heads // t if cfg.num_heads % t == 0 else cfg.num_heads
    return "ulysses" if local_heads % n == 0 else "ring"


# ------------------------------------------------------------------------------ global arrays

def put(x, sharding: NamedSharding) -> jax.Array:
    """A global array from a host array that every process holds in full."""
    x = np.asarray(x)
    return jax.make_array_from_callback(x.shape, sharding, lambda idx: x[idx])


def put_process_local(x, sharding: NamedSharding) -> jax.Array:
    """A global array from each process's own rows of the batch (per-host input sharding): process
    i passes the rows its devices hold, in order, and the global batch is their concatenation."""
    return jax.make_array_from_process_local_data(sharding, np.asarray(x))


def gather(x: jax.Array) -> np.ndarray:
    """The full value of a global array, on every process."""
    if x.is_fully_addressable:
        return np.asarray(x)
    return np.asarray(multihost_utils.process_allgather(x, tiled=True))


def sync(name: str) -> None:
    """A barrier across processes (no-op in a single-process run)."""
    if jax.process_count() > 1:
        multihost_utils.sync_global_devices(name)


def shared_token() -> str:
    """A random hex token, the same on every process."""
    token = np.frombuffer(uuid.uuid4().bytes[:8], np.int32)
    if jax.process_count() > 1:
        token = multihost_utils.broadcast_one_to_all(token)
    return bytes(np.asarray(token, np.int32)).hex()


# ---------------------------------------------------------------------------------- multi-host

def initialize_distributed(coordinator: str | None = None, num_processes: int | None = None,
                           process_id: int | None = None) -> bool:
    """`jax.distributed.initialize` from the arguments, else JAX_COORDINATOR_ADDRESS /
    JAX_NUM_PROCESSES / JAX_PROCESS_ID; 'auto' as coordinator lets JAX detect a TPU pod or a
    SLURM / Open MPI job. Nothing set: a single-process run (returns False). Must run before any
    other JAX call; CPU devices then talk over gloo."""
    env = os.environ
    coordinator = coordinator or env.get("JAX_COORDINATOR_ADDRESS")
    if num_processes is None and env.get("JAX_NUM_PROCESSES"):
        num_processes = int(env["JAX_NUM_PROCESSES"])
    if process_id is None and env.get("JAX_PROCESS_ID"):
        process_id = int(env["JAX_PROCESS_ID"])
    if coordinator is None and num_processes is None and process_id is None:
        return False
    if jax.distributed.is_initialized():
        return True
    jax.config.update("jax_cpu_collectives_implementation", "gloo")
    jax.distributed.initialize(None if coordinator == "auto" else coordinator, num_processes, process_id)
    return True


def add_mesh_args(parser: argparse.ArgumentParser) -> None:
    """--mesh, --sequence-parallel and the multi-host flags (shared by `parity` and `generate`)."""
    g = parser.add_argument_group("devices")
    g.add_argument("--mesh", help="device mesh, e.g. data=2,fsdp=-1 (axes data, fsdp, sequence, tensor; "
                                  "missing axes are 1, -1 fills); default: one device")
    g.add_argument("--sequence-parallel", choices=("auto", "none", "ulysses", "ring"), default="auto",
                   help="attention over the sequence axis (auto: ulysses when heads divide, else ring)")
    g.add_argument("--coordinator", help="host:port of process 0 for a multi-host run, or 'auto' "
                                         "(env JAX_COORDINATOR_ADDRESS)")
    g.add_argument("--num-processes", type=int, help="number of processes (env JAX_NUM_PROCESSES)")
    g.add_argument("--process-id", type=int, help="this process's index (env JAX_PROCESS_ID)")


def mesh_from_args(args: argparse.Namespace) -> Mesh | None:
    """Initialise multi-host JAX if asked, then the --mesh mesh (None: a single device)."""
    initialize_distributed(args.coordinator, args.num_processes, args.process_id)
    if args.mesh is None:
        if jax.process_count() > 1:
            raise ValueError(f"a {jax.process_count()}-process run needs --mesh (e.g. fsdp=-1)")
        return None
    return make_mesh(args.mesh)
