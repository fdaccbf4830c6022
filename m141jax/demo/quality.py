"""The demo's quality metric: generate clips for the held-out captions and score them with the analyser
(`m141jax.data.analysis`): per attribute, the fraction of clips whose moving object has the caption's
colour, shape and direction and stays the same object; the score is the mean of these four accuracies
(`correct`, all four at once, is also reported; it is bounded by the demo VAE, whose own reconstructions
get it for 4 clips in 10, mostly for blurring the shape).

The evaluation clips are the shapes dataset's `eval` split (the 8 held-out colour-shape-direction
combinations, never seen in training); image-to-video models get each clip's true first frame, text-to-video
models the caption alone. The text-to-image stage's images (the first frames of the text-only path) are
scored on colour, shape and whether they hold exactly one object (`image_accuracies`).

The demo's targets (`metrics`) are measured over all 48 captions, on clips of a `SPLITS` seed: `dev`
(`EVAL_SEED`, the one any tuning looks at) or `final` (its own seed, for the verdict after the recipe is
fixed). `split_clips` draws a split's clips of the held-out combinations (the dataset's `eval` split)
or of the 40 training ones (the dataset's `train` split at the evaluation seed: new scenes of the
training captions; the demo trains on seed 0). `text_to_video` makes clips from captions alone, by the
path and settings of `m141jax generate --preset demo` (the T2I DiT's first frame, then the 4-step I2V
student); `metrics` scores clips against the true clips of the same captions: colour, direction,
shape, one object in every frame, temporal consistency, and the edge sharpness as a ratio to the true
clips'.
"""

from __future__ import annotations

import dataclasses

import numpy as np
from PIL import Image

from m141jax import components, demo, media, pipeline
from m141jax.components import Component
from m141jax.data import analysis, shapes
from m141jax.demo import recipe
from m141jax.demo.data import Prepared

EVAL_SEED = 1
SPLITS = {"dev": EVAL_SEED, "final": 2}  # evaluation split -> dataset seed; `final` is never used for tuning
# evaluation split -> the generators' noise seed: every split shares the 48 captions, so the text-only
# clips of `final` must come from other noise than `dev`'s (`dev`'s 0 is the harness' historical seed)
NOISE_SEEDS = {"dev": 0, "final": 1}
CAPTION_SETS = {"held_out": "eval", "training": "train"}  # caption set -> the shapes dataset's split


def split_clips(split: str, captions: str, per_combination: int,
                radius: tuple[float, float] = shapes.RADIUS) -> tuple[np.ndarray, list[str]]:
    """uint8 videos [N, F, H, W, 3] and captions of an evaluation split (`SPLITS`) for a caption set
    (`CAPTION_SETS`: the 8 held-out combinations or the 40 training ones), `per_combination` of each;
    `radius`: the objects' half-extent range (another than the dataset's only to probe a model)."""
    if split not in SPLITS or captions not in CAPTION_SETS:
        raise ValueError(f"unknown split {split!r} or caption set {captions!r}; accepted: {sorted(SPLITS)}, "
                         f"{sorted(CAPTION_SETS)}")
    if per_combination < 1:
        raise ValueError(f"per_combination {per_combination} must be ≥ 1")
    kind = CAPTION_SETS[captions]
    ds = shapes.ShapesDataset(per_combination * len(shapes.combinations(kind)), kind, seed=SPLITS[split], radius=radius)
    items = [ds[i] for i in range(len(ds))]
    return np.stack([v for v, _ in items]), [c for _, c in items]


def eval_clips(per_combination: int) -> tuple[np.ndarray, list[str]]:
    """uint8 videos [N, F, H, W, 3] and captions of the held-out split, `per_combination` of each."""
    return split_clips("dev", "held_out", per_combination)


def generate(model, params, vae: Component, prepared: Prepared, steps: int, guidance: float = 1.0,
             seed: int = 0, batch: int = 16, guidance_min_sigma: float = 0.0) -> np.ndarray:
    """uint8 clips [N, F, H, W, 3] of a DiT for the prepared conditioning: image-to-video (`model` takes
    the reference) or text-to-video (prompt only, embedded guidance recipe.T2I_GUIDANCE); CFG `guidance`
    on the steps from σ ≥ `guidance_min_sigma`."""
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
        z = recipe.sample(model, params, part, prepared.null, steps, n_image, guidance, seed + i, guidance_min_sigma)
        out.append(np.asarray(pipeline.decode_frames(vae, z)))
    return np.concatenate(out)


