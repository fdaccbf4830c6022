"""Everything the DiT receives as conditioning, computed in JAX (release.md A.3 step 2, E).

    enc = Encoders.load(llm, clip, tokenizer, clip_tokenizer)      # checkpoints + tokenizer folders
    cond = encode(enc, prompts, images)                           # Conditioning for the DiT
    cond, uncond = encode_with_negative(enc, prompts, images)     # CFG: NEGATIVE_PROMPT, same image tokens
    empty = encode_empty(enc, images)                             # the "" prompt (training's CFG dropout)

- `llm`: a `vlm` checkpoint (LLaVA; its language model also encodes the prompts: one copy of the 8B
  weights) or an `llm` checkpoint (prompts only, no image tokens), made by
  `tools/convert_torch_weights.py`. `clip`: a `clip` checkpoint.
- `tokenizer`: the LLaVA / Llama-3 tokenizer folder (xtuner/llava-llama-3-8b-v1_1-transformers, which
  also holds the image processor's preprocessor_config.json); `clip_tokenizer`: the CLIP-L tokenizer.

`Conditioning` (models/conditioning.py; release shapes): `text_states` [B, 402, 4096] float32 = 146 VLM
tokens ‖ 256 prompt tokens, `text_mask` [B, 402] int32 (ones for the VLM tokens, then the prompt's mask), `text_states_2`
[B, 768] float32 (CLIP-L pooled). Without a VLM: 256 prompt tokens. Model dims follow the configs.

The prompt states are the LLM's layer 30 of 32 without the final norm (hidden_states[-3]), cropped
after the template; the VLM tokens are its last layer after the final norm at the selected positions
of the image-only VLM prompt. The empty prompt is allowed (training's CFG dropout uses it, `encode`
with ""), long prompts are truncated with a warning, unreadable images are refused with one line.
"""

from __future__ import annotations

import dataclasses
import functools
import json
import warnings
from pathlib import Path

import jax
import jax.numpy as jnp

from m141jax import checkpoint
from m141jax.config import CLIPTextConfig, LlamaConfig, LlavaConfig
from m141jax.models import clip, llama, llava
from m141jax.models.conditioning import Conditioning
from m141jax.prompts import (
    MAX_LENGTH,
    NEGATIVE_PROMPT,
    TEMPLATES,
    VLMPrompt,
    clip_tokens,
    llm_tokens,
    template_crop,
    vlm_prompt,
)
from m141jax.vision_input import ImageProcessing, preprocess

SKIP_LAYER = 2  # the release's hidden_state_skip_layer: hidden_states[-3]


