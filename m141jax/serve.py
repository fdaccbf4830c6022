"""Generation as a service of loaded models: the interactive loop and resumable JSON Lines batches.

Both keep the models loaded and the compiled programs in memory (and, with the persistent compilation
cache, on disk), and both describe a video by a `Request`: a prompt, optionally a first-frame image, a
seed, a frame count and an output file.

Seeds: a request with a seed S makes the video `m141jax generate --prompt P --seed S` makes (key
fold_in(key(S), 0)); one without takes the run's --seed and its index (fold_in(key(seed), index), the
rule of a plain prompts file), so its video does not depend on the other prompts of its batch.

Batches (`run_batch`): requests of equal shape (image size, frame count) run together, at most
`batch_size` at a time, in device batches that are whole multiples of the mesh's data axis where the
group allows (`device_batches`: the samplers split a batch's rows over that axis; a batch it does not
divide would run whole on every data shard), the rest as one smaller batch. `manifest.jsonl` beside the
outputs gets one line per finished video (prompt, seed, file, seconds, status "ok") or failed request
(status "error", message), each appended in one write; a rerun skips the requests whose video and "ok"
line exist. A batch that fails is retried request by request, so one bad request is recorded and the
others finish. Over several processes each takes the requests whose index modulo the process count is its
own (when its devices are its own).
"""

from __future__ import annotations

import dataclasses
import json
import os
import sys
import time
from pathlib import Path
from typing import Callable, Iterable, TextIO

import jax
import numpy as np

from m141jax import media, pipeline
from m141jax.axes import DATA
from m141jax.components import Models

MANIFEST = "manifest.jsonl"
FIELDS = ("prompt", "image", "seed", "frames", "out")


@dataclasses.dataclass(frozen=True)
class Request:
    """One video: its prompt, first-frame image (None: the text-to-image stage), seed (None: the run's
    seed and `index`), frame count (None: the run's) and output file."""

    prompt: str
    out: Path
    index: int = 0
    image: str | None = None
    seed: int | None = None
    frames: int | None = None


def parse_line(line: str) -> tuple[str, str | None, int | None] | None:
    """An interactive line `prompt [| image path [| seed]]` -> (prompt, image, seed); None for a blank line."""
    if not line.strip():
        return None
    parts = [p.strip() for p in line.split("|")]
    if len(parts) > 3:
        raise ValueError(f"{len(parts)} fields separated by '|'; accepted: prompt | image path | seed")
    if not parts[0]:
        raise ValueError("the prompt is empty (accepted: prompt | image path | seed)")
    image = parts[1] if len(parts) > 1 and parts[1] else None
    seed = None
    if len(parts) > 2 and parts[2]:
        try:
            seed = int(parts[2])
        except ValueError:
            raise ValueError(f"seed {parts[2]!r} is not an integer") from None
    return parts[0], image, seed


def is_jsonl(path: str | Path | None) -> bool:
    """A prompts file in JSON Lines: named *.jsonl, or its first non-blank line is a JSON object."""
    if path is None:
        return False
    if Path(path).suffix.lower() == ".jsonl":
        return True
    try:
        with open(path) as f:
            first = next((ln for ln in f if ln.strip()), "")
    except OSError:
        return False
    return first.lstrip().startswith("{")


def read_jsonl(path: str | Path, out: str | Path) -> list[Request | str]:
    """The requests of a JSON Lines prompts file, one object a line (`prompt`, optional `image`, `seed`,
    `frames`, `out`), blank lines skipped; a line that is not a valid request becomes its error message
    (so the batch records it and goes on). Outputs: an entry's `out` (relative: beside --out), else
    OUT_000.mp4, OUT_001.mp4, ... by line index."""
    out = Path(out)
    if out.suffix.lower() != ".mp4":
        raise ValueError(f"--out {out} must end in .mp4")
    try:
        lines = Path(path).read_text().splitlines()
    except OSError as e:
        raise ValueError(f"prompts file {path} cannot be read ({e.strerror})") from None
    entries: list[Request | str] = []
    for n, line in enumerate(ln for ln in lines if ln.strip()):
        default = out.with_name(f"{out.stem}_{n:03d}{out.suffix}")
        try:
            entries.append(_request(json.loads(line), n, default, out.parent))
        except json.JSONDecodeError as e:
            entries.append(f"line {n + 1}: not JSON ({e.msg})")
        except (ValueError, TypeError) as e:
            entries.append(f"line {n + 1}: {e}")
    if not entries:
        raise ValueError(f"prompts file {path} holds no prompt (one JSON object a line)")
    return entries


