"""`m141jax generate` end to end on tiny random models: the checkpoint folder, MP4 output, the
text-to-image stage, the sliding window, batches, and the errors for broken checkpoint folders."""

import re

import imageio.v2 as imageio
import jax
import numpy as np
import pytest
from fixtures import TINY_I2V, save_random, write_gradient_image
from PIL import Image

from m141jax import checkpoint, components, encoders, media, pipeline
from m141jax.cli import main
from m141jax.models import dit, vae

# reading MP4s back starts ffmpeg by fork + exec, which JAX warns about needlessly
pytestmark = pytest.mark.filterwarnings("ignore:os.fork")

SIZE = (64, 64)


def read_video(path):
    with imageio.get_reader(path, format="FFMPEG") as r:
        return np.stack([f for f in r.iter_data()]), r.get_meta_data()["fps"]


@pytest.fixture(scope="module")
def models(ckpt):
    return components.load_models(ckpt, with_t2i=True, dtype="fp32")


@pytest.fixture(scope="module")
def image(tmp_path_factory):
    return write_gradient_image(tmp_path_factory.mktemp("img") / "first.png", 90, 120, step=2)


def _generate(ckpt, tmp_path, *argv):
    return main(["generate", "--checkpoints", str(ckpt), "--dtype", "fp32", "--size", "64x64", "--quiet", *argv])


def test_image_to_video_mp4(ckpt, image, tmp_path, capsys):
    out = tmp_path / "cat.mp4"
    assert _generate(ckpt, tmp_path, "--prompt", "a cat walks on the grass", "--image", str(image), "--frames", "9",
                     "--out", str(out)) == 0
    video, fps = read_video(out)
    assert video.shape == (9, 64, 64, 3) and fps == 24
    err = capsys.readouterr().err
    assert re.search(r"sampling\s+\d", err) and re.search(r"decode\s+\d", err) and "total" in err


class Spy:
    """Records every clip (its first frames, VLM images, output) and every frame appended to a writer."""

    def __init__(self, monkeypatch, fail_at=None):
        self.clips, self.written, self.t2i = [], [], []
        clip_fn, t2i_fn, append = pipeline.image_to_video, pipeline.text_to_image, media.VideoWriter.append

        def image_to_video(models, prompts, frames, vlm_images, n, keys, k, *a):
            if k == fail_at:
                raise RuntimeError("out of memory")
            out = clip_fn(models, prompts, frames, vlm_images, n, keys, k, *a)
            self.clips.append((np.array(frames), [np.asarray(i) for i in vlm_images], out))
            return out

        def text_to_image(*a):
            self.t2i.append(t2i_fn(*a))
            return self.t2i[-1]

        def record(writer, frames):
            self.written.append((writer.path.name, np.array(frames)))
            append(writer, frames)

        monkeypatch.setattr(pipeline, "image_to_video", image_to_video)
        monkeypatch.setattr(pipeline, "text_to_image", text_to_image)
        monkeypatch.setattr(media.VideoWriter, "append", record)


