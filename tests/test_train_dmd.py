"""DMD2 pieces against hand-computed cases, gradient routing (stop-gradients), two time scales, and the
whole step on 8 simulated devices against the unsharded step."""

import dataclasses
import itertools
import os
import subprocess
import sys
import textwrap
from pathlib import Path

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from train_helpers import pixel_dmd_step, pixel_params, pixel_velocity, tiny_distill_config, tree_equal

from m141jax import sampling
from m141jax.models.conditioning import Conditioning
from m141jax.train import dmd, flow
from m141jax.train.data import SyntheticSource

ROOT = Path(__file__).resolve().parents[1]


def test_teacher_velocity_combines_branches():
    """The real score's CFG v_u + w·(v_c − v_u) as one batch-2B forward (rows: uncond, then cond); w ≤ 1 is
    one conditional pass."""
    def vel(p, x, s, c, e):
        assert x.shape[0] == s.shape[0] == c.text_states.shape[0] == e["r"].shape[0]
        return x * 0 + c.text_states_2[:, :1] + e["r"][:, None]

    def teacher(scale):
        cfg = dataclasses.replace(tiny_distill_config(), dmd=dmd.DMDConfig(real_guidance=scale))
        return dmd.DMD(cfg, vel).teacher_velocity(None, x, s, cond, uncond, {"r": jnp.zeros((2,))})[:, 0]

    x, s = jnp.zeros((2, 3)), jnp.ones((2,))
    def text(t):
        return Conditioning(jnp.zeros((2, 1, 1)), jnp.ones((2, 1), jnp.int32), jnp.array(t)[:, None])
    cond, uncond = text([3.0, 5.0]), text([1.0, 1.0])
    np.testing.assert_allclose(teacher(4.0), [1 + 4 * 2, 1 + 4 * 4])
    np.testing.assert_allclose(teacher(1.0), [3, 5])


def test_dm_gradient_and_loss_hand_case():
    x0 = jnp.array([[1.0, 2.0], [0.0, 4.0]])
    x0_real = jnp.array([[0.0, 0.0], [1.0, 1.0]])  # p_real = [[1, 2], [-1, 3]], mean|p_real| = [1.5, 2]
    x0_fake = jnp.array([[1.0, 1.0], [0.0, 0.0]])  # p_fake = [[0, 1], [0, 4]]
    g = dmd.dm_gradient(x0, x0_real, x0_fake)
    np.testing.assert_allclose(g, [[1 / 1.5, 1 / 1.5], [-1 / 2, -1 / 2]], rtol=1e-6)
    # teacher and fake score both exact: 0/0 becomes 0 (nan_to_num), as in DMD2
    np.testing.assert_array_equal(dmd.dm_gradient(x0, x0, x0), jnp.zeros_like(x0))
    loss, grad = jax.value_and_grad(dmd.dm_loss_from_gradient)(x0, g)
    assert float(loss) == pytest.approx(0.5 * float(jnp.mean(g ** 2)))
    np.testing.assert_allclose(grad, g / x0.size, rtol=1e-6)  # the loss's gradient is exactly g / N


def test_gan_losses_hand_case():
    assert float(dmd.generator_gan_loss(jnp.zeros(3))) == pytest.approx(np.log(2))
    lf, lr = jnp.array([1.0, -2.0]), jnp.array([0.5])
    want = np.mean(np.log1p(np.exp([1.0, -2.0]))) + np.log1p(np.exp(-0.5))
    assert float(dmd.discriminator_loss(lf, lr)) == pytest.approx(want, rel=1e-6)
    assert float(dmd.generator_gan_loss(jnp.array([2.0]))) == pytest.approx(np.log1p(np.exp(-2.0)), rel=1e-6)


def test_backward_simulation_is_the_euler_sampler():
    a = 0.3

    def vel(p, x, s, c, e):
        return a * x
    sig = jnp.asarray(sampling.schedule(4, 5.0))
    noise = jnp.ones((1, 2))
    for k in range(4):
        want = np.prod([1 + a * (sig[i + 1] - sig[i]) for i in range(k)])
        np.testing.assert_allclose(dmd.backward_simulate(vel, None, noise, None, {}, sig, k), want * noise, rtol=1e-6)
        x0 = dmd.generate(vel, None, noise, None, {}, sig, k)
        np.testing.assert_allclose(x0, want * (1 - sig[k] * a) * noise, rtol=1e-6)


def _setup():
    cfg = tiny_distill_config()
    src = SyntheticSource(cfg.model, cfg.data, cfg.n_image_tokens)
    batch = {k: jnp.stack([src[i][k] for i in range(2)]) for k in src[0]}
    batch.update({f"null_{k}": jnp.asarray(v) for k, v in src.null().items()})
    cpu = jax.devices()[0]
    teacher = jax.device_put(pixel_params(cfg.model, jax.random.PRNGKey(0)), cpu)
    state = jax.device_put(dmd.init_dmd_state(cfg, teacher, jax.random.PRNGKey(1), features=16), cpu)
    return cfg, batch, teacher, state


