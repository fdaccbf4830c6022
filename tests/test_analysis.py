"""The shapes analyser: ground-truth videos score (near) perfectly, noise and broken videos do not."""

import dataclasses

import numpy as np
import pytest
from scipy import ndimage

from m141jax.data import analysis, shapes


@pytest.fixture(scope="module")
def videos():
    train, held = shapes.ShapesDataset(80, "train", seed=11), shapes.ShapesDataset(24, "eval", seed=11)
    return [d[i] for d in (train, held) for i in range(len(d))]


def test_ground_truth_scores_perfectly(videos):
    acc = analysis.accuracy(*zip(*videos))
    assert all(v >= 0.98 for v in acc.values()), acc
    fills = {s: [analysis.analyse(v).fill for v, c in videos if shapes.parse_caption(c)[1] == s] for s in shapes.SHAPES}
    # the fill ratios the shape is read from: π/4 for a disc, 1 for a square, about 0.55 for a triangle
    assert abs(np.mean(fills["circle"]) - np.pi / 4) < 0.03 and np.mean(fills["square"]) > 0.97
    assert 0.5 < np.mean(fills["triangle"]) < 0.6, fills


def test_track_follows_the_scene(videos):
    video, _ = videos[0]
    scene = shapes.ShapesDataset(80, "train", seed=11).scene(0)
    a = analysis.analyse(video)
    step = np.asarray(shapes.DIRECTIONS[scene.direction]) * scene.speed
    expected = (np.asarray(scene.start) + np.arange(len(video))[:, None] * step) % shapes.SIZE
    assert np.abs(analysis.wrap(a.track - expected, shapes.SIZE)).max() < 0.6


def _captions(n):
    every = [shapes.caption(*c) for s in shapes.SPLITS for c in shapes.combinations(s)]
    return [every[i % len(every)] for i in range(n)]


def test_noise_scores_at_most_chance():
    rng = np.random.default_rng(0)
    white = [rng.integers(0, 256, (17, 32, 32, 3), dtype=np.uint8) for _ in range(24)]
    smooth = [np.clip(128 + 100 * ndimage.gaussian_filter(rng.standard_normal((17, 32, 32, 3)), (1, 3, 3, 0),
                                                          mode="wrap"), 0, 255).astype(np.uint8) for _ in range(24)]
    chance = {"colour": 1 / 4, "shape": 1 / 3, "direction": 1 / 4}
    for noise in (white, smooth):
        acc = analysis.accuracy(noise, _captions(len(noise)))
        assert acc["correct"] == 0.0 and acc["consistent"] < 0.1, acc
        assert all(acc[k] <= chance[k] + 0.1 for k in chance), acc


def test_broken_motion_is_caught(videos):
    rng = np.random.default_rng(1)
    clips, captions = zip(*videos[:48])
    shuffled = analysis.accuracy([v[rng.permutation(len(v))] for v in clips], captions)
    assert shuffled["consistent"] < 0.2 and shuffled["correct"] < 0.2 and shuffled["colour"] == 1.0
    static = [analysis.analyse(np.repeat(v[:1], len(v), 0)) for v in clips[:8]]
    assert all(a.direction is None and not a.consistent for a in static)
    flicker = [v.copy() for v in clips[:8]]
    for v in flicker:
        v[::3] = v[0, 0, 0]  # every third frame is background only
    assert not any(analysis.analyse(v).consistent for v in flicker)


def test_wrong_captions_are_caught(videos):
    video, caption = videos[0]
    colour, shape, direction = shapes.parse_caption(caption)
    other = lambda x, xs: next(v for v in xs if v != x)  # noqa: E731
    assert analysis.judge(video, caption)["correct"]
    for i, (value, values) in enumerate(((colour, shapes.COLOURS), (shape, shapes.SHAPES),
                                         (direction, shapes.DIRECTIONS))):
        words = [colour, shape, direction]
        words[i] = other(value, list(values))
        verdict = analysis.judge(video, shapes.caption(*words))
        assert not verdict["correct"] and sum(not verdict[k] for k in ("colour", "shape", "direction")) == 1
    # red and blue swapped by reversing the channels
    red = next(v for v, c in videos if c.startswith("a red"))
    assert analysis.analyse(red).colour == "red" and analysis.analyse(red[..., ::-1]).colour == "blue"


def test_count_objects():
    ds = shapes.ShapesDataset(40, "train", seed=5)
    frames = [ds[i][0][0] for i in range(len(ds))]
    assert [analysis.count_objects(f) for f in frames] == [1] * len(frames)
    scene = ds.scene(0)
    edge = shapes.render(dataclasses.replace(scene, start=(0.0, 0.0)), frames=1)[0]  # split over 4 corners
    assert analysis.count_objects(edge) == 1
    far = dataclasses.replace(scene, start=((scene.start[0] + 16) % 32, (scene.start[1] + 16) % 32))
    two = np.where(frames[0] != frames[0][0, 0], frames[0], shapes.render(far, frames=1)[0])
    assert analysis.count_objects(two) == 2
    assert analysis.count_objects(np.full_like(edge, 40)) == 0


