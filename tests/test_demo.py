"""The shipped demo checkpoints: complete, small, and `m141jax generate --preset demo` makes a clip of the
right shape from text alone on CPU (text → image → video); the demo's training sources are shaped for
the demo DiTs; the quality harness' splits, text-only path and target metrics; the README's pictures."""

import dataclasses
import importlib.util
import shutil
import sys
from pathlib import Path

import imageio.v3 as iio
import jax
import numpy as np
import pytest
from PIL import Image
from scipy import ndimage

from m141jax import checkpoint, cli, components, demo, media
from m141jax.cli import generate as generate_cli
from m141jax.data import shapes
from m141jax.demo import data as demo_data
from m141jax.demo import encoders as demo_encoders
from m141jax.demo import quality, recipe
from m141jax.train import vae as vae_train

MAX_MB = 20


def test_checkpoints_are_complete_and_small():
    for name in components.LAYOUT:
        components.locate(demo.CHECKPOINTS, name)
    assert components.read_config(demo.CHECKPOINTS, "dit", "fp32").architecture() == recipe.I2V.architecture()
    assert components.read_config(demo.CHECKPOINTS, "t2i", "fp32").architecture() == recipe.T2V.architecture()
    size = sum(f.stat().st_size for f in demo.CHECKPOINTS.rglob("*") if f.is_file()) / 2 ** 20
    assert size <= MAX_MB, f"demo checkpoints take {size:.1f} MB"


@pytest.mark.slow
@pytest.mark.parametrize("seconds", [None, 4.0])
def test_generate_demo_preset(tmp_path, seconds):
    out = tmp_path / "demo.mp4"
    argv = ["generate", "--preset", "demo", "--prompt", "a blue circle moving right", "--out", str(out), "--quiet"]
    if seconds is not None:  # 33 frames at 8 fps: two clips of the sliding window
        argv += ["--seconds", str(seconds)]
    assert cli.main(argv) == 0
    video = np.stack(list(iio.imiter(out)))
    frames = 17 if seconds is None else 33
    assert video.shape == (frames, 32, 32, 3)
    assert video.std() > 5  # not a blank clip


def test_sources_fit_the_demo_models():
    vae = components.load_component(demo.CHECKPOINTS, "vae", "fp32")
    videos, captions = quality.eval_clips(1)
    prepared = demo_data.prepare(vae, demo_encoders.load(demo.CHECKPOINTS), videos[:2], captions[:2], progress=False)
    c, text = recipe.LATENT, demo_encoders.TEXT_LENGTH
    i2v, t2i = demo_data.i2v_source(prepared), demo_data.t2v_source(prepared, 1.0, image=True)
    assert len(i2v) == len(t2i) == 2
    assert {k: v.shape for k, v in i2v[1].items()} == {
        "latents": (5, 8, 8, c), "ref_latents": (1, 8, 8, c), "text_states": (recipe.N_IMAGE_TOKENS + text, 64),
        "text_mask": (recipe.N_IMAGE_TOKENS + text,), "text_states_2": (32,)}
    assert t2i[0]["latents"].shape == (1, 8, 8, c) and t2i[0]["text_states"].shape == (text, 64)
    assert float(t2i[0]["guidance"]) == 1000.0
    assert i2v.null()["text_states"].shape == (text, 64)


def test_shipped_vae_posterior_noise_is_a_few_percent_of_the_latents_spread():
    """Why the decoder meets a DiT's latent errors unprepared (`m141jax.train.vae.noised_latents`): the
    small KL leaves the posterior's std at under 5 % of the latents' per-channel std."""
    vae = components.load_component(demo.CHECKPOINTS, "vae", "fp32")
    videos, _ = quality.eval_clips(1)
    _, logvar = vae_train.posterior(vae.params, vae.cfg, media.to_signed(videos[:4]))
    ratio = np.exp(0.5 * np.asarray(logvar)).reshape(-1, recipe.LATENT).mean(0) / np.asarray(vae.cfg.latents_std)
    assert 0 < ratio.max() < 0.05, ratio


