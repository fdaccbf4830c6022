"""The PyTorch side of the encoder tests: tiny random Hugging Face models saved as folders and converted
with the project's converter (the offline tokenizers are in fixtures.py)."""

from __future__ import annotations

import json
from pathlib import Path

import pytest

torch = pytest.importorskip("torch")

from m141jax.cli.convert import main as convert_main  # noqa: E402


def randomize(model: torch.nn.Module, std: float = 0.1, seed: int = 0) -> torch.nn.Module:
    """Every parameter ~ N(0, std²) (norm weights around 1), so no layer is close to an identity."""
    g = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for name, p in model.named_parameters():
            base = 1.0 if ("norm" in name or "layrnorm" in name) and name.endswith("weight") else 0.0
            p.copy_(base + std * torch.randn(p.shape, generator=g))
    return model.eval()


def save_hf(model, folder: Path, rename: dict[str, str] | None = None, config: dict | None = None) -> Path:
    """A Hugging Face folder (config.json + model.safetensors); keys optionally renamed by prefix."""
    from safetensors.torch import save_file

    folder.mkdir(parents=True, exist_ok=True)
    state = {}
    for k, v in model.state_dict().items():
        for old, new in (rename or {}).items():
            if k.startswith(old):
                k = new + k[len(old):]
                break
        state[k] = v.detach().clone().contiguous()
    save_file(state, str(folder / "model.safetensors"))
    (folder / "config.json").write_text(json.dumps(config or model.config.to_dict()))
    return folder


def convert(component: str, src: Path, dst: Path, dtype: str = "fp32") -> Path:
    assert convert_main([component, "--src", str(src), "--dst", str(dst), "--dtype", dtype, "--quiet"]) == 0
    return dst
