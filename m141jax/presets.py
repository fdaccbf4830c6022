"""Settings files for `m141jax generate` (`configs/generate/*.yaml`, read by `--config FILE`).

A file is a YAML mapping of generate's settings, spelled as its flags without the dashes
(`t2i_steps: 50` or `t2i-steps: 50` for `--t2i-steps 50`). `load_generate_config` checks the keys
and the value types and returns them under generate's argparse names; `m141jax generate --config`
makes them the defaults of its flags, so flags given on the command line win.
"""

from __future__ import annotations

from pathlib import Path
from typing import Any

import yaml

# argparse name -> accepted value type(s) of the settings a file may hold; None (YAML null) leaves a
# setting unset (the --preset's default). Inputs and outputs (--prompt, --image, --out) are not settings;
# --seconds is left to the command line (it would override a --frames given there).
GENERATE_KEYS: dict[str, tuple[type, ...]] = {
    "preset": (str,), "checkpoints": (str,),
    "frames": (int,), "clip_frames": (int,), "fps": (int,), "size": (str,),
    "steps": (int,), "shift": (int, float), "guidance": (int, float), "seed": (int,), "reference_mean": (bool,),
    "t2i_steps": (int,), "t2i_shift": (int, float), "t2i_guidance": (int, float), "t2i_cfg": (int, float),
    "t2i_cfg_sigma": (int, float), "t2i_template": (str,),
    "dtype": (str,), "text_length": (int,), "quantize": (str,), "low_memory": (bool,),
    "mesh": (str,), "sequence_parallel": (str,),
}


def load_generate_config(path: str | Path) -> dict[str, Any]:
    """{argparse name: value} of a generate settings file; a one-line ValueError names an unknown key or a
    value of the wrong type, with what is accepted."""
    try:
        data = yaml.safe_load(Path(path).read_text())
    except OSError as e:
        raise ValueError(f"generate config {path} cannot be read ({e.strerror})") from None
    data = {} if data is None else data
    if not isinstance(data, dict):
        raise ValueError(f"generate config {path} must hold a mapping of settings, got {type(data).__name__}")
    out: dict[str, Any] = {}
    for key, value in data.items():
        dest = str(key).replace("-", "_")
        if dest not in GENERATE_KEYS:
            raise ValueError(f"{path}: unknown generate setting {key!r}; accepted: {', '.join(sorted(GENERATE_KEYS))}")
        types = GENERATE_KEYS[dest]
        if value is not None and (not isinstance(value, types) or (isinstance(value, bool) and bool not in types)):
            raise ValueError(f"{path}: {key}={value!r} must be {' or '.join(t.__name__ for t in types)}")
        out[dest] = float(value) if value is not None and float in types and not isinstance(value, bool) else value
    return out