@pytest.mark.slow
def test_shipped_student_follows_the_caption():
    """The shipped 4-step student on 16 held-out clips (true first frame + never-seen caption) keeps the
    colour, moves the object the caption's way (chance: 1/4) and keeps it the same object; measured on
    these 16: colour, direction and consistency 1.00, score 0.94 (n=96, benchmarks/demo_quality.py: 1.00,
    1.00, 1.00, 0.92; earlier models of 0.70 failed this test)."""
    vae = components.load_component(demo.CHECKPOINTS, "vae", "fp32")
    student = components.load_component(demo.CHECKPOINTS, "dit", "fp32")
    videos, captions = quality.eval_clips(2)
    prepared = demo_data.prepare(vae, demo_encoders.load(demo.CHECKPOINTS), videos, captions, progress=False)
    clips = quality.generate(student.cfg, student.params, vae, prepared, 4)
    acc = quality.accuracies(clips, captions)
    assert acc["colour"] >= 0.9 and acc["direction"] >= 0.9 and acc["consistent"] >= 0.8, acc
    assert quality.score(clips, captions) >= 0.75


@pytest.mark.slow
def test_shipped_text_to_image_draws_the_caption():
    """The shipped text-to-image DiT on the 16 held-out captions draws one object of the caption's colour
    well above chance (colour: 1/4), with generate's CFG; measured on these 16: colour 1.00, single 1.00
    (n=96, benchmarks/demo_quality.py: 1.00, 0.97). The true first frames score 1 on every attribute, and 0
    on colour with the colours swapped in their captions."""
    vae = components.load_component(demo.CHECKPOINTS, "vae", "fp32")
    t2i = components.load_component(demo.CHECKPOINTS, "t2i", "fp32")
    videos, captions = quality.eval_clips(2)
    truth = quality.image_accuracies(videos[:, 0], captions)
    assert truth == {"colour": 1.0, "shape": 1.0, "single": 1.0}, truth
    swap = {"red": "blue", "blue": "red", "green": "yellow", "yellow": "green"}
    swapped = [" ".join(swap.get(w, w) for w in c.split()) for c in captions]
    assert quality.image_accuracies(videos[:, 0], swapped)["colour"] == 0.0
    prepared = demo_data.prepare(vae, demo_encoders.load(demo.CHECKPOINTS), videos, captions, progress=False)
    acc = quality.image_accuracies(quality.text_to_image(t2i.cfg, t2i.params, vae, prepared), captions)
    assert acc["colour"] >= 0.8 and acc["single"] >= 0.85, acc


def test_train_flow_returns_the_parameters_ema():
    """`recipe.train_flow(ema_decay=d)` returns the EMA, not the last parameters: after two steps (the first at
    the warm-up's learning rate 0, so it leaves the initialisation p₀ unchanged) d·p₀ + (1 − d)·p₂."""
    model = dataclasses.replace(recipe.T2V, hidden_size=16, num_heads=2, double_blocks=1, single_blocks=1,
                                rope_axes=(2, 2, 4))
    rng, n, length = np.random.default_rng(0), 4, 3
    text = {"text_states": rng.normal(size=(n, length, model.text_dim)).astype(np.float32),
            "text_mask": np.ones((n, length), np.int32),
            "text_states_2": rng.normal(size=(n, model.pooled_dim)).astype(np.float32)}
    source = demo_data.ArraySource({"latents": rng.normal(size=(n, 1, 4, 4, recipe.LATENT)).astype(np.float32),
                                    "guidance": np.full((n,), 1000.0, np.float32), **text},
                                   {k: v[0] for k, v in text.items()})
    train = lambda d: recipe.train_flow(model, source, 2, 0, batch=2, progress=False, ema_decay=d)  # noqa: E731
    last, ema, d = train(0.0), train(0.9), 0.9
    start = recipe.dit_lib.init_params(model, jax.random.PRNGKey(0))
    moved = [float(np.abs(a - b).max()) for a, b in zip(jax.tree.leaves(last), jax.tree.leaves(start))]
    assert max(moved) > 1e-6  # the second step moved the parameters
    for e, p0, p2 in zip(jax.tree.leaves(ema), jax.tree.leaves(start), jax.tree.leaves(last)):
        np.testing.assert_allclose(e, d * np.asarray(p0) + (1 - d) * np.asarray(p2), rtol=1e-5, atol=1e-6)


