"""Runs a pod operator can watch: TensorBoard event files (read back by an independent reader below), a
profiler trace of a step range, and per-window throughput / MFU from the step's model FLOPs."""

import csv
import struct

import jax
import jax.numpy as jnp
import pytest

from m141jax.cli import main
from m141jax.config import preset
from m141jax.train import observe

# ---- an independent reader of TensorBoard event files: TFRecord frames + the protobuf wire format


def _crc32c_bitwise(data: bytes) -> int:
    crc = 0xFFFFFFFF
    for b in data:
        crc ^= b
        for _ in range(8):
            crc = (crc >> 1) ^ (0x82F63B78 & -(crc & 1))
    return crc ^ 0xFFFFFFFF


def _masked(data: bytes) -> int:
    c = _crc32c_bitwise(data)
    return (((c >> 15) | (c << 17)) + 0xA282EAD8) & 0xFFFFFFFF


def _records(path):
    raw, i, out = path.read_bytes(), 0, []
    while i < len(raw):
        (n,) = struct.unpack_from("<Q", raw, i)
        assert struct.unpack_from("<I", raw, i + 8)[0] == _masked(raw[i:i + 8]), "length CRC"
        data = raw[i + 12:i + 12 + n]
        assert struct.unpack_from("<I", raw, i + 12 + n)[0] == _masked(data), "data CRC"
        out.append(data)
        i += 16 + n
    return out


def _fields(buf: bytes) -> dict[int, list]:
    """Protobuf wire format -> {field number: [values]} (varint ints, fixed64/32 as raw bytes, bytes)."""
    out, i = {}, 0

    def varint():
        nonlocal i
        shift = value = 0
        while True:
            b = buf[i]
            i += 1
            value |= (b & 0x7F) << shift
            shift += 7
            if not b & 0x80:
                return value
    while i < len(buf):
        key = varint()
        number, wire = key >> 3, key & 7
        if wire == 0:
            v = varint()
        elif wire == 1:
            v, i = buf[i:i + 8], i + 8
        elif wire == 5:
            v, i = buf[i:i + 4], i + 4
        else:
            assert wire == 2, f"wire type {wire}"
            n = varint()
            v, i = buf[i:i + n], i + n
        out.setdefault(number, []).append(v)
    return out


def read_events(path):
    """[(step, wall_time, {tag: value}, file_version, session_status)] of one event file."""
    out = []
    for rec in _records(path):
        f = _fields(rec)
        scalars = {}
        for summary in f.get(5, []):
            for value in _fields(summary).get(1, []):
                v = _fields(value)
                scalars[v[1][0].decode()] = struct.unpack("<f", v[2][0])[0]
        session = _fields(f[7][0]).get(1, [None])[0] if 7 in f else None
        out.append((f.get(2, [0])[0], struct.unpack("<d", f[1][0])[0], scalars,
                    f[3][0].decode() if 3 in f else None, session))
    return out


def test_crc_and_event_file_round_trip(tmp_path):
    assert observe.crc32c(b"123456789") == 0xE3069283 == _crc32c_bitwise(b"123456789")  # the CRC-32C check value
    w = observe.EventWriter(tmp_path / "a")
    w.scalars(3, {"loss": 0.25, "memory_gib/dev0": 1.5})
    w.scalars(6, {"loss": -1e-3})
    w.close()
    (path,) = (tmp_path / "a").glob("events.out.tfevents.*")
    ev = read_events(path)
    assert ev[0][3] == "brain.Event:2" and [e[0] for e in ev] == [0, 3, 6]
    assert ev[1][2] == {"loss": 0.25, "memory_gib/dev0": 1.5} and ev[2][2] == {"loss": pytest.approx(-1e-3)}
    resumed = observe.EventWriter(tmp_path / "a", resume_step=4)  # in the same second: a later name all the same
    resumed.scalars(6, {"loss": 2.0})
    resumed.close()
    first, second = sorted((tmp_path / "a").glob("events.out.tfevents.*"))  # TensorBoard's reading order
    assert first == path and second == resumed.path
    assert [(e[0], e[4]) for e in read_events(second)] == [(0, None), (4, 1), (6, None)]  # SessionLog START


def test_tensorboard_reads_the_files_when_installed(tmp_path):
    """TensorBoard's own reader (not a dependency; skipped where it is not installed) sees the scalars, and
    the START of a resumed run drops the earlier run's points after the resume step."""
    ea = pytest.importorskip("tensorboard.backend.event_processing.event_accumulator")
    w = observe.EventWriter(tmp_path)
    w.scalars(2, {"loss": 0.5, "mfu": 0.25})
    w.scalars(4, {"loss": 0.125})
    w.close()
    w = observe.EventWriter(tmp_path, resume_step=3)
    w.scalars(4, {"loss": 9.0})
    w.close()
    acc = ea.EventAccumulator(str(tmp_path))
    acc.Reload()
    assert sorted(acc.Tags()["scalars"]) == ["loss", "mfu"]
    assert [(s.step, s.value) for s in acc.Scalars("loss")] == [(2, 0.5), (4, 9.0)]


