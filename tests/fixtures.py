"""The tiny models and inputs the tests share: tiny DiT configs and parameters, fixed DiT inputs, the
tiny checkpoint folder `m141jax generate` reads (with offline Llama-3 / CLIP tokenizers) and prepared
training data. Everything here is torch-free; the PyTorch references live in dit_reference.py and
hf_encoders.py. Comparisons of numbers are in numerics.py."""

from __future__ import annotations

import dataclasses
import functools
import json
from pathlib import Path

import jax
import jax.numpy as jnp
import numpy as np
from PIL import Image

from m141jax import checkpoint, sampling
from m141jax.config import CLIP_TEXT_PRESETS, LLAVA_PRESETS, VAE_PRESETS, preset, to_json_dict
from m141jax.models import clip, dit, llava, vae
from m141jax.models.conditioning import Conditioning

# ------------------------------------------------------------------------------------------ tiny DiTs

TINY_I2V = preset("tiny-i2v", param_dtype="fp32", dtype="fp32")
"""The tiny image-to-video DiT in fp32 (text dims 32 / 16, 16 latent channels)."""
TINY_T2V = preset("tiny-t2v", param_dtype="fp32", dtype="fp32")
"""The tiny text-to-video (and text-to-image) DiT in fp32."""
MESH_I2V = preset("tiny-i2v", hidden_size=64, num_heads=8, rope_axes=(2, 2, 4), param_dtype="fp32", dtype="fp32",
                  attention="xla")
"""The tiny I2V DiT of the sharding tests: 8 heads so Ulysses can split them over 8 devices."""


@functools.lru_cache(maxsize=None)
def tiny_dit_params(cfg=TINY_I2V):
    """init_params(cfg, PRNGKey(0)), computed once per config for the whole test session."""
    return dit.init_params(cfg, jax.random.PRNGKey(0))


def dit_inputs(batch: int = 1):
    """(latents, timestep, cond, ref_latents), `dit_forward`'s inputs for TINY_I2V: 2 × 8 × 8 latents,
    5 text tokens of which 4 valid, t = 700."""
    k = jax.random.split(jax.random.PRNGKey(1), 3)
    latents = jax.random.normal(k[0], (batch, 2, 8, 8, TINY_I2V.out_channels))
    mask = jnp.ones((batch, 5), jnp.int32).at[:, 4:].set(0)
    cond = Conditioning(jax.random.normal(k[1], (batch, 5, TINY_I2V.text_dim)), mask,
                        jax.random.normal(k[2], (batch, TINY_I2V.pooled_dim)))
    return latents, jnp.full((batch,), 700.0), cond, latents[:, :1]


def mesh_dit_inputs(batch: int = 2):
    """Host inputs of MESH_I2V in `dit_forward`'s order: latents, timestep, cond (text mask: 5 and 3 valid of
    7 tokens), ref_latents, guidance (None): 8 image + 7 text tokens, a count no mesh axis divides."""
    k = jax.random.split(jax.random.PRNGKey(1), 4)
    mask = np.array([[1] * 5 + [0] * 2, [1] * 3 + [0] * 4][:batch], np.int32)
    return (np.asarray(jax.random.normal(k[0], (batch, 2, 4, 4, 16))),
            np.array([900.0, 300.0][:batch], np.float32),
            Conditioning(np.asarray(jax.random.normal(k[2], (batch, 7, 32))), mask,
                         np.asarray(jax.random.normal(k[3], (batch, 16)))),
            np.asarray(jax.random.normal(k[1], (batch, 1, 4, 4, 16))), None)


def tiny_sample(params):
    """The 4-step sampling run (release schedule) of TINY_I2V from fixed noise, text and reference (batch 2)."""
    latents, _, cond, ref = dit_inputs(batch=2)
    return sampling.sample(params, TINY_I2V, latents, cond, sigmas=sampling.schedule(4), ref_latents=ref)


# ------------------------------------------------------------------------------ tiny checkpoint folder

LLAMA3_SPLIT = (r"(?i:'s|'t|'re|'ve|'m|'ll|'d)|[^\r\n\p{L}\p{N}]?\p{L}+|\p{N}{1,3}| ?[^\s\p{L}\p{N}]+[\r\n]*"
                r"|\s*[\r\n]+|\s+(?!\S)|\s+")
LLAMA3_SPECIAL = ["<|begin_of_text|>", "<|end_of_text|>", "<|start_header_id|>", "<|end_header_id|>", "<|eot_id|>",
                  "<image>", "<pad>"]
CORPUS = ["Describe the video by detailing the following aspects. A cat walks on the grass, a red car drives "
          "through a rainy city at night. Aerial view, overexposed, low quality, deformation."] * 20