def test_paired_gap_is_clear_only_for_a_real_difference():
    rng = np.random.default_rng(0)
    b = rng.uniform(0, 1, 200)
    gap, lo, hi = quality.paired_gap(b + 0.05 + rng.normal(0, 0.02, 200), b)
    assert abs(gap - 0.05) < 0.01 and 0 < lo < gap < hi
    gap, lo, hi = quality.paired_gap(b, rng.permutation(b))  # same scores, pairing lost: no gap
    assert lo < 0 < hi
    with pytest.raises(ValueError, match="aligned"):
        quality.paired_gap(b, b[:10])


def test_split_clips():
    dev, dev_captions = quality.split_clips("dev", "held_out", 1)
    final, final_captions = quality.split_clips("final", "held_out", 1)
    assert dev.shape == final.shape == (len(shapes.HELD_OUT), 17, 32, 32, 3) and dev.dtype == np.uint8
    assert dev_captions == final_captions == [shapes.caption(*c) for c in shapes.combinations("eval")]
    assert all((d != f).any() for d, f in zip(dev, final))  # other scenes of the same captions
    assert np.array_equal(quality.eval_clips(1)[0], dev)  # the harness' historical clips are dev's
    train, train_captions = quality.split_clips("dev", "training", 1)
    assert len(train) == 40 and {shapes.parse_caption(c) for c in train_captions} == set(shapes.combinations("train"))
    seen = shapes.ShapesDataset(40, "train", seed=0)  # the demo's training clips
    assert all((train[i] != seen[i][0]).any() for i in range(40))
    final_train, _ = quality.split_clips("final", "training", 1)
    assert all((t != f).any() for t, f in zip(train, final_train))
    assert quality.SPLITS["dev"] == quality.EVAL_SEED and len(set(quality.SPLITS.values())) == len(quality.SPLITS)
    assert len(set(quality.NOISE_SEEDS.values())) == len(quality.NOISE_SEEDS)
    with pytest.raises(ValueError, match="unknown split"):
        quality.split_clips("test", "held_out", 1)


def test_generate_settings_are_the_demo_presets():
    args = cli.build_parser().parse_args(["generate", "--preset", "demo", "--prompt", "a red circle moving up"])
    generate_cli.apply_preset(args)
    assert quality.generate_settings() == generate_cli.settings_from(args)


def test_metrics_of_true_and_degraded_clips():
    videos, captions = quality.split_clips("dev", "held_out", 1)
    truth = quality.metrics(videos, captions, videos)
    plain = truth.pop("background")
    assert truth == {"colour": 1.0, "direction": 1.0, "shape": 1.0, "single_all_frames": 1.0, "consistent": 1.0,
                     "edge_ratio": 1.0} and plain < 1.0, (truth, plain)
    blurred = np.clip(np.round(ndimage.gaussian_filter(videos.astype(np.float32), (0, 0, 1.5, 1.5, 0), mode="wrap")),
                      0, 255).astype(np.uint8)
    assert quality.metrics(blurred, captions, videos)["edge_ratio"] < 0.8
    still = np.repeat(videos[:, :1], videos.shape[1], axis=1)
    m = quality.metrics(still, captions, videos)
    assert m["direction"] == 0.0 and m["consistent"] == 0.0 and m["colour"] == 1.0, m


def test_shape_by_latent_frame_finds_where_the_shape_changes():
    videos, captions = quality.split_clips("dev", "held_out", 2)
    truth = quality.shape_by_latent_frame(videos, captions)
    assert len(truth) == 5 and min(truth) >= 0.9, truth  # 17 frames: frame 0, then 4 latent frames of 4
    shape = [shapes.parse_caption(c)[1] for c in captions]
    other = [next(j for j in range(len(shape)) if shape[j] != shape[i]) for i in range(len(shape))]
    changed = videos.copy()
    changed[:, 5:] = videos[other, 5:]  # from latent frame 2 on, another clip's object of another shape
    by_frame = quality.shape_by_latent_frame(changed, captions)
    assert by_frame[:2] == truth[:2] and max(by_frame[2:]) <= 0.1, by_frame
    with pytest.raises(ValueError, match="captions"):
        quality.shape_by_latent_frame(videos, captions[:1])


