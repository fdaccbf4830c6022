"""Text → image → video (release.md A) and minute-long videos by a sliding window (release.md H).

Each stage is a function of one component's (config, params) and its inputs:

- `condition`: the encoders turn prompts (+ the first frames, for the VLM image tokens) into the
  DiT's text inputs, and the negative prompt into the unconditional branch (same image tokens).
- `text_to_image`: without a given image, the T2V DiT (`hunyuan-t2v-13b`) at one latent frame with
  embedded guidance, decoded by the VAE, makes the first frames.
- `reference_latents`: the VAE encodes the first frames (posterior sample with a seed, or the mean)
  and scales them for the DiT (`vae.scale_latents`: the VAE's scaling factor, or its per-channel statistics).
- `image_to_video`: noise from the seed, the compiled sampler with the I2V DiT, the tiled VAE decode,
  frames to uint8.

`generate` runs clips one after another. Chaining rule (the paper does not give one): clip k+1 takes
the last decoded frame of clip k (uint8, exactly as written to the file) as its first frame; it is
encoded again by the VAE and the VLM; the prompt stays; the noise comes from the seed and the clip
index; clip k+1's first decoded frame, the model's copy of that reference, is dropped when joining.
Only the reference frames are carried from clip to clip, so memory does not grow with the number of
clips, and each clip's frames are appended to the output files as soon as it is decoded.
"""

from __future__ import annotations

import contextlib
import dataclasses
import math
import signal
import threading
import time
from pathlib import Path
from typing import Callable

import jax
import jax.numpy as jnp
import numpy as np
from PIL import Image
from tqdm.auto import tqdm

from m141jax import encoders, media, sampling
from m141jax.components import Component, Models, StagedModels
from m141jax.models import vae as vae_lib

# random streams folded into each prompt's key: which draw a key is for
_NOISE, _POSTERIOR, _T2I = 0, 1, 2


@dataclasses.dataclass(frozen=True)
class Settings:
    """Generation settings; defaults are the release's (4 steps, shift 5, no CFG, 81 frames, 24 fps)."""

    frames: int = 81  # video frames in all (4k+1)
    clip_frames: int = 81  # frames per sliding-window clip (4k+1)
    steps: int = 4
    shift: float = 5.0
    guidance: float = 1.0  # CFG scale of the I2V stage (the distilled model needs none)
    seed: int = 0
    size: tuple[int, int] | None = None  # (H, W); None: the image's 540p bucket, 544x960 for text-only
    fps: int = 24
    reference_mean: bool = False  # the posterior mean instead of a sample for the reference latent
    t2i_steps: int = 50  # text-to-image stage (HunyuanVideo's sampling defaults)
    t2i_shift: float = 7.0
    t2i_guidance: float = 6.0  # embedded guidance scale
    # CFG scale of the text-to-image stage against the empty prompt (> 1 runs that branch too): for a T2I DiT
    # trained with CFG dropout; the release's is guidance-distilled (t2i_guidance) and needs none
    t2i_cfg: float = 1.0
    t2i_cfg_sigma: float = 0.0  # CFG only on the steps from σ ≥ this (a guidance interval; 0: every step)
    t2i_template: str = "video"  # HunyuanVideo prompt template of the text-to-image stage: video | image

    def __post_init__(self):
        for name in ("frames", "clip_frames"):
            n = getattr(self, name)
            if n < 1 or (n - 1) % 4:
                raise ValueError(f"{name.replace('_', ' ')} {n} must be 4k+1 (e.g. 1, 5, ..., 81, 121)")
        if self.clip_frames < 5 and self.frames > self.clip_frames:
            raise ValueError(f"clips of {self.clip_frames} frame cannot chain: a sliding window needs clips of >= 5")
        if isinstance(self.fps, bool) or not isinstance(self.fps, int) or self.fps < 1:
            raise ValueError(f"fps {self.fps} must be a positive whole number")
        for name in ("shift", "guidance", "t2i_shift", "t2i_guidance", "t2i_cfg"):
            if not math.isfinite(getattr(self, name)):
                raise ValueError(f"{name.replace('_', ' ')} {getattr(self, name)} must be a finite number")
        if not 0.0 <= self.t2i_cfg_sigma <= 1.0:
            raise ValueError(f"t2i cfg sigma {self.t2i_cfg_sigma} must be in [0, 1]")
        if self.steps < 1 or self.t2i_steps < 1:
            raise ValueError(f"steps {self.steps} and T2I steps {self.t2i_steps} must be positive")
        if self.size is not None:
            media.check_size(self.size)

    def clips(self) -> list[tuple[int, int, int]]:
        """(frames generated, first kept, end kept) per clip: one clip of `frames`, or clips of
        `clip_frames` whose first frame is dropped after the first clip, the last one cut short."""
        if self.frames <= self.clip_frames:
            return [(self.frames, 0, self.frames)]
        plan, left = [(self.clip_frames, 0, self.clip_frames)], self.frames - self.clip_frames
        while left:
            n = min(left, self.clip_frames - 1)
            plan.append((self.clip_frames, 1, 1 + n))
            left -= n
        return plan


