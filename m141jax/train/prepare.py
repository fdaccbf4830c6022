"""`m141jax prepare-data`: a folder of captioned videos/images -> the latents + conditioning that
training reads (`m141jax.train.data.LatentSource`).

    m141jax prepare-data --checkpoints DIR --input FOLDER --output DATA [--frames 81] [--size 544x960]

FOLDER holds videos (.mp4 .mov .mkv .webm .avi) or images (.png .jpg .jpeg .webp .bmp), each with its
caption in a text file of the same name (`clip.mp4` + `clip.txt`). DIR is the checkpoint folder of
`m141jax generate` (vae/, vlm/, clip/, tokenizer/, clip_tokenizer/; the DiTs are not read).

Per sample, as the release prepares its inputs (release.md A.3): the first `--frames` frames (4k+1; an image is
one frame) are fitted to `--size` (resize to cover, centre crop), encoded by the VAE with tiling (the
posterior mean, scaled by `vae.scale_latents`: the clean latents x₀); the first frame alone gives the reference
latent; the caption and the first frame give the text conditioning (VLM image tokens ‖ prompt tokens,
mask, CLIP pooled). The empty prompt's text part goes to null.npz for the CFG dropout. DATA is written
atomically (complete or absent).
"""

from __future__ import annotations

import json
import warnings
from pathlib import Path

import jax.numpy as jnp
import numpy as np
from PIL import Image
from tqdm import tqdm

from m141jax import components, encoders, media, pipeline
from m141jax.checkpoint import atomic_dir
from m141jax.io import save_npz
from m141jax.models import vae as vae_lib
from m141jax.train.data import FORMAT, META

VIDEOS = (".mp4", ".mov", ".mkv", ".webm", ".avi")
IMAGES = (".png", ".jpg", ".jpeg", ".webp", ".bmp")


def list_samples(folder: str | Path) -> list[tuple[Path, str]]:
    """(media file, caption) pairs of the folder, sorted by name; one-line errors for missing captions."""
    folder = Path(folder)
    if not folder.is_dir():
        raise FileNotFoundError(f"input folder {folder} does not exist")
    files = sorted(p for p in folder.iterdir() if p.suffix.lower() in VIDEOS + IMAGES)
    if not files:
        raise ValueError(f"{folder} holds no videos ({' '.join(VIDEOS)}) or images ({' '.join(IMAGES)})")
    missing = [p.name for p in files if not p.with_suffix(".txt").is_file()]
    if missing:
        raise ValueError(f"no caption file (NAME.txt) for {', '.join(missing[:5])}"
                         f"{' ...' if len(missing) > 5 else ''}")
    return [(p, p.with_suffix(".txt").read_text().strip()) for p in files]


def read_frames(path: Path, frames: int) -> list[Image.Image]:
    """The first `frames` frames of a video (or the image itself, when frames == 1) as RGB images."""
    if path.suffix.lower() in IMAGES:
        if frames != 1:
            raise ValueError(f"{path.name} is an image, but --frames is {frames}; images need --frames 1")
        return [media.open_image(path)]
    import imageio.v2 as imageio

    out = []
    with warnings.catch_warnings():  # ffmpeg is started by fork + exec, which JAX's fork warning does not concern
        warnings.filterwarnings("ignore", message=r"os\.fork\(\) was called", category=RuntimeWarning)
        with imageio.get_reader(path, format="FFMPEG") as reader:
            for frame in reader:
                out.append(Image.fromarray(np.asarray(frame)).convert("RGB"))
                if len(out) == frames:
                    return out
    raise ValueError(f"{path.name} has {len(out)} frames, fewer than --frames {frames}")


def _encode_video(vae, frames: np.ndarray):
    video = jnp.asarray(media.to_signed(frames))[None]
    mean, _ = vae_lib.encode(vae.params, vae.cfg, video, tiling=True)
    return vae_lib.scale_latents(vae.cfg, mean[0])


def prepare(checkpoints: str | Path, folder: str | Path, output: str | Path, frames: int, size: tuple[int, int],
            dtype: str = "bf16", overwrite: bool = False, progress: bool = True) -> Path:
    """Write the prepared-data directory `output` (see the module docstring); returns its path."""
    if frames < 1 or (frames - 1) % 4:
        raise ValueError(f"--frames {frames} must be 4k+1 (1, 5, ..., 81): the VAE compresses time by 4")
    media.check_size(size)
    samples = list_samples(folder)
    for name in ("vae", "vlm", "clip", "tokenizer", "clip_tokenizer"):
        components.locate(checkpoints, name)
    root = Path(checkpoints)
    vae = components.load_component(root, "vae", dtype)
    enc = encoders.Encoders.load(root / "vlm", root / "clip", root / "tokenizer", root / "clip_tokenizer", dtype)
    null = encoders.text_conditioning(enc, [""])
    n_image_tokens = enc.text_length - enc.max_length

    def write(tmp: Path):
        save_npz(tmp / "null.npz", {"text_states": np.asarray(null.text_states[0], np.float32),
                                    "text_mask": np.asarray(null.text_mask[0], np.int32),
                                    "text_states_2": np.asarray(null.text_states_2[0], np.float32)})
        for i, (path, caption) in enumerate(tqdm(samples, desc="prepare-data", disable=not progress)):
            images = read_frames(path, frames)
            fitted = np.stack([media.fit_image(img, size) for img in images])
            cond = encoders.encode(enc, [caption], [Image.fromarray(fitted[0])])
            ref = pipeline.reference_latents(vae, fitted[:1], None, 0, use_mean=True)
            save_npz(tmp / "samples" / f"{i:08d}.npz", {
                "latents": np.asarray(_encode_video(vae, fitted), np.float32),
                "ref_latents": np.asarray(ref[0], np.float32),
                "text_states": np.asarray(cond.text_states[0], np.float32),
                "text_mask": np.asarray(cond.text_mask[0], np.int32),
                "text_states_2": np.asarray(cond.text_states_2[0], np.float32)})
        (tmp / META).write_text(json.dumps({
            "format": FORMAT, "samples": len(samples), "n_image_tokens": n_image_tokens, "frames": frames,
            "size": list(size), "files": [p.name for p, _ in samples]}, indent=1))

    return atomic_dir(output, write, overwrite)