@pytest.mark.slow
def test_text_to_video_on_the_shipped_checkpoints():
    """Two captions through `m141jax generate --preset demo`'s text-only path (T2I first frame, 4-step
    student); the target metrics against true clips of the same captions are fractions, and the edge
    ratio is positive (the shipped models' edges are blurrier than the dataset's: below 1)."""
    truth, captions = quality.split_clips("dev", "held_out", 1)
    truth, captions = truth[:2], captions[:2]
    videos = quality.text_to_video(quality.load_models(), captions, batch=2)
    assert videos.shape == (2, 17, 32, 32, 3) and videos.dtype == np.uint8
    assert videos.std() > 5  # not blank
    m = quality.metrics(videos, captions, truth)
    assert m.pop("background") >= 0.0
    assert set(m) == {"colour", "direction", "shape", "single_all_frames", "consistent", "edge_ratio"}
    assert all(0.0 <= v <= 1.0 for v in m.values()) and m["edge_ratio"] > 0, m


def load_script(path: Path):
    """A script of the repository (tools/, benchmarks/) imported as a module."""
    spec = importlib.util.spec_from_file_location(path.stem, path)
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


@pytest.mark.slow
def test_demo_media_writes_the_readme_pictures(tmp_path, monkeypatch):
    tool = load_script(Path(__file__).parents[1] / "tools" / "demo_media.py")
    monkeypatch.setattr(sys, "argv", ["demo_media.py", "--out", str(tmp_path)])
    assert tool.main() == 0
    side = 32 * tool.SCALE
    for name in ("demo_still.png", "demo_still_image.png"):
        still = np.asarray(Image.open(tmp_path / name))
        assert still.shape == (side, 5 * side + 4 * 2, 3) and still.std() > 5, name
    gif = Image.open(tmp_path / "demo.gif")
    assert gif.n_frames == 17 and gif.size == (len(tool.PREVIEW) * side, side)
    frames = []
    for i in (0, 16):
        gif.seek(i)
        frames.append(np.asarray(gif.convert("RGB"), np.float32))
    assert np.abs(frames[0] - frames[1]).mean() > 1  # the objects move


def test_compare_checkpoints_tells_same_models_from_different_ones(tmp_path, capsys):
    """tools/compare_checkpoints.py: a fresh save of the same arrays (other Orbax files) is identical, another
    model of the same architecture in its place is not, a tokenizer file changed by one byte is not."""
    tool = load_script(Path(__file__).parents[1] / "tools" / "compare_checkpoints.py")
    copy = tmp_path / "copy"
    student = demo.CHECKPOINTS / "dit"
    for name in ("dit", "teacher"):  # the student saved again under teacher/: same architecture, other values
        checkpoint.save(copy / name, "dit", checkpoint.read_meta(student)["config"], checkpoint.load_params(student))
    shutil.copytree(demo.CHECKPOINTS / "tokenizer", copy / "tokenizer")
    assert tool.main([str(demo.CHECKPOINTS), str(copy), "dit", "tokenizer"]) == 0
    assert tool.main([str(demo.CHECKPOINTS), str(copy), "teacher"]) == 1
    vocab = copy / "tokenizer" / "tokenizer.json"
    vocab.write_bytes(vocab.read_bytes() + b" ")
    assert tool.main([str(demo.CHECKPOINTS), str(copy)]) == 1
    out = [x for x in capsys.readouterr().out.splitlines() if x.startswith("RESULT ")]
    assert out == ["RESULT compare_checkpoints dit=identical tokenizer=identical",
                   "RESULT compare_checkpoints teacher=different",
                   "RESULT compare_checkpoints dit=identical teacher=different tokenizer=different"]
    assert tool.main([str(demo.CHECKPOINTS), str(copy), "vae"]) == 2  # not in both


def test_shape_by_caption_reads_the_fill_ratio_per_shape():
    videos, captions = quality.split_clips("dev", "held_out", 2)
    truth = quality.shape_by_caption(videos, captions)
    assert (truth["circle"], truth["square"], truth["triangle"]) == (1.0, 1.0, 1.0), truth
    assert truth["fill_triangle"] < 0.65 <= truth["fill_circle"] < 0.88 <= truth["fill_square"], truth
    disc = {"square": "circle", "triangle": "circle", "circle": "square"}  # every caption names another shape
    wrong = [c.replace(s, disc[s]) for c in captions for s in [shapes.parse_caption(c)[1]]]
    swapped = quality.shape_by_caption(videos, wrong)
    assert swapped["circle"] == swapped["square"] == 0.0 and np.isnan(swapped["triangle"]), swapped  # no triangles
    # a blur rounds the square's corners and blunts the triangle's: their fill ratios move towards the circle's
    # (σ = 2.5 px: at 1.5 the dataset's 13–16-px squares keep a fill of 0.98)
    blurred = np.clip(np.round(ndimage.gaussian_filter(videos.astype(np.float32), (0, 0, 2.5, 2.5, 0), mode="wrap")),
                      0, 255).astype(np.uint8)
    soft = quality.shape_by_caption(blurred, captions)
    assert soft["fill_square"] < truth["fill_square"] - 0.03 and soft["fill_triangle"] > truth["fill_triangle"] + 0.03


