"""Images in, videos out: the release's reference-image preprocessing (release.md A.3) and MP4 writing.

- `load_image` / `fit_image`: pick the closest 540p aspect-ratio bucket (or a given size), resize with
  the aspect ratio kept so the image covers the target (bilinear, antialiased: torchvision's `Resize`
  on PIL images is PIL's), then centre-crop. A 16:9 image becomes 544×960 (H×W).
- `to_signed`: uint8 frames -> float32 in [-1, 1] (x/255·2 − 1; the one formula every VAE input uses).
- `to_uint8`: decoded video in [-1, 1] -> uint8 frames by `(x/2 + 0.5).clip(0, 1) · 255`, truncated as
  the release's `.byte()` does.
- `VideoWriter`: streams frames into an H.264 MP4 (imageio + its ffmpeg) as they arrive; the file is
  written under a hidden name and renamed into place when closed, also when closed by an error, so
  the output is always a finished, playable file holding every frame appended so far.
"""

from __future__ import annotations

import os
import uuid
import warnings
from pathlib import Path

import jax
import jax.numpy as jnp
import numpy as np
from PIL import Image, UnidentifiedImageError

# the release's 540p table (datasets/test_image.py), aspect w:h -> (height, width)
BUCKETS_540P = {(9, 16): (960, 544), (3, 4): (832, 624), (1, 1): (720, 720), (4, 3): (624, 832),
                (16, 9): (544, 960)}
SIZE_MULTIPLE = 16  # VAE 8× spatial compression × DiT 2×2 patches
DEFAULT_SIZE = BUCKETS_540P[(16, 9)]


def bucket_size(width: int, height: int) -> tuple[int, int]:
    """(height, width) of the 540p bucket whose aspect ratio is closest to width/height (first on ties)."""
    ratio = width / height
    best = min(sorted(BUCKETS_540P, key=lambda a: a[0] / a[1]), key=lambda a: abs(a[0] / a[1] - ratio))
    return BUCKETS_540P[best]


def parse_size(text: str) -> tuple[int, int]:
    """'544x960' -> (544, 960), checked to be positive multiples of 16."""
    try:
        h, w = (int(v) for v in text.lower().split("x"))
    except ValueError:
        raise ValueError(f"size {text!r} must be HxW, e.g. 544x960") from None
    check_size((h, w))
    return h, w


def check_size(size: tuple[int, int]) -> None:
    h, w = size
    if h <= 0 or w <= 0 or h % SIZE_MULTIPLE or w % SIZE_MULTIPLE:
        raise ValueError(f"video size {h}x{w} must be positive multiples of {SIZE_MULTIPLE} (e.g. 544x960)")


