"""Orbax resume: 6 steps in one go and 3 steps + interruption + restart + 3 steps end bit-identical
(parameters, optimizer state, data position), for flow training and DMD2 (the stand-in model keeps this
cheap; the DiT's own steps are exercised by the CLI and sharding tests)."""

import jax
import pytest
from train_helpers import (
    pixel_dmd_step,
    pixel_flow_step,
    pixel_params,
    tiny_distill_config,
    tiny_train_config,
    tree_equal,
)

from m141jax.train import dmd, flow
from m141jax.train.checkpointing import RunCheckpoints
from m141jax.train.data import SyntheticSource, make_iterator
from m141jax.train.loop import MetricsLog, run_loop


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


def _damage(step_dir, how):
    """Damage a saved checkpoint as a crash or a full disk would."""
    files = sorted(p for p in step_dir.rglob("*") if p.is_file())
    if how == "metadata":
        for p in files:
            if p.name == "_METADATA":
                p.unlink()
    else:  # truncate every array data file
        for p in files:
            if "ocdbt" in str(p) or p.parent.name == "d":
                p.write_bytes(p.read_bytes()[: max(1, p.stat().st_size // 3)])


@pytest.mark.parametrize("how", ["metadata", "truncated"])
def test_resume_falls_back_past_a_damaged_checkpoint(tmp_path, capsys, how):
    """The newest checkpoint damaged: the run resumes from the one before, says which was skipped and why,
    moves the damaged one aside, and still ends bit-identical to an uninterrupted run."""
    cfg = tiny_train_config(steps=6, checkpoint_every=2)
    params, step, n_img = pixel_params(cfg.model, jax.random.PRNGKey(0)), pixel_flow_step(cfg), cfg.flow.n_image_tokens
    make_state = lambda: flow.init_train_state(cfg, params)  # noqa: E731
    step_fn = lambda s, b, r, i: step(s, b, r)  # noqa: E731
    full, full_pos = _session(tmp_path / "full", cfg, n_img, make_state, step_fn)
    with pytest.raises(Interrupted):
        _session(tmp_path / "split", cfg, n_img, make_state, step_fn, crash_at=5)
    ckpts = tmp_path / "split" / "checkpoints"
    _damage(ckpts / "4", how)
    it = make_iterator(SyntheticSource(cfg.model, cfg.data, n_img), cfg.data)
    ckpt = RunCheckpoints(ckpts, cfg.run.checkpoint_every, cfg.run.keep_checkpoints)
    state, start = ckpt.restore_newest(jax.device_put(make_state(), jax.devices()[0]), it)
    ckpt.close()
    err = capsys.readouterr().err
    assert start == 2 and "skipping checkpoint step 4" in err and "does not restore" in err, err
    assert not (ckpts / "4").exists() and any((tmp_path / "split" / "damaged-checkpoints").iterdir())
    split, split_pos = _session(tmp_path / "split", cfg, n_img, make_state, step_fn)
    assert int(split.step) == 6 and split_pos == full_pos and tree_equal(full, split)


def test_metrics_log_drops_the_tail_and_a_row_cut_short(tmp_path):
    """Resuming from step 2 keeps the rows of steps ≤ 2 and drops later ones, also a last row a kill cut
    short in its step number ('1' of '12,...')."""
    path = tmp_path / "m.csv"
    path.write_text("step,metric,value\r\n1,loss,0.5\r\n2,loss,0.25\r\n3,loss,0.125\r\n1")
    MetricsLog(path, resume_step=2).write(3, {"loss": 0.1})
    assert path.read_text().splitlines() == ["step,metric,value", "1,loss,0.5", "2,loss,0.25", "3,loss,0.1"]