def test_edge_bleed_of_clips():
    videos, _ = quality.split_clips("dev", "held_out", 1)
    outside, inside = quality.edge_bleed(videos, videos)
    assert outside < 0.25 and inside > 0.75, (outside, inside)


@pytest.mark.slow
def test_demo_vae_scores_a_checkpoint_folder_without_training(monkeypatch, capsys):
    """`benchmarks/demo_vae.py --checkpoints` scores the shipped VAE's reconstructions: plain fractions, an
    edge ratio below 1 (its edges are softer than the dataset's) and a background off the plain colour."""
    bench = Path(__file__).parents[1] / "benchmarks"
    monkeypatch.syspath_prepend(str(bench))  # its `common` module
    tool = load_script(bench / "demo_vae.py")
    monkeypatch.setattr(sys, "argv", ["demo_vae.py", "--checkpoints", str(demo.CHECKPOINTS), "--per-combination", "1"])
    assert tool.main() == 0
    line = next(x for x in capsys.readouterr().out.splitlines() if x.startswith("RESULT demo_vae_checkpoint"))
    m = {k: float(v) for k, v in (kv.split("=") for kv in line.split()[2:])}
    assert m["n"] == 48 and m["colour"] == 1.0 and 0.0 <= m["shape"] <= 1.0, m
    assert 0.3 < m["edge_ratio"] < 1.0 and m["background"] > 1.0, m
    assert m["bleed_outside"] > 0.25 and m["bleed_inside"] < 0.85 and m["circle"] == 1.0, m  # softer than the truth


def test_demo_vae_radius_is_for_a_checkpoint_folder(monkeypatch, capsys):
    """`benchmarks/demo_vae.py --radius` probes a checkpoint folder's VAE on clips of another object size; a
    VAE it would train learns the dataset's sizes, so it is refused without `--checkpoints`, in one line, as
    is a range that is not LOW,HIGH."""
    bench = Path(__file__).parents[1] / "benchmarks"
    monkeypatch.syspath_prepend(str(bench))
    tool = load_script(bench / "demo_vae.py")
    for argv, message in ((["--radius", "5,7"], "scores a checkpoint folder's VAE"), (["--radius", "5"], "is not LOW,HIGH")):
        monkeypatch.setattr(sys, "argv", ["demo_vae.py", *argv])
        with pytest.raises(SystemExit) as exit_info:
            tool.main()
        assert exit_info.value.code == 2 and message in capsys.readouterr().err


