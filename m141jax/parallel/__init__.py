"""Meshes, the logical-axis rule table and sharding strategies, sharded jit, multi-host arrays.

One sharding regime for inference and training: every array is placed by the logical names of its
dimensions (`m141jax.axes`) through `rules.RULES`.
"""

from m141jax.parallel.dit import dit_forward_fn, dit_on_mesh, dit_param_shardings, sequence_parallel_method
from m141jax.parallel.hosts import gather, initialize_distributed, put, shared_token, sync
from m141jax.parallel.jit import MeshFunction, activate, jit_sharded
from m141jax.parallel.mesh import format_mesh, host_split, make_mesh, parse_mesh
from m141jax.parallel.rules import (
                                    DEFAULT,
                                    HOST,
                                    RULES,
                                    Strategy,
                                    batch_axes,
                                    batch_sharding,
                                    logical_sharding,
                                    path_str,
                                    rules_for_batch,
                                    state_shardings,
                                    storage_sharding,
                                    tree_shardings,
)

__all__ = ["DEFAULT", "HOST", "RULES", "MeshFunction", "Strategy", "activate", "batch_axes", "batch_sharding",
           "dit_forward_fn", "dit_on_mesh", "dit_param_shardings", "format_mesh", "gather", "host_split",
           "initialize_distributed", "jit_sharded", "logical_sharding", "make_mesh", "parse_mesh", "path_str",
           "put", "rules_for_batch", "sequence_parallel_method", "shared_token", "state_shardings",
           "storage_sharding", "sync", "tree_shardings"]
