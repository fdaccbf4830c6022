"""Jitted functions traced and run inside a mesh and its rule table.

Model code reads the mesh and the rules while it is traced: `nn.with_logical_constraint` at block
boundaries and the sequence-parallel `shard_map` (models/sequence_parallel.py).
"""

from __future__ import annotations

import contextlib
from typing import Callable

import flax.linen as nn
import jax
from jax.sharding import Mesh

from m141jax.parallel.rules import rules_for_batch


@contextlib.contextmanager
def activate(mesh: Mesh, batch: int):
    """Run and trace inside `mesh` with the rule table for `batch` rows."""
    with jax.set_mesh(mesh), nn.logical_axis_rules(rules_for_batch(mesh, batch)):
        yield


class MeshFunction:
    """A jitted function traced and run inside its mesh and rule table."""

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