@pytest.mark.slow
def test_demo_dit_trains_and_scores_a_stage(monkeypatch, capsys):
    """`benchmarks/demo_dit.py`: a teacher trained a few steps at width 32 on the shipped VAE's latents is
    scored on the dev clips, on its own training clips and per latent frame; `--steps 0` scores the shipped
    text-to-image DiT (one object of the caption's colour, as in the README's harness) and the shipped
    student; a student is distilled a few steps from the shipped teacher."""
    bench = Path(__file__).parents[1] / "benchmarks"
    monkeypatch.syspath_prepend(str(bench))  # its `common` module
    tool = load_script(bench / "demo_dit.py")

    def run(*argv) -> dict[str, dict[str, str]]:
        monkeypatch.setattr(sys, "argv", ["demo_dit.py", "--per-combination", "1", "--training-per-combination", "1", *argv])
        assert tool.main() == 0
        lines = [x.split() for x in capsys.readouterr().out.splitlines() if x.startswith("RESULT ")]
        return {" ".join([x[1]] + [kv for kv in x[2:] if kv.startswith("clips=")]): dict(kv.split("=", 1) for kv in x[2:])
                for x in lines}

    out = run("--stage", "teacher", "--steps", "3", "--videos", "16", "--fit-clips", "4", "--set", "hidden_size=32",
              "--set", "num_heads=2", "--sigma-sampling", "uniform")
    dev, fit = out["demo_dit"], out["demo_dit_fit"]
    assert (dev["steps"], dev["config"], dev["sigma_sampling"], dev["n"], fit["n"]) == (
        "3", "hidden_size=32,num_heads=2", "uniform", "48", "4"), out
    assert float(dev["train_s"]) > 0 and 0.0 <= float(dev["shape"]) <= 1.0 and float(dev["edge_ratio"]) > 0, dev
    for clips in ("dev", "fit"):
        by_frame = out[f"demo_dit_shape_by_latent_frame clips={clips}"]
        assert [k for k in by_frame if k.startswith("f")] == ["f0", "f1", "f2", "f3", "f4"], by_frame
    t2i = run("--stage", "t2i", "--steps", "0")["demo_dit"]
    assert t2i["n"] == "48" and float(t2i["colour"]) >= 0.9 and float(t2i["single"]) >= 0.8, t2i
    with pytest.raises(SystemExit, match="needs training"):
        run("--stage", "t2i", "--steps", "0", "--set", "hidden_size=32")
    # the student: the shipped one (`dit/`) in 4 steps without CFG, then one distilled a few DMD2 steps
    student = run("--stage", "student", "--steps", "0", "--fit-clips", "4")
    shipped = student["demo_dit"]
    assert (shipped["guidance"], shipped["n"], student["demo_dit_fit"]["n"]) == ("1", "48", "4"), student
    assert float(shipped["colour"]) >= 0.9 and float(shipped["consistent"]) >= 0.9, shipped
    distilled = run("--stage", "student", "--steps", "2", "--videos", "16", "--fit-clips", "4", "--lr", "2e-4")["demo_dit"]
    assert (distilled["steps"], distilled["lr"]) == ("2", "0.0002") and float(distilled["train_s"]) > 0, distilled
    with pytest.raises(SystemExit, match="flow-matching stages"):
        run("--stage", "student", "--steps", "2", "--set", "hidden_size=32")


@pytest.mark.slow
def test_train_demo_reuses_an_earlier_vae_and_teacher(tmp_path, monkeypatch, capsys):
    """`tools/train_demo.py --vae-from DIR`: the later stages train (a few steps here) on DIR's VAE, which
    lands in the new folder unchanged, as do the deterministic encoders; with `--teacher-from DIR` the
    teacher does too and the student is distilled from it; a folder without a VAE or teacher is refused
    in one line before anything is written."""
    root = Path(__file__).parents[1] / "tools"
    tool, compare = load_script(root / "train_demo.py"), load_script(root / "compare_checkpoints.py")
    out = tmp_path / "checkpoints"

    def run(*argv):
        monkeypatch.setattr(sys, "argv", ["train_demo.py", "--out", str(out), "--videos", "16", "--t2i-steps", "2",
                                          "--teacher-steps", "2", "--distill-steps", "2", "--quiet", *argv])
        return tool.main()

    assert run("--vae-from", str(demo.CHECKPOINTS)) == 0
    line = next(x for x in capsys.readouterr().out.splitlines() if x.startswith("RESULT train_demo"))
    assert float(dict(kv.split("=") for kv in line.split()[2:])["vae_s"]) < 60, line
    components.load_models(out, with_t2i=True)  # a complete folder
    assert compare.main([str(demo.CHECKPOINTS), str(out), "vae", "vlm", "clip", "tokenizer", "clip_tokenizer"]) == 0
    assert compare.main([str(demo.CHECKPOINTS), str(out), "teacher"]) == 1
    assert run("--vae-from", str(demo.CHECKPOINTS), "--teacher-from", str(demo.CHECKPOINTS)) == 0
    assert compare.main([str(demo.CHECKPOINTS), str(out), "vae", "teacher"]) == 0
    assert compare.main([str(demo.CHECKPOINTS), str(out), "dit"]) == 1  # a student of 2 steps, not the shipped one
    for flag in ("--vae-from", "--teacher-from"):
        with pytest.raises(SystemExit, match=f"{flag} {tmp_path}: .* is not an m141jax checkpoint"):
            run(flag, str(tmp_path), "--out", str(tmp_path / "other"))
        assert not (tmp_path / "other").exists()
