"""A deterministic analyser of shapes videos (`m141jax.data.shapes`): what moves, in which colour and
shape, in which direction, and whether it stays the same object — the demo's quality metric.

Per video (uint8 [F, H, W, 3]):
1. background = the per-channel median of all pixels; a pixel belongs to the object when its RGB
   distance from the background exceeds half of the video's 99th-percentile distance (no object when
   that percentile is under `MIN_CONTRAST`);
2. per frame, the frame is rolled so the object's circular (torus) centroid sits in the middle, and
   the largest connected part of the mask is the object; it must cover 1.5–30 % of the frame;
3. colour: the palette colour nearest to the object's mean RGB; shape: its fill ratio of its bounding
   box (triangle ≈ 0.5, circle ≈ π/4, square ≈ 1), the median over frames; direction: the sign of the
   dominant axis of the mean centroid step (torus-wrapped), at least `MIN_SPEED` px per frame;
4. temporal consistency: an object in every frame, its area steady (coefficient of variation ≤ 0.25),
   its colour the same in every frame, and ≥ 75 % of its steps going the mean direction.

`judge(video, caption)` scores one video against its caption; `accuracy` averages over videos, with
`correct` = every attribute right and the video consistent. For a still image (the text-to-image stage's
output), `count_objects` says how many separate objects its mask holds; `one_object_in_every_frame`
asks it of every frame of a video.

Edge sharpness (`edge_sharpness`): per frame with an object (step 2), the mean RGB gradient magnitude
(central differences, the Euclidean norm over the 3 channels × 2 axes, in uint8 levels per pixel) on
the object's boundary pixels (its mask minus the mask's 4-neighbour erosion), averaged over those
frames. Like everything here it treats the frame as a torus (the rolled frame of step 2, wrap-around
differences and erosion), so an object crossing an edge is measured as one. A blurred copy of a clip
scores lower; compare a model's clips with the dataset's clips of the same scenes as a ratio.

Edge bleed (`edge_bleed`): a reconstruction of a clip against the true clip, on the true object's 1-px ring
just outside its mask and on its boundary just inside (4-neighbour steps, on the torus), per frame: the
mean distance from the background colour there over that of the object's interior, averaged over frames.
A true clip's anti-aliasing gives about 0.14 outside and 0.87 inside; a blur symmetric about the edge
moves both towards 0.5 by about as much, a decoder that bleeds the object's colour outwards raises the first
more than it lowers the second.

Background noise (`background_noise`): the mean RGB distance (uint8 levels) from the background colour
(step 1's median) of the pixels more than `BACKGROUND_MARGIN` px (4-neighbour steps, on the torus) from
any object-mask pixel: under a level for a dataset clip's plain background; stripes, blotches and noise
that a decoder paints around the object raise it.
"""

from __future__ import annotations

import dataclasses

import numpy as np
from scipy import ndimage

from m141jax.data.shapes import COLOURS, DIRECTIONS, parse_caption

MIN_CONTRAST = 40.0  # RGB distance from the background that some pixels must reach
AREA = (0.015, 0.30)  # accepted object area, fraction of the frame
FILL_TRIANGLE, FILL_CIRCLE = 0.65, 0.88  # fill-ratio boundaries triangle | circle | square
MIN_SPEED = 0.25  # px per frame
MIN_PART = 4  # pixels of a mask part that `count_objects` counts as an object
MAX_AREA_CV = 0.25
BACKGROUND_MARGIN = 2  # px between the object's mask and the pixels `background_noise` averages
MIN_FORWARD = 0.75  # fraction of steps that go the mean direction
ATTRIBUTES = ("colour", "shape", "direction", "consistent")
_PALETTE = np.asarray(list(COLOURS.values()), np.float32)


@dataclasses.dataclass(frozen=True)
class Analysis:
    """What the analyser sees in one video; None where it cannot tell."""

    colour: str | None
    shape: str | None
    direction: str | None
    consistent: bool
    track: np.ndarray  # [F, 2] centroid (y, x) per frame, NaN where no object
    fill: float | None = None  # the median fill ratio the shape is read from


def _circular_mean(coords, weights, size: int) -> float:
    angle = 2 * np.pi * coords / size
    return float(np.arctan2((weights * np.sin(angle)).sum(), (weights * np.cos(angle)).sum()) * size / (2 * np.pi)) % size


def wrap(d, size: int):
    """A difference of positions on a torus of `size`, mapped into [−size/2, size/2)."""
    return (d + size / 2) % size - size / 2


