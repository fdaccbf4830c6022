"""PyTorch -> Orbax weight conversion (the command: `m141jax.cli.convert`, `tools/convert_torch_weights.py`).

Each component module exposes `convert(src, config, dtype, progress) -> (config dataclass, params)`:
streaming sources (`sources.py`), checked conversion plans (`plan.py`), per-component key maps and
config translators (`dit.py`, `vae.py`, `hf.py`, `llama.py`, `clip.py`, `llava.py`), config checks
(`configs.py`) and the destination rules (`destination.py`).
"""

from __future__ import annotations

import ml_dtypes
import numpy as np

# component name -> module holding its `convert`
COMPONENTS = {
    "dit": "m141jax.convert.dit",
    "vae": "m141jax.convert.vae",
    "llm": "m141jax.convert.llama",
    "clip": "m141jax.convert.clip",
    "vlm": "m141jax.convert.llava",
}
DTYPES = {"bf16": ml_dtypes.bfloat16, "fp32": np.float32}