def _request(obj, index: int, default_out: Path, folder: Path) -> Request:
    if not isinstance(obj, dict):
        raise ValueError(f"expected a JSON object with {', '.join(FIELDS)}")
    unknown = sorted(set(obj) - set(FIELDS))
    if unknown:
        raise ValueError(f"unknown field(s) {', '.join(unknown)}; accepted: {', '.join(FIELDS)}")
    prompt = obj.get("prompt")
    if not isinstance(prompt, str) or not prompt.strip():
        raise ValueError("'prompt' must be a non-empty string")
    for name in ("seed", "frames"):
        if obj.get(name) is not None and (not isinstance(obj[name], int) or isinstance(obj[name], bool)):
            raise ValueError(f"'{name}' must be an integer, got {obj[name]!r}")
    target = Path(obj["out"]) if obj.get("out") else default_out
    if obj.get("out"):
        target = target if target.is_absolute() else folder / target
        if target.suffix.lower() != ".mp4":
            raise ValueError(f"'out' {obj['out']} must end in .mp4")
    return Request(prompt=prompt, out=target, index=index, image=obj.get("image"), seed=obj.get("seed"),
                   frames=obj.get("frames"))


def request_key(request: Request, seed: int):
    """The PRNG key of a request's video (see the module docstring)."""
    if request.seed is not None:
        return pipeline.prompt_keys(request.seed, 1)[0]
    return jax.random.fold_in(jax.random.key(seed), request.index)


@dataclasses.dataclass
class Prepared:
    """A request with its settings and first frame resolved: what batching needs."""

    request: Request
    settings: pipeline.Settings
    image: np.ndarray | None  # fitted first frame uint8 [H, W, 3]
    vlm_image: object  # what the VLM sees (the original image)

    @property
    def shape(self):
        size = self.image.shape[:2] if self.image is not None else (self.settings.size or media.DEFAULT_SIZE)
        return (tuple(size), self.settings.frames, self.image is not None)


def prepare(request: Request, settings: pipeline.Settings) -> Prepared:
    """Settings of the request (its frames) and its first frame fitted to its size (checked: one-line errors)."""
    if request.frames is not None:
        settings = dataclasses.replace(settings, frames=request.frames)
    image = vlm = None
    if request.image is not None:
        vlm = media.open_image(request.image)
        image = media.fit_image(vlm, settings.size)
        media.check_size(image.shape[:2])
    return Prepared(request, settings, image, vlm)


def run(models: Models, batch: list[Prepared], seed: int, progress: bool = False,
        timings: pipeline.Timings | None = None) -> list[Path]:
    """One batch of requests of equal shape -> their videos."""
    first = batch[0]
    keys = jax.numpy.stack([request_key(p.request, seed) for p in batch])
    images = [p.image for p in batch] if first.image is not None else None
    vlm = [p.vlm_image for p in batch] if first.image is not None else None
    for p in batch:
        p.request.out.parent.mkdir(parents=True, exist_ok=True)
    return pipeline.generate(models, [p.request.prompt for p in batch], [p.request.out for p in batch], images=images,
                             vlm_images=vlm, settings=first.settings, timings=timings, progress=progress, keys=keys)


def one_line(e: BaseException) -> str:
    text = " ".join(str(e).split())
    return text if isinstance(e, (ValueError, FileNotFoundError)) else f"{type(e).__name__}: {text}"


# ------------------------------------------------------------------------------------- interactive

def next_output(out: Path, start: int) -> tuple[Path, int]:
    """The first OUT_NNN.mp4 from number `start` on that does not exist yet, and its number."""
    n = start
    while (path := out.with_name(f"{out.stem}_{n:03d}{out.suffix}")).exists():
        n += 1
    return path, n


def interactive(models: Models, settings: pipeline.Settings, lines: Iterable[str], out: str | Path,
                stdout: TextIO | None = None, stderr: TextIO | None = None, ask: bool = False,
                default_image: str | None = None) -> tuple[int, int]:
    """The interactive loop: each line `prompt [| image path [| seed]]` makes a video OUT_NNN.mp4 and prints
    `PATH SECONDS s`; a bad line (or a failed video) prints `error: ...` on one line and the loop goes on;
    the end of `lines` ends it. A line without an image uses `default_image` (None: the text-to-image
    stage). Returns (videos written, errors)."""
    out = Path(out)
    if out.suffix.lower() != ".mp4":
        raise ValueError(f"--out {out} must end in .mp4")
    stdout, stderr = stdout or sys.stdout, stderr or sys.stderr
    done = errors = number = 0
    if ask:
        print("prompt [| image path [| seed]] (end of input quits)> ", end="", file=stderr, flush=True)
    for line in lines:
        try:
            parsed = parse_line(line)
            if parsed is not None:
                prompt, image, seed = parsed
                path, number = next_output(out, number)
                start = time.perf_counter()
                request = Request(prompt=prompt, out=path, index=done + errors, image=image or default_image,
                                  seed=seed)
                run(models, [prepare(request, settings)], settings.seed)
                print(f"{path} {time.perf_counter() - start:.2f} s", file=stdout, flush=True)
                done += 1
        except Exception as e:  # noqa: BLE001 - one line per bad request, the loop goes on
            print(f"error: {one_line(e)}", file=stderr, flush=True)
            errors += 1
        if ask:
            print("> ", end="", file=stderr, flush=True)
    return done, errors