def _object(mask: np.ndarray):
    """(rolled mask of the object alone, its (y, x) centroid, the roll) of one frame's mask, or None."""
    h, w = mask.shape
    if not mask.any():
        return None
    ys, xs = np.nonzero(mask)
    cy, cx = _circular_mean(ys, 1.0, h), _circular_mean(xs, 1.0, w)
    shift = (int(round(h / 2 - cy)), int(round(w / 2 - cx)))
    rolled = np.roll(mask, shift, axis=(0, 1))
    labels, n = ndimage.label(rolled)
    sizes = ndimage.sum(rolled, labels, range(1, n + 1))
    part = labels == 1 + int(np.argmax(sizes))
    if not AREA[0] <= part.mean() <= AREA[1]:
        return None
    py, px = np.nonzero(part)
    # pixel i covers [i, i + 1): its centre is i + 0.5, as in `shapes.render`
    return part, ((py.mean() + 0.5 - shift[0]) % h, (px.mean() + 0.5 - shift[1]) % w), shift


def _fill_shape(part: np.ndarray) -> float:
    ys, xs = np.nonzero(part)
    return part.sum() / ((np.ptp(ys) + 1) * (np.ptp(xs) + 1))


def _nearest_colour(rgb) -> str:
    return list(COLOURS)[int(np.argmin(np.linalg.norm(_PALETTE - rgb, axis=-1)))]


def _masks(video: np.ndarray):
    """(the video as float32, its object masks [F, H, W]) of a uint8 video [F, H, W, 3], masks None
    when nothing stands out from the background (step 1 above)."""
    video = np.asarray(video)
    if video.ndim != 4 or video.shape[-1] != 3:
        raise ValueError(f"video must be [frames, height, width, 3], got {video.shape}")
    x = video.astype(np.float32)
    distance = np.linalg.norm(x - np.median(x.reshape(-1, 3), axis=0), axis=-1)
    peak = np.percentile(distance, 99)
    return x, (distance > peak / 2 if peak >= MIN_CONTRAST else None)


def count_objects(image: np.ndarray) -> int:
    """The number of separate objects (4-connected mask parts of ≥ MIN_PART pixels, joined across the
    torus' edges) in a uint8 image [H, W, 3]; 0 when nothing stands out from the background."""
    _, masks = _masks(np.asarray(image)[None])
    if masks is None:
        return 0
    labels, n = ndimage.label(masks[0])
    parent = list(range(n + 1))

    def root(i):
        while parent[i] != i:
            i = parent[i]
        return i

    for a, b in ((labels[0], labels[-1]), (labels[:, 0], labels[:, -1])):  # parts touching across an edge
        for i, j in zip(a, b):
            if i and j:
                parent[root(i)] = root(j)
    sizes = {}
    for i, size in enumerate(ndimage.sum(masks[0], labels, range(1, n + 1)), start=1):
        sizes[root(i)] = sizes.get(root(i), 0) + size
    return int(sum(size >= MIN_PART for size in sizes.values()))


def one_object_in_every_frame(video: np.ndarray) -> bool:
    """Whether `count_objects` finds exactly one object in every frame of a uint8 video [F, H, W, 3]."""
    video = np.asarray(video)
    if video.ndim != 4:
        raise ValueError(f"video must be [frames, height, width, 3], got {video.shape}")
    return all(count_objects(frame) == 1 for frame in video)


def _grow(mask: np.ndarray) -> np.ndarray:
    """A mask [..., H, W] and its 4-neighbours on the torus."""
    out = mask.copy()
    for shift, axis in ((1, -2), (-1, -2), (1, -1), (-1, -1)):
        out |= np.roll(mask, shift, axis=axis)
    return out


def _boundary(part: np.ndarray) -> np.ndarray:
    """The pixels of a mask with a 4-neighbour outside it (the mask minus its erosion, on the torus)."""
    return part & _grow(~part)


def _gradient_magnitude(frame: np.ndarray) -> np.ndarray:
    """|∇| [H, W] of a float frame [H, W, 3]: wrap-around central differences, the norm over channels."""
    gy = (np.roll(frame, -1, axis=0) - np.roll(frame, 1, axis=0)) / 2
    gx = (np.roll(frame, -1, axis=1) - np.roll(frame, 1, axis=1)) / 2
    return np.sqrt((gy * gy + gx * gx).sum(axis=-1))


def edge_sharpness(video: np.ndarray) -> float:
    """The mean RGB gradient magnitude on the object's boundary, averaged over the frames of a uint8 video
    [F, H, W, 3] with an object (see the module docstring); NaN when no frame has one."""
    x, masks = _masks(video)
    if masks is None:
        return float("nan")
    per_frame = []
    for f in range(len(x)):
        found = _object(masks[f])
        if found is None:
            continue
        part, _, shift = found
        per_frame.append(_gradient_magnitude(np.roll(x[f], shift, axis=(0, 1)))[_boundary(part)].mean())
    return float(np.mean(per_frame)) if per_frame else float("nan")


