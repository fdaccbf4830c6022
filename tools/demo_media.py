"""The README's demo pictures, made by `m141jax generate --preset demo` itself (the MP4s it writes, read
back), so that they show what a user gets:

- demo_still.png: frames 0, 4, 8, 12 and 16 of the text → video clip of "a blue circle moving right";
- demo_still_image.png: the same frames from a true first frame, that of the development split's clip of
  "a red circle moving down" (a colour-shape-direction combination never seen in training);
- demo.gif: an animated preview, text → video for PREVIEW's captions side by side, looping at the clip's
  frame rate.

Frames are enlarged SCALE× (nearest neighbour), the pixels as generated:

    python tools/demo_media.py [--out docs] [--checkpoints DIR]
"""

from __future__ import annotations

import argparse
import os
import sys
import tempfile
from pathlib import Path

import imageio.v3 as iio
import numpy as np
from PIL import Image

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))  # run from a source checkout

from m141jax import demo  # noqa: E402
from m141jax.cli import main as cli_main  # noqa: E402
from m141jax.demo import quality  # noqa: E402

TEXT_PROMPT = "a blue circle moving right"
IMAGE_PROMPT = "a red circle moving down"
PREVIEW = ("a blue circle moving right", "a red square moving up", "a green triangle moving left",
           "a yellow square moving down")
STILL_FRAMES = (0, 4, 8, 12, 16)
SCALE = 4


def generate(prompt: str, work: Path, checkpoints: str, image: Path | None = None) -> np.ndarray:
    """uint8 frames [F, H, W, 3] of `m141jax generate --preset demo` for a prompt (and a first frame)."""
    out = work / f"{len(list(work.iterdir()))}.mp4"
    argv = ["generate", "--preset", "demo", "--checkpoints", checkpoints, "--prompt", prompt, "--out", str(out),
            "--quiet"]
    if image is not None:
        argv += ["--image", str(image)]
    if cli_main(argv) != 0:
        raise RuntimeError(f"m141jax generate failed for {prompt!r}")
    return np.stack(list(iio.imiter(out)))


def enlarge(frame: np.ndarray) -> np.ndarray:
    return np.kron(frame, np.ones((SCALE, SCALE, 1), np.uint8))


def strip(video: np.ndarray) -> Image.Image:
    """The STILL_FRAMES of a clip side by side, 2 px apart on white."""
    gap = np.full((video.shape[1] * SCALE, 2, 3), 255, np.uint8)
    parts = [p for f in STILL_FRAMES for p in (enlarge(video[f]), gap)][:-1]
    return Image.fromarray(np.concatenate(parts, axis=1))


def save(image: Image.Image, path: Path, **kwargs) -> None:
    """Write a picture atomically: into a hidden sibling, then renamed."""
    tmp = path.with_name(f".{path.name}.partial-{os.getpid()}")
    try:
        image.save(tmp, format=path.suffix[1:].upper(), **kwargs)
        os.replace(tmp, path)
    finally:
        tmp.unlink(missing_ok=True)


def main() -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    p.add_argument("--out", default="docs", help="folder for the pictures")
    p.add_argument("--checkpoints", default=str(demo.CHECKPOINTS))
    args = p.parse_args()
    out = Path(args.out)
    out.mkdir(parents=True, exist_ok=True)
    with tempfile.TemporaryDirectory() as tmp:
        work = Path(tmp)
        save(strip(generate(TEXT_PROMPT, work, args.checkpoints)), out / "demo_still.png")
        clips, captions = quality.split_clips("dev", "held_out", 1)
        first = work / "first.png"
        Image.fromarray(clips[captions.index(IMAGE_PROMPT), 0]).save(first)
        save(strip(generate(IMAGE_PROMPT, work, args.checkpoints, first)), out / "demo_still_image.png")
        videos = [generate(prompt, work, args.checkpoints) for prompt in PREVIEW]
    fps = demo.GENERATE["fps"]
    frames = [Image.fromarray(np.concatenate([enlarge(v[f]) for v in videos], axis=1)) for f in range(len(videos[0]))]
    save(frames[0], out / "demo.gif", save_all=True, append_images=frames[1:], duration=round(1000 / fps), loop=0)
    print(f"wrote {out / 'demo_still.png'}, {out / 'demo_still_image.png'}, {out / 'demo.gif'}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
