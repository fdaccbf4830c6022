"""Every file under configs/ loads and validates against the code that reads it: train/distill files through
`load_run_config` with their presets, generate files through `load_generate_config` and the real argparse
parser, the demo recipe against m141jax/demo/recipe.py and tools/train_demo.py. A renamed field fails here."""

import dataclasses
import importlib.util
import inspect
import math
from pathlib import Path

import pytest
import yaml

from m141jax import presets
from m141jax.cli import build_parser, generate, main
from m141jax.cli import train as train_cli
from m141jax.config import DiTConfig, VAEConfig
from m141jax.data import shapes
from m141jax.demo import SHIFT, recipe
from m141jax.parallel import parse_mesh
from m141jax.presets import GENERATE_KEYS, load_generate_config
from m141jax.train.config import DISTILL_PRESETS, TRAIN_PRESETS, load_run_config

ROOT = Path(__file__).resolve().parents[1]
CONFIGS = ROOT / "configs"
RUNS = {"train": TRAIN_PRESETS, "distill": DISTILL_PRESETS}
RUN_FILES = sorted(f for kind in RUNS for f in (CONFIGS / kind).glob("*.yaml"))
GENERATE_FILES = sorted((CONFIGS / "generate").glob("*.yaml"))
RECIPE = CONFIGS / "demo" / "recipe.yaml"


def _name(path: Path) -> str:
    return str(path.relative_to(CONFIGS))


def test_every_file_is_checked():
    every = {p for p in CONFIGS.rglob("*") if p.is_file()}
    assert every == {*RUN_FILES, *GENERATE_FILES, RECIPE}, "a file under configs/ that no test loads"
    assert {_name(p) for p in every} >= {"train/magic141-i2v-13b.yaml", "train/tiny-i2v.yaml", "distill/tiny-i2v.yaml",
                                         "distill/magic141-i2v-13b-dmd2.yaml", "generate/release.yaml",
                                         "generate/low-memory.yaml", "generate/quantized.yaml", "demo/recipe.yaml"}


@pytest.mark.parametrize("path", RUN_FILES, ids=_name)
def test_run_file(path):
    data = yaml.safe_load(path.read_text())
    presets_ = RUNS[path.parent.name]
    assert data["preset"] in presets_ and data.get("mesh"), "a run file names its preset and the mesh it is meant for"
    cfg = load_run_config(presets_, path)
    assert cfg.mesh == data["mesh"]
    # every field the file sets arrives in the config (nothing silently dropped)
    for key, value in data.items():
        if isinstance(value, dict):
            for sub, v in value.items():
                got = getattr(getattr(cfg, key), sub)
                assert got == (tuple(v) if isinstance(v, list) else v), f"{key}.{sub}"
        elif key != "preset":
            assert getattr(cfg, key) == value, key
    # the mesh is a four-axis mesh whose batch axes (data, fsdp) split each micro-batch
    explicit = math.prod(int(p.split("=")[1]) for p in cfg.mesh.split(",") if not p.endswith("=-1"))
    sizes = parse_mesh(cfg.mesh, explicit if "-1" not in cfg.mesh else 8)
    assert cfg.data.batch_size % (sizes["data"] * sizes["fsdp"] * cfg.accumulate) == 0


def test_13b_runs_are_meant_for_64_devices():
    for path in (CONFIGS / "train/magic141-i2v-13b.yaml", CONFIGS / "distill/magic141-i2v-13b-dmd2.yaml"):
        cfg = load_run_config(RUNS[path.parent.name], path)
        assert cfg.model == RUNS[path.parent.name]["magic141-i2v-13b"].model
        assert math.prod(parse_mesh(cfg.mesh, 64).values()) == 64


def test_run_file_unknown_field(tmp_path):
    for text, match in (("preset: tiny-i2v\noptimiser: {learning_rate: 0.1}\n", "unknown config field 'optimiser'"),
                        ("preset: tiny-i2v\nrun: {stepz: 3}\n", "unknown config field 'run.stepz'"),
                        ("preset: tiny-i3v\n", "unknown preset 'tiny-i3v'")):
        f = tmp_path / "bad.yaml"
        f.write_text(text)
        with pytest.raises(ValueError, match=match):
            load_run_config(TRAIN_PRESETS, f)


def test_train_mesh_from_the_file_unless_given(tmp_path, monkeypatch):
    """`mesh` in the file is used when --mesh is absent; --mesh wins; neither: every device on fsdp."""
    seen = []

    class Stop(Exception):
        pass

    def make_mesh(spec):
        seen.append(spec)
        raise Stop
    monkeypatch.setattr(train_cli, "make_mesh", make_mesh)
    tiny = str(CONFIGS / "train" / "tiny-i2v.yaml")
    for argv in (["--config", tiny], ["--config", tiny, "--mesh", "data=2,fsdp=4"], ["preset=tiny-i2v"]):
        with pytest.raises(Stop):
            main(["train", "--output", str(tmp_path / "run"), "--quiet", *argv])
    with pytest.raises(Stop):
        main(["distill", "--output", str(tmp_path / "d"), "--quiet", "--config",
              str(CONFIGS / "distill" / "magic141-i2v-13b-dmd2.yaml")])
    assert seen == ["fsdp=-1", "data=2,fsdp=4", None, "fsdp=8,sequence=8"]


