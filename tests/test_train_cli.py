"""`m141jax train` / `m141jax distill`: config file + overrides, checkpoints, metrics CSV, exported DiT,
resume, and the NaN stop that keeps the last good checkpoint."""

import csv
import json
from pathlib import Path

import jax
import pytest
from fixtures import write_prepared

from m141jax import checkpoint
from m141jax.cli import main
from m141jax.train.checkpointing import RunCheckpoints
from m141jax.train.config import TRAIN_PRESETS, load_run_config

CONFIGS = Path(__file__).resolve().parents[1] / "configs"


def test_config_file_and_overrides(tmp_path):
    f = tmp_path / "c.yaml"
    f.write_text("preset: tiny-i2v\noptimizer: {learning_rate: 0.01}\nmodel: {remat: full}\n")
    cfg = load_run_config(TRAIN_PRESETS, f, ["optimizer.warmup_steps=3", "flow.ref_frame_loss=false",
                                             "data.source=/x"])
    assert cfg.model.hidden_size == 64 and cfg.model.remat == "full"
    assert cfg.optimizer.learning_rate == 0.01 and cfg.optimizer.warmup_steps == 3
    assert cfg.flow.ref_frame_loss is False and cfg.data.source == "/x"
    assert load_run_config(TRAIN_PRESETS, None, ["preset=tiny-i2v", "model=small-i2v"]).model.hidden_size == 512
    for bad, msg in ((["optimizer.lr=1"], "unknown config field 'optimizer.lr'"),
                     (["run.steps=1.5"], "must be an integer"), (["flow.weighting=x"], "unknown weighting"),
                     (["nonsense"], "must look like")):
        with pytest.raises(ValueError, match=msg):
            load_run_config(TRAIN_PRESETS, f, bad)


@pytest.fixture
def compile_cache(tmp_path):
    """A persistent compilation cache for this test, so the resumed run reuses the first run's executable."""
    keys = ("jax_compilation_cache_dir", "jax_persistent_cache_min_compile_time_secs")
    old = {k: getattr(jax.config, k) for k in keys}
    jax.config.update("jax_compilation_cache_dir", str(tmp_path / "xla-cache"))
    jax.config.update("jax_persistent_cache_min_compile_time_secs", 0.0)
    yield
    for k, v in old.items():
        jax.config.update(k, v)


def _metrics(path):
    with open(path) as f:
        return [(int(r["step"]), r["metric"], float(r["value"])) for r in csv.DictReader(f)]


@pytest.mark.slow
def test_train_resume_nan_stop_and_distill(tmp_path, capsys, compile_cache):
    good, bad = write_prepared(tmp_path / "good", n=8), write_prepared(tmp_path / "bad", n=8, nan=True)
    run = tmp_path / "run"
    # configs/train/tiny-i2v.yaml: preset tiny-i2v, checkpoints and logs every 2 steps, batch 8, 1 reader thread
    common = ["--output", str(run), "--quiet", "--config", str(CONFIGS / "train" / "tiny-i2v.yaml")]
    assert main(["train", *common, f"data.source={good}", "run.steps=4"]) == 0
    assert RunCheckpoints(run / "checkpoints", 2, 3).manager.all_steps() == [2, 4]
    rows = _metrics(run / "metrics.csv")
    assert {s for s, _, _ in rows} == {2, 4} and {"loss", "grad_norm", "lr", "samples_per_s"} <= {m for _, m, _ in rows}
    assert json.loads((run / "config.json").read_text())["data"]["source"] == str(good)
    assert checkpoint.read_meta(run / "dit", "dit")["config"]["hidden_size"] == 64

    # resume with NaN data: stops at step 4 (the first new one) and keeps checkpoint 4 as the last
    capsys.readouterr()
    assert main(["train", *common, f"data.source={bad}", "run.steps=8"]) == 2
    err = capsys.readouterr().err
    assert "non-finite" in err and "at step 4" in err and "last good checkpoint is step 4" in err
    assert RunCheckpoints(run / "checkpoints", 2, 3).manager.all_steps() == [2, 4]

    # distill set-up from the trained DiT: teacher loading, state placement, checkpoint, export (0 steps;
    # the DiT's DMD2 step itself runs in the sharding test)
    out = tmp_path / "distill"
    tiny_distill = str(CONFIGS / "distill" / "tiny-i2v.yaml")
    assert main(["distill", "--output", str(out), "--quiet", "--config", tiny_distill, f"teacher={run / 'dit'}",
                 f"data.source={good}", "run.steps=0"]) == 0
    generator = checkpoint.load_params(out / "generator")
    teacher = checkpoint.load_params(run / "dit")
    assert jax.tree.all(jax.tree.map(lambda a, b: bool((a == b).all()), generator, teacher))
    assert (out / "checkpoints" / "0").is_dir()
    assert main(["distill", "--output", str(tmp_path / "x"), "--quiet", "--config", tiny_distill,
                 f"teacher={run / 'dit'}", "model.hidden_size=32", "model.rope_axes=[2,2,4]"]) == 2
    assert "differ from the configured model" in capsys.readouterr().err