def test_sliding_window_chains_clips(models, tmp_path, monkeypatch):
    """Clip k+1 starts from the last decoded frame of clip k (also what its VLM sees); its first frame is
    dropped when joining; frames stream out clip by clip; the count is exact."""
    spy = Spy(monkeypatch)
    first = media.fit_image(Image.fromarray(np.full((80, 80, 3), 90, np.uint8)), SIZE)
    settings = pipeline.Settings(frames=21, clip_frames=9, size=SIZE)
    timings = pipeline.Timings()
    pipeline.generate(models, ["a red car at night"], [tmp_path / "long.mp4"], images=[first], settings=settings,
                      timings=timings, progress=False)
    assert [c[2].shape for c in spy.clips] == [(1, 9, 64, 64, 3)] * 3
    np.testing.assert_array_equal(spy.clips[0][0][0], first)
    for (_, _, prev), (frames, vlm, _) in zip(spy.clips, spy.clips[1:]):
        np.testing.assert_array_equal(frames, prev[:, -1])
        np.testing.assert_array_equal(vlm[0], prev[0, -1])
    joined = np.concatenate([spy.clips[0][2][0], spy.clips[1][2][0, 1:], spy.clips[2][2][0, 1:5]])
    assert [f.shape[0] for _, f in spy.written] == [9, 8, 4]
    np.testing.assert_array_equal(np.concatenate([f for _, f in spy.written]), joined)
    video, _ = read_video(tmp_path / "long.mp4")
    assert video.shape == (21, 64, 64, 3)
    # H.264 is lossy (and random weights draw noise): each frame read back is closest to the one written there
    dist = np.abs(video[:, None].astype(np.float32) - joined[None].astype(np.float32)).mean((2, 3, 4))
    np.testing.assert_array_equal(dist.argmin(1), np.arange(21))
    assert timings.calls["sampling"] == 3 and timings.calls["vae-encode"] == 3


@pytest.mark.slow
def test_text_to_image_then_video_batch(ckpt, tmp_path, monkeypatch):
    """Without --image the T2I DiT makes the first frames; a prompts file is one batch (one sampling call
    per clip) and writes one video per prompt."""
    spy = Spy(monkeypatch)
    templates, conditioning = [], encoders.text_conditioning
    monkeypatch.setattr(encoders, "text_conditioning",
                        lambda enc, p, template="video": templates.append(template) or conditioning(enc, p, template))
    (tmp_path / "prompts.txt").write_text("a cat walks on the grass\n# skipped\n\na red car at night\n")
    assert _generate(ckpt, tmp_path, "--prompts-file", str(tmp_path / "prompts.txt"), "--frames", "9", "--t2i-steps",
                     "2", "--t2i-template", "image", "--out", str(tmp_path / "batch.mp4")) == 0
    assert templates == ["image", "video"]  # the T2I stage, then the video stage's conditioning
    assert len(spy.t2i) == 1 and spy.t2i[0].shape == (2, 64, 64, 3)
    assert len(spy.clips) == 1 and spy.clips[0][2].shape == (2, 9, 64, 64, 3)
    np.testing.assert_array_equal(spy.clips[0][0], spy.t2i[0])  # the T2I frames are the video's references
    for i in range(2):
        video, fps = read_video(tmp_path / f"batch_{i:03d}.mp4")
        assert video.shape == (9, 64, 64, 3) and fps == 24
    assert not np.array_equal(spy.clips[0][2][0], spy.clips[0][2][1])  # two prompts, two seeds: two videos


def test_text_to_image_cfg_against_the_empty_prompt(models, monkeypatch):
    """--t2i-cfg G: CFG of the text-to-image stage against the empty prompt. After one Euler step the latent
    is x + Δσ·(v_empty + G·(v_prompt − v_empty)), affine in G; the empty prompt's own latent is the same for
    every G (its two branches agree), a real prompt's moves with G."""
    monkeypatch.setattr(pipeline, "decode_frames", lambda vae, z: z)  # the sampled latents themselves
    keys = pipeline.prompt_keys(0, 2)
    z = {g: np.asarray(pipeline.text_to_image(models, ["a cat walks on the grass", ""], SIZE, keys,
                                              pipeline.Settings(t2i_steps=1, t2i_cfg=g), pipeline.Timings()))
         for g in (1.0, 2.0, 4.0)}
    step = z[2.0] - z[1.0]
    assert np.abs(step[0]).max() > 1e-3
    np.testing.assert_allclose(z[4.0] - z[1.0], 3 * step, atol=1e-4)
    np.testing.assert_allclose(z[4.0][1], z[1.0][1], atol=1e-5)


