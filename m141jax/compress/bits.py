"""Low-bit codes (int4 values, N:M positions) packed into bytes along the input axis."""

from __future__ import annotations

import math

import jax.numpy as jnp


def code_bits(levels: int) -> int:
    """Bits per code for `levels` distinct codes, rounded up to 1, 2, 4 or 8 so codes never straddle bytes."""
    need = max(1, math.ceil(math.log2(levels)))
    if need > 8:
        raise ValueError(f"{levels} codes do not fit in a byte")
    return next(b for b in (1, 2, 4, 8) if b >= need)


def pack_bits(codes, bits: int):
    """Codes [..., K, N] (integers in [0, 2**bits)) packed along K into uint8 [..., K·bits/8, N]; the
    first code of each byte in its lowest bits."""
    per = 8 // bits
    k = codes.shape[-2]
    if k % per:
        raise ValueError(f"cannot pack {k} codes of {bits} bits into whole bytes")
    c = codes.astype(jnp.uint8).reshape(*codes.shape[:-2], k // per, per, codes.shape[-1])
    shifts = (jnp.arange(per, dtype=jnp.uint8) * bits)[:, None]
    return jnp.sum(c << shifts, axis=-2, dtype=jnp.uint8)


def unpack_bits(packed, bits: int):
    """The inverse of `pack_bits`: uint8 codes [..., K, N]."""
    per = 8 // bits
    shifts = (jnp.arange(per, dtype=jnp.uint8) * bits)[:, None]
    c = (packed[..., :, None, :] >> shifts) & jnp.uint8((1 << bits) - 1)
    return c.reshape(*packed.shape[:-2], packed.shape[-2] * per, packed.shape[-1])
