"""The compressed-leaf protocol: a compressed kernel held in a parameter tree in place of the dense one.

A `Box` is a flax `AxisMetadata`, so when a layer reads the parameter, flax unboxes it: the dense kernel is
rebuilt there, inside the jitted forward, one layer at a time (inside `nn.scan` too). The models need no
change; `densify` rebuilds a whole tree at once. Every subclass registers itself by name in `BOX_TYPES`,
which is how `checkpoint.load` rebuilds boxes from a checkpoint (importing `m141jax.compress` registers
the int8/int4 and N:M formats).
"""

from __future__ import annotations

import math

import flax.struct
import jax
import numpy as np
from flax.core import meta

from m141jax.parallel import storage_sharding

BOX_TYPES: dict[str, type] = {}


def static():
    """A box field that is part of the format (not an array): kept out of the pytree's leaves."""
    return flax.struct.field(pytree_node=False)


class Box(flax.struct.PyTreeNode, meta.AxisMetadata):
    """A compressed dense kernel in a parameter tree. Subclasses define `unbox()` (the dense kernel, with the
    leading axes of their arrays) and `astype(dtype)` (the same box rebuilding a kernel of `dtype`).

    The arrays are pytree children (sliced by `nn.scan` and `models.stack` along the leading axes like
    any parameter); the format (shapes without leading axes, dtypes, N:M...) is static.
    """

    def __init_subclass__(cls, **kwargs):
        super().__init_subclass__(**kwargs)
        BOX_TYPES[cls.__name__] = cls

    def replace_boxed(self, val):
        raise TypeError(f"{type(self).__name__} parameters are read-only: densify the tree to train it")

    def add_axis(self, index, params):
        return self

    def remove_axis(self, index, params):
        return self


def is_box(x) -> bool:
    return isinstance(x, Box)


def densify_traced(tree):
    """The tree with every compressed kernel rebuilt as a dense array, inside a trace (jit, eval_shape)."""
    return jax.tree_util.tree_map(lambda x: x.unbox() if is_box(x) else x, tree, is_leaf=is_box)


def densify(tree):
    """The tree with every compressed kernel rebuilt as a dense array (in one jitted program per kernel)."""
    rebuild = jax.jit(lambda b: b.unbox())
    return jax.tree_util.tree_map(lambda x: rebuild(x) if is_box(x) else x, tree, is_leaf=is_box)


def split_boxes(tree, mesh):
    """The tree with the arrays of every compressed kernel split along their output channels over `mesh`
    (`parallel.storage_sharding`); other leaves unchanged."""
    def split(box):
        return jax.tree_util.tree_map(lambda a: jax.device_put(a, storage_sharding(a.shape, mesh)), box)

    return jax.tree_util.tree_map(lambda x: split(x) if is_box(x) else x, tree, is_leaf=is_box)


def nbytes(tree) -> int:
    """Bytes of every array in the tree (jax/numpy arrays or ShapeDtypeStructs), boxes included."""
    return sum(math.prod(x.shape) * np.dtype(x.dtype).itemsize for x in jax.tree_util.tree_leaves(tree))
