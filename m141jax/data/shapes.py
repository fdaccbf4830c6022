"""A procedural dataset of short captioned videos: one coloured shape moving over a dark background.

Caption: "a {colour} {shape} moving {direction}" for 4 colours × 3 shapes × 4 directions = 48
combinations; `HELD_OUT` keeps 8 of them (every colour, direction and shape still seen in training)
for evaluation only. Everything else varies per sample: the start position, the size, the speed, the
exact shade of the colour and of the background.

The frame is a torus: a shape leaving one side re-enters from the other, so any frame, including the
last frame of a generated clip, is a valid first frame and the sliding window can run forever.
Rendering is anti-aliased by 4×4 supersampling. Sample i of a split depends only on (seed, split, i).
"""

from __future__ import annotations

import dataclasses
import itertools

import numpy as np

COLOURS = {"red": (215, 45, 40), "green": (45, 185, 60), "blue": (45, 85, 225), "yellow": (225, 205, 40)}
SHAPES = ("circle", "square", "triangle")
# (dy, dx) per frame for a unit speed; image rows grow downwards
DIRECTIONS = {"left": (0.0, -1.0), "right": (0.0, 1.0), "up": (-1.0, 0.0), "down": (1.0, 0.0)}
# (colour, shape, direction) combinations never seen in training: 2 per colour and per direction
HELD_OUT = (("red", "circle", "down"), ("red", "triangle", "left"), ("green", "square", "right"),
            ("green", "circle", "up"), ("blue", "triangle", "up"), ("blue", "square", "down"),
            ("yellow", "circle", "left"), ("yellow", "triangle", "right"))
SPLITS = ("train", "eval")
FRAMES, SIZE = 17, 32  # the demo's clip: 17 frames (5 latent frames) of 32×32
# half-extent of a shape in pixels: 14–18 px across, 3.5–4.5 latents of the demo VAE (4× spatial). At 5–7 px the
# VAE and the DiTs rounded squares and filled triangles, their corners a pixel or two on a 10-px object (README)
RADIUS = (7.0, 9.0)
SPEED = (1.0, 2.0)  # pixels per frame
BACKGROUND = (20, 70)  # grey level of the background
JITTER = 20  # ± per channel on colours, ± JITTER/2 on the background's tint
SUPERSAMPLE = 4


def caption(colour: str, shape: str, direction: str) -> str:
    return f"a {colour} {shape} moving {direction}"


def combinations(split: str) -> list[tuple[str, str, str]]:
    """The (colour, shape, direction) combinations of a split: 'train' (40) or 'eval' (the 8 held out)."""
    if split not in SPLITS:
        raise ValueError(f"unknown split {split!r}; accepted: {SPLITS}")
    every = itertools.product(COLOURS, SHAPES, DIRECTIONS)
    return [c for c in every if (c in HELD_OUT) == (split == "eval")]


def parse_caption(text: str) -> tuple[str, str, str]:
    """(colour, shape, direction) of a caption of this dataset; a one-line error otherwise."""
    words = text.lower().split()
    if (len(words) != 5 or words[0] != "a" or words[3] != "moving" or words[1] not in COLOURS
            or words[2] not in SHAPES or words[4] not in DIRECTIONS):
        raise ValueError(f"caption {text!r} is not 'a COLOUR SHAPE moving DIRECTION' with COLOUR in "
                         f"{list(COLOURS)}, SHAPE in {list(SHAPES)}, DIRECTION in {list(DIRECTIONS)}")
    return words[1], words[2], words[4]


@dataclasses.dataclass(frozen=True)
class Scene:
    """Everything that determines one video."""

    colour: str
    shape: str
    direction: str
    start: tuple[float, float]  # (y, x) centre in the first frame, pixels
    radius: float
    speed: float
    rgb: tuple[int, int, int]  # the shape's exact colour
    background: tuple[int, int, int]

    @property
    def caption(self) -> str:
        return caption(self.colour, self.shape, self.direction)


