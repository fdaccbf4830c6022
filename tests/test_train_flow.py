"""Flow-matching pieces against hand-computed cases; optimizer schedule; EMA; gradient routing."""

import dataclasses

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from train_helpers import pixel_params, pixel_velocity, tiny_train_config

from m141jax import sampling
from m141jax.models.conditioning import Conditioning
from m141jax.models.dit import abstract_params, init_params
from m141jax.train import flow
from m141jax.train.config import DataConfig, FlowConfig, OptimizerConfig
from m141jax.train.data import SyntheticSource
from m141jax.train.optim import ema_init, ema_update, lr_schedule, make_optimizer


def test_time_shift_is_the_inference_schedule_s():
    assert float(sampling.shift_sigma(0.5, 3.0)) == pytest.approx(1.5 / 2.0)
    np.testing.assert_allclose(sampling.shift_sigma(np.linspace(1, 0, 5), 5.0), sampling.schedule(4, 5.0), atol=1e-6)


def test_sigma_sampling_densities():
    key = jax.random.PRNGKey(0)
    z = jax.random.normal(key, (5,))
    got = flow.sample_sigmas(key, 5, FlowConfig(logit_mean=0.3, logit_std=2.0, shift=3.0))
    u = jax.nn.sigmoid(0.3 + 2.0 * z)
    np.testing.assert_allclose(got, 3 * u / (1 + 2 * u), rtol=1e-6)
    u = jax.random.uniform(key, (5,))
    np.testing.assert_allclose(flow.sample_sigmas(key, 5, FlowConfig(sigma_sampling="uniform")), u, rtol=1e-6)
    mode = 1 - u - 1.29 * (jnp.cos(jnp.pi * u / 2) ** 2 - 1 + u)
    np.testing.assert_allclose(flow.sample_sigmas(key, 5, FlowConfig(sigma_sampling="mode")), mode, rtol=1e-6)
    big = flow.sample_sigmas(key, 20000, FlowConfig())
    assert 0 < float(big.min()) and float(big.max()) < 1 and abs(float(jnp.median(big)) - 0.5) < 0.02


def test_loss_weights():
    s = jnp.array([0.5, 0.25])
    np.testing.assert_allclose(flow.loss_weight(s, "none"), [1, 1])
    np.testing.assert_allclose(flow.loss_weight(s, "sigma_sqrt"), [4, 16])
    np.testing.assert_allclose(flow.loss_weight(s, "cosmap"), [4 / np.pi, 2 / (np.pi * 0.625)], rtol=1e-6)


def test_flow_matching_loss_hand_case():
    # x0 = [1, 2], eps = [0, 1]: target eps - x0 = [-1, -1]; v = [0, -1] -> squared errors [1, 0]
    x0 = jnp.array([1.0, 2.0]).reshape(1, 2, 1, 1, 1)
    eps = jnp.array([0.0, 1.0]).reshape(1, 2, 1, 1, 1)
    v = jnp.array([0.0, -1.0]).reshape(1, 2, 1, 1, 1)
    s = jnp.array([0.5])
    assert float(flow.flow_matching_loss(v, x0, eps, s)) == pytest.approx(0.5)
    assert float(flow.flow_matching_loss(v, x0, eps, s, "sigma_sqrt")) == pytest.approx(2.0)
    assert float(flow.flow_matching_loss(v, x0, eps, s, skip_frames=1)) == pytest.approx(0.0)
    x = sampling.interpolate(x0, eps, s)
    np.testing.assert_allclose(x.ravel(), [0.5, 1.5])
    np.testing.assert_allclose(sampling.predict_x0(x, eps - x0, s), x0)  # the exact velocity recovers x0


def _cond(b=2, L=4, n_img=2):
    ts = jnp.arange(b * L * 3, dtype=jnp.float32).reshape(b, L, 3)
    return (Conditioning(ts, jnp.array([[1, 1, 1, 0], [1, 1, 1, 1]]), jnp.array([[1.0, 2.0], [3.0, 4.0]])),
            Conditioning(-jnp.ones((L - n_img, 3)), jnp.array([1, 0]), jnp.array([9.0, 9.0])))


def test_drop_text_keeps_image_tokens():
    cond, null = _cond()
    out = flow.drop_text(cond, jnp.array([False, True]), null, 2)
    assert isinstance(out, Conditioning)
    np.testing.assert_array_equal(out.text_states[0], cond.text_states[0])
    np.testing.assert_array_equal(out.text_states[1, :2], cond.text_states[1, :2])  # image tokens kept
    np.testing.assert_array_equal(out.text_states[1, 2:], -np.ones((2, 3)))
    np.testing.assert_array_equal(out.text_mask, [[1, 1, 1, 0], [1, 1, 1, 0]])
    np.testing.assert_array_equal(out.text_states_2, [[1, 2], [9, 9]])
    with pytest.raises(ValueError, match="empty-prompt states"):
        flow.drop_text(cond, jnp.array([False, True]), null, 1)