@dataclasses.dataclass
class Encoders:
    """Configs, parameters (on device) and tokenizers of the three encoders; build it with `Encoders.load`."""

    llm: LlamaConfig
    clip: CLIPTextConfig
    vlm: LlavaConfig | None  # None: prompts only
    params: dict  # {"language_model", "clip"} (+ {"vision_tower", "projector"} with a VLM)
    tokenizer: object
    clip_tokenizer: object
    crop: int  # template tokens before the prompt (95 for Llama-3)
    max_length: int = MAX_LENGTH
    vlm_prompt: VLMPrompt | None = None
    image_processing: ImageProcessing | None = None
    # what to say when a prompt has words the tokenizer reads as unknown (a tokenizer folder's
    # tokenizer_config.json may give it as `m141jax_vocabulary_note`); warned once per Encoders
    vocabulary_note: str = "prompt words outside the tokenizer's vocabulary"
    warned_unknown: bool = False

    @classmethod
    def load(cls, llm: str | Path, clip: str | Path, tokenizer: str | Path, clip_tokenizer: str | Path,
             dtype: str = "bf16", max_length: int = MAX_LENGTH, mesh=None) -> "Encoders":
        """Read the checkpoints (`vlm` or `llm`, and `clip`) in `dtype` and the two tokenizer folders. With a
        `mesh` the weights are restored sharded on it by their logical axis names (the 8B LLM is 16 GB in
        bf16: more than one 16 GB chip), and the jitted encoders run partitioned over it."""
        from transformers import AutoTokenizer

        kind, llm_cfg, llm_params = checkpoint.load(llm, ("vlm", "llm"), dtype, mesh=mesh)
        _, clip_cfg, clip_params = checkpoint.load(clip, ("clip",), dtype, mesh=mesh)
        tok = AutoTokenizer.from_pretrained(str(tokenizer), padding_side="right")
        if tok.pad_token is None:  # Meta's Llama-3 tokenizer has none; padded positions are masked anyway
            tok.pad_token = tok.eos_token
        clip_tok = AutoTokenizer.from_pretrained(str(clip_tokenizer))
        note = _vocabulary_note(tokenizer)
        enc = cls(llm=llm_cfg.text if kind == "vlm" else llm_cfg, clip=clip_cfg, vlm=llm_cfg if kind == "vlm" else None,
                  params={**(llm_params if kind == "vlm" else {"language_model": llm_params}), "clip": clip_params},
                  tokenizer=tok, clip_tokenizer=clip_tok, crop=template_crop(tok), max_length=max_length)
        if note:
            enc.vocabulary_note = note
        if enc.vlm is not None:
            enc.vlm_prompt = vlm_prompt(tok, enc.vlm.image_token_id, enc.vlm.image_seq_length)
            enc.image_processing = ImageProcessing.from_folder(tokenizer, enc.vlm.vision.image_size)
        return enc

    @property
    def text_length(self) -> int:
        """Tokens of text_states: the selected VLM tokens (146) + the prompt window (256)."""
        return (len(self.vlm_prompt.keep) if self.vlm is not None else 0) + self.max_length


def _vocabulary_note(tokenizer: str | Path) -> str | None:
    try:
        return json.loads((Path(tokenizer) / "tokenizer_config.json").read_text()).get("m141jax_vocabulary_note")
    except (OSError, ValueError, AttributeError):
        return None


def warn_unknown_words(enc: Encoders, prompts: list[str]) -> list[str]:
    """Warn (once per Encoders) when the prompts have words the Llama-side tokenizer reads as its unknown
    token (a byte-level BPE such as Llama-3's has none); the unknown words."""
    tok = enc.tokenizer
    unk = getattr(tok, "unk_token_id", None)
    if unk is None or unk in {tok.bos_token_id, tok.eos_token_id, tok.pad_token_id}:
        return []
    words = []
    for p in prompts:
        e = tok(p, add_special_tokens=False, return_offsets_mapping=True)
        words += [p[a:b] for i, (a, b) in zip(e["input_ids"], e["offset_mapping"]) if i == unk]
    words = list(dict.fromkeys(words))
    if words and not enc.warned_unknown:
        enc.warned_unknown = True
        warnings.warn(f"{enc.vocabulary_note}; these prompt words are read as unknown: {', '.join(words)}",
                      stacklevel=3)
    return words


# ------------------------------------------------------------------------------- jitted forwards

@functools.partial(jax.jit, static_argnames=("cfg", "crop"))
def _prompt_states(params, cfg: LlamaConfig, input_ids, attention_mask, crop: int):
    h = llama.hidden_states(params, cfg, input_ids, attention_mask, skip_layer=SKIP_LAYER)
    return h[:, crop:], attention_mask[:, crop:]


@functools.partial(jax.jit, static_argnames=("cfg",))
def _pooled(params, cfg: CLIPTextConfig, input_ids, attention_mask):
    return clip.text_forward(params, cfg, input_ids, attention_mask)[1]


@functools.partial(jax.jit, static_argnames=("cfg",))
def _image_tokens(params, cfg: LlavaConfig, input_ids, pixels, keep):
    ids = jnp.broadcast_to(input_ids, (pixels.shape[0], input_ids.shape[0]))
    return llava.llava_forward(params, cfg, ids, jnp.ones_like(ids), pixels)[:, keep]


# ---------------------------------------------------------------------------------- public API

def _check_prompts(prompts) -> list[str]:
    if isinstance(prompts, str) or not all(isinstance(p, str) for p in prompts) or not prompts:
        raise ValueError(f"prompts must be a non-empty list of strings, got {prompts!r:.80}")
    return list(prompts)


