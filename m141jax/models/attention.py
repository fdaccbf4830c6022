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
- ``splash``: `models/splash.py`, the Pallas TPU splash kernel (forward and backward) with the two
  segments as its `SegmentIds`; exact segment semantics, any length. Compiled for TPU; on any other
  platform it runs in the Pallas interpreter (slow, exact: tests), never silently another kernel.
  `block` is its block length (default per TPU generation, `splash.default_block`).
- ``cudnn``: `jax.nn.dot_product_attention(implementation="cudnn")` on NVIDIA GPUs (bf16/fp16), forward
  and backward (jax's cuDNN custom VJP), with query and key/value lengths both `valid_len`: valid tokens
  get exactly the release's result and gradient; padding query rows come out zero instead of attending
  among themselves, which the release's outputs never see (padding text tokens reach nothing valid).
- ``auto``: splash on a TPU; cudnn on a GPU with half-precision inputs; else blockwise for long
  sequences, else xla.

Attention over tokens split across devices (Ulysses, ring) lives in `models/sequence_parallel.py`,
which calls this entry point on each device's share; the DiT chooses between them.
"""

from __future__ import annotations

import math

import jax
import jax.numpy as jnp

from m141jax.models.blockwise import NEG, blockwise_attention, default_block
from m141jax.models.splash import splash_attention

BACKENDS = ("auto", "xla", "blockwise", "splash", "cudnn")


def attention(q, k, v, *, valid_len=None, mask=None, impl: str = "auto", block: int | None = None):
    """Softmax attention with scale 1/sqrt(D). q [B, Lq, H, D], k/v [B, Lk, H, D] -> [B, Lq, H, D].

    block: the blockwise or splash backend's block length (default `blockwise.default_block()`,
    `splash.default_block()`).
    """
    if impl not in BACKENDS:
        raise ValueError(f"unknown attention backend {impl!r}; accepted: {BACKENDS}")
    if mask is not None:
        if impl not in ("auto", "xla"):
            raise ValueError(f"a dense attention mask needs the 'xla' backend, not {impl!r}")
        return _xla(q, k, v, _segments(q, k, None), mask)
    impl = resolve(impl, q, k)
    if impl == "cudnn":
        return cudnn_attention(q, k, v, valid_len)
    seg_q, seg_k = _segments(q, k, valid_len)
    if impl == "xla":
        return _xla(q, k, v, (seg_q, seg_k), None)
    if impl == "splash":
        return splash_attention(q, k, v, seg_q, seg_k, block=block)
    return blockwise_attention(q, k, v, seg_q, seg_k, block or default_block())


def resolve(impl: str, q, k) -> str:
    """The backend `impl` names, with "auto" decided for this platform and these shapes."""
    if impl not in BACKENDS:
        raise ValueError(f"unknown attention backend {impl!r}; accepted: {BACKENDS}")
    return _auto(q, k) if impl == "auto" else impl


def cudnn_attention(q, k, v, valid_len, implementation: str = "cudnn"):
    """The cudnn backend: query and key/value lengths both `valid_len` (all tokens without it).

    Valid rows and every gradient they produce are the release's; padding query rows are zero.
    `implementation="xla"` runs the same call through XLA (how CPU tests check the formulation)."""
    lengths = None if valid_len is None else jnp.asarray(valid_len, jnp.int32)
    return jax.nn.dot_product_attention(q, k, v, query_seq_lengths=lengths, key_value_seq_lengths=lengths,
                                        implementation=implementation)


def _auto(q, k) -> str:
    if jax.default_backend() == "tpu":
        return "splash"
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