def edge_bleed(video: np.ndarray, truth: np.ndarray) -> tuple[float, float]:
    """(outside, inside): the contrast of a uint8 video [F, H, W, 3] on the 1-px ring outside and on the
    boundary of the true clip's object masks (`truth`, the same scene), relative to the true object's
    interior (see the module docstring); NaN when the true clip has no object."""
    video, truth = np.asarray(video), np.asarray(truth)
    if video.shape != truth.shape:
        raise ValueError(f"video {video.shape} and true clip {truth.shape} must have one shape")
    t, masks = _masks(truth)
    if masks is None:
        return float("nan"), float("nan")
    background = np.median(t.reshape(-1, 3), axis=0)
    true_distance = np.linalg.norm(t - background, axis=-1)
    distance = np.linalg.norm(video.astype(np.float32) - background, axis=-1)
    outside, inside = [], []
    for f, mask in enumerate(masks):
        boundary = _boundary(mask)
        interior = mask & ~boundary
        if not interior.any():
            continue
        contrast = true_distance[f][interior].mean()
        outside.append(distance[f][_grow(mask) & ~mask].mean() / contrast)
        inside.append(distance[f][boundary].mean() / contrast)
    return (float(np.mean(outside)), float(np.mean(inside))) if outside else (float("nan"), float("nan"))


def background_noise(video: np.ndarray) -> float:
    """The mean RGB distance from the background colour of the background pixels (those more than
    BACKGROUND_MARGIN px from the object's mask) of a uint8 video [F, H, W, 3], in uint8 levels."""
    x, masks = _masks(video)
    distance = np.linalg.norm(x - np.median(x.reshape(-1, 3), axis=0), axis=-1)
    near = np.zeros(distance.shape, bool) if masks is None else masks.copy()
    for _ in range(BACKGROUND_MARGIN):
        near = _grow(near)
    return float(distance[~near].mean())


def analyse(video: np.ndarray) -> Analysis:
    """The object's colour, shape, direction and temporal consistency in a uint8 video [F, H, W, 3]."""
    x, masks = _masks(video)
    frames, h, w, _ = x.shape
    track = np.full((frames, 2), np.nan)
    none = Analysis(None, None, None, False, track)
    if masks is None:
        return none
    areas, fills, colours = [], [], []
    for f in range(frames):
        found = _object(masks[f])
        if found is None:
            continue
        part, track[f], shift = found
        pixels = np.roll(x[f], shift, axis=(0, 1))[part]
        areas.append(part.sum())
        fills.append(_fill_shape(part))
        colours.append(_nearest_colour(pixels.mean(axis=0)))
    if not areas:
        return none
    colour = _nearest_colour(np.mean([_PALETTE[list(COLOURS).index(c)] for c in colours], axis=0)) \
        if len(set(colours)) > 1 else colours[0]
    fill = float(np.median(fills))
    shape = "triangle" if fill < FILL_TRIANGLE else "circle" if fill < FILL_CIRCLE else "square"
    steps = wrap(np.diff(track, axis=0), np.asarray([h, w]))
    steps = steps[~np.isnan(steps).any(axis=1)]
    direction, forward = None, 0.0
    if len(steps):
        mean = steps.mean(axis=0)
        if np.abs(mean).max() >= MIN_SPEED:
            axis = int(np.argmax(np.abs(mean)))
            unit = np.zeros(2)
            unit[axis] = np.sign(mean[axis])
            direction = next(k for k, v in DIRECTIONS.items() if tuple(v) == tuple(unit))
            forward = float(np.mean(steps @ unit > 0))
    consistent = (len(areas) == frames and np.std(areas) <= MAX_AREA_CV * np.mean(areas)
                  and len(set(colours)) == 1 and forward >= MIN_FORWARD)
    return Analysis(colour, shape, direction, bool(consistent), track, fill)


def judge(video: np.ndarray, caption: str) -> dict[str, bool]:
    """Per attribute, whether the video shows what its caption says; `correct`: all of them, consistently."""
    colour, shape, direction = parse_caption(caption)
    a = analyse(video)
    out = {"colour": a.colour == colour, "shape": a.shape == shape, "direction": a.direction == direction,
           "consistent": a.consistent}
    out["correct"] = all(out.values())
    return out


def accuracy(videos, captions) -> dict[str, float]:
    """The fraction of videos right per attribute and overall (`correct`)."""
    if len(videos) != len(captions) or not len(captions):
        raise ValueError(f"{len(videos)} videos need as many captions (≥ 1), got {len(captions)}")
    scores = [judge(v, c) for v, c in zip(videos, captions)]
    return {k: float(np.mean([s[k] for s in scores])) for k in scores[0]}