def llama3_tokenizer(folder: Path, corpus: list[str], vocab_size: int = 600) -> Path:
    """A byte-level BPE trained on `corpus` with Llama-3's split pattern, special tokens and BOS rule."""
    from tokenizers import Regex, Tokenizer, decoders, models, pre_tokenizers, processors, trainers
    from transformers import PreTrainedTokenizerFast

    tok = Tokenizer(models.BPE())
    tok.pre_tokenizer = pre_tokenizers.Sequence([pre_tokenizers.Split(Regex(LLAMA3_SPLIT), behavior="isolated"),
                                                 pre_tokenizers.ByteLevel(add_prefix_space=False, use_regex=False)])
    tok.decoder = decoders.ByteLevel()
    trainer = trainers.BpeTrainer(vocab_size=vocab_size, special_tokens=LLAMA3_SPECIAL,
                                  initial_alphabet=pre_tokenizers.ByteLevel.alphabet())
    tok.train_from_iterator(corpus, trainer)
    bos = "<|begin_of_text|>"
    tok.post_processor = processors.TemplateProcessing(single=f"{bos} $A", pair=f"{bos} $A {bos} $B",
                                                       special_tokens=[(bos, tok.token_to_id(bos))])
    fast = PreTrainedTokenizerFast(tokenizer_object=tok, bos_token=bos, eos_token="<|eot_id|>", pad_token="<pad>")
    fast.save_pretrained(str(folder))
    return folder


def clip_tokenizer(folder: Path, corpus: list[str], vocab_size: int = 400) -> Path:
    """A CLIP-like BPE: lower-cased, <|startoftext|> ... <|endoftext|>, padded with <|endoftext|>, which
    has the largest id (so the argmax of the ids is the EOS position, as with the real CLIP vocabulary)."""
    from tokenizers import Tokenizer, models, normalizers, pre_tokenizers, processors, trainers
    from transformers import PreTrainedTokenizerFast

    tok = Tokenizer(models.BPE(unk_token="<|unk|>"))
    tok.normalizer = normalizers.Lowercase()
    tok.pre_tokenizer = pre_tokenizers.Whitespace()
    trainer = trainers.BpeTrainer(vocab_size=vocab_size, special_tokens=["<|unk|>", "<|startoftext|>"])
    tok.train_from_iterator(corpus, trainer)
    tok.add_special_tokens(["<|endoftext|>"])
    bos, eos = "<|startoftext|>", "<|endoftext|>"
    tok.post_processor = processors.TemplateProcessing(
        single=f"{bos} $A {eos}", special_tokens=[(bos, tok.token_to_id(bos)), (eos, tok.token_to_id(eos))])
    fast = PreTrainedTokenizerFast(tokenizer_object=tok, bos_token=bos, eos_token=eos, pad_token=eos,
                                   unk_token="<|unk|>")
    fast.save_pretrained(str(folder))
    return folder


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
    """A complete checkpoint folder (components.LAYOUT) of tiny random fp32 models under root: tiny offline
    tokenizers, LLaVA, CLIP, the I2V and T2I DiTs, the VAE (benchmarks/generate.py uses it too)."""
    from transformers import AutoTokenizer

    from m141jax.prompts import NEGATIVE_PROMPT, PROMPT_TEMPLATE_VIDEO, VLM_TEMPLATE

    corpus = [PROMPT_TEMPLATE_VIDEO, VLM_TEMPLATE, NEGATIVE_PROMPT, "\n\n" * 20] + CORPUS
    tok = llama3_tokenizer(root / "tokenizer", corpus)
    (tok / "preprocessor_config.json").write_text(json.dumps(
        {"crop_size": 336, "size": 336, "do_center_crop": True, "do_normalize": True, "do_resize": True,
         "image_mean": [0.48145466, 0.4578275, 0.40821073], "image_std": [0.26862954, 0.26130258, 0.27577711],
         "resample": 3}))
    clip_tokenizer(root / "clip_tokenizer", corpus)
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


def write_gradient_image(path: Path, height: int = 64, width: int = 64, step: int = 3) -> Path:
    """A first-frame PNG of colour ramps (red along x, green along y, blue along both; `step` per pixel):
    every pixel distinct, so a crop or a resize shows."""
    y, x = np.mgrid[0:height, 0:width]
    Image.fromarray(np.stack([x * step, y * step, x + y], -1).astype(np.uint8)).save(path)
    return path


# ------------------------------------------------------------------------------------ prepared data

def write_prepared(path, n=3, n_img=2, nan=False):
    """A prepared-data directory of n tiny-i2v samples (latents 2×4×4×16, 6 text tokens); all-NaN latents
    when nan."""
    (path / "samples").mkdir(parents=True)
    rng = np.random.default_rng(0)
    for i in range(n):
        x = rng.standard_normal((2, 4, 4, 16)).astype(np.float32)
        if nan:
            x[:] = np.nan
        np.savez(path / "samples" / f"{i:08d}.npz", latents=x, ref_latents=x[:1],
                 text_states=rng.standard_normal((6, 32)).astype(np.float32),
                 text_mask=np.array([1, 1, 1, 1, 0, 0], np.int32),
                 text_states_2=rng.standard_normal(16).astype(np.float32))
    np.savez(path / "null.npz", text_states=np.zeros((4, 32), np.float32), text_mask=np.array([1, 0, 0, 0], np.int32),
             text_states_2=np.zeros(16, np.float32))
    (path / "data.json").write_text(json.dumps({"format": 1, "samples": n, "n_image_tokens": n_img}))
    return path