def text_conditioning(enc: Encoders, prompts: list[str], template: str = "video") -> Conditioning:
    """The prompt-only conditioning (no image tokens): prompt states [B, 256, D], mask [B, 256] int32, CLIP
    pooled [B, D2], the prompts put in HunyuanVideo's 'video' template (the release's) or its one-frame
    'image' template (the text-to-image stage)."""
    prompts = _check_prompts(prompts)
    if template not in TEMPLATES:
        raise ValueError(f"unknown prompt template {template!r}; accepted: {sorted(TEMPLATES)}")
    warn_unknown_words(enc, prompts)
    crop = enc.crop if template == "video" else template_crop(enc.tokenizer, TEMPLATES[template])
    ids, mask = llm_tokens(enc.tokenizer, prompts, crop, enc.max_length, TEMPLATES[template])
    states, mask = _prompt_states(enc.params["language_model"], enc.llm, ids, mask, crop)
    pooled = _pooled(enc.params["clip"], enc.clip, *clip_tokens(enc.clip_tokenizer, prompts, enc.clip.max_positions))
    return Conditioning(states, mask.astype(jnp.int32), pooled)


def image_tokens(enc: Encoders, images) -> jax.Array:
    """The VLM tokens [N, 146, D] float32 of N images (PIL images or file paths)."""
    if enc.vlm is None:
        raise ValueError("these encoders have no VLM (an 'llm' checkpoint was loaded): load a 'vlm' checkpoint "
                         "to condition on images")
    if isinstance(images, (str, Path)) or not len(images):
        raise ValueError(f"images must be a non-empty list of PIL images or paths, got {images!r:.80}")
    pixels = preprocess(images, enc.image_processing)
    return _image_tokens(enc.params, enc.vlm, enc.vlm_prompt.input_ids, pixels, enc.vlm_prompt.keep)


def _assemble(text: Conditioning, vlm_tokens) -> Conditioning:
    if vlm_tokens is None:
        return text
    mask = jnp.concatenate([jnp.ones(vlm_tokens.shape[:2], text.text_mask.dtype), text.text_mask], axis=1)
    return text.replace(text_states=jnp.concatenate([vlm_tokens, text.text_states], axis=1), text_mask=mask)


def _vlm_tokens(enc: Encoders, prompts: list[str], images):
    if enc.vlm is None and images is None:
        return None
    if enc.vlm is not None and (images is None or len(images) != len(prompts)):
        raise ValueError(f"these encoders condition on images: pass one image per prompt ({len(prompts)}), "
                         f"got {'none' if images is None else len(images)}")
    return image_tokens(enc, images)


def encode(enc: Encoders, prompts: list[str], images=None) -> Conditioning:
    """The conditioning of each (prompt, image) pair: VLM tokens ‖ prompt tokens, mask, CLIP pooled.

    images: one PIL image (or path) per prompt when the encoders have a VLM, else None. An empty
    prompt "" gives the empty-prompt conditioning (training's CFG dropout).
    """
    prompts = _check_prompts(prompts)
    return _assemble(text_conditioning(enc, prompts), _vlm_tokens(enc, prompts, images))


def encode_with_negative(enc: Encoders, prompts: list[str], images=None,
                         negative_prompt: str = NEGATIVE_PROMPT) -> tuple[Conditioning, Conditioning]:
    """(conditional, unconditional) for CFG: the unconditional branch has `negative_prompt` (the release's
    NEGATIVE_PROMPT) for the LLM and CLIP and keeps the same VLM image tokens (release.md A.3 step 5)."""
    prompts = _check_prompts(prompts)
    vlm_tokens = _vlm_tokens(enc, prompts, images)
    negative = [negative_prompt] * len(prompts)
    return (_assemble(text_conditioning(enc, prompts), vlm_tokens),
            _assemble(text_conditioning(enc, negative), vlm_tokens))



def encode_empty(enc: Encoders, images=None) -> Conditioning:
    """The empty-prompt conditioning (training's CFG dropout): `encode` with "" for each image (one row
    when the encoders have no VLM)."""
    return encode(enc, [""] * (1 if images is None else len(images)), images)
