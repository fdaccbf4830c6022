"""Real, shape-only and logical-axis views of a model's parameters, from one boxed initialiser.

Every model module defines `boxed_params(cfg, rng)` returning parameters wrapped in their logical
axis names; these helpers give the plain pytree, its shapes, and its PartitionSpecs.
"""

from __future__ import annotations

from typing import Callable

import flax.linen as nn
import jax


def unboxed(boxed: Callable, rng):
    """Randomly initialised parameters as a plain pytree."""
    return nn.unbox(boxed(rng))


def abstract(boxed: Callable):
    """Parameter shapes/dtypes (jax.ShapeDtypeStruct pytree) without allocating anything."""
    return jax.eval_shape(lambda: nn.unbox(boxed(jax.random.PRNGKey(0))))


def logical_axes(boxed: Callable):
    """The logical axis names of every parameter (a pytree of PartitionSpec)."""
    return nn.get_partition_spec(jax.eval_shape(lambda: boxed(jax.random.PRNGKey(0))))
