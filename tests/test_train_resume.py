"""Orbax resume: 6 steps in one go and 3 steps + interruption + restart + 3 steps end bit-identical
(parameters, optimizer state, data position), for flow training and DMD2 (the stand-in model keeps this
cheap; the DiT's own steps are exercised by the CLI and sharding tests)."""

import jax
import pytest

from m141jax.train import dmd, flow
from m141jax.train.checkpointing import RunCheckpoints
from m141jax.train.data import SyntheticSource, make_iterator
from m141jax.train.loop import MetricsLog, run_loop
from train_helpers import (pixel_dmd_step, pixel_flow_step, pixel_params, tiny_distill_config, tiny_train_config,
                           tree_equal)


class Interrupted(Exception):
    pass


def _session(tmp, cfg, n_image_tokens, make_state, step_fn, crash_at=None):
    """One process's life: fresh state and iterator, resume from the latest checkpoint, run the loop.
    (The state is committed to its device, as the CLI's is, so the restored one reuses the compiled step.)"""
    it = make_iterator(SyntheticSource(cfg.model, cfg.data, n_image_tokens), cfg.data)
    ckpt = RunCheckpoints(tmp / "checkpoints", cfg.run.checkpoint_every, cfg.run.keep_checkpoints)
    state, start = jax.device_put(make_state(), jax.devices()[0]), ckpt.latest_step() or 0
    if start:
        state = ckpt.restore(state, it)

    def step(s, b, r, i):
        if i == crash_at:
            raise Interrupted
        return step_fn(s, b, r, i)

    try:
        state = run_loop(step, state, it, lambda b: b, cfg.run, ckpt, MetricsLog(tmp / "m.csv", start), start,
                         cfg.data.batch_size, console=False)
    finally:
        ckpt.close()
    return state, it.get_state()


def _check_resume(tmp_path, cfg, n_image_tokens, make_state, step_fn):
    full, full_pos = _session(tmp_path / "full", cfg, n_image_tokens, make_state, step_fn)
    with pytest.raises(Interrupted):
        _session(tmp_path / "split", cfg, n_image_tokens, make_state, step_fn, crash_at=3)
    assert RunCheckpoints(tmp_path / "split" / "checkpoints", 3, 2).latest_step() == 3
    split, split_pos = _session(tmp_path / "split", cfg, n_image_tokens, make_state, step_fn)
    assert int(full.step) == int(split.step) == 6 and full_pos == split_pos
    assert tree_equal(full, split)
    assert not tree_equal(full, make_state())


@pytest.mark.slow
def test_flow_resume_is_bit_identical(tmp_path):
    cfg = tiny_train_config(steps=6, checkpoint_every=3)
    params = pixel_params(cfg.model, jax.random.PRNGKey(0))
    step = pixel_flow_step(cfg)
    _check_resume(tmp_path, cfg, cfg.flow.n_image_tokens, lambda: flow.init_train_state(cfg, params),
                  lambda s, b, r, i: step(s, b, r))


@pytest.mark.slow
def test_dmd_resume_is_bit_identical(tmp_path):
    cfg = tiny_distill_config(steps=6, checkpoint_every=3)
    teacher = jax.device_put(pixel_params(cfg.model, jax.random.PRNGKey(0)), jax.devices()[0])
    step = pixel_dmd_step(cfg)
    _check_resume(tmp_path, cfg, cfg.n_image_tokens,
                  lambda: dmd.init_dmd_state(cfg, teacher, jax.random.PRNGKey(1), features=16),
                  lambda s, b, r, i: step(s, teacher, b, r, dmd.generator_turn(i, cfg.dmd)))