def test_jaxpr_flops_counts_scans_grads_and_conds():
    def layer(c, w):
        return jnp.tanh(c @ w), None

    def f(ws, x):
        return (jax.lax.scan(layer, x, ws)[0] ** 2).sum()
    ws, x = jnp.ones((4, 32, 32)), jnp.ones((8, 32))
    fwd = 2 * 8 * 32 * 32 * 4
    assert observe.step_flops(f, ws, x) == fwd  # the scan body × its length
    assert observe.step_flops(jax.grad(f), ws, x) == 3 * fwd  # forward + two products per layer backward
    assert observe.step_flops(jax.grad(jax.checkpoint(f)), ws, x) == 4 * fwd  # recomputation shows when traced
    g = lambda p, x: jax.lax.cond(p, lambda: x @ x, lambda: x)  # noqa: E731
    assert observe.step_flops(g, True, jnp.ones((16, 16))) == 2 * 16 ** 3
    assert observe.window_rates(4e12, 2.0, 2, 2e12) == {"tflops_per_s_per_device": 1.0, "mfu": 0.5}
    assert "mfu" not in observe.window_rates(4e12, 2.0, 2, None)


def _dit_forward_flops(cfg, n_img, n_txt, batch):
    """The blocks' matrix products (anchors.md §5): (double + single)·(2(4 + 2r)·d²·N + 4·N²·d), r the MLP ratio."""
    n, d = n_img + n_txt, cfg.hidden_size
    return batch * (cfg.double_blocks + cfg.single_blocks) * (2 * (4 + 2 * cfg.mlp_ratio) * d * d * n + 4 * n * n * d)


def test_tiny_run_writes_events_profile_and_mfu(tmp_path, monkeypatch):
    monkeypatch.setattr(observe, "peak_flops", lambda device=None: 1e9)  # a CPU has no known peak: pretend 1 GFLOP/s
    run = tmp_path / "run"
    assert main(["train", "--output", str(run), "--quiet", "--mesh", "fsdp=-1", "preset=tiny-i2v", "data.batch_size=8",
                 "run.steps=4", "run.log_every=2", "run.checkpoint_every=4", "run.profile_start=1",
                 "run.profile_steps=2"]) == 0

    with open(run / "metrics.csv") as f:
        rows = [(int(r["step"]), r["metric"], float(r["value"])) for r in csv.DictReader(f)]
    csv_metrics = {(s, m): v for s, m, v in rows}
    for s in (2, 4):
        for m in ("loss", "grad_norm", "lr", "samples_per_s", "step_time_s", "tflops_per_s_per_device", "mfu"):
            assert (s, m) in csv_metrics, (s, m)
        rate, step_time = csv_metrics[s, "tflops_per_s_per_device"], csv_metrics[s, "step_time_s"]
        assert csv_metrics[s, "mfu"] == pytest.approx(rate * 1e12 / 1e9)
        # the counted FLOPs of one step: 3 × (forward) of the DiT on 8 samples of 2×8×8 latents (32 image + 8
        # text tokens), plus embedders, refiner and final layer; throughput = FLOPs / devices / step time
        step_flops = rate * 1e12 * 8 * step_time
        blocks = 3 * _dit_forward_flops(preset("tiny-i2v"), 32, 8, 8)
        assert blocks < step_flops < 1.5 * blocks

    (events,) = run.glob("events.out.tfevents.*")
    by_step = {s: scalars for s, _, scalars, _, _ in read_events(events) if scalars}
    assert sorted(by_step) == [2, 4]
    for s, scalars in by_step.items():
        assert {"loss", "grad_norm", "lr", "samples_per_s", "step_time_s", "mfu"} <= set(scalars)
        for tag, v in scalars.items():
            assert v == pytest.approx(csv_metrics[s, tag], rel=1e-6)

    traces = list((run / "profile").rglob("*.xplane.pb"))
    assert len(traces) == 1 and traces[0].stat().st_size > 0


def test_profile_fields_checked(tmp_path, capsys):
    assert main(["train", "--output", str(tmp_path / "x"), "preset=tiny-i2v", "run.profile_steps=-1"]) == 2
    assert "run.profile_steps -1 must be ≥ 0" in capsys.readouterr().err