def frames_for_seconds(seconds: float, fps: int = 24) -> int:
    """The smallest 4k+1 frame count lasting at least `seconds` at `fps`."""
    if not math.isfinite(seconds) or seconds <= 0:
        raise ValueError(f"seconds must be positive and finite, got {seconds}")
    if fps < 1:
        raise ValueError(f"fps {fps} must be a positive whole number")
    return 4 * math.ceil((math.ceil(seconds * fps - 1e-9) - 1) / 4) + 1


def latent_frames(frames: int) -> int:
    return (frames - 1) // 4 + 1


class NonFiniteError(ValueError):
    """A stage produced NaN or Inf values (a broken checkpoint or input): nothing wrong is written."""


def check_finite(stage: str, tree) -> None:
    """Raise NonFiniteError naming `stage` when a floating array of `tree` holds NaN or Inf."""
    for path, x in jax.tree_util.tree_leaves_with_path(tree):
        if hasattr(x, "dtype") and jnp.issubdtype(x.dtype, jnp.inexact) and not bool(jnp.isfinite(x).all()):
            where = jax.tree_util.keystr(path)
            raise NonFiniteError(f"the {stage} stage produced non-finite values (NaN/Inf){' in ' + where if where else ''}"
                                 f": a broken checkpoint or input; nothing was written from it")


class Timings:
    """Wall time per stage, blocking on each stage's result so asynchronous dispatch is counted; each
    stage's floating outputs are checked to be finite (`NonFiniteError` names the stage)."""

    def __init__(self):
        self.seconds: dict[str, float] = {}
        self.calls: dict[str, int] = {}
        self.bar = None  # a tqdm bar whose postfix shows the running stage

    def run(self, stage: str, fn: Callable, *args, **kwargs):
        if self.bar is not None:
            self.bar.set_postfix_str(stage)
        start = time.perf_counter()
        out = jax.block_until_ready(fn(*args, **kwargs))
        check_finite(stage, out)
        self.seconds[stage] = self.seconds.get(stage, 0.0) + time.perf_counter() - start
        self.calls[stage] = self.calls.get(stage, 0) + 1
        return out

    def summary(self) -> str:
        rows = [f"{'stage':<12} {'seconds':>9} {'calls':>6}"]
        rows += [f"{k:<12} {v:9.2f} {self.calls[k]:6d}" for k, v in self.seconds.items()]
        rows.append(f"{'total':<12} {sum(self.seconds.values()):9.2f}")
        return "\n".join(rows)


def prompt_keys(seed: int, n: int):
    """One key per prompt, so a prompt's video does not depend on the rest of its batch."""
    base = jax.random.key(seed)
    return jnp.stack([jax.random.fold_in(base, i) for i in range(n)])


