"""Compressed weights: matrix layout of dense kernels, the compressed-leaf protocol and its Orbax I/O,
int8/int4 weight-only quantization, the N:M sparse format.

Importing the package registers every compressed-leaf type (`box.BOX_TYPES`), so `checkpoint.load` can
rebuild any compressed checkpoint.
"""

from m141jax.compress import bits, box, io, layout, nm, quant

__all__ = ["bits", "box", "io", "layout", "nm", "quant"]
