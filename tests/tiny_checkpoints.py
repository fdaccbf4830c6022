"""A checkpoint folder of tiny random fp32 models in the layout `m141jax generate` reads (the tests and
benchmarks/generate.py use it): tiny offline tokenizers, LLaVA, CLIP, the I2V and T2I DiTs, the VAE."""

from __future__ import annotations

import dataclasses
import json
from pathlib import Path

import jax
import numpy as np
from hf_encoders import clip_tokenizer, llama3_tokenizer

from m141jax import checkpoint
from m141jax.config import CLIP_TEXT_PRESETS, LLAVA_PRESETS, VAE_PRESETS, preset, to_json_dict
from m141jax.models import clip, dit, llava, vae

CORPUS = ["Describe the video by detailing the following aspects. A cat walks on the grass, a red car drives "
          "through a rainy city at night. Aerial view, overexposed, low quality, deformation."] * 20


def random_params(module, cfg, seed):
    """Random parameters of the right shapes without compiling an init: kernels ~ N(0, 1/fan-in),
    vectors (biases, norm scales) ~ 1 + N(0, 0.1²) for scales and N(0, 0.1²) otherwise."""
    rng = np.random.default_rng(seed)

    def draw(path, a):
        if len(a.shape) >= 2:
            return (rng.standard_normal(a.shape) / np.sqrt(np.prod(a.shape[:-1]))).astype(np.float32)
        base = 1.0 if "scale" in jax.tree_util.keystr(path) else 0.0
        return (base + 0.1 * rng.standard_normal(a.shape)).astype(np.float32)
    return jax.tree_util.tree_map_with_path(draw, module.abstract_params(cfg))


def save_random(path: Path, component: str, module, cfg, seed: int) -> None:
    checkpoint.save(path, component, to_json_dict(cfg), random_params(module, cfg, seed))


def write_tiny_checkpoints(root: Path) -> Path:
    """A complete checkpoint folder (components.LAYOUT) of tiny random fp32 models under root."""
    from m141jax.prompts import NEGATIVE_PROMPT, PROMPT_TEMPLATE_VIDEO, VLM_TEMPLATE

    corpus = [PROMPT_TEMPLATE_VIDEO, VLM_TEMPLATE, NEGATIVE_PROMPT, "\n\n" * 20] + CORPUS
    tok = llama3_tokenizer(root / "tokenizer", corpus)
    (tok / "preprocessor_config.json").write_text(json.dumps(
        {"crop_size": 336, "size": 336, "do_center_crop": True, "do_normalize": True, "do_resize": True,
         "image_mean": [0.48145466, 0.4578275, 0.40821073], "image_std": [0.26862954, 0.26130258, 0.27577711],
         "resample": 3}))
    clip_tokenizer(root / "clip_tokenizer", corpus)
    from transformers import AutoTokenizer

    image_id = AutoTokenizer.from_pretrained(str(tok)).convert_tokens_to_ids("<image>")
    f32 = dict(param_dtype="fp32", dtype="fp32")
    vlm_cfg = dataclasses.replace(LLAVA_PRESETS["tiny-llava"], image_token_id=image_id)
    clip_cfg = CLIP_TEXT_PRESETS["tiny-clip"]
    dims = dict(text_dim=vlm_cfg.text.hidden_size, pooled_dim=clip_cfg.hidden_size, **f32)
    save_random(root / "vlm", "vlm", llava, vlm_cfg, 0)
    save_random(root / "clip", "clip", clip, clip_cfg, 1)
    save_random(root / "dit", "dit", dit, preset("tiny-i2v", **dims), 2)
    save_random(root / "t2i", "dit", dit, preset("tiny-t2v", **dims), 3)
    save_random(root / "vae", "vae", vae, dataclasses.replace(VAE_PRESETS["tiny-vae"], **f32), 4)
    return root