def text_to_image(model, params, vae: Component, prepared: Prepared, seed: int = 0,
                  guidance: float = demo.GENERATE["t2i_cfg"],
                  guidance_min_sigma: float = demo.GENERATE["t2i_cfg_sigma"]) -> np.ndarray:
    """uint8 images [N, H, W, 3] of the text-to-image DiT for the prepared captions, with the text-to-image
    settings of `m141jax generate --preset demo` (steps, shift, embedded guidance, CFG against the empty
    prompt on the steps from σ ≥ `guidance_min_sigma`); `guidance`: the CFG scale (1: none)."""
    one_frame = dataclasses.replace(prepared, latents=prepared.ref_latents)
    return generate(model, params, vae, one_frame, demo.GENERATE["t2i_steps"], guidance, seed,
                    guidance_min_sigma=guidance_min_sigma)[:, 0]


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


def generate_settings(seed: int = 0, **changes) -> pipeline.Settings:
    """The generation settings of `m141jax generate --preset demo --seed SEED` (`demo.GENERATE`), with
    `changes` to `pipeline.Settings` fields (e.g. t2i_cfg=1.0)."""
    g = demo.GENERATE
    return pipeline.Settings(**{
        "frames": g["frames"], "clip_frames": g["clip_frames"], "steps": g["steps"], "shift": g["shift"], "seed": seed,
        "size": media.parse_size(g["size"]), "fps": g["fps"], "t2i_steps": g["t2i_steps"], "t2i_shift": g["t2i_shift"],
        "t2i_guidance": g["t2i_guidance"], "t2i_cfg": g["t2i_cfg"], "t2i_cfg_sigma": g["t2i_cfg_sigma"], **changes})


def load_models(root=demo.CHECKPOINTS) -> components.Models:
    """The demo's models with the text-to-image DiT, loaded as `m141jax generate --preset demo` loads them."""
    return components.load_models(root, with_t2i=True, dtype=demo.GENERATE["dtype"],
                                  max_length=demo.GENERATE["text_length"])


def text_to_video(models: components.Models, captions: list[str], seed: int = 0, batch: int = 16,
                  **changes) -> np.ndarray:
    """uint8 clips [N, F, H, W, 3] from the captions alone, by `m141jax generate --preset demo`'s stages
    and settings (`changes`: as `generate_settings`'s): `pipeline.text_to_image`, then
    `pipeline.image_to_video` from its first frame; caption i gets the key of prompt i
    (`pipeline.prompt_keys(seed, N)`), as in a prompts file of these captions. The frames are the decoded
    ones, before MP4 encoding. Batches of `batch` (the last one padded, so one program shape is compiled)."""
    settings = generate_settings(seed, **changes)
    if len(settings.clips()) != 1:
        raise ValueError(f"the demo's settings make {len(settings.clips())} clips; this path runs one")
    n = len(captions)
    if not n:
        raise ValueError("no captions")
    keys = pipeline.prompt_keys(seed, n)
    timings, out = pipeline.Timings(), []
    for i in range(0, n, batch):
        rows = np.minimum(np.arange(i, i + batch), n - 1)  # the last batch repeats its last caption
        prompts, k = [captions[r] for r in rows], keys[rows]
        first = pipeline.text_to_image(models, prompts, settings.size, k, settings, timings)
        video = pipeline.image_to_video(models, prompts, first, [Image.fromarray(f) for f in first],
                                        settings.clip_frames, k, 0, settings, timings)
        out.append(video[:min(batch, n - i)])
    return np.concatenate(out)