def test_cfg_dropout_feeds_the_empty_prompt():
    """With dropout 1 the loss is the loss on the empty-prompt conditioning; with 0 it is not."""
    cfg = tiny_train_config()
    vel = pixel_velocity()
    params = pixel_params(cfg.model, jax.random.PRNGKey(0), text_len=4)
    cond, null = _cond()
    cond = cond.replace(text_states=jnp.pad(cond.text_states, ((0, 0), (0, 0), (0, cfg.model.text_dim - 3))),
                        text_states_2=jnp.pad(cond.text_states_2, ((0, 0), (0, cfg.model.pooled_dim - 2))))
    null = null.replace(text_states=jnp.pad(null.text_states, ((0, 0), (0, cfg.model.text_dim - 3))),
                        text_states_2=jnp.pad(null.text_states_2, (0, cfg.model.pooled_dim - 2)))
    extra = {"ref_latents": jnp.ones((2, 1, 2, 2, 16))}
    x0 = jax.random.normal(jax.random.PRNGKey(1), (2, 2, 2, 2, 16))
    key = jax.random.PRNGKey(2)
    dropped = flow.drop_text(cond, jnp.array([True, True]), null, 2)
    always = flow.flow_loss(vel, params, FlowConfig(cfg_dropout=1.0, n_image_tokens=2), x0, cond, extra, null, key)[0]
    by_hand = flow.flow_loss(vel, params, FlowConfig(cfg_dropout=0.0), x0, dropped, extra, null, key)[0]
    never = flow.flow_loss(vel, params, FlowConfig(cfg_dropout=0.0), x0, cond, extra, null, key)[0]
    assert float(always) == pytest.approx(float(by_hand), rel=1e-6)
    assert abs(float(always) - float(never)) > 1e-4


def test_lr_schedule_warmup_and_decay():
    cos = lr_schedule(OptimizerConfig(learning_rate=1.0, warmup_steps=10, decay="cosine", final_lr_ratio=0.1), 110)
    assert float(cos(0)) == 0.0 and float(cos(5)) == pytest.approx(0.5) and float(cos(10)) == pytest.approx(1.0)
    assert float(cos(60)) == pytest.approx(0.1 + 0.9 * 0.5) and float(cos(110)) == pytest.approx(0.1)
    lin = lr_schedule(OptimizerConfig(learning_rate=2.0, decay="linear"), 100)
    assert float(lin(50)) == pytest.approx(1.0)


def test_adamw_clips_the_global_norm():
    # with b1 = b2 = 0 and a huge eps, AdamW's update is -lr·g/eps: linear in the (clipped) gradient
    opt = dict(learning_rate=1e6, weight_decay=0.0, b1=0.0, b2=0.0, eps=1e6)
    params = {"w": jnp.zeros(3)}
    g = {"w": jnp.array([30.0, 40.0, 0.0])}
    for clip, want in ((1.0, [-0.6, -0.8, 0.0]), (0.0, [-30.0, -40.0, 0.0])):
        tx, _ = make_optimizer(OptimizerConfig(clip_norm=clip, **opt), 10)
        updates, _ = tx.update(g, tx.init(params), params)
        np.testing.assert_allclose(updates["w"], want, rtol=1e-4)


def test_ema():
    p = {"a": jnp.array([2.0])}
    assert ema_init(p, 0.0) is None and ema_update(None, p, 0.0) is None
    e = ema_init(p, 0.9)
    e = ema_update(e, {"a": jnp.array([12.0])}, 0.9)
    np.testing.assert_allclose(e["a"], [0.9 * 2 + 0.1 * 12])


