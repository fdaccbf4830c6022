"""The shapes dataset: determinism, the held-out split, captions, and what is drawn."""

import dataclasses

import numpy as np
import pytest

from m141jax.data import shapes


def test_deterministic_per_seed_split_and_index():
    a, b = shapes.ShapesDataset(10, seed=3), shapes.ShapesDataset(10, seed=3)
    va, ca = a[7]
    vb, cb = b[7]
    assert ca == cb and np.array_equal(va, vb)
    assert va.shape == (shapes.FRAMES, shapes.SIZE, shapes.SIZE, 3) and va.dtype == np.uint8
    assert not np.array_equal(va, shapes.ShapesDataset(10, seed=4)[7][0])
    assert not np.array_equal(a[6][0], va)


def test_held_out_combinations():
    train, held = shapes.combinations("train"), shapes.combinations("eval")
    assert len(train) == 40 and sorted(held) == sorted(shapes.HELD_OUT) and not set(train) & set(held)
    for i, values in enumerate((shapes.COLOURS, shapes.SHAPES, shapes.DIRECTIONS)):
        assert {c[i] for c in train} == set(values) == {c[i] for c in held} | {c[i] for c in train}
    captions = {shapes.ShapesDataset(80, "eval")[i][1] for i in range(16)}
    assert captions == {shapes.caption(*c) for c in shapes.HELD_OUT}
    with pytest.raises(ValueError, match="unknown split 'test'"):
        shapes.combinations("test")


def test_parse_caption():
    assert shapes.parse_caption("A Blue circle moving right") == ("blue", "circle", "right")
    with pytest.raises(ValueError, match="is not 'a COLOUR SHAPE moving DIRECTION'"):
        shapes.parse_caption("a purple circle moving right")


@pytest.mark.parametrize("shape, area", [("circle", np.pi * 36), ("square", (1.8 * 6) ** 2),
                                         ("triangle", 3 * np.sqrt(3) / 4 * (1.2 * 6) ** 2)])
def test_drawn_area_position_and_motion(shape, area):
    scene = shapes.Scene("red", shape, "right", start=(16.0, 30.0), radius=6.0, speed=1.5, rgb=(200, 40, 40),
                         background=(30, 30, 30))
    video = shapes.render(scene, frames=5, size=32).astype(np.float32)
    alpha = (video[..., 0] - 30) / 170  # coverage from the red channel
    assert np.allclose(alpha.sum(axis=(1, 2)), area, rtol=0.05)  # 4×4 supersampling
    # the shape wraps around the right edge: frame 2 has its centre at x = 33 ≡ 1
    cols = alpha[2].sum(axis=0)
    assert cols[:8].sum() > cols[8:24].sum() == 0


def test_radius_range_sets_the_drawn_size_and_is_checked():
    """Every scene's half-extent lies in the dataset's `radius` range (the demo's: `RADIUS`), the rest of the
    scene unchanged, so a smaller range draws the same clips with smaller objects; a range the frame cannot
    hold is refused in one line."""
    default, small = shapes.ShapesDataset(12, seed=1), shapes.ShapesDataset(12, seed=1, radius=(3.0, 4.0))
    for i in range(12):
        a, b = default.scene(i), small.scene(i)
        assert shapes.RADIUS[0] <= a.radius <= shapes.RADIUS[1] and 3.0 <= b.radius <= 4.0
        assert dataclasses.replace(a, radius=b.radius) == b
    drawn = lambda ds: (ds[0][0] != np.asarray(ds.scene(0).background)).any(axis=-1).sum()  # noqa: E731
    assert drawn(default) > 2 * drawn(small)  # object pixels over the 17 frames
    for bad in ((4.0, 3.0), (0.5, 2.0), (8.0, 12.0)):
        with pytest.raises(ValueError, match="radius range"):
            shapes.ShapesDataset(4, radius=bad)
