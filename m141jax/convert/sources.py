"""Lazy, streaming readers of PyTorch-side weights: one tensor in memory at a time.

`open_source(path)` accepts a .safetensors file, a .pt/.pth/.bin/.ckpt pickle, or a directory holding
sharded safetensors, sharded .bin files, a DeepSpeed `mp_rank_00_model_states.pt`, or a diffusers /
Hugging Face model folder. Wrappers ('state_dict', 'module') and prefixes that every key shares
('model.', 'module.', ...) are removed. Shapes are known without reading data, so keys and shapes
can be checked before anything is converted.

Pickles are loaded only with `torch.load(weights_only=True)`; one that would run code is refused.
safetensors files are read with plain file reads (no mmap), and pages of memory-mapped pickles are
released after each tensor, so the reader's footprint stays at about one tensor.
"""

from __future__ import annotations

import ctypes
import json
import os
import struct
import warnings
from pathlib import Path
from typing import Iterable

import ml_dtypes
import numpy as np

PICKLE_SUFFIXES = (".pt", ".pth", ".bin", ".ckpt")
WRAPPERS = ("state_dict", "module", "model", "ema")
_ST_DTYPES = {"F64": np.float64, "F32": np.float32, "F16": np.float16, "BF16": ml_dtypes.bfloat16,
              "I64": np.int64, "I32": np.int32, "I16": np.int16, "I8": np.int8, "U8": np.uint8, "BOOL": np.bool_,
              "F8_E4M3": ml_dtypes.float8_e4m3fn, "F8_E5M2": ml_dtypes.float8_e5m2}
# safetensors dtype codes with no numpy reader here: their tensors can be listed (and refused as non-float)
_ST_OTHER = {"U16": "uint16", "U32": "uint32", "U64": "uint64", "C64": "complex64", "C128": "complex128",
             "F8_E8M0": "float8_e8m0fnu", "F4": "float4_e2m1fn_x2", "F6_E2M3": "float6_e2m3", "F6_E3M2": "float6_e3m2"}
FLOAT_DTYPES = ("float64", "float32", "float16", "bfloat16", "float8_e4m3fn", "float8_e5m2")  # read as floats
_MAX_HEADER = 100 << 20  # the safetensors format's own limit on the JSON header


class SourceError(ValueError):
    """A source that cannot be read, or that is refused (for example a pickle that would run code)."""