def test_train_step_updates_params_ema_and_counts():
    cfg = dataclasses.replace(tiny_train_config(), ema_decay=0.5)
    vel = pixel_velocity()
    params = pixel_params(cfg.model, jax.random.PRNGKey(0))
    state = flow.init_train_state(cfg, params)
    cond, null = _cond()
    batch = {"latents": jnp.ones((2, 2, 2, 2, 16)), "ref_latents": jnp.ones((2, 1, 2, 2, 16)),
             "text_states": jnp.zeros((2, 4, cfg.model.text_dim)), "text_mask": cond.text_mask,
             "text_states_2": jnp.zeros((2, cfg.model.pooled_dim)),
             "null_text_states": jnp.zeros((2, cfg.model.text_dim)), "null_text_mask": null.text_mask,
             "null_text_states_2": jnp.zeros((cfg.model.pooled_dim,))}
    step = jax.jit(flow.make_train_step(cfg, vel))
    s1, _ = step(state, batch, jax.random.PRNGKey(1))
    s2, m2 = step(s1, batch, jax.random.PRNGKey(2))
    assert int(s2.step) == 2 and np.isfinite(float(m2["loss"])) and float(m2["lr"]) > 0
    x0, cond, extra, null = flow.split_batch(batch)
    grads = jax.grad(lambda p: flow.flow_loss(vel, p, cfg.flow, x0, cond, extra, null, jax.random.PRNGKey(2))[0])(
        s1.params)
    assert all(float(jnp.abs(g).max()) > 0 for g in jax.tree.leaves(grads))  # every parameter is trained
    want = jax.tree.map(lambda p0, p1, p2: 0.5 * (0.5 * p0 + 0.5 * p1) + 0.5 * p2, params, s1.params, s2.params)
    for e, w in zip(jax.tree.leaves(s2.ema), jax.tree.leaves(want)):
        np.testing.assert_allclose(e, w, rtol=1e-6)
    assert not np.allclose(jax.tree.leaves(s2.params)[0], jax.tree.leaves(params)[0])


def test_remat_policy_comes_from_the_model_config():
    cfg = tiny_train_config()
    src = SyntheticSource(cfg.model, cfg.data, cfg.flow.n_image_tokens)
    batch = {k: np.stack([src[i][k] for i in range(2)]) for k in src[0]}
    batch.update({f"null_{k}": v for k, v in src.null().items()})
    counts = {}
    for remat in ("none", "full"):
        c = dataclasses.replace(cfg, model=dataclasses.replace(cfg.model, remat=remat))
        state = jax.eval_shape(lambda c=c: flow.init_train_state(c, abstract_params(c.model)))
        counts[remat] = str(jax.make_jaxpr(flow.make_train_step(c))(state, batch, jax.random.PRNGKey(0))).count("remat")
    assert counts == {"none": 0, "full": 3}  # refiner, double-stream and single-stream stacks


def _tiny_batch(cfg, n):
    src = SyntheticSource(cfg.model, cfg.data, cfg.flow.n_image_tokens)
    batch = {k: np.stack([src[i][k] for i in range(n)]) for k in src[0]}
    batch.update({f"null_{k}": v for k, v in src.null().items()})
    return batch


def test_accumulated_step_equals_the_large_batch_step():
    """accumulate=2 over a batch of 4 gives the loss, gradient norm and parameters of one batch of 4."""
    cfg = dataclasses.replace(tiny_train_config(), data=DataConfig(batch_size=4, num_samples=6))
    batch = _tiny_batch(cfg, 4)
    state = flow.init_train_state(cfg, init_params(cfg.model, jax.random.PRNGKey(0)))
    out = {}
    for n in (1, 2, 4):
        c = dataclasses.replace(cfg, accumulate=n)
        out[n] = jax.jit(flow.make_train_step(c))(state, batch, jax.random.PRNGKey(3))
    for n in (2, 4):
        for k in ("loss", "grad_norm", "sigma_mean"):
            np.testing.assert_allclose(float(out[n][1][k]), float(out[1][1][k]), rtol=1e-5, atol=1e-6)
        for a, b in zip(jax.tree.leaves(out[n][0].params), jax.tree.leaves(out[1][0].params)):
            np.testing.assert_allclose(a, b, rtol=1e-5, atol=1e-6)
    with pytest.raises(ValueError, match="accumulate 3"):
        dataclasses.replace(cfg, accumulate=3)


@pytest.mark.parametrize("remat", ["dots", "attention"])
def test_remat_policies_keep_the_gradient(remat):
    """Every remat policy (model.remat) computes the same loss and gradient as none."""
    cfg = tiny_train_config()
    batch = _tiny_batch(cfg, 2)
    x0, cond, extra, null = flow.split_batch(batch)
    params = init_params(cfg.model, jax.random.PRNGKey(0))
    grads = {}
    for r in ("none", remat):
        vel = flow.dit_velocity(dataclasses.replace(cfg.model, remat=r))
        grads[r] = jax.jit(jax.grad(lambda p, vel=vel: flow.flow_loss(vel, p, cfg.flow, x0, cond, extra, null,
                                                                         jax.random.PRNGKey(1))[0]))(params)
    for a, b in zip(jax.tree.leaves(grads[remat]), jax.tree.leaves(grads["none"])):
        np.testing.assert_allclose(a, b, rtol=1e-5, atol=1e-6)
