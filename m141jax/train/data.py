"""Input pipelines with grain: precomputed latents + conditioning, or a synthetic source for tests.

A prepared-data directory (written by `m141jax prepare-data`) holds
    data.json        {"format": 1, "samples": N, "n_image_tokens": n, ...}
    null.npz         the empty prompt: text_states [L−n, D], text_mask [L−n], text_states_2 [D2]
    samples/{i:08d}.npz   latents [F,H,W,C] (scaled VAE latents, channels-last), ref_latents [1,H,W,C]
                     (I2V), text_states [L,D], text_mask [L], text_states_2 [D2]

The pipeline shuffles the sample indices deterministically (a new order every epoch, from `seed`), repeats
forever and batches them into global batches, the same on every JAX process; each process reads only the
rows its devices hold, so a step sees the same samples however many hosts run it. Its iterator state (a
position) is saved with every checkpoint so a resumed run reads the same batches.
"""

from __future__ import annotations

import json
from pathlib import Path

import grain
import jax
import numpy as np

from m141jax.config import DiTConfig
from m141jax.train.config import DataConfig

FORMAT = 1
META = "data.json"


class SyntheticSource:
    """Deterministic random samples (sample i depends only on (seed, i)) shaped for `model`: for tests
    and dry runs. Valid text tokens form a prefix covering the image tokens."""

    def __init__(self, model: DiTConfig, data: DataConfig, n_image_tokens: int):
        if data.text_len <= n_image_tokens:
            raise ValueError(f"data.text_len {data.text_len} must exceed n_image_tokens {n_image_tokens}")
        self.model, self.data, self.n_image_tokens = model, data, n_image_tokens

    def __len__(self) -> int:
        return self.data.num_samples

    def __getitem__(self, i: int) -> dict[str, np.ndarray]:
        d, m = self.data, self.model
        rng = np.random.default_rng([d.seed, int(i)])
        c = m.out_channels
        x = rng.standard_normal((d.frames, d.height, d.width, c), dtype=np.float32)
        n_valid = int(rng.integers(self.n_image_tokens + 1, d.text_len + 1))
        sample = {"latents": x,
                  "text_states": rng.standard_normal((d.text_len, m.text_dim), dtype=np.float32),
                  "text_mask": (np.arange(d.text_len) < n_valid).astype(np.int32),
                  "text_states_2": rng.standard_normal((m.pooled_dim,), dtype=np.float32)}
        if m.image_conditioned:
            sample["ref_latents"] = x[:1].copy()
        return sample

    def null(self) -> dict[str, np.ndarray]:
        rng = np.random.default_rng([self.data.seed, -1 % 2**32])
        n = self.data.text_len - self.n_image_tokens
        return {"text_states": rng.standard_normal((n, self.model.text_dim), dtype=np.float32),
                "text_mask": (np.arange(n) < 1).astype(np.int32),
                "text_states_2": rng.standard_normal((self.model.pooled_dim,), dtype=np.float32)}


class LatentSource:
    """Samples of a prepared-data directory, read one .npz per sample."""

    def __init__(self, path: str | Path):
        self.path = Path(path)
        meta_path = self.path / META
        if not meta_path.is_file():
            raise FileNotFoundError(f"{self.path} is not a prepared-data directory (no {META}); "
                                    f"write one with `m141jax prepare-data`")
        self.meta = json.loads(meta_path.read_text())
        if self.meta.get("format") != FORMAT:
            raise ValueError(f"{meta_path}: data format {self.meta.get('format')} is not supported (expected {FORMAT})")

    def __len__(self) -> int:
        return int(self.meta["samples"])

    def __getitem__(self, i: int) -> dict[str, np.ndarray]:
        with np.load(self.path / "samples" / f"{int(i):08d}.npz") as f:
            return {k: f[k] for k in f.files}

    def null(self) -> dict[str, np.ndarray]:
        with np.load(self.path / "null.npz") as f:
            return {k: f[k] for k in f.files}


def open_source(data: DataConfig, model: DiTConfig, n_image_tokens: int):
    """The source named by data.source: 'synthetic' or a prepared-data directory."""
    if data.source == "synthetic":
        return SyntheticSource(model, data, n_image_tokens)
    src = LatentSource(data.source)
    if int(src.meta.get("n_image_tokens", n_image_tokens)) != n_image_tokens:
        raise ValueError(f"{data.source} was prepared with n_image_tokens={src.meta['n_image_tokens']}, "
                         f"but the config says {n_image_tokens}")
    return src


def process_rows(sharding, batch_size: int) -> slice:
    """The rows of a global batch of `batch_size` held by this process's devices under `sharding` (split
    along the leading axis): one contiguous range, since hosts are grouped on the outer mesh axes
    (`parallel.make_mesh`); every row on a single process."""
    rows = sorted({r for idx in sharding.addressable_devices_indices_map((batch_size,)).values()
                   for r in range(batch_size)[idx[0]]})
    if rows != list(range(rows[0], rows[-1] + 1)):
        raise ValueError(f"this process's devices hold rows {rows} of the batch of {batch_size}, not one "
                         f"contiguous range; put the hosts on the mesh's data/fsdp axes")
    return slice(rows[0], rows[-1] + 1)


def make_iterator(source, data: DataConfig, rows: slice | None = None) -> grain.DatasetIterator:
    """An endless iterator of batches (dicts of numpy arrays) with the empty prompt attached as `null_*`
    entries; checkpointable with grain.checkpoint.CheckpointSave/Restore.

    Every process draws the same sequence of global batches (sample order shuffled from `seed`, a new order
    every epoch) and reads only its `rows` of each (default: all; `process_rows`), so the samples of a step
    do not depend on the number of processes."""
    if len(source) < 1:
        raise ValueError("the data source holds no samples")
    rows = rows or slice(0, data.batch_size)
    null = {f"null_{k}": v for k, v in source.null().items()}

    def load(indices):
        samples = [source[int(i)] for i in indices[rows]]
        return {**{k: np.stack([s[k] for s in samples]) for k in samples[0]}, **null}

    ds = (grain.MapDataset.range(len(source)).seed(data.seed).shuffle().repeat()
          .batch(data.batch_size, drop_remainder=True).map(load))
    options = grain.ReadOptions(num_threads=data.read_threads, prefetch_buffer_size=data.prefetch)
    return iter(ds.to_iter_dataset(options))


def global_batch(batch: dict, sharding, batch_size: int | None = None) -> dict:
    """This process's rows of a global batch of `batch_size` (default: the rows given, a single process) as
    global jax arrays: batched entries split by sharding['batch'], the unbatched empty prompt placed by
    sharding['replicated']."""
    def put(key, x):
        x = np.asarray(x)
        if key.startswith("null_"):
            return jax.make_array_from_callback(x.shape, sharding["replicated"], lambda idx: x[idx])
        n = batch_size or x.shape[0]
        lo = process_rows(sharding["batch"], n).start

        def rows(idx):
            r = range(n)[idx[0]]
            return x[(slice(r.start - lo, r.stop - lo), *idx[1:])]
        return jax.make_array_from_callback((n, *x.shape[1:]), sharding["batch"], rows)

    return {k: put(k, v) for k, v in batch.items()}
