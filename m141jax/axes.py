"""Axis names: the device mesh's axes, the batch axes, and the logical names models give their arrays.

Constants only (plus `fit_axes`, which reads a mesh's axis sizes): the bottom layer, imported by the
models (to name parameters and activations) and by `m141jax.parallel` (to map the names to mesh axes).
"""

from __future__ import annotations

# mesh axes, outermost first: replicas, fully sharded data parallel, tokens, heads / MLP channels
DATA, FSDP, SEQUENCE, TENSOR = "data", "fsdp", "sequence", "tensor"
MESH_AXES = (DATA, FSDP, SEQUENCE, TENSOR)
BATCH_AXES = (DATA, FSDP)  # the axes that split batch rows

# logical names of activations (`nn.with_logical_constraint` at block boundaries)
ACTIVATION_BATCH = "activation_batch"
ACTIVATION_LENGTH = "activation_length"
ACTIVATION_EMBED = "activation_embed"
ACTIVATIONS = (ACTIVATION_BATCH, ACTIVATION_LENGTH, ACTIVATION_EMBED)

# logical names of parameter axes (`nn.with_logical_partitioning` at creation)
LAYERS = "layers"  # the stacked-layer axis of scanned blocks (nn.scan, models/stack.py)
EMBED = "embed"  # the model width
MLP = "mlp"  # MLP hidden channels, and the output side of projections back to the width
HEADS = "heads"  # attention heads
KV_HEADS = "kv_heads"  # key/value heads of grouped-query attention (Llama)
KV = "kv"  # the head dimension
TEXT_EMBED = "text_embed"  # input width of the text projections
VISION_EMBED = "vision_embed"  # input width of the LLaVA projector (the vision tower's width)
VOCAB = "vocab"  # token-embedding rows
NORM = "norm"  # norm scales and biases
CONV_IN = "conv_in"  # input channels of the VAE's convolutions
CONV_OUT = "conv_out"  # output channels of the VAE's convolutions
PARAMETERS = (LAYERS, EMBED, MLP, HEADS, KV_HEADS, KV, TEXT_EMBED, VISION_EMBED, VOCAB, NORM, CONV_IN, CONV_OUT)
LOGICAL_NAMES = ACTIVATIONS + PARAMETERS


def fit_axes(axes, size: int, mesh) -> str | tuple[str, ...] | None:
    """The mesh axes (a name, a tuple or None) reduced to those present in `mesh`, of size > 1, whose
    product divides `size`: a name, a tuple of names, or None (replicated)."""
    keep, prod = [], 1
    for a in (axes,) if isinstance(axes, str) else (axes or ()):
        n = mesh.shape.get(a, 1)
        if n > 1 and size % (prod * n) == 0:
            keep.append(a)
            prod *= n
    return None if not keep else keep[0] if len(keep) == 1 else tuple(keep)
