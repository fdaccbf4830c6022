"""The one table of logical-axis rules, and the shardings it gives any array tree.

Every parameter and block-boundary activation carries logical axis names (`m141jax.axes`); `RULES` maps
each of them to mesh axes, or explicitly to None (replicated). A mesh axis that does not divide an array
dimension is left out for that array (it stays replicated there), so one table serves every model and
every shape, in inference and in training.

`Strategy` adds what a run chooses on top of the table: a minimum size below which arrays stay
replicated (small arrays are not worth a gather), per-path overrides of the logical names, and the
parts of a state kept in host memory. `state_shardings` places whole training states (parameters,
optimizer moments, EMA, masks) by the names of the parameters they mirror.
"""

from __future__ import annotations

import dataclasses
import math
import re
from typing import Any, Sequence

import flax.linen as nn
import jax
from jax.sharding import Mesh, NamedSharding
from jax.sharding import PartitionSpec as P

from m141jax import axes as ax
from m141jax.axes import BATCH_AXES, MESH_AXES, fit_axes

# logical name -> mesh axes; the first rule whose mesh axes are still free in an array wins (flax)
RULES: tuple[tuple[str, Any], ...] = (
    # activations
    (ax.ACTIVATION_BATCH, BATCH_AXES),
    (ax.ACTIVATION_LENGTH, ax.SEQUENCE),
    (ax.ACTIVATION_EMBED, None),
    # parameters
    (ax.LAYERS, None),
    (ax.EMBED, (ax.FSDP, ax.SEQUENCE)),
    (ax.MLP, ax.TENSOR),
    (ax.HEADS, ax.TENSOR),
    (ax.KV_HEADS, None),  # Llama's 8 key/value heads: replicated, the query heads carry the tensor split
    (ax.KV, None),
    (ax.TEXT_EMBED, None),
    (ax.VISION_EMBED, None),
    (ax.VOCAB, None),
    (ax.NORM, None),
    (ax.CONV_IN, None),  # the VAE (0.5 GB) stays whole on each device
    (ax.CONV_OUT, None),
)


@dataclasses.dataclass(frozen=True)
class Strategy:
    """How a run lays arrays out beyond the rule table.

    min_size: arrays with fewer elements stay replicated (0: every array follows the table).
    overrides: (regular expression, logical names) pairs; a parameter whose '/'-joined path matches
    takes those names instead of its own (the first match wins).
    host: top-level fields of a state (e.g. 'opt_state') whose arrays live in host memory (`HOST`), split
    as on the device.
    """

    rules: tuple = RULES
    min_size: int = 0
    overrides: tuple[tuple[str, tuple], ...] = ()
    host: tuple[str, ...] = ()

    def names(self, path: str, names: tuple) -> tuple:
        for pattern, override in self.overrides:
            if re.search(pattern, path):
                return tuple(override)
        return names


DEFAULT = Strategy()
HOST = "pinned_host"  # the host memory kind of the CPU, GPU and TPU backends (jax.memory.Space.Host)


def path_str(path) -> str:
    """'double_blocks/img_attn/qkv/kernel' for a pytree key path."""
    return "/".join(str(getattr(k, "key", getattr(k, "name", getattr(k, "idx", k)))) for k in path)


def logical_sharding(names: Sequence[str | None], shape: Sequence[int], mesh: Mesh,
                     strategy: Strategy = DEFAULT) -> NamedSharding:
    """The sharding of one array whose dimensions carry logical `names`."""
    if strategy.min_size and math.prod(shape) < strategy.min_size:
        return NamedSharding(mesh, P())
    spec = nn.logical_to_mesh_axes(tuple(names), strategy.rules) if names else P()
    axes = list(spec) + [None] * (len(shape) - len(spec))
    return NamedSharding(mesh, P(*(fit_axes(a, n, mesh) for a, n in zip(axes, shape))))


def _names_by_path(logical_axes) -> dict[str, tuple]:
    leaves = jax.tree_util.tree_flatten_with_path(logical_axes, is_leaf=lambda x: isinstance(x, P))[0]
    return {path_str(p): tuple(names) for p, names in leaves}


def tree_shardings(logical_axes, abstract, mesh: Mesh, strategy: Strategy = DEFAULT):
    """NamedShardings for a parameter tree from its logical names (a pytree of PartitionSpec, as
    `nn.get_partition_spec` gives) and its shapes: the DiT, the VAE or an encoder alike."""
    names = _names_by_path(logical_axes)
    return jax.tree_util.tree_map_with_path(
        lambda p, a: logical_sharding(strategy.names(k, names[k]) if (k := path_str(p)) in names else (),
                                      a.shape, mesh, strategy), abstract)


def state_shardings(state, logical_axes, mesh: Mesh, strategy: Strategy = DEFAULT):
    """NamedShardings for a training state (arrays or ShapeDtypeStructs) holding parameter trees: every
    leaf whose path ends with a parameter's path and has its rank (the parameters, EMA, AdamW moments,
    N:M masks, a second model's copy) takes that parameter's logical names; other leaves (step counters,
    scalars) are replicated. Leaves under a field of `strategy.host` get the host memory kind."""
    names = _names_by_path(logical_axes)

    def place(path, a):
        parts = path_str(path).split("/")
        kind = HOST if parts[0] in strategy.host else None
        for i in range(len(parts)):
            suffix = "/".join(parts[i:])
            if suffix in names and len(names[suffix]) == len(a.shape):
                sharding = logical_sharding(strategy.names(suffix, names[suffix]), a.shape, mesh, strategy)
                return sharding.with_memory_kind(kind) if kind else sharding
        return NamedSharding(mesh, P(), memory_kind=kind)

    return jax.tree_util.tree_map_with_path(place, state)


def storage_sharding(shape: Sequence[int], mesh: Mesh) -> NamedSharding:
    """An array split along its last axis over every mesh axis that divides it (the arrays of compressed
    kernels, [*lead, K or K/g, N]: their output channels N; the layer that reads one rebuilds its dense
    kernel and XLA moves it to where the matmul needs it)."""
    return NamedSharding(mesh, P(*([None] * (len(shape) - 1)), fit_axes(MESH_AXES, shape[-1], mesh)))


def batch_axes(mesh: Mesh, batch: int):
    """The batch mesh axes (data, then fsdp) that split `batch` rows evenly."""
    return fit_axes(BATCH_AXES, batch, mesh)


def batch_sharding(mesh: Mesh, ndim: int, batch: int) -> NamedSharding:
    """Arrays [batch, ...] split over the batch axes, replicated over the rest."""
    return NamedSharding(mesh, P(batch_axes(mesh, batch), *([None] * (ndim - 1))))


def rules_for_batch(mesh: Mesh, batch: int, rules=RULES):
    """`rules` with `activation_batch` limited to the batch axes that divide `batch` (batch 1 on an
    fsdp mesh keeps whole activations instead of padding the batch to the axis size)."""
    return tuple((name, batch_axes(mesh, batch) if name == ax.ACTIVATION_BATCH else axes) for name, axes in rules)
