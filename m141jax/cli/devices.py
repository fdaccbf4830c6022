"""The device flags shared by commands that run on a mesh: --mesh, --sequence-parallel, multi-host."""

from __future__ import annotations

import argparse

import jax
from jax.sharding import Mesh

from m141jax import parallel


def add_mesh_args(parser: argparse.ArgumentParser) -> None:
    """--mesh, --sequence-parallel and the multi-host flags (shared by `parity` and `generate`)."""
    g = parser.add_argument_group("devices")
    g.add_argument("--mesh", help="device mesh, e.g. data=2,fsdp=-1 (axes data, fsdp, sequence, tensor; "
                                  "missing axes are 1, -1 fills); default: one device")
    g.add_argument("--sequence-parallel", choices=("auto", "none", "ulysses", "ring"), default="auto",
                   help="attention over the sequence axis (auto: ulysses when heads divide, else ring)")
    add_host_args(g)


def add_host_args(g) -> None:
    """--coordinator, --num-processes, --process-id (shared by every command that can run on many hosts)."""
    g.add_argument("--coordinator", help="host:port of process 0 for a multi-host run, or 'auto' "
                                         "(env JAX_COORDINATOR_ADDRESS)")
    g.add_argument("--num-processes", type=int, help="number of processes (env JAX_NUM_PROCESSES)")
    g.add_argument("--process-id", type=int, help="this process's index (env JAX_PROCESS_ID)")


def mesh_from_args(args: argparse.Namespace) -> Mesh | None:
    """Initialise multi-host JAX if asked, then the --mesh mesh (None: a single device)."""
    parallel.initialize_distributed(args.coordinator, args.num_processes, args.process_id)
    if args.mesh is None:
        if jax.process_count() > 1:
            raise ValueError(f"a {jax.process_count()}-process run needs --mesh (e.g. fsdp=-1)")
        return None
    return parallel.make_mesh(args.mesh)
