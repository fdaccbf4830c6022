"""The demo's quality metric: generate clips for the held-out captions and score them with the analyser
(`m141jax.data.analysis`): per attribute, the fraction of clips whose moving object has the caption's
colour, shape and direction and stays the same object; the score is the mean of these four accuracies
(`correct`, all four at once, is also reported; it is bounded by the demo VAE, whose own reconstructions
get it for 4 clips in 10, mostly for blurring the shape).

The evaluation clips are the shapes dataset's `eval` split (the 8 held-out colour-shape-direction
combinations, never seen in training); image-to-video models get each clip's true first frame, text-to-video
models the caption alone. The text-to-image stage's images (the first frames of the text-only path) are
scored on colour, shape and whether they hold exactly one object (`image_accuracies`).
"""

from __future__ import annotations

import dataclasses

import numpy as np

from m141jax import demo, pipeline
from m141jax.components import Component
from m141jax.data import analysis, shapes
from m141jax.demo import recipe
from m141jax.demo.data import Prepared

EVAL_SEED = 1


def eval_clips(per_combination: int) -> tuple[np.ndarray, list[str]]:
    """uint8 videos [N, F, H, W, 3] and captions of the held-out split, `per_combination` of each."""
    ds = shapes.ShapesDataset(per_combination * len(shapes.HELD_OUT), "eval", seed=EVAL_SEED)
    items = [ds[i] for i in range(len(ds))]
    return np.stack([v for v, _ in items]), [c for _, c in items]


def generate(model, params, vae: Component, prepared: Prepared, steps: int, guidance: float = 1.0,
             seed: int = 0, batch: int = 16) -> np.ndarray:
    """uint8 clips [N, F, H, W, 3] of a DiT for the prepared conditioning: image-to-video (`model` takes
    the reference) or text-to-video (prompt only, embedded guidance recipe.T2I_GUIDANCE)."""
    n = len(prepared.latents)
    if model.image_conditioned:
        cond, n_image = {"latents": prepared.latents, "ref_latents": prepared.ref_latents, **prepared.image_text}, \
            recipe.N_IMAGE_TOKENS
    else:
        cond, n_image = {"latents": prepared.latents, **prepared.text,
                         "guidance": np.full((n,), 1000.0 * recipe.T2I_GUIDANCE, np.float32)}, 0
    out = []
    for i in range(0, n, batch):
        part = {k: v[i:i + batch] for k, v in cond.items()}
        z = recipe.sample(model, params, part, prepared.null, steps, n_image, guidance, seed + i)
        out.append(np.asarray(pipeline.decode_frames(vae, z)))
    return np.concatenate(out)


def text_to_image(model, params, vae: Component, prepared: Prepared, seed: int = 0) -> np.ndarray:
    """uint8 images [N, H, W, 3] of the text-to-image DiT for the prepared captions, with the text-to-image
    settings of `m141jax generate --preset demo` (steps, shift, embedded guidance)."""
    one_frame = dataclasses.replace(prepared, latents=prepared.ref_latents)
    return generate(model, params, vae, one_frame, demo.GENERATE["t2i_steps"], seed=seed)[:, 0]


def image_accuracies(images: np.ndarray, captions: list[str]) -> dict[str, float]:
    """The fraction of images [N, H, W, 3] whose object has the caption's colour and shape, and of those
    holding exactly one object (`single`)."""
    if len(images) != len(captions) or not len(captions):
        raise ValueError(f"{len(images)} images need as many captions (≥ 1), got {len(captions)}")
    hits = {"colour": [], "shape": [], "single": []}
    for image, caption in zip(images, captions):
        colour, shape, _ = shapes.parse_caption(caption)
        a = analysis.analyse(np.asarray(image)[None])
        hits["colour"].append(a.colour == colour)
        hits["shape"].append(a.shape == shape)
        hits["single"].append(analysis.count_objects(image) == 1)
    return {k: float(np.mean(v)) for k, v in hits.items()}


def accuracies(videos: np.ndarray, captions: list[str]) -> dict[str, float]:
    """Per attribute (and `correct`: all of them), the fraction of clips the analyser finds right."""
    return analysis.accuracy(list(videos), captions)


def clip_scores(videos: np.ndarray, captions: list[str]) -> np.ndarray:
    """Per clip, the fraction of the four attributes the analyser finds right; `score` is their mean."""
    judged = [analysis.judge(v, c) for v, c in zip(videos, captions)]
    return np.asarray([np.mean([j[k] for k in analysis.ATTRIBUTES]) for j in judged])


def score(videos: np.ndarray, captions: list[str]) -> float:
    """The mean of the four attribute accuracies (colour, shape, direction, consistent)."""
    return float(clip_scores(videos, captions).mean())


def paired_gap(a: np.ndarray, b: np.ndarray, resamples: int = 10_000, seed: int = 0) -> tuple[float, float, float]:
    """(mean of a − b, and its 95 % paired-bootstrap interval) for two models' `clip_scores` on the same
    clips: the gap is clear when the interval excludes 0."""
    if np.ndim(a) != 1 or np.shape(a) != np.shape(b) or len(a) < 2:
        raise ValueError(f"need two aligned 1-D score arrays of ≥ 2 clips, got shapes {np.shape(a)} and {np.shape(b)}")
    d = np.asarray(a, np.float64) - np.asarray(b, np.float64)
    means = d[np.random.default_rng(seed).integers(0, len(d), (resamples, len(d)))].mean(axis=1)
    lo, hi = np.percentile(means, [2.5, 97.5])
    return float(d.mean()), float(lo), float(hi)