def _blur(video, sigma=1.0):
    smooth = ndimage.gaussian_filter(video.astype(np.float32), (0, sigma, sigma, 0), mode="wrap")
    return np.clip(np.round(smooth), 0, 255).astype(np.uint8)


def test_edge_sharpness_drops_with_blur(videos):
    clips = [v for v, _ in videos[::8]]
    sharp = np.asarray([analysis.edge_sharpness(v) for v in clips])
    for sigma in (0.7, 1.5):
        blurred = np.asarray([analysis.edge_sharpness(_blur(v, sigma)) for v in clips])
        assert np.all(blurred < 0.9 * sharp), (sigma, blurred / sharp)
    assert np.all(sharp > 40)  # a step of ≥ 80 levels between object and background, over ~2 pixels
    assert np.isnan(analysis.edge_sharpness(np.full((17, 32, 32, 3), 40, np.uint8)))


def test_edge_sharpness_is_the_same_across_the_torus_edge():
    scene = shapes.ShapesDataset(1, "train", seed=3).scene(0)
    inside = shapes.render(dataclasses.replace(scene, start=(16.0, 16.0), speed=0.0), frames=2)
    split = np.roll(inside, (16, 16), axis=(1, 2))  # the same frames with the object over the four corners
    assert abs(analysis.edge_sharpness(split) - analysis.edge_sharpness(inside)) < 1e-3


def _widened(video):
    """Each pixel takes the colour of its 3×3 neighbour (on the torus) farthest from the background."""
    x = video.astype(np.float32)
    background = np.median(x.reshape(-1, 3), axis=0)
    moved = np.stack([np.roll(x, (dy, dx), axis=(1, 2)) for dy in (-1, 0, 1) for dx in (-1, 0, 1)])
    pick = np.linalg.norm(moved - background, axis=-1).argmax(0)
    return np.take_along_axis(moved, pick[None, ..., None], 0)[0].astype(np.uint8)


def test_edge_bleed_tells_an_outward_bleed_from_a_blur(videos):
    clips = [v for v, _ in videos[::8]]
    own = np.asarray([analysis.edge_bleed(v, v) for v in clips])
    assert np.all((own[:, 0] < 0.25) & (own[:, 1] > 0.75)), own  # the anti-aliased rim alone
    blurred = np.asarray([analysis.edge_bleed(_blur(v, 1.0), v) for v in clips])
    assert np.all((blurred[:, 0] > own[:, 0] + 0.1) & (blurred[:, 1] < own[:, 1] - 0.05)), blurred
    # the object painted one pixel wider: outside up to about the object's contrast, boundary kept
    grown = [_widened(v) for v in clips]
    wide = np.asarray([analysis.edge_bleed(g, v) for g, v in zip(grown, clips)])
    assert np.all((wide[:, 0] > 0.6) & (wide[:, 1] > own[:, 1] - 0.02)), wide
    with pytest.raises(ValueError, match="one shape"):
        analysis.edge_bleed(clips[0][:2], clips[0])


def test_background_noise_sees_stripes_and_not_the_object(videos):
    clips = [v for v, _ in videos[::8]]
    plain = np.asarray([analysis.background_noise(v) for v in clips])
    assert np.all(plain < 1.0), plain  # a plain background; the object's anti-aliased rim is excluded
    striped = [v.astype(np.int16) for v in clips]
    for v in striped:
        v[:, ::8] += 25  # a faint horizontal stripe every 8 rows, as a decoder's artefacts
    noisy = np.asarray([analysis.background_noise(np.clip(v, 0, 255).astype(np.uint8)) for v in striped])
    assert np.all(noisy > 2.0), noisy
    assert np.all(np.asarray([analysis.background_noise(_blur(v, 0.7)) for v in clips]) < 1.0)  # blur is not noise


def test_one_object_in_every_frame(videos):
    assert all(analysis.one_object_in_every_frame(v) for v, _ in videos[::4])
    video, _ = videos[0]
    scene = shapes.ShapesDataset(80, "train", seed=11).scene(0)
    far = shapes.render(dataclasses.replace(scene, start=((scene.start[0] + 16) % 32, (scene.start[1] + 16) % 32)))
    two = video.copy()
    two[9] = np.where(video[9] != video[9, 0, 0], video[9], far[9])  # a second object in frame 9 only
    assert analysis.count_objects(two[8]) == 1 and analysis.count_objects(two[9]) == 2
    assert not analysis.one_object_in_every_frame(two)
    empty = video.copy()
    empty[3] = video[0, 0, 0]  # no object in frame 3
    assert not analysis.one_object_in_every_frame(empty)
