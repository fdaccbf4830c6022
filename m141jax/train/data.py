"""Input pipelines with grain: precomputed latents + conditioning, or a synthetic source for tests.

A prepared-data directory (written by `m141jax prepare-data`) holds
    data.json        {"format": 1, "samples": N, "n_image_tokens": n, ...}
    null.npz         the empty prompt: text_states [L−n, D], text_mask [L−n], text_states_2 [D2]
    samples/{i:08d}.npz   latents [F,H,W,C] (scaled VAE latents, channels-last), ref_latents [1,H,W,C]
                     (I2V), text_states [L,D], text_mask [L], text_states_2 [D2]

The pipeline shards the sample indices over JAX processes (host i reads i, i+P, ...), shuffles them
deterministically (a new order every epoch, from `seed`), repeats forever and batches; its iterator
state (a position) is saved with every checkpoint so a resumed run reads the same batches.
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


def make_iterator(source, data: DataConfig) -> grain.DatasetIterator:
    """An endless iterator of this host's batches (dicts of numpy arrays) with the empty prompt attached
    as `null_*` entries; checkpointable with grain.checkpoint.CheckpointSave/Restore."""
    procs, index = jax.process_count(), jax.process_index()
    if data.batch_size % procs:
        raise ValueError(f"batch_size {data.batch_size} is not divisible by the {procs} processes")
    if len(source) < procs:
        raise ValueError(f"{len(source)} samples cannot be shared by {procs} processes")
    null = {f"null_{k}": v for k, v in source.null().items()}
    ds = (grain.MapDataset.source(source).slice(slice(index, None, procs)).seed(data.seed).shuffle().repeat()
          .batch(data.batch_size // procs, drop_remainder=True).map(lambda b: {**b, **null}))
    options = grain.ReadOptions(num_threads=data.read_threads, prefetch_buffer_size=data.prefetch)
    return iter(ds.to_iter_dataset(options))


def global_batch(batch: dict, sharding) -> dict:
    """This host's batch as global jax arrays: batched entries split by sharding['batch'], the
    unbatched empty prompt placed by sharding['replicated']."""
    return {k: jax.make_array_from_process_local_data(
        sharding["replicated" if k.startswith("null_") else "batch"], np.asarray(v)) for k, v in batch.items()}