def metrics(videos: np.ndarray, captions: list[str], truth: np.ndarray) -> dict[str, float]:
    """The demo's targets for clips [N, F, H, W, 3] of the captions, against the true clips `truth` of the
    same captions (the same scenes for image-to-video clips, others for text-only ones): the fractions of
    clips whose object has the caption's colour, direction and shape, that hold exactly one object in
    every frame (`single_all_frames`) and are temporally consistent; `edge_ratio`: the clips' mean edge
    sharpness over the true clips' (clips without an object left out of the mean); `background`: the
    clips' mean `analysis.background_noise` (uint8 levels; a true clip's is under 1)."""
    if not len(captions) or len(videos) != len(captions) or len(truth) != len(captions):
        raise ValueError(f"{len(captions)} captions (≥ 1) need as many clips and true clips, got {len(videos)} "
                         f"and {len(truth)}")
    judged = [analysis.judge(v, c) for v, c in zip(videos, captions)]
    out = {k: float(np.mean([j[k] for j in judged])) for k in ("colour", "direction", "shape")}
    out["single_all_frames"] = float(np.mean([analysis.one_object_in_every_frame(v) for v in videos]))
    out["consistent"] = float(np.mean([j["consistent"] for j in judged]))
    out["edge_ratio"] = edge_ratio(videos, truth)
    out["background"] = background_noise(videos)
    return out


def shape_by_latent_frame(videos: np.ndarray, captions: list[str]) -> list[float]:
    """Where a generator loses the shape: per latent frame of the causal VAE (frame 0 alone, then frames
    1–4, 5–8, …), the fraction of the clips' video frames [N, F, H, W, 3], each analysed alone, whose
    object has the caption's shape (a frame without an object counts as wrong)."""
    if not len(captions) or len(videos) != len(captions):
        raise ValueError(f"{len(captions)} captions (≥ 1) need as many clips, got {len(videos)}")
    wanted = [shapes.parse_caption(c)[1] for c in captions]
    right = np.asarray([[analysis.analyse(frame[None]).shape == shape for frame in video]
                        for video, shape in zip(videos, wanted)])
    groups = [[0]] + [list(range(f, min(f + 4, right.shape[1]))) for f in range(1, right.shape[1], 4)]
    return [float(right[:, g].mean()) for g in groups]


def shape_by_caption(videos: np.ndarray, captions: list[str]) -> dict[str, float]:
    """Which shapes a generator loses: per captioned shape, the fraction of its clips [N, F, H, W, 3] whose
    object has it, and (`fill_<shape>`) their mean fill ratio, the quantity the analyser reads the shape
    from (triangle < 0.65 ≤ circle < 0.88 ≤ square; clips without an object left out)."""
    if not len(captions) or len(videos) != len(captions):
        raise ValueError(f"{len(captions)} captions (≥ 1) need as many clips, got {len(videos)}")
    wanted = [shapes.parse_caption(c)[1] for c in captions]
    read = [analysis.analyse(v) for v in videos]
    out = {}
    for shape in shapes.SHAPES:
        mine = [a for a, w in zip(read, wanted) if w == shape]
        fills = [a.fill for a in mine if a.fill is not None]
        out[shape] = float(np.mean([a.shape == shape for a in mine])) if mine else float("nan")
        out[f"fill_{shape}"] = float(np.mean(fills)) if fills else float("nan")
    return out


def edge_bleed(videos: np.ndarray, truth: np.ndarray) -> tuple[float, float]:
    """The mean `analysis.edge_bleed` (outside, inside) of clips [N, F, H, W, 3] against their true clips."""
    return tuple(float(v) for v in np.nanmean([analysis.edge_bleed(v, t) for v, t in zip(videos, truth)], axis=0))


def background_noise(videos: np.ndarray) -> float:
    """The mean `analysis.background_noise` of clips [N, F, H, W, 3], in uint8 levels."""
    return float(np.mean([analysis.background_noise(v) for v in videos]))


def edge_sharpness(videos: np.ndarray) -> float:
    """The mean `analysis.edge_sharpness` of clips [N, F, H, W, 3], over those with an object (NaN: none)."""
    edges = np.asarray([analysis.edge_sharpness(v) for v in videos])
    return float(np.nanmean(edges)) if np.isfinite(edges).any() else float("nan")


def edge_ratio(videos: np.ndarray, truth: np.ndarray) -> float:
    """`edge_sharpness` of the clips over that of the true clips."""
    return edge_sharpness(videos) / edge_sharpness(truth)


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
