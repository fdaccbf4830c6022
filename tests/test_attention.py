"""The attention backends agree with each other and with the release's segment rule (release.md B.6)."""

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from m141jax.models import attention as A


def _qkv(b=2, l=45, h=3, d=8, seed=0):
    ks = jax.random.split(jax.random.PRNGKey(seed), 3)
    return [jax.random.normal(k, (b, l, h, d), jnp.float32) for k in ks]


def _reference(q, k, v, valid_len):
    """Dense float64 numpy attention with the release's two segments per sample."""
    q, k, v = (np.asarray(x, np.float64) for x in (q, k, v))
    out = np.zeros_like(q)
    for b in range(q.shape[0]):
        seg = (np.arange(q.shape[1]) >= valid_len[b]).astype(int)
        s = np.einsum("qhd,khd->hqk", q[b], k[b]) / np.sqrt(q.shape[-1])
        s = np.where(seg[None, :, None] == seg[None, None, :], s, -np.inf)
        p = np.exp(s - s.max(-1, keepdims=True))
        out[b] = np.einsum("hqk,khd->qhd", p / p.sum(-1, keepdims=True), v[b])
    return out


@pytest.mark.parametrize("impl,block", [("xla", 512), ("blockwise", 16), ("blockwise", 512)])
def test_segment_semantics(impl, block):
    q, k, v = _qkv()
    valid = np.array([45, 30])
    got = A.attention(q, k, v, valid_len=jnp.asarray(valid), impl=impl, block=block)
    np.testing.assert_allclose(np.asarray(got), _reference(q, k, v, valid), atol=2e-6)


def test_padding_never_reaches_valid_tokens():
    q, k, v = _qkv()
    valid = jnp.array([40, 25])
    base = A.attention(q, k, v, valid_len=valid, impl="blockwise", block=16)
    noise = jax.random.normal(jax.random.PRNGKey(9), k.shape)
    pad = (jnp.arange(45)[None, :, None, None] >= valid[:, None, None, None])
    moved = A.attention(q, jnp.where(pad, noise, k), jnp.where(pad, noise * 3, v), valid_len=valid,
                        impl="blockwise", block=16)
    for b, n in enumerate([40, 25]):
        np.testing.assert_array_equal(np.asarray(base[b, :n]), np.asarray(moved[b, :n]))


def test_key_padding_form_equals_on_valid_rows():
    """The cudnn backend's formulation (jax.nn.dot_product_attention with key lengths), run by XLA here."""
    q, k, v = _qkv()
    valid = np.array([45, 30])
    got = jax.nn.dot_product_attention(q, k, v, key_value_seq_lengths=jnp.asarray(valid), implementation="xla")
    want = _reference(q, k, v, valid)
    for b, n in enumerate(valid):
        np.testing.assert_allclose(np.asarray(got[b, :n]), want[b, :n], atol=2e-6)


def test_blockwise_gradients_match_xla():
    q, k, v = _qkv(l=37)
    valid = jnp.array([37, 21])
    w = jax.random.normal(jax.random.PRNGKey(3), q.shape)

    def loss(impl, block):
        return lambda q, k, v: jnp.sum(w * A.attention(q, k, v, valid_len=valid, impl=impl, block=block) ** 2)

    want = jax.grad(loss("xla", 512), argnums=(0, 1, 2))(q, k, v)
    got = jax.jit(jax.grad(loss("blockwise", 8), argnums=(0, 1, 2)))(q, k, v)
    for g, r in zip(got, want):
        np.testing.assert_allclose(np.asarray(g), np.asarray(r), atol=5e-5, rtol=1e-4)


def test_blockwise_memory_is_bounded():
    """The compiled blockwise forward+backward never holds an L×L score tensor."""
    l, h, d, block = 4096, 2, 16, 256
    q = jax.ShapeDtypeStruct((1, l, h, d), jnp.float32)
    valid = jnp.array([3000])
    f = jax.jit(jax.grad(lambda q, k, v: A.attention(q, k, v, valid_len=valid, impl="blockwise", block=block).sum(),
                         argnums=(0, 1, 2)))
    mem = f.lower(q, q, q).compile().memory_analysis()
    full_scores = l * l * h * 4
    assert mem.temp_size_in_bytes < full_scores / 4, (mem.temp_size_in_bytes, full_scores)


def test_dense_mask_and_errors():
    q, k, v = _qkv(l=6)
    mask = jnp.tril(jnp.ones((6, 6), bool))[None, None]
    out = A.attention(q, k, v, mask=mask)
    np.testing.assert_allclose(np.asarray(out[:, 0]), np.asarray(v[:, 0]), atol=1e-6)  # row 0 sees only key 0
    with pytest.raises(ValueError, match="unknown attention backend 'flash'"):
        A.attention(q, k, v, impl="flash")
    with pytest.raises(ValueError, match="needs the 'xla' backend"):
        A.attention(q, k, v, mask=mask, impl="blockwise")
