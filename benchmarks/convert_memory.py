"""Peak memory of `tools/convert_torch_weights.py dit` on a synthetic release-named checkpoint of real
13B block shapes (hidden 3072, 24 heads, text 4096/768) with fewer blocks, so the output is ≥ 1 GB.

    python benchmarks/convert_memory.py [--double 1 --single 2] [--format pt|safetensors] [--workdir DIR]

Peak RSS of the converter process (ru_maxrss of the child) is compared with the output checkpoint size;
the same process importing everything and exiting gives the fixed interpreter/library baseline.
RESULT convert_memory output_gb=… peak_gb=… baseline_gb=… ratio=… ratio_above_baseline=…
"""

from __future__ import annotations

import argparse
import os
import shutil
import subprocess
import sys
import tempfile
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))


# Runs a script and reports its own peak resident memory (VmHWM is per address space, so nothing of
# the parent process that spawned it is counted).
_WRAP = """import runpy, sys
sys.argv = sys.argv[1:]
try:
    runpy.run_path(sys.argv[0], run_name="__main__")
finally:
    hwm = [l for l in open("/proc/self/status") if l.startswith("VmHWM")][0].split()[1]
    print("VmHWM_kB", hwm, file=sys.stderr)
"""


def peak_gb(script: str, *args: str) -> tuple[float, float]:
    """(peak RSS in GB, wall seconds) of `python script args...`."""
    t0 = time.perf_counter()
    r = subprocess.run([sys.executable, "-c", _WRAP, script, *args], capture_output=True, text=True)
    if r.returncode:
        raise SystemExit(f"{script} failed:\n{r.stderr[-2000:]}")
    kb = int(r.stderr.rsplit("VmHWM_kB", 1)[1].split()[0])
    return kb * 1024 / 1e9, time.perf_counter() - t0


def write_source(cfg_fields: dict, fmt: str, path: Path) -> int:
    """Write a random bf16 release-named checkpoint in a child process; returns its parameter count."""
    code = f"""
import dataclasses, torch
from m141jax.config import preset
from m141jax.convert.dit import release_plan
cfg = dataclasses.replace(preset("magic141-i2v-13b"), **{cfg_fields!r})
sd = {{k: torch.randn(s, dtype=torch.bfloat16) * 0.02 for r in release_plan(cfg) for k, s in r.sources}}
if {fmt!r} == "pt":
    torch.save({{"state_dict": sd}}, {str(path)!r})
else:
    from safetensors.torch import save_file
    save_file(sd, {str(path)!r})
print(sum(v.numel() for v in sd.values()))
"""
    r = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True,
                       env=dict(os.environ, PYTHONPATH=str(ROOT)))
    return int(r.stdout.split()[-1])


def main():
    p = argparse.ArgumentParser()
    p.add_argument("--double", type=int, default=1)
    p.add_argument("--single", type=int, default=2)
    p.add_argument("--format", choices=("pt", "safetensors"), default="pt")
    p.add_argument("--workdir", default=None, help="where to write the ~2×output-size files (default: a temp dir)")
    a = p.parse_args()

    work = Path(tempfile.mkdtemp(dir=a.workdir))
    try:
        src = work / ("model.pt" if a.format == "pt" else "model.safetensors")
        n_params = write_source({"double_blocks": a.double, "single_blocks": a.single}, a.format, src)
        cfg_json = work / "cfg.json"
        cfg_json.write_text(
            '{"hidden_size": 3072, "heads_num": 24, "mm_double_blocks_depth": %d, "mm_single_blocks_depth": %d}'
            % (a.double, a.single))
        dst = work / "ck"
        tool = str(ROOT / "tools" / "convert_torch_weights.py")
        peak, secs = peak_gb(tool, "dit", "--src", str(src), "--dst", str(dst), "--config", str(cfg_json),
                             "--dtype", "bf16", "--quiet")
        probe = work / "imports.py"
        probe.write_text("import jax, torch, orbax.checkpoint, m141jax.convert.dit\njax.device_put(0)\n")
        baseline, _ = peak_gb(str(probe))
        out_gb = n_params * 2 / 1e9
        on_disk = sum(f.stat().st_size for f in dst.rglob("*") if f.is_file()) / 1e9
        print(f"RESULT convert_memory format={a.format} params={n_params} output_gb={out_gb:.3f} "
              f"on_disk_gb={on_disk:.3f} peak_gb={peak:.3f} baseline_gb={baseline:.3f} ratio={peak / out_gb:.3f} "
              f"ratio_above_baseline={(peak - baseline) / out_gb:.3f} seconds={secs:.1f}", flush=True)
    finally:
        shutil.rmtree(work, ignore_errors=True)


if __name__ == "__main__":
    main()
