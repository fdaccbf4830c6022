"""One attention entry point with interchangeable backends, on one device's share of the tokens.

Inputs are [B, L, H, D]. Masking follows the release (release.md B.6): `valid_len[b]` tokens form a prefix
segment (image tokens + valid text tokens) and the remaining padding tokens form a second segment; a
token attends only within its own segment. A dense boolean `mask` [B, 1|H, Lq, Lk] is accepted too
(the token refiner's rule, B.4), on the XLA backend.

Backends:
- ``xla``: materialises the L×L scores; exact segment semantics. Fast for short sequences.
- ``blockwise``: `models/blockwise.py`, online softmax over key/value blocks with a recomputing
  backward pass, so memory is O(L·block) in both directions; exact segment semantics. This is what
  makes the 43k-token 544×960×81 case fit, and it is the fastest CPU path at moderate lengths.
- ``cudnn``: `jax.nn.dot_product_attention(implementation="cudnn")` on NVIDIA GPUs with a key-padding
  mask. Valid tokens get exactly the release's result; padding rows attend to the valid tokens instead
  of to each other, which the release's outputs never see.
- ``auto``: cudnn on a GPU with half-precision inputs, else blockwise for long sequences, else xla.

Attention over tokens split across devices (Ulysses, ring) lives in `models/sequence_parallel.py`,
which calls this entry point on each device's share; the DiT chooses between them.
"""

from __future__ import annotations

import math

import jax
import jax.numpy as jnp

from m141jax.models.blockwise import NEG, blockwise_attention, default_block

BACKENDS = ("auto", "xla", "blockwise", "cudnn")


def attention(q, k, v, *, valid_len=None, mask=None, impl: str = "auto", block: int | None = None):
    """Softmax attention with scale 1/sqrt(D). q [B, Lq, H, D], k/v [B, Lk, H, D] -> [B, Lq, H, D].

    block: the blockwise backend's block length (default `blockwise.default_block()`).
    """
    if impl not in BACKENDS:
        raise ValueError(f"unknown attention backend {impl!r}; accepted: {BACKENDS}")
    if mask is not None:
        if impl not in ("auto", "xla"):
            raise ValueError(f"a dense attention mask needs the 'xla' backend, not {impl!r}")
        return _xla(q, k, v, _segments(q, k, None), mask)
    if impl == "auto":
        impl = _auto(q, k)
    if impl == "cudnn":
        return jax.nn.dot_product_attention(q, k, v, key_value_seq_lengths=valid_len, implementation="cudnn")
    seg_q, seg_k = _segments(q, k, valid_len)
    if impl == "xla":
        return _xla(q, k, v, (seg_q, seg_k), None)
    return blockwise_attention(q, k, v, seg_q, seg_k, block or default_block())


def _auto(q, k) -> str:
    if jax.default_backend() == "gpu" and q.dtype in (jnp.bfloat16, jnp.float16):
        return "cudnn"
    # the score tensor of one batch item and head beyond ~1M entries: go blockwise
    return "blockwise" if q.shape[1] * k.shape[1] > 1 << 20 else "xla"


def _segments(q, k, valid_len):
    """Segment ids [B, L]: 0 for the valid prefix, 1 for padding (all 0 without valid_len)."""
    b = q.shape[0]
    if valid_len is None:
        return jnp.zeros((b, q.shape[1]), jnp.int32), jnp.zeros((b, k.shape[1]), jnp.int32)
    valid_len = jnp.asarray(valid_len, jnp.int32)[:, None]
    return ((jnp.arange(q.shape[1])[None] >= valid_len).astype(jnp.int32),
            (jnp.arange(k.shape[1])[None] >= valid_len).astype(jnp.int32))


def _xla(q, k, v, segments, mask):
    scale = 1.0 / math.sqrt(q.shape[-1])
    s = jnp.einsum("bqhd,bkhd->bhqk", q, k, preferred_element_type=jnp.float32) * scale
    seg_q, seg_k = segments
    allowed = seg_q[:, None, :, None] == seg_k[:, None, None, :]
    if mask is not None:
        allowed = allowed & mask
    s = jnp.where(allowed, s, NEG)
    p = jax.nn.softmax(s, axis=-1)
    return jnp.einsum("bhqk,bkhd->bqhd", p.astype(v.dtype), v, preferred_element_type=jnp.float32).astype(q.dtype)



def causal_padding_mask(attention_mask):
    """The mask of a causal text encoder with padding [B, 1, L, L]: query i sees keys j ≤ i that are not padding.

    attention_mask [B, L] (1 = token, 0 = padding), as transformers' LlamaModel / CLIPTextModel take it.
    Padding queries still see the valid keys before them, so no row is empty.
    """
    valid = jnp.asarray(attention_mask).astype(bool)
    n = valid.shape[1]
    causal = jnp.arange(n)[:, None] >= jnp.arange(n)[None, :]
    return causal[None, None] & valid[:, None, None, :]