def test_text_to_image_cfg_interval(models, monkeypatch):
    """--t2i-cfg-sigma τ (`sampling.sample(guidance_min_sigma=τ)`): the steps that start from σ ≥ τ run with
    CFG, the rest without, one path from the noise; at τ = 0 every step is guided."""
    calls, denoise = [], pipeline.sampling.denoise

    def spy(params, cfg, noise, sigmas, ref, text, neg_text, scale, g):
        out = denoise(params, cfg, noise, sigmas, ref, text, neg_text, scale, g)
        calls.append((np.asarray(sigmas).round(4).tolist(), neg_text is not None, noise, out))
        return out
    monkeypatch.setattr(pipeline.sampling, "denoise", spy)
    keys = pipeline.prompt_keys(0, 1)
    for tau in (0.5, 0.0):
        settings = pipeline.Settings(t2i_steps=4, t2i_shift=1.0, t2i_cfg=3.0, t2i_cfg_sigma=tau)
        pipeline.text_to_image(models, ["a cat"], SIZE, keys, settings, pipeline.Timings())
    assert [c[:2] for c in calls] == [([1.0, 0.75, 0.5, 0.25], True), ([0.25, 0.0], False),
                                      ([1.0, 0.75, 0.5, 0.25, 0.0], True)]
    np.testing.assert_array_equal(calls[1][2], calls[0][3])  # the unguided steps go on from the guided ones
    with pytest.raises(ValueError, match=r"t2i cfg sigma 1.5 must be in \[0, 1\]"):
        pipeline.Settings(t2i_cfg_sigma=1.5)


def test_failure_keeps_finished_clips(ckpt, image, tmp_path, monkeypatch, capsys):
    Spy(monkeypatch, fail_at=2)
    out = tmp_path / "partial.mp4"
    assert _generate(ckpt, tmp_path, "--prompt", "a cat", "--image", str(image), "--frames", "25", "--clip-frames", "9",
                     "--out", str(out)) == 1
    err = capsys.readouterr().err
    assert f"clip 3 of 3 failed (RuntimeError: out of memory); {out} holds clips 1-2 (17 frames each, playable)" in err
    video, _ = read_video(out)
    assert video.shape == (17, 64, 64, 3)
    assert [p.name for p in tmp_path.iterdir() if p.suffix == ".mp4"] == ["partial.mp4"]


def test_reference_latent_sample_or_mean(models):
    frames = np.random.default_rng(0).integers(0, 255, (2, *SIZE, 3), np.uint8)
    keys = pipeline.prompt_keys(0, 2)
    mean = pipeline.reference_latents(models.vae, frames, keys, 0, use_mean=True)
    m, logvar = vae.encode(models.vae.params, models.vae.cfg, np.asarray(frames, np.float32)[:, None] / 255 * 2 - 1)
    np.testing.assert_allclose(mean, m * models.vae.cfg.scaling_factor, rtol=1e-5, atol=1e-5)
    a, b = (pipeline.reference_latents(models.vae, frames, keys, c, use_mean=False) for c in (0, 1))
    z = (np.asarray(a) / models.vae.cfg.scaling_factor - np.asarray(m)) / np.exp(0.5 * np.asarray(logvar))
    assert abs(z.mean()) < 0.2 and abs(z.std() - 1) < 0.2  # a posterior draw: mean + σ·ε with ε ~ N(0, 1)
    assert not np.allclose(a, b)  # each clip draws anew


def _broken(ckpt, tmp_path, **swap):
    """A copy of the checkpoint folder (by links) with some entries replaced or removed (None)."""
    root = tmp_path / "broken"
    root.mkdir()
    for name in components.LAYOUT:
        target = swap.get(name, ckpt / name)
        if target is not None:
            (root / name).symlink_to(target)
    return root


