"""What a pod operator watches during a run: TensorBoard event files, a profiler trace of a step range, the
step's FLOPs (for throughput and MFU) and the memory each device holds.

- `EventWriter`: TensorBoard scalars without a TensorBoard dependency: an `events.out.tfevents.*` file of
  TFRecords (length, masked CRC-32C of the length, an `Event` protocol buffer, its masked CRC-32C) holding
  `Event{wall_time, step, summary{value{tag, simple_value}}}`, hand-encoded (the format is small and fixed).
  A resumed run starts a new file with a `SessionLog START` event at the resume step, which tells
  TensorBoard to drop the previous run's points after that step (as `metrics.csv` drops its rows).
- `step_flops`: the model FLOPs of one step, counted on its jaxpr (2·M·N·K per matrix product, scan
  bodies × their length, the larger branch of a `cond`, while-loop bodies once). XLA's `cost_analysis()`
  counts a scanned layer stack's body once, so it is not used. Callers trace the step with attention on
  the plain XLA path and no rematerialisation, so the count is model FLOPs (not recomputation, and not
  hidden inside attention kernels).
- `peak_flops`: a chip's dense bf16 peak by `device_kind` (None when unknown, e.g. a CPU: no MFU then).
- `memory_in_use`: `bytes_in_use` / `peak_bytes_in_use` per local device where `memory_stats()` reports them.
- `ProfileWindow`: `jax.profiler` trace of steps [start, start + steps) into RUN/profile.
"""

from __future__ import annotations

import dataclasses
import math
import os
import socket
import struct
import time
from pathlib import Path
from typing import Any, Iterable

import jax
import jax.extend

# ---- TensorBoard event files

_CRC_TABLE = []
for _i in range(256):
    _c = _i
    for _ in range(8):
        _c = (_c >> 1) ^ 0x82F63B78 if _c & 1 else _c >> 1
    _CRC_TABLE.append(_c)


def crc32c(data: bytes) -> int:
    """CRC-32C (Castagnoli), as TFRecord frames use it."""
    crc = 0xFFFFFFFF
    for b in data:
        crc = _CRC_TABLE[(crc ^ b) & 0xFF] ^ (crc >> 8)
    return crc ^ 0xFFFFFFFF


def masked_crc(data: bytes) -> int:
    crc = crc32c(data)
    return (((crc >> 15) | (crc << 17)) + 0xA282EAD8) & 0xFFFFFFFF


def tfrecord(data: bytes) -> bytes:
    """One TFRecord frame around data."""
    n = struct.pack("<Q", len(data))
    return n + struct.pack("<I", masked_crc(n)) + data + struct.pack("<I", masked_crc(data))


def _varint(n: int) -> bytes:
    out = bytearray()
    while True:
        b, n = n & 0x7F, n >> 7
        out.append(b | (0x80 if n else 0))
        if not n:
            return bytes(out)


def _field(number: int, payload: bytes) -> bytes:  # a length-delimited field (wire type 2)
    return _varint(number << 3 | 2) + _varint(len(payload)) + payload


def event_bytes(step: int, wall_time: float, *, scalars: dict[str, float] | None = None,
                file_version: str | None = None, session_start: bool = False) -> bytes:
    """An `Event` protocol buffer: wall_time (1, double), step (2, int64), file_version (3),
    summary (5: repeated value (1) {tag (1), simple_value (2, float)}), session_log (7: status (1) START = 1)."""
    out = b"\x09" + struct.pack("<d", wall_time) + b"\x10" + _varint(step)
    if file_version is not None:
        out += _field(3, file_version.encode())
    if scalars:
        values = b"".join(_field(1, _field(1, tag.encode()) + b"\x15" + struct.pack("<f", value))
                          for tag, value in sorted(scalars.items()))
        out += _field(5, values)
    if session_start:
        out += _field(7, b"\x08\x01")
    return out


class EventWriter:
    """Scalars to LOGDIR/events.out.tfevents.TIME.HOST.PID (one new file per start, TIME above any earlier
    file's so TensorBoard reads them in order; flushed at every write)."""

    def __init__(self, logdir: str | Path, resume_step: int | None = None):
        self.dir = Path(logdir)
        self.dir.mkdir(parents=True, exist_ok=True)
        now = time.time()
        # TensorBoard reads a directory's files in name order: a later start gets a larger timestamp
        stamps = [int(p.name.split(".")[3]) for p in self.dir.glob("events.out.tfevents.*")
                  if p.name.split(".")[3:4] and p.name.split(".")[3].isdigit()]
        stamp = max([int(now), *(t + 1 for t in stamps)])
        self.path = self.dir / f"events.out.tfevents.{stamp}.{socket.gethostname()}.{os.getpid()}"
        self._f = open(self.path, "xb")
        self._f.write(tfrecord(event_bytes(0, now, file_version="brain.Event:2")))
        if resume_step:
            self._f.write(tfrecord(event_bytes(resume_step, now, session_start=True)))
        self._f.flush()

    def scalars(self, step: int, values: dict[str, float]) -> None:
        self._f.write(tfrecord(event_bytes(step, time.time(), scalars=values)))
        self._f.flush()

    def close(self) -> None:
        self._f.close()


# ---- FLOPs, peaks, memory

