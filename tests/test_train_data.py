"""grain input: deterministic sources and shuffling, per-process rows, iterator state, prepared-data dirs."""

import jax
import numpy as np
import pytest
from fixtures import TINY_I2V, write_prepared

from m141jax.train import data
from m141jax.train.config import DataConfig
from m141jax.train.mesh import batch_shardings, make_mesh

MODEL = TINY_I2V


class IndexSource:
    def __init__(self, n):
        self.n = n

    def __len__(self):
        return self.n

    def __getitem__(self, i):
        return {"i": np.int64(i)}

    def null(self):
        return {}


def _take(it, n):
    return [next(it) for _ in range(n)]


def test_synthetic_source_is_deterministic_and_shaped():
    cfg = DataConfig(frames=3, height=4, width=6, text_len=5, seed=7)
    a, b = data.SyntheticSource(MODEL, cfg, 2), data.SyntheticSource(MODEL, cfg, 2)
    s = a[3]
    assert s["latents"].shape == (3, 4, 6, 16) and s["ref_latents"].shape == (1, 4, 6, 16)
    assert s["text_states"].shape == (5, 32) and s["text_states_2"].shape == (16,)
    np.testing.assert_array_equal(s["ref_latents"], s["latents"][:1])
    for k in s:
        np.testing.assert_array_equal(s[k], b[3][k])
    assert not np.array_equal(a[3]["latents"], a[4]["latents"])
    m = s["text_mask"]
    assert m[:3].all() and list(m) == sorted(m, reverse=True)  # a valid prefix covering the image tokens
    assert a.null()["text_states"].shape == (3, 32)
    with pytest.raises(ValueError, match="text_len"):
        data.SyntheticSource(MODEL, DataConfig(text_len=2), 2)


def test_shuffle_is_deterministic_and_reshuffles_each_epoch():
    def order(seed):
        it = data.make_iterator(IndexSource(8), DataConfig(batch_size=2, seed=seed))
        return [int(x) for b in _take(it, 8) for x in b["i"]]

    first = order(0)
    assert first == order(0) and first != order(1)
    assert sorted(first[:8]) == list(range(8)) and sorted(first[8:]) == list(range(8))  # whole epochs
    assert first[:8] != first[8:]


def test_iterator_state_resumes_the_same_batches():
    cfg = DataConfig(batch_size=2, seed=3)
    it = data.make_iterator(IndexSource(6), cfg)
    _take(it, 4)
    state = it.get_state()
    want = [list(b["i"]) for b in _take(it, 5)]
    again = data.make_iterator(IndexSource(6), cfg)
    again.set_state(state)
    assert [list(b["i"]) for b in _take(again, 5)] == want


def test_processes_read_their_rows_of_the_same_global_batches():
    cfg = DataConfig(batch_size=4, seed=0)
    whole = [list(b["i"]) for b in _take(data.make_iterator(IndexSource(6), cfg), 3)]
    parts = [[list(b["i"]) for b in _take(data.make_iterator(IndexSource(6), cfg, rows), 3)]
             for rows in (slice(0, 1), slice(1, 4))]
    assert [p + q for p, q in zip(*parts)] == whole and all(len(p) == 1 for p in parts[0])
    mesh = make_mesh("data=2,fsdp=2,sequence=2")
    assert data.process_rows(batch_shardings(mesh)["batch"], 8) == slice(0, 8)  # one process holds every row


def test_prepared_directory_source(tmp_path):
    path = write_prepared(tmp_path / "d")
    src = data.open_source(DataConfig(source=str(path)), MODEL, 2)
    assert len(src) == 3 and src[1]["latents"].shape == (2, 4, 4, 16)
    b = next(data.make_iterator(src, DataConfig(source=str(path), batch_size=2)))
    assert b["latents"].shape == (2, 2, 4, 4, 16) and b["null_text_states"].shape == (4, 32)
    g = data.global_batch(b, batch_shardings(make_mesh("data=2,fsdp=-1", jax.devices()[:2])))
    assert isinstance(g["latents"], jax.Array) and g["latents"].shape == (2, 2, 4, 4, 16)
    with pytest.raises(ValueError, match="n_image_tokens=2"):
        data.open_source(DataConfig(source=str(path)), MODEL, 3)
    with pytest.raises(FileNotFoundError, match="prepare-data"):
        data.open_source(DataConfig(source=str(tmp_path)), MODEL, 2)