@pytest.mark.parametrize("swap, message", [
    (dict(t2i=None), "t2i is missing: the text-to-image DiT"),
    (dict(clip_tokenizer=None), "clip_tokenizer is missing: the CLIP tokenizer folder"),
    (dict(vae="dit"), "vae holds a 'dit' checkpoint, not 'vae'"),
    (dict(t2i="dit"), "t2i/ must be the text-to-image DiT"),
    (dict(dit="t2i"), "dit/ must be the image-to-video DiT"),
])
def test_broken_checkpoint_folders(ckpt, tmp_path, capsys, swap, message):
    root = _broken(ckpt, tmp_path, **{k: None if v is None else ckpt / v for k, v in swap.items()})
    assert main(["generate", "--prompt", "a cat", "--checkpoints", str(root), "--size", "64x64", "--dtype", "fp32"]) == 2
    err = capsys.readouterr().err
    assert message in err and len(err.strip().splitlines()) == 1, err


def test_parameters_that_do_not_fit_the_config(ckpt, tmp_path, capsys):
    """A checkpoint whose config says one architecture and whose parameters are another's."""
    meta = checkpoint.read_meta(ckpt / "dit")
    bad = tmp_path / "bad_dit"
    params = checkpoint.load_params(ckpt / "t2i")
    checkpoint.save(bad, "dit", meta["config"], params)
    root = _broken(ckpt, tmp_path, dit=bad)
    assert main(["generate", "--prompt", "a cat", "--checkpoints", str(root), "--size", "64x64", "--dtype", "fp32"]) == 2
    err = capsys.readouterr().err
    assert f"{root / 'dit'} (the image-to-video DiT" in err and "do not match its config" in err


def test_dit_that_does_not_fit_the_encoders(ckpt, tmp_path, capsys):
    # TINY_I2V: text dims 32 / 16, the encoders give 64 / 32
    save_random(tmp_path / "small_dit", "dit", dit, TINY_I2V, 5)
    root = _broken(ckpt, tmp_path, dit=tmp_path / "small_dit")
    assert main(["generate", "--prompt", "a cat", "--checkpoints", str(root)]) == 2
    assert "dit/ takes text states of 32 and pooled states of 16, the encoders give 64 (vlm/) and 32 (clip/)" in \
        capsys.readouterr().err


def test_sharded_encoders_equal_one_device(ckpt, models, image):
    """Encoders restored on a mesh: the weights are split over its devices, the conditioning is unchanged."""
    from m141jax import parallel
    from m141jax.encoders import Encoders, encode

    mesh = parallel.make_mesh("fsdp=2,tensor=4")
    enc = Encoders.load(ckpt / "vlm", ckpt / "clip", ckpt / "tokenizer", ckpt / "clip_tokenizer", "fp32", mesh=mesh)
    split = [a for a in jax.tree.leaves(enc.params) if not a.sharding.is_fully_replicated]
    assert len(split) > len(jax.tree.leaves(enc.params)) // 2
    assert all(len(a.sharding.device_set) == 8 for a in jax.tree.leaves(enc.params))
    prompts, images = ["a cat walks on the grass", ""], [Image.open(image)] * 2
    got, want = encode(enc, prompts, images), encode(models.encoders, prompts, images)
    for name in ("text_states", "text_mask", "text_states_2"):
        np.testing.assert_allclose(np.asarray(getattr(got, name)), np.asarray(getattr(want, name)), rtol=2e-5,
                                   atol=2e-5, err_msg=name)


@pytest.mark.slow
def test_generate_on_a_mesh(ckpt, image, tmp_path, monkeypatch):
    """`generate --mesh`: the DiTs are restored sharded (sequence-parallel attention, fsdp, tensor) and
    the video equals the one-device video up to uint8 truncation of float rounding."""
    spy = Spy(monkeypatch)
    args = ["--prompt", "a cat walks on the grass", "--image", str(image), "--frames", "9"]
    assert _generate(ckpt, tmp_path, *args, "--out", str(tmp_path / "one.mp4")) == 0
    assert _generate(ckpt, tmp_path, *args, "--mesh", "fsdp=2,sequence=2,tensor=2",
                     "--out", str(tmp_path / "mesh.mp4")) == 0
    one, mesh = (np.asarray(c[2], np.int16) for c in spy.clips)
    assert np.abs(one - mesh).max() <= 1 and (one != mesh).mean() < 0.01
