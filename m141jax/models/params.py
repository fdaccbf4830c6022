"""Real, shape-only and logical-axis views of a model's parameters, from one boxed initialiser.

A model module defines `boxed_params(cfg, rng)` (parameters wrapped in their logical axis names) and
gets its public `init_params, abstract_params, param_logical_axes = views(boxed_params)`.
"""

from __future__ import annotations

from typing import Callable

import flax.linen as nn
import jax


def views(boxed: Callable):
    """(init_params(cfg, rng), abstract_params(cfg), param_logical_axes(cfg)) for `boxed(cfg, rng)`."""

    def init_params(cfg, rng):
        """Randomly initialised parameters as a plain pytree, built in one jit (the dummy forward pass
        that init traces is compiled away instead of run op by op)."""
        return jax.jit(lambda r: nn.unbox(boxed(cfg, r)))(rng)

    def abstract_params(cfg):
        """Parameter shapes/dtypes (jax.ShapeDtypeStruct pytree) without allocating anything."""
        return jax.eval_shape(lambda: init_params(cfg, jax.random.PRNGKey(0)))

    def param_logical_axes(cfg):
        """The logical axis names of every parameter (a pytree of PartitionSpec)."""
        return nn.get_partition_spec(jax.eval_shape(lambda: boxed(cfg, jax.random.PRNGKey(0))))

    return init_params, abstract_params, param_logical_axes
