"""Reference-image preprocessing (release.md A.3), uint8 conversion, the streaming MP4 writer."""

import imageio.v2 as imageio
import numpy as np
import pytest
from PIL import Image

from m141jax import media

# reading back starts ffmpeg by fork + exec, which JAX warns about needlessly
pytestmark = pytest.mark.filterwarnings("ignore:os.fork")


def read_video(path):
    """(frames [F, H, W, 3], fps) of an MP4, read back with ffmpeg."""
    with imageio.get_reader(path, format="FFMPEG") as r:
        return np.stack([f for f in r.iter_data()]), r.get_meta_data()["fps"]


@pytest.mark.parametrize("wh, size", [((1920, 1080), (544, 960)), ((1080, 1920), (960, 544)), ((800, 600), (624, 832)),
                                      ((600, 800), (832, 624)), ((500, 500), (720, 720)), ((3000, 1000), (544, 960)),
                                      ((650, 600), (720, 720)), ((1000, 2500), (960, 544))])
def test_buckets(wh, size):
    assert media.bucket_size(*wh) == size
    img = Image.fromarray(np.random.default_rng(0).integers(0, 255, (wh[1], wh[0], 3), np.uint8))
    out = media.fit_image(img)
    assert out.dtype == np.uint8 and out.shape == (*size, 3)


def test_fit_crops_the_centre_like_torchvision():
    """Images already at the cover size are only cropped, at round((size - crop) / 2) (round half to even)."""
    rng = np.random.default_rng(1)
    wide = rng.integers(0, 255, (544, 967, 3), np.uint8)  # 16:9 bucket, cover width int(544·967/544) = 967
    np.testing.assert_array_equal(media.fit_image(Image.fromarray(wide)), wide[:, 4:964])
    tall = rng.integers(0, 255, (1088, 544, 3), np.uint8)  # 9:16 bucket, cover height int(544 / 0.5) = 1088
    np.testing.assert_array_equal(media.fit_image(Image.fromarray(tall)), tall[64:1024])
    # an explicit size uses the same cover-and-crop rule
    np.testing.assert_array_equal(media.fit_image(Image.fromarray(wide), (544, 544)), wide[:, 212:756])


def test_fit_resizes_bilinear_with_antialias():
    """A 2x downscale of a smooth image is close to the 2x2 box average (PIL's bilinear filter is widened)."""
    y, x = np.mgrid[0:1088, 0:1920]
    img = np.stack([(x % 256), (y % 256), ((x + y) // 8 % 256)], -1).astype(np.uint8)
    out = media.fit_image(Image.fromarray(img)).astype(np.float32)
    box = img.reshape(544, 2, 960, 2, 3).mean((1, 3))
    inner = (slice(8, -8), slice(8, -8))
    assert out.shape == (544, 960, 3)
    assert np.median(np.abs(out[inner] - box[inner])) <= 1.0


def test_size_errors():
    assert media.parse_size("544x960") == (544, 960)
    for bad in ("540x960", "544", "axb", "0x16", "-16x32"):
        with pytest.raises(ValueError, match="544x960"):
            media.parse_size(bad)


def test_unreadable_images(tmp_path):
    with pytest.raises(ValueError, match="does not exist"):
        media.open_image(tmp_path / "missing.png")
    (tmp_path / "bad.png").write_text("not an image")
    with pytest.raises(ValueError, match="cannot be read"):
        media.open_image(tmp_path / "bad.png")


def test_to_uint8_truncates():
    x = np.array([-2.0, -1.0, 0.0, 0.999, 1.0, 3.0], np.float32)  # (x/2 + 0.5)·255: 0, 0, 127.5, 254.87, 255, 255
    np.testing.assert_array_equal(np.asarray(media.to_uint8(x)), [0, 0, 127, 254, 255, 255])


def test_video_writer_streams_and_reads_back(tmp_path):
    rng = np.random.default_rng(2)
    frames = [rng.integers(0, 255, (n, 48, 80, 3), np.uint8) for n in (5, 4, 4)]
    out = tmp_path / "sub" / "clip.mp4"
    with media.VideoWriter(out, fps=12) as w:
        for f in frames:
            w.append(f)
            assert not out.exists()  # only a hidden partial file while writing
    video, fps = read_video(out)
    assert video.shape == (13, 48, 80, 3) and fps == 12
    assert [p.name for p in out.parent.iterdir()] == ["clip.mp4"]


def test_video_writer_keeps_what_was_written_on_error(tmp_path):
    out = tmp_path / "partial.mp4"
    with pytest.raises(RuntimeError, match="clip 3"):
        with media.VideoWriter(out) as w:
            w.append(np.full((9, 32, 32, 3), 200, np.uint8))
            raise RuntimeError("clip 3 failed")
    video, fps = read_video(out)
    assert video.shape == (9, 32, 32, 3) and fps == 24
    assert abs(float(video.mean()) - 200) < 3


def test_video_writer_errors(tmp_path):
    with pytest.raises(ValueError, match=".mp4"):
        media.VideoWriter(tmp_path / "x.avi")
    w = media.VideoWriter(tmp_path / "x.mp4")
    with pytest.raises(ValueError, match="uint8"):
        w.append(np.zeros((2, 16, 16, 3), np.float32))
    assert w.close() is None and not (tmp_path / "x.mp4").exists()