def _key(key, stream: int, clip: int):
    """The key of one draw (`stream`: noise, posterior or T2I noise) for one clip of one prompt."""
    return jax.random.fold_in(jax.random.fold_in(key, stream), clip)


def noise(keys, stream: int, clip: int, shape: tuple[int, ...]):
    """Standard normal noise [B, *shape] in float32, one independent draw per prompt key."""
    return jax.vmap(lambda k: jax.random.normal(_key(k, stream, clip), shape, jnp.float32))(keys)


# ------------------------------------------------------------------------------------------- stages

def on_device(models: Models | StagedModels, name: str):
    """The component `name` (encoders, t2i, dit, vae) ready to run: staged models (--low-memory) bring its
    weights to the device and take the others' off it; resident models hold them all there already."""
    return models.stage(name) if isinstance(models, StagedModels) else getattr(models, name)


def condition(models: Models, prompts: list[str], images: list[Image.Image], guidance: float):
    """(text, neg_text) Conditionings of the prompts and first frames (VLM image tokens ‖ prompt tokens);
    neg_text, the negative prompt with the same image tokens, only when guidance > 1 (CFG)."""
    if sampling.uses_cfg(guidance):
        return encoders.encode_with_negative(on_device(models, "encoders"), prompts, images)
    return encoders.encode(on_device(models, "encoders"), prompts, images), None


def decode_frames(vae: Component, latents) -> jax.Array:
    """Scaled latents [B, f, h, w, C] -> uint8 frames [B, 4(f-1)+1, 8h, 8w, 3] (tiled decode)."""
    video = vae_lib.decode(vae.params, vae.cfg, vae_lib.unscale_latents(vae.cfg, latents), tiling=True)
    check_finite("decode", video)
    return media.to_uint8(video)


