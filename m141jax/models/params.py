"""Real, shape-only and logical-axis views of a model's parameters, from one boxed initialiser.

A model module defines `boxed_params(cfg, rng)` (parameters wrapped in their logical axis names) and
gets its public `init_params, abstract_params, param_logical_axes, kernel_layouts = views(boxed_params)`.
"""

from __future__ import annotations

from typing import Callable

import flax.linen as nn
import jax

from m141jax.axes import LAYERS


def views(boxed: Callable):
    """(init_params(cfg, rng), abstract_params(cfg), param_logical_axes(cfg), kernel_layouts(cfg)) for
    `boxed(cfg, rng)`."""

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

    def kernel_layouts(cfg) -> dict[str, tuple[int, int]]:
        """{'/'-joined path: (stacked-layer axes, contracted input axes)} of every dense kernel, as the
        layers stored them when they were created (what quantization and N:M sparsity read)."""
        tree = jax.eval_shape(lambda: boxed(cfg, jax.random.PRNGKey(0)))
        out = {}
        for path, box in jax.tree_util.tree_flatten_with_path(tree, is_leaf=_is_box)[0]:
            if getattr(box, "inputs", 0):
                lead = 0
                while lead < len(box.names) and box.names[lead] == LAYERS:
                    lead += 1
                out["/".join(str(k.key) for k in path)] = (lead, box.inputs)
        return out

    return init_params, abstract_params, param_logical_axes, kernel_layouts


def _is_box(x) -> bool:
    return isinstance(x, nn.LogicallyPartitioned)
