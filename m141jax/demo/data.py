"""The demo's training data, held in memory: shapes videos -> VAE latents and DiT conditioning, served by
`m141jax.train.data.make_iterator` like a prepared-data directory.

Per video, as `m141jax prepare-data` prepares a sample (release.md A.3): x₀ = the VAE posterior mean of the
whole clip, scaled (`vae.scale_latents`); the reference latent = the same for the first frame alone (the causal
VAE's GroupNorm sees every frame of its input, so this is not x₀'s first latent frame); the
conditioning = the VLM tokens of the first frame ‖ the caption's prompt tokens, and the CLIP vector.
Text-to-image/-video models get the prompt tokens alone (no image tokens) and the embedded-guidance
input the demo's T2I model is run with. The empty prompt goes with every batch for the CFG dropout.
"""

from __future__ import annotations

import dataclasses

import jax
import numpy as np
from PIL import Image
from tqdm.auto import tqdm

from m141jax import encoders, media, pipeline
from m141jax.components import Component
from m141jax.models import vae as vae_lib


class ArraySource:
    """A grain source over stacked arrays (sample i = row i of each) plus the empty prompt (`null`)."""

    def __init__(self, arrays: dict[str, np.ndarray], null: dict[str, np.ndarray]):
        sizes = {k: len(v) for k, v in arrays.items()}
        if len(set(sizes.values())) != 1:
            raise ValueError(f"arrays of one source must have as many rows: {sizes}")
        self.arrays, self._null = arrays, null

    def __len__(self) -> int:
        return len(next(iter(self.arrays.values())))

    def __getitem__(self, i: int) -> dict[str, np.ndarray]:
        return {k: v[i] for k, v in self.arrays.items()}

    def null(self) -> dict[str, np.ndarray]:
        return self._null

    def subset(self, rows) -> ArraySource:
        return ArraySource({k: v[rows] for k, v in self.arrays.items()}, self._null)


def _batches(n: int, size: int, desc: str, progress: bool):
    return tqdm(range(0, n, size), desc=desc, disable=not progress, leave=False)


def clean_latents(vae: Component, videos: np.ndarray, batch: int = 16, progress: bool = True) -> np.ndarray:
    """x₀ = the scaled posterior means [N, f, h, w, C] of uint8 videos [N, F, H, W, 3]."""
    out = []
    for i in _batches(len(videos), batch, "vae-encode", progress):
        x = media.to_signed(videos[i:i + batch])
        mean, _ = vae_lib.encode(vae.params, vae.cfg, x, tiling=True)
        out.append(np.asarray(vae_lib.scale_latents(vae.cfg, mean)))
    return np.concatenate(out)


def reference_latents(vae: Component, frames: np.ndarray, batch: int = 64, progress: bool = True) -> np.ndarray:
    """The scaled reference latents [N, 1, h, w, C] of first frames uint8 [N, H, W, 3] (posterior means)."""
    return np.concatenate([np.asarray(pipeline.reference_latents(vae, frames[i:i + batch], None, 0, use_mean=True))
                           for i in _batches(len(frames), batch, "reference", progress)])


def conditioning(enc: encoders.Encoders, captions: list[str], first_frames: np.ndarray | None, batch: int = 64,
                 progress: bool = True) -> dict[str, np.ndarray]:
    """text_states, text_mask, text_states_2 of each caption: with the VLM tokens of its first frame
    (uint8 [N, H, W, 3]) ahead of the prompt tokens, or the prompt tokens alone when first_frames is None."""
    parts = []
    for i in _batches(len(captions), batch, "encoders", progress):
        prompts = list(captions[i:i + batch])
        if first_frames is None:
            parts.append(encoders.text_conditioning(enc, prompts))
        else:
            parts.append(encoders.encode(enc, prompts, [Image.fromarray(f) for f in first_frames[i:i + batch]]))
    c = jax.tree.map(lambda *a: np.concatenate([np.asarray(x) for x in a]), *parts)
    return {"text_states": c.text_states.astype(np.float32), "text_mask": c.text_mask.astype(np.int32),
            "text_states_2": c.text_states_2.astype(np.float32)}


def empty_prompt(enc: encoders.Encoders) -> dict[str, np.ndarray]:
    """The empty prompt's text part (what CFG dropout substitutes): states [L, D], mask [L], pooled [D2]."""
    c = encoders.text_conditioning(enc, [""])
    return {"text_states": np.asarray(c.text_states[0], np.float32), "text_mask": np.asarray(c.text_mask[0], np.int32),
            "text_states_2": np.asarray(c.text_states_2[0], np.float32)}


@dataclasses.dataclass(frozen=True)
class Prepared:
    """A set of videos ready for the DiTs: x₀ [N, f, h, w, C], reference latents [N, 1, h, w, C], the
    image-to-video conditioning (VLM image tokens ‖ prompt), the prompt-only conditioning, the empty prompt."""

    latents: np.ndarray
    ref_latents: np.ndarray
    image_text: dict[str, np.ndarray]
    text: dict[str, np.ndarray]
    null: dict[str, np.ndarray]


def prepare(vae: Component, enc: encoders.Encoders, videos: np.ndarray, captions: list[str],
            progress: bool = True) -> Prepared:
    """Latents and conditioning of uint8 videos [N, F, H, W, 3] with their captions."""
    first = videos[:, 0]
    return Prepared(clean_latents(vae, videos, progress=progress), reference_latents(vae, first, progress=progress),
                    conditioning(enc, captions, first, progress=progress),
                    conditioning(enc, captions, None, progress=progress), empty_prompt(enc))


def i2v_source(p: Prepared) -> ArraySource:
    """Image-to-video samples: x₀, the reference latent, the image + prompt conditioning."""
    return ArraySource({"latents": p.latents, "ref_latents": p.ref_latents, **p.image_text}, p.null)


def t2v_source(p: Prepared, guidance: float, image: bool = False) -> ArraySource:
    """Text-to-video samples (prompt only, embedded guidance `guidance` × 1000): whole clips, or with
    `image` the first frames alone as one-frame latents (the text-to-image stage's data)."""
    n = len(p.latents)
    latents = p.ref_latents if image else p.latents
    return ArraySource({"latents": latents, **p.text, "guidance": np.full((n,), 1000.0 * guidance, np.float32)}, p.null)