def _nonzero(tree):
    return [float(jnp.abs(g).max()) > 0 for g in jax.tree.leaves(tree)]


@pytest.mark.slow
def test_stop_gradients_route_each_loss_to_its_own_parameters():
    cfg, batch, teacher, state = _setup()
    losses = dmd.DMD(cfg, pixel_velocity())
    x_real, cond, extra, null = flow.split_batch(batch)
    uncond = flow.drop_text(cond, jnp.ones((2,), bool), null, cfg.n_image_tokens)
    noise = jax.random.normal(jax.random.PRNGKey(2), x_real.shape)
    # perturb the generator so it differs from the teacher and the fake score (otherwise the DM term is 0)
    gen = jax.tree.map(lambda p: p * 1.1, state.generator)
    key = jax.random.PRNGKey(3)

    @jax.jit
    def all_grads(gen, critic, teacher, x, k):
        g_gen = jax.grad(lambda g, c, t: losses.generator_loss(g, c, t, noise, cond, uncond, extra, k, key)[0],
                         argnums=(0, 1, 2))(gen, critic, teacher)
        g_critic = jax.grad(lambda c, x: losses.critic_loss(c, x, x_real, cond, extra, null, key)[0],
                            argnums=(0, 1))(critic, x)
        g_dm = jax.grad(lambda x, f, t: losses.dm_loss(x, t, f, cond, uncond, extra, key)[0], argnums=(0, 1, 2))(
            x, critic["fake"], teacher)
        return g_gen, g_critic, g_dm

    for k in (0, 2):
        (gg, gc, gt), (cc, cx), (dx, df, dt) = all_grads(gen, state.critic, teacher, noise, k)
        assert all(_nonzero(gg))  # the generator loss trains the generator ...
        assert not any(_nonzero(gc)) and not any(_nonzero(gt))  # ... and neither the critic nor the teacher
        assert all(_nonzero(cc["fake"])) and all(_nonzero(cc["head"]))  # the critic loss trains fake score + head
        assert not any(_nonzero(cx))  # generator samples are constants for the critic
        assert float(jnp.abs(dx).max()) > 0 and not any(_nonzero(df)) and not any(_nonzero(dt))


@pytest.mark.slow
def test_two_time_scales():
    cfg, batch, teacher, state = _setup()
    step = pixel_dmd_step(cfg)
    teacher_before = jax.tree.map(jnp.copy, teacher)
    states, metrics = [state], []
    for i in range(3):
        s, m = step(states[-1], teacher, batch, jax.random.PRNGKey(10 + i), dmd.generator_turn(i, cfg.dmd))
        states.append(s)
        metrics.append(m)
    assert cfg.dmd.critic_steps == 2 and [dmd.generator_turn(i, cfg.dmd) for i in range(3)] == [True, False, True]
    assert "gen_loss_dm" in metrics[0] and "gen_loss_dm" not in metrics[1]
    assert not tree_equal(states[0].generator, states[1].generator)
    assert tree_equal(states[1].generator, states[2].generator)  # critic-only step
    assert tree_equal(states[1].generator_opt, states[2].generator_opt)
    assert not tree_equal(states[2].generator, states[3].generator)
    for a, b in itertools.pairwise(states):
        assert not tree_equal(a.critic, b.critic)  # the critic moves every step
    assert tree_equal(teacher, teacher_before)
    assert int(states[3].step) == 3


def test_generator_starts_as_the_teacher():
    _, _, teacher, state = _setup()
    assert tree_equal(state.generator, teacher) and tree_equal(state.critic["fake"], teacher)
    assert jax.tree.leaves(state.generator)[0] is not jax.tree.leaves(teacher)[0]