def _generate_args(*argv):
    return build_parser().parse_args(["generate", "--prompt", "x", *argv])


def test_generate_keys_are_generate_flags():
    args = vars(_generate_args())
    assert set(GENERATE_KEYS) <= set(args), sorted(set(GENERATE_KEYS) - set(args))


@pytest.mark.parametrize("path", GENERATE_FILES, ids=_name)
def test_generate_file(path):
    settings = load_generate_config(path)
    assert settings, f"{path} sets nothing"
    args = _generate_args("--config", str(path))
    for dest, value in settings.items():
        assert getattr(args, dest) == value, dest
    generate.apply_preset(args)
    generate.settings_from(args)  # the file's settings make valid generation settings


def test_release_file_is_the_release_defaults():
    settings = load_generate_config(CONFIGS / "generate" / "release.yaml")
    defaults = vars(_generate_args())
    want = {**{k: defaults[k] for k in GENERATE_KEYS if k not in ("mesh", "sequence_parallel")},
            **generate.PRESETS["release"]}
    assert settings == want


def test_generate_config_flags_win(tmp_path):
    path = str(CONFIGS / "generate" / "quantized.yaml")
    assert _generate_args("--config", path).quantize == "int8"
    assert _generate_args("--config", path, "--quantize", "int4").quantize == "int4"
    assert _generate_args("--quantize", "int4", "--config", path).quantize == "int4"
    f = tmp_path / "g.yaml"
    f.write_text("steps: 8\nt2i-steps: 20\n")
    args = _generate_args("--steps", "6", "--config", str(f))
    assert (args.steps, args.t2i_steps) == (6, 20)


def test_generate_file_errors(tmp_path, capsys):
    f = tmp_path / "g.yaml"
    for text, match in (("stepz: 4\n", "unknown generate setting 'stepz'; accepted: .*steps"),
                        ("steps: four\n", "steps='four' must be int"), ("reference_mean: 1\n", "must be bool"),
                        ("prompt: a cat\n", "unknown generate setting 'prompt'"), ("- 1\n", "must hold a mapping")):
        f.write_text(text)
        with pytest.raises(ValueError, match=match):
            load_generate_config(f)
    f.write_text("quantize: int3\n")
    with pytest.raises(SystemExit):
        _generate_args("--config", str(f))
    assert "quantize='int3'; accepted: int8, int4" in capsys.readouterr().err
    with pytest.raises(ValueError, match="cannot be read"):
        presets.load_generate_config(tmp_path / "missing.yaml")


def _train_demo_defaults() -> dict:
    spec = importlib.util.spec_from_file_location("train_demo", ROOT / "tools" / "train_demo.py")
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return vars(module.parser().parse_args([]))


def _defaults(fn) -> dict:
    params = inspect.signature(fn).parameters.items()
    return {k: p.default for k, p in params if p.default is not inspect.Parameter.empty}


