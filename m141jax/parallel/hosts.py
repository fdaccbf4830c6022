"""Multi-host runs: start-up, global arrays from host data, gathering, barriers."""

from __future__ import annotations

import os
import uuid

import jax
import numpy as np
from jax.experimental import multihost_utils
from jax.sharding import NamedSharding


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


def put(x, sharding: NamedSharding) -> jax.Array:
    """A global array from a host array that every process holds in full."""
    x = np.asarray(x)
    return jax.make_array_from_callback(x.shape, sharding, lambda idx: x[idx])


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