# dense bf16 peak TFLOP/s per chip, matched as a case-insensitive substring of device_kind (first match wins)
PEAK_BF16_TFLOPS = (("H200", 989.4), ("H100", 989.4), ("GH200", 989.4), ("B200", 2250.0), ("A100", 312.0),
                    ("L40S", 362.0), ("v6 lite", 918.0), ("v6e", 918.0), ("v5 lite", 197.0), ("v5e", 197.0),
                    ("v5p", 459.0), ("v5", 459.0), ("v4", 275.0))


def peak_flops(device=None) -> float | None:
    """The dense bf16 peak FLOP/s of a device (default: the first), None when its kind is not in the table."""
    kind = (device or jax.devices()[0]).device_kind.lower()
    return next((tf * 1e12 for k, tf in PEAK_BF16_TFLOPS if k.lower() in kind), None)


def _sub_jaxprs(value) -> Iterable[Any]:
    if isinstance(value, jax.extend.core.ClosedJaxpr):
        yield value.jaxpr
    elif isinstance(value, jax.extend.core.Jaxpr):
        yield value
    elif isinstance(value, (tuple, list)):
        for v in value:
            yield from _sub_jaxprs(v)


def jaxpr_flops(jaxpr) -> float:
    """FLOPs of the matrix products of a jaxpr (see the module docstring for loops and branches)."""
    jaxpr = getattr(jaxpr, "jaxpr", jaxpr)
    total = 0.0
    for eqn in jaxpr.eqns:
        name = eqn.primitive.name
        if name == "dot_general":
            (contract, _), _ = eqn.params["dimension_numbers"]
            lhs = eqn.invars[0].aval.shape
            total += 2.0 * math.prod(eqn.outvars[0].aval.shape) * math.prod(lhs[d] for d in contract)
        elif name == "cond":
            total += max(jaxpr_flops(b) for b in eqn.params["branches"])
        else:
            inner = sum(jaxpr_flops(j) for v in eqn.params.values() for j in _sub_jaxprs(v))
            total += inner * (eqn.params["length"] if name == "scan" else 1)
    return total


def step_flops(fn, *args, static_argnums=()) -> float:
    """The FLOPs of fn(*args) counted on its jaxpr (traced, not compiled)."""
    return jaxpr_flops(jax.make_jaxpr(fn, static_argnums=static_argnums)(*args))


def model_flops_config(cfg):
    """A training config whose model is traced for counting FLOPs: attention on the plain XLA path (no
    kernels that hide their FLOPs), no sequence parallelism, no rematerialisation (model, not hardware, FLOPs)."""
    model = dataclasses.replace(cfg.model, attention="xla", sequence_parallel="none", remat="none")
    return dataclasses.replace(cfg, model=model)


class FlopCounter:
    """flops(state, batch, rng, step): count(state, batch, rng, step) computed once per `variant(step)` (a
    step function compiled in several variants, e.g. the DMD2 generator and critic turns). A count that fails
    is reported once and then omitted (None): the run goes on without throughput figures."""

    def __init__(self, count, variant=lambda step: None):
        self.count, self.variant, self.cache = count, variant, {}

    def __call__(self, state, batch, rng, step):
        key = self.variant(step)
        if key not in self.cache:
            try:
                self.cache[key] = self.count(state, batch, rng, step)
            except Exception as e:  # an observation must not stop a training run
                print(f"note: the step's FLOPs could not be counted ({type(e).__name__}: {e}); no MFU reported")
                self.cache[key] = None
        return self.cache[key]


def memory_in_use(devices=None) -> dict[str, float]:
    """{'memory_gib/dev{id}': bytes in use, 'memory_peak_gib/dev{id}': peak} in GiB per local device, where
    the backend reports them (GPUs and TPUs; not the CPU)."""
    out = {}
    for d in devices or jax.local_devices():
        stats = d.memory_stats() if hasattr(d, "memory_stats") else None
        if not stats or "bytes_in_use" not in stats:
            continue
        out[f"memory_gib/dev{d.id}"] = stats["bytes_in_use"] / 2**30
        if "peak_bytes_in_use" in stats:
            out[f"memory_peak_gib/dev{d.id}"] = stats["peak_bytes_in_use"] / 2**30
    return out


# ---- profiler

class ProfileWindow:
    """A `jax.profiler` trace of steps [start, start + steps) (0-based) into `logdir`; `steps` ≤ 0 disables."""

    def __init__(self, logdir: str | Path, start: int, steps: int):
        self.logdir, self.start, self.stop_at = Path(logdir), start, start + steps
        self.enabled, self.active = steps > 0, False

    def before(self, step: int) -> None:
        if self.enabled and not self.active and self.start <= step < self.stop_at:
            self.logdir.mkdir(parents=True, exist_ok=True)
            jax.profiler.start_trace(str(self.logdir))
            self.active = True

    def after(self, step: int, state) -> None:
        if self.active and step + 1 >= self.stop_at:
            self.close(state)

    def close(self, state=None) -> None:
        if self.active:
            if state is not None:
                jax.block_until_ready(state)
            jax.profiler.stop_trace()
            self.active = False


def window_rates(flops: float, dt: float, n_devices: int, peak: float | None) -> dict[str, float]:
    """Achieved model TFLOP/s per device over a window of `flops` in `dt` seconds, and MFU when the peak is known."""
    out = {"tflops_per_s_per_device": flops / n_devices / dt / 1e12}
    if peak:
        out["mfu"] = flops / n_devices / dt / peak
    return out