SHARDED = textwrap.dedent("""
    import dataclasses, jax, jax.numpy as jnp, numpy as np
    from m141jax.models.dit import init_params
    from m141jax.train import dmd
    from m141jax.train.config import DISTILL_PRESETS, DataConfig, OptimizerConfig
    from m141jax.train.data import SyntheticSource, global_batch
    from m141jax.train.mesh import batch_shardings, make_mesh, state_shardings
    assert jax.device_count() == 8
    # AdamW with eps = 1 is nearly linear in the gradient, so the updates of both runs can be compared
    # entry by entry (with eps ≈ 0 the first step is lr·sign(g), which flips on round-off for g ≈ 0)
    opt = OptimizerConfig(learning_rate=1e-2, eps=1.0)
    cfg = dataclasses.replace(DISTILL_PRESETS["tiny-i2v"], generator_optimizer=opt, critic_optimizer=opt)
    src = SyntheticSource(cfg.model, DataConfig(frames=2, height=4, width=4, text_len=4), cfg.n_image_tokens)
    host = {k: np.stack([src[i][k] for i in range(8)]) for k in src[0]}
    host.update({f"null_{k}": v for k, v in src.null().items()})
    teacher = init_params(cfg.model, jax.random.PRNGKey(0))
    state = dmd.init_dmd_state(cfg, teacher, jax.random.PRNGKey(1))
    rng = jax.random.PRNGKey(2)
    step = dmd.make_dmd_step(cfg)
    ref_state, ref_m = jax.jit(step, static_argnums=4)(state, teacher, jax.tree.map(jnp.asarray, host), rng, True)

    mesh = make_mesh("data=2,fsdp=4")
    st_sh, t_sh = state_shardings(state, cfg.model, mesh), state_shardings(teacher, cfg.model, mesh)
    batch = global_batch(host, batch_shardings(mesh))
    sharded = jax.jit(step, static_argnums=4, in_shardings=(st_sh, t_sh, None, None), out_shardings=(st_sh, None))
    out_state, out_m = sharded(jax.device_put(state, st_sh), jax.device_put(teacher, t_sh), batch, rng, True)
    kernel = out_state.generator["double_blocks"]["img_mlp"]["fc1"]["kernel"]
    assert len(kernel.sharding.device_set) == 8 and not kernel.sharding.is_fully_replicated
    assert set(out_m) == set(ref_m)
    for k in ref_m:
        np.testing.assert_allclose(out_m[k], ref_m[k], rtol=2e-4, atol=1e-6, err_msg=k)
    worst = 0.0
    for a, b, p0 in zip(jax.tree.leaves(out_state), jax.tree.leaves(ref_state), jax.tree.leaves(state)):
        a, b, p0 = (np.asarray(v, np.float64) for v in (a, b, p0))
        scale = np.max(np.abs(b - p0)) if b.size else 0.0
        if scale > 0:  # compare the updates (moments, parameters) leaf by leaf
            worst = max(worst, float(np.max(np.abs(a - b)) / scale))
        else:
            np.testing.assert_array_equal(a, b)
    assert worst < 5e-3, worst  # round-off of different reduction orders; a sharding error is O(1)
    print("SHARDED_OK", worst)
""")


@pytest.mark.slow
def test_dmd_step_sharded_on_8_devices_equals_unsharded():
    # 8 host devices; cheaper CPU code generation halves the two compiles (both runs get the same flags)
    flags = os.environ["XLA_FLAGS"] + " --xla_backend_optimization_level=0 --xla_llvm_disable_expensive_passes=true"
    env = {**os.environ, "XLA_FLAGS": flags, "JAX_PLATFORMS": "cpu", "PYTHONPATH": str(ROOT)}
    r = subprocess.run([sys.executable, "-c", SHARDED], env=env, capture_output=True, text=True, cwd=ROOT,
                       timeout=900, check=False)
    assert r.returncode == 0 and "SHARDED_OK" in r.stdout, r.stdout[-3000:] + r.stderr[-3000:]


def test_accumulated_dmd_steps_run_both_turns():
    """accumulate=2: both turns run as two micro-batches (own randomness each) and move their networks."""
    cfg, batch, teacher, state = _setup()
    cfg = dataclasses.replace(cfg, accumulate=2)
    step = pixel_dmd_step(cfg)
    s1, m1 = step(state, teacher, batch, jax.random.PRNGKey(10), True)
    s2, m2 = step(s1, teacher, batch, jax.random.PRNGKey(11), False)
    assert all(np.isfinite(float(v)) for v in [*m1.values(), *m2.values()]) and "gen_loss_dm" in m1
    assert not tree_equal(state.generator, s1.generator) and tree_equal(s1.generator, s2.generator)
    assert not tree_equal(s1.critic, s2.critic)


def test_both_optimizer_states_in_host_memory():
    """state_memory=host for both optimizers: their states enter and leave every turn in pinned host memory
    (the networks stay on the device), and two generator turns give the device-resident run's states (≤1e-6)."""
    cfg, batch, teacher, state = _setup()
    host = dataclasses.replace(cfg, generator_optimizer=dataclasses.replace(cfg.generator_optimizer, state_memory="host"),
                               critic_optimizer=dataclasses.replace(cfg.critic_optimizer, state_memory="host"))
    assert dmd.host_fields(host) == ("generator_opt", "critic_opt") and dmd.host_fields(cfg) == ()
    out = {}
    for c in (cfg, host):  # the host run starts as `m141jax distill` places it: both states in host memory
        s = state.replace(**{f: jax.device_put(getattr(state, f), jax.memory.Space.Host) for f in dmd.host_fields(c)})
        for i in range(2):  # generator turns: both optimizers update (one compile per config)
            s, _ = pixel_dmd_step(c)(s, teacher, batch, jax.random.PRNGKey(10 + i), True)
        out[c] = s
    kinds = lambda tree: {a.sharding.memory_kind for a in jax.tree.leaves(tree)}  # noqa: E731
    assert kinds((out[host].generator_opt, out[host].critic_opt)) == {"pinned_host"}
    assert kinds((out[host].generator, out[host].critic, out[cfg].critic_opt)) == {"device"}
    for a, b in zip(jax.tree.leaves(out[cfg]), jax.tree.leaves(out[host])):
        np.testing.assert_allclose(np.asarray(a), np.asarray(b), rtol=1e-6, atol=1e-6)