def test_demo_recipe_file_matches_the_recipe(monkeypatch):
    r = yaml.safe_load(RECIPE.read_text())
    script = _train_demo_defaults()
    assert (r["seed"], r["videos"], r["shift"], r["n_image_tokens"]) == (script["seed"], recipe.VIDEOS, SHIFT,
                                                                          recipe.N_IMAGE_TOKENS)
    assert script["videos"] == recipe.VIDEOS and tuple(r["radius"]) == shapes.RADIUS
    # the VAE
    vae = r["vae"]
    assert dataclasses.replace(VAEConfig(), **{k: tuple(v) if isinstance(v, list) else v
                                               for k, v in vae["model"].items()},
                               param_dtype="fp32", dtype="fp32") == recipe.VAE
    assert (vae["steps"], vae["kl_weight"], vae["foreground_weight"]) == (script["vae_steps"], recipe.KL_WEIGHT,
                                                                         recipe.FOREGROUND_WEIGHT)
    keys = ("batch", "lr", "image_batch", "latent_noise", "foreground_margin")
    assert {k: vae[k] for k in keys} == {k: _defaults(recipe.train_vae)[k] for k in keys}
    assert (vae["lr"], vae["latent_noise"], vae["foreground_margin"]) == (script["vae_lr"], script["latent_noise"],
                                                                         script["foreground_margin"])
    # the DiTs
    dit = {k: tuple(v) if isinstance(v, list) else v for k, v in r["dit"].items()}
    latent = recipe.LATENT
    assert recipe.T2V == DiTConfig(in_channels=latent, guidance_embed=True, out_channels=latent, param_dtype="fp32",
                                   dtype="fp32", **dit)
    assert recipe.I2V == dataclasses.replace(recipe.T2V, in_channels=2 * latent + 1, guidance_embed=False,
                                             **r["teacher"]["blocks"])
    assert recipe.T2V_CLIPS == dataclasses.replace(recipe.T2V, **r["teacher"]["blocks"])
    # the configs recipe.train_flow / recipe.distill build, caught before any training
    class Built(Exception):
        pass

    def catch(cfg, *_):
        raise Built(cfg)
    monkeypatch.setattr(recipe.dit_lib, "init_params", lambda *a: None)
    monkeypatch.setattr(recipe.flow, "init_train_state", catch)
    monkeypatch.setattr(recipe.dmd, "init_dmd_state", catch)

    def built(fn, *args):
        with pytest.raises(Built) as e:
            fn(*args, progress=False)
        return e.value.args[0]
    flow_cfg = built(recipe.train_flow, recipe.I2V, None, 1, recipe.N_IMAGE_TOKENS)
    other = built(lambda *a, **k: recipe.train_flow(*a, sigma_sampling="uniform", **k), recipe.I2V, None, 1, 0)
    assert other.flow.sigma_sampling == "uniform"  # benchmarks/demo_dit.py --sigma-sampling reaches the loss
    other = built(lambda *a, **k: recipe.train_flow(*a, ema_decay=0.99, **k), recipe.I2V, None, 1, 0)
    assert other.ema_decay == 0.99  # tools/train_demo.py / benchmarks/demo_dit.py --ema-decay reach the training
    assert (script["t2i_lr"], script["teacher_lr"]) == (recipe.T2I_LR, recipe.TEACHER_LR)
    for stage, steps, lr in (("t2i", script["t2i_steps"], script["t2i_lr"]),
                             ("teacher", script["teacher_steps"], script["teacher_lr"])):
        s = r[stage]
        assert s["steps"] == steps, stage
        assert built(lambda *a, **k: recipe.train_flow(*a, lr=lr, **k), recipe.I2V, None, 1, 0).optimizer == \
            dataclasses.replace(flow_cfg.optimizer, learning_rate=s["lr"]), stage
        assert (s["batch"], s["lr"], s["warmup"], s["cfg_dropout"]) == (
            flow_cfg.data.batch_size, lr, flow_cfg.optimizer.warmup_steps, flow_cfg.flow.cfg_dropout), stage
        assert {k: getattr(flow_cfg.optimizer, k) for k in r["optimizer"]} == r["optimizer"]
        assert (flow_cfg.flow.shift, flow_cfg.flow.sigma_sampling) == (r["shift"], r["sigma_sampling"])
        assert flow_cfg.ema_decay == r["ema_decay"] == script["ema_decay"]
    assert script["teacher_steps"] == recipe.TEACHER_STEPS and r["t2i"]["guidance"] == recipe.T2I_GUIDANCE
    dcfg = built(recipe.distill, recipe.I2V, None, None, 1, recipe.N_IMAGE_TOKENS)
    s = r["student"]
    assert s["steps"] == script["distill_steps"] == recipe.DISTILL_STEPS
    assert (s["batch"], s["lr"], s["real_guidance"], s["critic_steps"], s["gan_sigma_max"], r["shift"]) == (
        dcfg.data.batch_size, dcfg.generator_optimizer.learning_rate, dcfg.dmd.real_guidance, dcfg.dmd.critic_steps,
        dcfg.dmd.gan_sigma_max, dcfg.dmd.shift)
    assert dcfg.critic_optimizer == dcfg.generator_optimizer
    assert {k: getattr(dcfg.generator_optimizer, k) for k in r["optimizer"]} == r["optimizer"]


@pytest.mark.parametrize("override, message", [
    ("run.steps=-3", "run.steps -3 must be ≥ 0"),
    ("ema_decay=true", "ema_decay=True must be a number (float), not a boolean"),
    ("ema_decay=1.0", "ema_decay 1.0 must lie in [0, 1)"),
    ("optimizer.learning_rate=NaN", "OptimizerConfig.learning_rate nan must be a finite number"),
    ("optimizer.learning_rate=-1e-4", "must be ≥ 0"),
    ("run.checkpoint_every=0", "run.checkpoint_every 0"),
    ("optimizer.state_memory=disk", "unknown optimizer state_memory 'disk'; accepted: device, host"),
])
def test_bad_training_values_are_refused_before_compiling(override, message):
    with pytest.raises(ValueError) as e:
        load_run_config(TRAIN_PRESETS, None, ["preset=tiny-i2v", override])
    assert message in str(e.value), str(e.value)


@pytest.mark.parametrize("name, text, message", [
    ("broken.yaml", "run:\n  steps: [1, 2\n", "is not valid YAML at line"),
    ("broken.json", "{\"run\": {\"steps\": 3,}}", "is not valid JSON"),
])
def test_broken_config_files_give_one_line(tmp_path, name, text, message):
    path = tmp_path / name
    path.write_text(text)
    with pytest.raises(ValueError) as e:
        load_run_config(TRAIN_PRESETS, path)
    assert f"config file {path} {message}" in str(e.value) and "\n" not in str(e.value), str(e.value)
    assert main(["train", "--config", str(path), "--output", str(tmp_path / "run")]) == 2
    assert not (tmp_path / "run").exists()