def random_scene(rng: np.random.Generator, colour: str, shape: str, direction: str, size: int = SIZE,
                 radius: tuple[float, float] = RADIUS) -> Scene:
    """A scene of the given combination with everything else drawn from rng (the shape's half-extent
    uniformly from the `radius` range)."""
    rgb = np.clip(np.asarray(COLOURS[colour]) + rng.integers(-JITTER, JITTER + 1, 3), 0, 255)
    grey = rng.integers(*BACKGROUND, endpoint=True)
    background = np.clip(grey + rng.integers(-JITTER // 2, JITTER // 2 + 1, 3), 0, 255)
    return Scene(colour, shape, direction, start=tuple(float(v) for v in rng.uniform(0, size, 2)),
                 radius=float(rng.uniform(*radius)), speed=float(rng.uniform(*SPEED)),
                 rgb=tuple(int(v) for v in rgb), background=tuple(int(v) for v in background))


def coverage(shape: str, dy, dx, radius: float):
    """Whether offsets (dy, dx) from the centre lie inside the shape: a disc of `radius`, an axis-aligned
    square of half-side 0.9·radius, or an upright equilateral triangle inscribed in a circle of 1.2·radius."""
    if shape == "circle":
        return dy * dy + dx * dx <= radius * radius
    if shape == "square":
        return (np.abs(dy) <= 0.9 * radius) & (np.abs(dx) <= 0.9 * radius)
    if shape == "triangle":
        r = 1.2 * radius  # circumradius; apex up, base at y = r/2 below the centre
        return (dy <= r / 2) & (np.sqrt(3.0) * np.abs(dx) <= dy + r)
    raise ValueError(f"unknown shape {shape!r}; accepted: {SHAPES}")


def render(scene: Scene, frames: int = FRAMES, size: int = SIZE) -> np.ndarray:
    """The video of a scene: uint8 [frames, size, size, 3], the shape moving on a torus."""
    s = SUPERSAMPLE
    grid = (np.arange(size * s) + 0.5) / s  # supersample centres in pixel units
    step = np.asarray(DIRECTIONS[scene.direction]) * scene.speed
    out = np.empty((frames, size, size, 3), np.uint8)
    bg, fg = np.asarray(scene.background, np.float32), np.asarray(scene.rgb, np.float32)
    for f in range(frames):
        cy, cx = np.asarray(scene.start) + f * step
        wrap = lambda v, c: (v - c + size / 2) % size - size / 2  # noqa: E731  (torus offset)
        inside = coverage(scene.shape, wrap(grid, cy)[:, None], wrap(grid, cx)[None, :], scene.radius)
        alpha = inside.reshape(size, s, size, s).mean(axis=(1, 3))[..., None]
        out[f] = np.round(bg + alpha * (fg - bg)).astype(np.uint8)
    return out


class ShapesDataset:
    """`n` samples of a split: dataset[i] -> (video uint8 [frames, size, size, 3], caption).

    The combination of sample i cycles through the split's combinations (balanced classes); the rest of
    the scene comes from a generator seeded with (seed, split, i), so any sample is cheap to reproduce.
    `radius` is the range of the shapes' half-extent in pixels (the demo's: `RADIUS`).
    """

    def __init__(self, n: int, split: str = "train", seed: int = 0, frames: int = FRAMES, size: int = SIZE,
                 radius: tuple[float, float] = RADIUS):
        if n < 1 or frames < 1 or size < 8:
            raise ValueError(f"n {n}, frames {frames} and size {size} must be ≥ 1, ≥ 1 and ≥ 8")
        if len(radius) != 2 or not 1 <= radius[0] <= radius[1] <= size / 3:
            raise ValueError(f"radius range {tuple(radius)} must be (low, high) with 1 ≤ low ≤ high ≤ {size / 3:g} "
                             f"px for size {size}")
        self.combos, self.split, self.n, self.seed = combinations(split), split, n, seed
        self.frames, self.size, self.radius = frames, size, (float(radius[0]), float(radius[1]))

    def __len__(self) -> int:
        return self.n

    def scene(self, i: int) -> Scene:
        if not 0 <= i < self.n:
            raise IndexError(f"sample {i} is outside 0..{self.n - 1}")
        rng = np.random.default_rng([self.seed, SPLITS.index(self.split), i])
        return random_scene(rng, *self.combos[i % len(self.combos)], size=self.size, radius=self.radius)

    def __getitem__(self, i: int) -> tuple[np.ndarray, str]:
        scene = self.scene(i)
        return render(scene, self.frames, self.size), scene.caption