def _center_crop(img: Image.Image, h: int, w: int) -> Image.Image:
    """torchvision's CenterCrop on PIL: zero-pad to at least (h, w), then crop at round((size − crop)/2)."""
    iw, ih = img.size
    if iw < w or ih < h:
        padded = Image.new(img.mode, (max(iw, w), max(ih, h)))
        padded.paste(img, ((max(w - iw, 0)) // 2, (max(h - ih, 0)) // 2))
        img, (iw, ih) = padded, padded.size
    top, left = int(round((ih - h) / 2.0)), int(round((iw - w) / 2.0))
    return img.crop((left, top, left + w, top + h))


def fit_image(img: Image.Image, size: tuple[int, int] | None = None) -> np.ndarray:
    """An RGB image resized to cover `size` (default: its 540p bucket) and centre-cropped: uint8 [H, W, 3]."""
    img = img.convert("RGB")
    width, height = img.size
    th, tw = size or bucket_size(width, height)
    ratio = width / height
    if ratio > tw / th:  # wider than the target: match the height
        nh, nw = th, int(th * ratio)
    else:
        nw, nh = tw, int(tw / ratio)
    img = img.resize((nw, nh), Image.Resampling.BILINEAR)
    return np.asarray(_center_crop(img, th, tw), np.uint8)


def open_image(path: str | Path) -> Image.Image:
    """The image at path as RGB; a one-line error when it is missing or not an image."""
    try:
        with Image.open(path) as img:
            return img.convert("RGB")
    except FileNotFoundError:
        raise ValueError(f"image {path} does not exist") from None
    except (UnidentifiedImageError, OSError) as e:
        raise ValueError(f"image {path} cannot be read as an image ({e})") from None


def to_signed(frames) -> np.ndarray:
    """uint8 frames -> float32 in [-1, 1] as the release scales its first frame: x/255 (ToTensor), then ×2 − 1."""
    return np.asarray(frames, np.float32) / 255.0 * 2.0 - 1.0


def to_uint8(video) -> jax.Array:
    """Decoded frames in [-1, 1] -> uint8 (on the device), truncating like the release's `(x·255).byte()`."""
    x = jnp.clip(jnp.asarray(video, jnp.float32) / 2 + 0.5, 0.0, 1.0)
    return (x * 255).astype(jnp.uint8)


def check_output(path: str | Path) -> Path:
    """Refuse, before any work, an output file that cannot be written: an existing folder, a parent that is
    a file, a place where no file can be created (probed by creating and removing a hidden file in the
    nearest existing folder). The absolute path."""
    path = Path(path).absolute()
    if path.is_dir():
        raise ValueError(f"output {path} is an existing folder: name a file")
    folder = path.parent
    while not folder.exists():
        folder = folder.parent
    if not folder.is_dir():
        raise ValueError(f"output {path} cannot be written: {folder} is a file, not a folder")
    probe = folder / f".{path.stem}.probe-{os.getpid()}-{uuid.uuid4().hex[:8]}"
    try:
        probe.touch(exist_ok=False)
    except OSError as e:
        raise ValueError(f"output {path} cannot be written in {folder} ({e.strerror})") from None
    probe.unlink(missing_ok=True)
    return path


class VideoWriter:
    """An MP4 written frame by frame: `append(frames [F, H, W, 3] uint8)`, then `close()`.

    Frames go to a hidden sibling file; `close()` (also on leaving a `with` block through an error)
    finishes the MP4 and renames it to `path`, so `path` only ever holds a complete video. With no
    frame appended nothing is written.
    """

    def __init__(self, path: str | Path, fps: int = 24):
        if fps <= 0:
            raise ValueError(f"fps must be positive, got {fps}")
        self.path = Path(path).absolute()
        if self.path.suffix.lower() != ".mp4":
            raise ValueError(f"output {path} must end in .mp4")
        if self.path.is_dir():
            raise ValueError(f"output {self.path} is an existing folder: name a file")
        self.fps = fps
        self.frames = 0
        self._tmp = self.path.parent / f".{self.path.stem}.partial-{os.getpid()}-{uuid.uuid4().hex[:8]}.mp4"
        self._writer = None

    def append(self, frames: np.ndarray) -> None:
        frames = np.asarray(frames)
        if frames.ndim != 4 or frames.shape[-1] != 3 or frames.dtype != np.uint8:
            raise ValueError(f"frames must be uint8 [F, H, W, 3], got {frames.dtype} {frames.shape}")
        if self._writer is None:
            import imageio.v2 as imageio

            self.path.parent.mkdir(parents=True, exist_ok=True)
            self._writer = imageio.get_writer(self._tmp, format="FFMPEG", fps=self.fps, codec="libx264", quality=8,
                                              macro_block_size=1, ffmpeg_log_level="error")
        with warnings.catch_warnings():  # ffmpeg is started by fork + exec, which JAX's fork warning does not concern
            warnings.filterwarnings("ignore", message=r"os\.fork\(\) was called", category=RuntimeWarning)
            for frame in frames:
                self._writer.append_data(frame)
        self.frames += len(frames)

    def close(self) -> Path | None:
        """Finish the file and move it into place; the path, or None when no frame was written."""
        if self._writer is None:
            return None
        writer, self._writer = self._writer, None
        try:
            writer.close()
            os.replace(self._tmp, self.path)
        finally:
            self._tmp.unlink(missing_ok=True)
        return self.path

    def __enter__(self):
        return self

    def __exit__(self, *exc):
        self.close()
