"""Images for the VLM's vision tower (release.md E.3), in NumPy/PIL: loading with clear errors, and the CLIP
preprocessing of LLaVA's image processor: RGB, resize the shortest side to 336 (bicubic), centre crop
336×336, scale to [0, 1], normalise with the CLIP mean/std. Output is channels-last float32.

The settings come from the checkpoint's `preprocessor_config.json` when the tokenizer folder has one
(both the old `size: 336` and the current `size: {"shortest_edge": 336}` forms), else CLIP's defaults.
"""

from __future__ import annotations

import dataclasses
import json
from pathlib import Path

import numpy as np
from PIL import Image

CLIP_MEAN = (0.48145466, 0.4578275, 0.40821073)
CLIP_STD = (0.26862954, 0.26130258, 0.27577711)


@dataclasses.dataclass(frozen=True)
class ImageProcessing:
    size: int = 336  # shortest side after resizing
    crop: tuple[int, int] = (336, 336)  # (height, width)
    mean: tuple[float, ...] = CLIP_MEAN
    std: tuple[float, ...] = CLIP_STD
    resample: int = Image.Resampling.BICUBIC
    rescale: float = 1 / 255

    @classmethod
    def from_folder(cls, folder: str | Path, image_size: int) -> "ImageProcessing":
        """The folder's preprocessor_config.json, else CLIP's defaults at `image_size`."""
        path = Path(folder) / "preprocessor_config.json"
        if not path.is_file():
            return cls(size=image_size, crop=(image_size, image_size))
        d = json.loads(path.read_text())
        for flag in ("do_resize", "do_center_crop", "do_rescale", "do_normalize"):
            if not d.get(flag, True):
                raise ValueError(f"{path}: {flag}=false is not supported; accepted: CLIP preprocessing (all steps on)")
        size = d.get("size", image_size)
        size = size["shortest_edge"] if isinstance(size, dict) else size
        crop = d.get("crop_size", image_size)
        crop = (crop["height"], crop["width"]) if isinstance(crop, dict) else (crop, crop)
        return cls(size=int(size), crop=tuple(int(c) for c in crop), mean=tuple(d.get("image_mean", CLIP_MEAN)),
                   std=tuple(d.get("image_std", CLIP_STD)), resample=int(d.get("resample", cls.resample)),
                   rescale=float(d.get("rescale_factor", 1 / 255)))


def load_image(image, what: str = "image") -> Image.Image:
    """A fully decoded RGB PIL image from a PIL image or a file path; unreadable input is a one-line error."""
    if not isinstance(image, (Image.Image, str, Path)):
        raise ValueError(f"{what} is a {type(image).__name__}; accepted: a PIL image or an image file path")
    try:
        if not isinstance(image, Image.Image):
            image = Image.open(image)
        image.load()
        return image.convert("RGB")
    except (OSError, ValueError, SyntaxError) as e:  # PIL raises these for missing, truncated or corrupt files
        raise ValueError(f"cannot read {what}: {e}; accepted: an image file PIL can decode "
                         f"(PNG, JPEG, WebP, ...)") from None


def resize_shortest(image: Image.Image, size: int, resample) -> Image.Image:
    """Resize so the shorter side is `size` and the longer int(size · long / short), as transformers does."""
    w, h = image.size
    short, long = min(w, h), max(w, h)
    new_long = int(size * long / short)
    return image.resize((size, new_long) if w <= h else (new_long, size), resample=resample)


def center_crop(x: np.ndarray, height: int, width: int) -> np.ndarray:
    """The centre [height, width] window of x [H, W, C]; top/left offsets round down."""
    h, w = x.shape[:2]
    if h < height or w < width:
        raise ValueError(f"cannot centre-crop a {h}x{w} image to {height}x{width}")
    top, left = (h - height) // 2, (w - width) // 2
    return x[top:top + height, left:left + width]


def preprocess(images, settings: ImageProcessing) -> np.ndarray:
    """Pixel values [N, H, W, 3] float32 (channels-last) for a list of PIL images or paths."""
    out = []
    for i, image in enumerate(images):
        image = resize_shortest(load_image(image, f"image {i}"), settings.size, settings.resample)
        x = center_crop(np.asarray(image), *settings.crop).astype(np.float32) * np.float32(settings.rescale)
        out.append((x - np.asarray(settings.mean, np.float32)) / np.asarray(settings.std, np.float32))
    return np.stack(out)