# ------------------------------------------------------------------------------------------- batch

def append_line(path: Path, record: dict) -> None:
    """Append one JSON line in a single write (O_APPEND) and flush it to disk: a line is there whole or not."""
    data = (json.dumps(record, ensure_ascii=False) + "\n").encode()
    fd = os.open(path, os.O_WRONLY | os.O_APPEND | os.O_CREAT, 0o644)
    try:
        os.write(fd, data)
        os.fsync(fd)
    finally:
        os.close(fd)


def read_manifest(folder: Path) -> dict[str, dict]:
    """The last record per output file of every manifest*.jsonl in folder (a torn last line is ignored)."""
    records: dict[str, dict] = {}
    for path in sorted(folder.glob("manifest*.jsonl")):
        for line in path.read_text().splitlines():
            try:
                record = json.loads(line)
            except json.JSONDecodeError:
                continue
            if isinstance(record, dict) and "file" in record:
                records[record["file"]] = record
    return records


def host_share(entries: list, process_index: int, process_count: int) -> list:
    """The entries of one process: those whose position modulo process_count is process_index."""
    return [e for i, e in enumerate(entries) if i % process_count == process_index]


def manifest_path(folder: Path, process_index: int = 0, process_count: int = 1) -> Path:
    """manifest.jsonl, or manifest-NNN.jsonl per process when there are several (each host appends its own)."""
    return folder / (MANIFEST if process_count == 1 else f"manifest-{process_index:03d}.jsonl")


def data_width(models: Models) -> int:
    """The size of the data axis of the mesh the I2V DiT runs on (1 without a mesh)."""
    mesh = getattr(models.dit, "mesh", None)
    return 1 if mesh is None else mesh.shape.get(DATA, 1)


def device_batches(n: int, batch_size: int | None, width: int) -> list[int]:
    """Sizes of the device batches of a group of n requests: at most batch_size each (None: n), each a
    multiple of the data axis `width` when n allows (batch_size rounded down to one, if it is at least
    `width`), the remainder (< width) last."""
    size = batch_size or n
    if size >= width:
        size -= size % width
    sizes = []
    while n >= size:
        sizes.append(size)
        n -= size
    while n:  # fewer left than a full batch: the largest multiple of width, then the rest
        part = n - n % width or n
        sizes.append(part)
        n -= part
    return sizes


def run_batch(models: Models, entries: list[Request | str], settings: pipeline.Settings, manifest: Path,
              batch_size: int | None = None, progress: bool = False,
              log: Callable[[str], None] | None = None) -> dict[str, int]:
    """Generate the requests not done yet (video and "ok" line in a manifest beside `manifest`), in batches
    of equal shape; record each video or failure in `manifest`. Returns counts: done, skipped, failed."""
    log = log or (lambda s: print(s, file=sys.stderr))
    done = read_manifest(manifest.parent)
    counts = dict(done=0, skipped=0, failed=0)

    def record(request: Request, **fields) -> None:
        append_line(manifest, dict(prompt=request.prompt, seed=request.seed if request.seed is not None else settings.seed,
                                   index=request.index, image=request.image, file=str(request.out), **fields))

    groups: dict[tuple, list[Prepared]] = {}
    for entry in entries:
        if isinstance(entry, str):  # a line that is not a request
            append_line(manifest, dict(status="error", message=entry, file=None))
            log(f"error: {entry}")
            counts["failed"] += 1
            continue
        previous = done.get(str(entry.out))
        if previous is not None and previous.get("status") == "ok" and entry.out.exists():
            counts["skipped"] += 1
            continue
        try:
            prepared = prepare(entry, settings)
        except Exception as e:  # noqa: BLE001 - recorded, the batch goes on
            record(entry, status="error", message=one_line(e))
            log(f"error: {entry.out.name}: {one_line(e)}")
            counts["failed"] += 1
            continue
        groups.setdefault(prepared.shape, []).append(prepared)
    width = data_width(models)
    for group in groups.values():
        start = 0
        for size in device_batches(len(group), batch_size, width):
            _run_recorded(models, group[start:start + size], settings.seed, record, counts, progress, log)
            start += size
    return counts


def _run_recorded(models, batch: list[Prepared], seed: int, record, counts, progress, log) -> None:
    start = time.perf_counter()
    try:
        run(models, batch, seed, progress=progress)
    except Exception as e:  # noqa: BLE001
        if len(batch) > 1:  # find the request that fails: each alone
            for p in batch:
                _run_recorded(models, [p], seed, record, counts, progress, log)
            return
        record(batch[0].request, status="error", message=one_line(e))
        log(f"error: {batch[0].request.out.name}: {one_line(e)}")
        counts["failed"] += 1
        return
    seconds = (time.perf_counter() - start) / len(batch)
    for p in batch:
        record(p.request, status="ok", frames=p.settings.frames, seconds=round(seconds, 3))
        log(f"wrote {p.request.out}: {p.settings.frames} frames ({seconds:.2f} s)")
        counts["done"] += 1