class _SafetensorsFile:
    """Header-only open of one .safetensors file; tensors read on demand with pread. The header is
    checked completely (sizes, offsets, dtypes) so a damaged or foreign file is refused in one line."""

    def __init__(self, path: Path):
        self.path = path
        size = path.stat().st_size
        bad = f"{path} is not a valid .safetensors file"
        if size < 8:
            raise SourceError(f"{bad}: it is empty" if size == 0 else f"{bad}: {size} bytes, shorter than the header")
        with open(path, "rb") as f:
            n = struct.unpack("<Q", f.read(8))[0]
            if n > min(size - 8, _MAX_HEADER):
                raise SourceError(f"{bad}: its header length field says {n} bytes, but the file has {size} bytes")
            raw = f.read(n)
        try:
            header = json.loads(raw.decode("utf-8"))
        except (UnicodeDecodeError, ValueError) as e:
            raise SourceError(f"{bad}: its header is not JSON ({e})") from None
        if not isinstance(header, dict):
            raise SourceError(f"{bad}: its header is a JSON {type(header).__name__}, not an object")
        header.pop("__metadata__", None)
        self.base = 8 + n
        for key, e in header.items():
            self._check_entry(key, e, size - self.base, bad)
        self.entries = header

    def _check_entry(self, key, e, data_size: int, bad: str) -> None:
        ok = (isinstance(e, dict) and isinstance(e.get("dtype"), str) and isinstance(e.get("shape"), list)
              and all(type(d) is int and d >= 0 for d in e["shape"]) and isinstance(e.get("data_offsets"), list)
              and len(e["data_offsets"]) == 2 and all(type(o) is int for o in e["data_offsets"])
              and 0 <= e["data_offsets"][0] <= e["data_offsets"][1])
        if not ok:
            raise SourceError(f"{bad}: malformed header entry for {key!r}: {str(e)[:200]}")
        if e["dtype"] not in _ST_DTYPES and e["dtype"] not in _ST_OTHER:
            raise SourceError(f"{bad}: tensor {key!r} has unknown dtype {e['dtype']!r}")
        start, end = e["data_offsets"]
        if e["dtype"] in _ST_DTYPES and end - start != int(np.prod(e["shape"])) * np.dtype(_ST_DTYPES[e["dtype"]]).itemsize:
            raise SourceError(f"{bad}: tensor {key!r} ({e['dtype']} {e['shape']}) spans {end - start} bytes")
        if end > data_size:
            raise SourceError(f"{self.path}: truncated: tensor {key!r} needs {end} data bytes, the file holds {data_size}")

    def shape(self, key):
        return tuple(self.entries[key]["shape"])

    def dtype(self, key) -> str:
        code = self.entries[key]["dtype"]
        return np.dtype(_ST_DTYPES[code]).name if code in _ST_DTYPES else _ST_OTHER[code]

    def get(self, key) -> np.ndarray:
        e = self.entries[key]
        if e["dtype"] not in _ST_DTYPES:
            raise SourceError(f"{self.path}: tensor {key!r} has dtype {self.dtype(key)}, which cannot be read")
        dtype = np.dtype(_ST_DTYPES[e["dtype"]])
        start, end = e["data_offsets"]
        buf = np.empty((end - start) // dtype.itemsize, dtype)
        with open(self.path, "rb", buffering=0) as f:
            f.seek(self.base + start)
            view = memoryview(buf.view(np.uint8))
            got = 0
            while got < len(view):
                n = f.readinto(view[got:])
                if not n:
                    raise SourceError(f"{self.path}: truncated data for {key!r}")
                got += n
        return buf.reshape(e["shape"])


_libc = ctypes.CDLL(None, use_errno=True) if os.name == "posix" else None
_MADV_DONTNEED = 4


def _drop_pages(tensor) -> None:
    """Release the resident pages of a tensor memory-mapped read-only from its file (they are re-read
    from disk if touched again). Only whole pages inside the tensor's own storage are released."""
    if _libc is None:
        return
    storage = tensor.untyped_storage()
    start, size = storage.data_ptr(), storage.nbytes()
    page = os.sysconf("SC_PAGE_SIZE")
    lo, hi = -(-start // page) * page, (start + size) // page * page
    if hi > lo:
        _libc.madvise(ctypes.c_void_p(lo), ctypes.c_size_t(hi - lo), _MADV_DONTNEED)


def _torch_to_numpy(t) -> np.ndarray:
    import torch

    t = t.detach()
    if t.dtype == torch.bfloat16:
        return t.contiguous().view(torch.int16).numpy().view(ml_dtypes.bfloat16).copy()
    return t.contiguous().numpy().copy()


def _is_pickle_stream(path: Path, mapped: bool) -> bool:
    """Whether the file's object stream parses as pickle opcodes (a real pickle, as opposed to random or
    damaged bytes): the zip archive's `data.pkl`, else the legacy format's leading pickles."""
    import io
    import pickletools
    import zipfile

    try:
        if mapped:
            with zipfile.ZipFile(path) as z:
                names = [n for n in z.namelist() if n.endswith("data.pkl")]
                if not names:
                    return False
                data = z.read(names[0])
            count = 1
        else:
            with open(path, "rb") as f:
                data = f.read(64 << 20)  # the pickles come first; the tensor bytes follow them
            count = 4  # magic number, protocol, sys info, then the object (legacy torch.save)
        stream = io.BytesIO(data)
        for _ in range(count):
            for _op in pickletools.genops(stream):
                pass
            if not mapped and stream.tell() == len(data):
                break
        return True
    except Exception:
        return False


def _weights_only_reason(msg: str) -> str:
    """The specific line of torch's weights-only refusal (what it met), without its boilerplate."""
    boiler = ("Weights only load failed", "Please file an issue", "Check the documentation", "In PyTorch 2.6")
    for line in msg.splitlines():
        line = line.strip().removeprefix("WeightsUnpickler error:").strip()
        if line and not line.startswith(boiler):
            return line
    return "torch's weights-only loader refused it"


def _load_pickle(path: Path) -> tuple[object, bool]:
    """(the unpickled object, whether its tensors are memory-mapped from the file)."""
    try:
        import torch
    except ImportError:
        raise SourceError(f"{path}: reading PyTorch pickles needs torch; install the 'convert' extra "
                          f"(pip install 'm141jax[convert]')") from None
    import zipfile

    if path.stat().st_size == 0:
        raise SourceError(f"cannot read {path}: the file is empty")
    mmap = zipfile.is_zipfile(path)  # mmap needs the zip format (torch >= 1.6 default)
    try:
        with warnings.catch_warnings():  # a plain pickle's protocol is refused (or read) below, in one line
            warnings.filterwarnings("ignore", message="Detected pickle protocol", category=UserWarning)
            return torch.load(path, map_location="cpu", weights_only=True, mmap=mmap), mmap
    except Exception as e:
        msg = str(e).strip()
        if "Weights only load failed" in msg or "UnpicklingError" in type(e).__name__:
            # torch's weights-only unpickler met something it does not allow; that is a refusal only when
            # the bytes are a real pickle (one that needs code); damaged or foreign bytes are unreadable.
            why = _weights_only_reason(msg)
            if _is_pickle_stream(path, mmap):
                raise SourceError(f"refusing to load {path}: it is not a weights-only pickle (it would run code or "
                                  f"build objects other than tensors; {why}). Only if you trust it: load it with "
                                  f"torch.load(weights_only=False) and torch.save its state dict") from None
            raise SourceError(f"cannot read {path}: not a PyTorch checkpoint (the bytes are neither a torch zip "
                              f"archive nor a pickle; damaged or not a weights file)") from None
        reason = msg.splitlines()[0] if msg else type(e).__name__
        if isinstance(e, EOFError):
            reason = "unexpected end of file: the file is truncated or not a PyTorch checkpoint"
        elif not mmap and not _is_pickle_stream(path, mmap):
            reason = f"not a PyTorch checkpoint (the bytes are neither a torch zip archive nor a pickle; torch: {reason})"
        raise SourceError(f"cannot read {path}: {reason}") from None


def _flatten_state(obj, path: Path) -> dict:
    """Unwrap {'state_dict': ...} / {'module': ...} layers and return the flat name -> tensor dict."""
    import torch

    while isinstance(obj, dict):  # a real state dict never holds a dict, so a dict under a wrapper name is one
        inner = [k for k in WRAPPERS if isinstance(obj.get(k), dict)]
        if not inner:
            break
        obj = obj[inner[0]]
    if not isinstance(obj, dict):
        raise SourceError(f"{path}: expected a state dict, found {type(obj).__name__}")
    tensors = {k: v for k, v in obj.items() if isinstance(v, torch.Tensor)}
    if not tensors:
        raise SourceError(f"{path}: no tensors found; top-level keys are {sorted(map(str, obj))[:10]}")
    return tensors


class TensorSource:
    """name -> tensor mapping over one or more files; `get` returns a fresh numpy array."""

    def __init__(self, files: Iterable[Path], strip: Iterable[str] = ("model.", "module.")):
        # name -> (safetensors file, key) or (torch tensor, memory-mapped?)
        self._where: dict[str, tuple[object, object]] = {}
        self.files = [Path(f) for f in files]
        for f in self.files:
            if f.suffix == ".safetensors":
                st = _SafetensorsFile(f)
                items = {k: (st, k) for k in st.entries}
            else:
                obj, mapped = _load_pickle(f)
                items = {k: (t, mapped) for k, t in _flatten_state(obj, f).items()}
            dup = set(items) & set(self._where)
            if dup:
                raise SourceError(f"{f}: keys also found in another shard: {sorted(dup)[:5]}")
            self._where.update(items)
        if not self._where:
            raise SourceError(f"no tensors found in {', '.join(map(str, self.files))}")
        self.prefix = ""
        for p in strip:  # strip a prefix only when every key has it
            while all(k.startswith(self.prefix + p) for k in self._where):
                self.prefix += p
        if self.prefix:
            self._where = {k[len(self.prefix):]: v for k, v in self._where.items()}

    def keys(self) -> set[str]:
        return set(self._where)

    def shape(self, key: str) -> tuple[int, ...]:
        obj, k = self._where[key]
        return obj.shape(k) if isinstance(obj, _SafetensorsFile) else tuple(obj.shape)

    def dtype(self, key: str) -> str:
        """The stored dtype's name ('float32', 'bfloat16', 'int64', 'bool', 'complex64', ...), read
        without loading the data; floats that are converted are those in FLOAT_DTYPES."""
        obj, k = self._where[key]
        if isinstance(obj, _SafetensorsFile):
            return obj.dtype(k)
        return str(obj.dtype).removeprefix("torch.")

    def get(self, key: str) -> np.ndarray:
        obj, k = self._where[key]
        if isinstance(obj, _SafetensorsFile):
            return obj.get(k)
        arr = _torch_to_numpy(obj)
        if k:  # memory-mapped
            _drop_pages(obj)
        return arr


def _shards(directory: Path, suffix: str) -> list[Path]:
    """Shard files of one kind in a directory, using a *.index.json weight map when present."""
    index = sorted(directory.glob(f"*{suffix}.index.json"))
    if index:
        names = sorted(set(json.loads(index[0].read_text())["weight_map"].values()))
        return [directory / n for n in names]
    return sorted(directory.glob(f"*{suffix}"))


def find_files(src: str | Path) -> tuple[list[Path], Path | None]:
    """(weight files, config.json or None) for a file or a model directory."""
    src = Path(src)
    if not src.exists():
        raise SourceError(f"{src} does not exist")
    if src.is_file():
        if src.suffix != ".safetensors" and src.suffix not in PICKLE_SUFFIXES:
            raise SourceError(f"{src}: unsupported file type; accepted: .safetensors, {', '.join(PICKLE_SUFFIXES)}")
        return [src], None
    config = src / "config.json" if (src / "config.json").is_file() else None
    if (src / "mp_rank_00_model_states.pt").is_file():
        return [src / "mp_rank_00_model_states.pt"], config
    for suffix in (".safetensors", ".bin", ".pt", ".pth"):
        files = _shards(src, suffix)
        if files:
            return files, config
    raise SourceError(f"{src}: no weights found (looked for *.safetensors, *.bin, *.pt, *.pth, "
                      f"mp_rank_00_model_states.pt)")


def open_source(src: str | Path, strip: Iterable[str] = ("model.", "module.")) -> tuple[TensorSource, dict | None]:
    """(TensorSource, the folder's config.json as a dict or None)."""
    files, config = find_files(src)
    return TensorSource(files, strip), (read_config_json(config) if config else None)


def read_config_json(path: str | Path, what: str = "config") -> dict:
    """A config JSON file as a dict; a one-line SourceError naming the file when it is not a JSON object."""
    try:
        d = json.loads(Path(path).read_text())
    except (OSError, UnicodeDecodeError, ValueError) as e:
        raise SourceError(f"{what} {path} is not valid JSON: {e}") from None
    if not isinstance(d, dict):
        raise SourceError(f"{what} {path} holds a JSON {type(d).__name__}, expected an object of fields")
    return d