def text_to_image(models: Models, prompts: list[str], size: tuple[int, int], keys, settings: Settings,
                  timings: Timings) -> np.ndarray:
    """First frames uint8 [B, H, W, 3] from the prompts: the T2V DiT at one latent frame, conditioned on
    the prompt tokens (in `settings.t2i_template`) and CLIP vector alone (no image tokens); with
    `settings.t2i_cfg` > 1, CFG against the empty prompt in the same template on the steps from σ ≥
    `settings.t2i_cfg_sigma` (CFG at low σ sharpens noise into specks)."""
    if models.t2i is None:
        raise ValueError("no image given and no text-to-image DiT loaded: pass --image or provide a t2i/ checkpoint")
    def encode():
        enc = on_device(models, "encoders")
        text = encoders.text_conditioning(enc, prompts, settings.t2i_template)
        cfg = sampling.uses_cfg(settings.t2i_cfg)
        return text, encoders.text_conditioning(enc, [""] * len(prompts), settings.t2i_template) if cfg else None
    text, empty = timings.run("encoders", encode)
    ratio = models.vae.cfg.spatial_compression_ratio
    shape = (1, size[0] // ratio, size[1] // ratio, models.t2i.cfg.out_channels)


    def run_t2i():
        t2i = on_device(models, "t2i")
        return sampling.sample(t2i.params, t2i.cfg, noise(keys, _T2I, 0, shape), text,
                               sigmas=sampling.schedule(settings.t2i_steps, settings.t2i_shift), neg_text=empty,
                               guidance_scale=settings.t2i_cfg, guidance_min_sigma=settings.t2i_cfg_sigma,
                               embedded_guidance=settings.t2i_guidance, mesh=t2i.mesh)
    z = timings.run("t2i", run_t2i)
    return np.asarray(timings.run("decode", lambda: decode_frames(on_device(models, "vae"), z)))[:, 0]


def reference_latents(vae: Component, frames, keys, clip: int, use_mean: bool) -> jax.Array:
    """The scaled reference latent [B, 1, h, w, C] of first frames uint8 [B, H, W, 3] (release.md A.3 step 3)."""
    video = jnp.asarray(media.to_signed(frames))[:, None]
    mean, logvar = vae_lib.encode(vae.params, vae.cfg, video, tiling=True)
    if not use_mean:
        draw = lambda m, lv, k: vae_lib.sample_posterior(m, lv, _key(k, _POSTERIOR, clip))
        mean = jax.vmap(draw)(mean, logvar, keys)
    return vae_lib.scale_latents(vae.cfg, mean)


def image_to_video(models: Models, prompts: list[str], frames: np.ndarray, vlm_images: list[Image.Image], n_frames: int,
                   keys, clip: int, settings: Settings, timings: Timings) -> np.ndarray:
    """One clip: uint8 video [B, n_frames, H, W, 3] whose first frames are `frames` uint8 [B, H, W, 3]
    (vlm_images: what the VLM sees of them: the unfitted image for a user's image, as in the release)."""
    text, neg = timings.run("encoders", condition, models, prompts, vlm_images, settings.guidance)
    ref = timings.run("vae-encode", lambda: reference_latents(on_device(models, "vae"), frames, keys, clip,
                                                              settings.reference_mean))
    shape = (latent_frames(n_frames), *ref.shape[2:4], models.dit.cfg.out_channels)

    def run_dit():
        dit = on_device(models, "dit")
        return sampling.sample(dit.params, dit.cfg, noise(keys, _NOISE, clip, shape), text,
                               sigmas=sampling.schedule(settings.steps, settings.shift), ref_latents=ref, neg_text=neg,
                               guidance_scale=settings.guidance, mesh=dit.mesh)
    z = timings.run("sampling", run_dit)
    return np.asarray(timings.run("decode", lambda: decode_frames(on_device(models, "vae"), z)))


# ------------------------------------------------------------------------------------------- driver

def _append(writers: list[media.VideoWriter], videos: np.ndarray) -> None:
    for writer, frames in zip(writers, videos):
        writer.append(frames)


class ClipError(RuntimeError):
    """A clip failed or was interrupted; the message says which and what the output files hold.
    `signum`: the signal that interrupted it (None for a failure); `exit_code`: 128 + signum, or 1."""

    def __init__(self, message: str, signum: int | None = None):
        super().__init__(message)
        self.signum = signum

    @property
    def exit_code(self) -> int:
        return 1 if self.signum is None else 128 + self.signum


class Interrupted(BaseException):
    """SIGINT or SIGTERM arrived inside `interruptible()` (a BaseException, as KeyboardInterrupt is, so
    no `except Exception` swallows it)."""

    def __init__(self, signum: int):
        super().__init__(f"interrupted by {signal.Signals(signum).name}")
        self.signum = signum

    @property
    def exit_code(self) -> int:
        return 128 + self.signum


_SIGNALS = (signal.SIGINT, signal.SIGTERM)
_deferred = {"depth": 0, "pending": None}


def _on_signal(signum, frame):
    if _deferred["depth"]:
        _deferred["pending"] = signum
        return
    raise Interrupted(signum)


@contextlib.contextmanager
def interruptible():
    """SIGINT and SIGTERM (what `timeout`, SLURM and `docker stop` send) raise `Interrupted` in the main
    thread, except while frames are written or files finished (`_uninterrupted`): then right after. So
    `generate` ends the files with the clips done. Also usable as a decorator."""
    if threading.current_thread() is not threading.main_thread():
        yield
        return
    previous = {s: signal.signal(s, _on_signal) for s in _SIGNALS}
    try:
        yield
    finally:
        for s, handler in previous.items():
            signal.signal(s, handler)


@contextlib.contextmanager
def _uninterrupted():
    """Defer SIGINT / SIGTERM to the end of the block (writing frames, finishing files); the deferred
    signal is raised then unless the block is already leaving by an exception."""
    _deferred["depth"] += 1
    failed = False
    try:
        yield
    except BaseException:
        failed = True
        raise
    finally:
        _deferred["depth"] -= 1
        if not _deferred["depth"]:
            signum, _deferred["pending"] = _deferred["pending"], None
            if signum is not None and not failed:
                raise Interrupted(signum)


def _close(writers: list[media.VideoWriter]) -> None:
    with _uninterrupted():
        for writer in writers:
            writer.close()


def _held(writers: list[media.VideoWriter], done: int) -> str:
    """What the output files hold after `done` finished clips."""
    if not done:
        return "no video was written"
    return (f"{', '.join(str(w.path) for w in writers)} {'holds' if len(writers) == 1 else 'hold'} "
            f"clips 1-{done} ({writers[0].frames} frames each, playable)")


def generate(models: Models, prompts: list[str], outputs: list[str | Path], images: list[np.ndarray] | None = None,
             vlm_images: list[Image.Image] | None = None, settings: Settings = Settings(),
             timings: Timings | None = None, progress: bool = True, keys=None) -> list[Path]:
    """Write one MP4 per prompt (`outputs`), `settings.frames` frames each, by clips of `settings.clip_frames`.

    images: one first frame per prompt (uint8 [H, W, 3], already fitted by `media.fit_image`), or None
    to make them with the text-to-image stage; vlm_images: what the VLM sees of them in the first clip
    (the release gives it the original image file; default: images). All prompts run as one batch.
    A clip that fails, or an `Interrupted` (inside `interruptible()`), raises `ClipError` after the
    files are finished with the clips done.
    keys: one PRNG key per prompt (default: `prompt_keys(settings.seed, len(prompts))`).
    """
    if not prompts or len(outputs) != len(prompts):
        raise ValueError(f"{len(prompts)} prompts need as many outputs, got {len(outputs)}")
    if images is not None and len(images) != len(prompts):
        raise ValueError(f"{len(prompts)} prompts need as many images, got {len(images)}")
    timings = timings if timings is not None else Timings()
    keys = prompt_keys(settings.seed, len(prompts)) if keys is None else keys
    plan = settings.clips()
    with contextlib.ExitStack() as stack:
        bar = stack.enter_context(tqdm(total=len(plan) + (images is None), desc="video", unit="stage", disable=not progress))
        timings.bar = bar
        stack.callback(setattr, timings, "bar", None)
        if images is None:
            refs = text_to_image(models, prompts, settings.size or media.DEFAULT_SIZE, keys, settings, timings)
            bar.update()
        else:
            if len({im.shape for im in images}) != 1:
                sizes = sorted({im.shape for im in images})
                raise ValueError(f"the first frames of a batch must share one size, got {sizes}")
            refs = np.stack(images)
            media.check_size(refs.shape[1:3])
        vlm = [Image.fromarray(f) for f in refs] if vlm_images is None else vlm_images
        writers = [media.VideoWriter(p, settings.fps) for p in outputs]
        stack.callback(_close, writers)
        done = 0
        for k, (n, first, end) in enumerate(plan):
            bar.set_description(f"clip {k + 1}/{len(plan)}")
            try:
                video = image_to_video(models, prompts, refs, vlm, n, keys, k, settings, timings)
                with _uninterrupted():
                    timings.run("write", _append, writers, video[:, first:end])
                    done += 1
                refs = video[:, -1]
                vlm = [Image.fromarray(f) for f in refs]
                del video
                bar.update()
            except Interrupted as e:
                raise ClipError(f"clip {k + 1} of {len(plan)} {e}; {_held(writers, done)}", e.signum) from None
            except Exception as e:
                raise ClipError(f"clip {k + 1} of {len(plan)} failed ({type(e).__name__}: {e}); "
                                f"{_held(writers, done)}") from e
    return [w.path for w in writers]
