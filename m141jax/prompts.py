"""The release's prompt formats (release.md E.1–E.3): templates, tokenisation, the template crop and the VLM
token selection. Pure Python/NumPy on top of a Hugging Face tokenizer; no model code.

- LLM: the user prompt inside HunyuanVideo's video template, right-padded to crop + 256 tokens, where
  `crop` is the token count of the template before the prompt (BOS included) computed from the
  tokenizer: 95 with the Llama-3 vocabulary. The encoder keeps positions crop..crop+255.
- CLIP-L: the bare prompt, 77 tokens.
- VLM: Magic 1-For-1's image-description template holding only `<image>` as the user message. After the
  user header come "\\n\\n", the image positions and `<|eot_id|>`; the release keeps all of them but
  every 4th image position ("::4"): 1 + 144 + 1 = 146 states for 576 image positions.
"""

from __future__ import annotations

import dataclasses
import warnings

import numpy as np

# HunyuanVideo constants.py, PROMPT_TEMPLATE["dit-llm-encode-video"] (the release's LLM template)
PROMPT_TEMPLATE_VIDEO = (
    "<|start_header_id|>system<|end_header_id|>\n\nDescribe the video by detailing the following aspects: "
    "1. The main content and theme of the video."
    "2. The color, shape, size, texture, quantity, text, and spatial relationships of the objects."
    "3. Actions, events, behaviors temporal relationships, physical movement changes of the objects."
    "4. background environment, light, style and atmosphere."
    "5. camera angles, movements, and transitions used in the video:<|eot_id|>"
    "<|start_header_id|>user<|end_header_id|>\n\n{}<|eot_id|>"
)
# HunyuanVideo constants.py, PROMPT_TEMPLATE["dit-llm-encode"]: what HunyuanVideo encodes a one-frame
# prompt with (crop 36 for Llama-3); the release never uses it, our text-to-image stage may (--t2i-template)
PROMPT_TEMPLATE_IMAGE = (
    "<|start_header_id|>system<|end_header_id|>\n\nDescribe the image by detailing the color, shape, size, texture, "
    "quantity, text, spatial relationships of the objects and background:<|eot_id|>"
    "<|start_header_id|>user<|end_header_id|>\n\n{}<|eot_id|>"
)
TEMPLATES = {"video": PROMPT_TEMPLATE_VIDEO, "image": PROMPT_TEMPLATE_IMAGE}
# Magic 1-For-1 text_encoder_vlm.py, LLAVA_LLAMA_3_8B_PROMPT_TEMPLATE_LI_DIT_ENCODE_VIDEO
VLM_TEMPLATE = (
    "<|start_header_id|>system<|end_header_id|>\n\nDescribe the video by detailing the following aspects: "
    "1. The central subject and overarching message or purpose of the video."
    "2. The color, shape, size, texture, quantity, text, and spatial arrangement of objects within the scene."
    "3. Actions, events, behaviors, temporal sequences, and physical movements or transformations of objects."
    "4. Behavior, facial expressions, emotions, speaking style, eye gaze, head orientation, body orientation, "
    "gestures (hand and body), and changes in these elements for the main character."
    "5. The background setting, lighting, artistic style, and overall mood or tone of the scene."
    "6. Camera angles, movements, transitions, and other filming techniques employed in the video:<|eot_id|>"
    "<|start_header_id|>user<|end_header_id|>\n\n{}<|eot_id|>"
)
IMAGE_TOKEN = "<image>"
VLM_PROMPT = VLM_TEMPLATE.format(IMAGE_TOKEN)  # LLAVA_LLAMA_3_8B_HUMAN_IMAGE_PROMPT
USER_HEADER = "<|start_header_id|>user<|end_header_id|>"
# HunyuanVideo constants.py NEGATIVE_PROMPT: the unconditional prompt of CFG (for LLM and CLIP alike)
NEGATIVE_PROMPT = ("Aerial view, aerial view, overexposed, low quality, deformation, a poor composition, bad hands, "
                   "bad teeth, bad eyes, bad limbs, distortion")
MAX_LENGTH = 256  # LLM positions kept after the crop
CLIP_MAX_LENGTH = 77
IMAGE_STRIDE = 4  # the release's image_token_selection_expr "::4"


def template_crop(tokenizer, template: str = PROMPT_TEMPLATE_VIDEO) -> int:
    """Tokens before the prompt in `template`, BOS included (95 for the video template and Llama-3)."""
    return len(tokenizer(template.split("{}")[0])["input_ids"])


def _warn_truncated(lengths, limit: int, what: str) -> None:
    for i, n in enumerate(lengths):
        if n > limit:
            warnings.warn(f"prompt {i} takes {n} tokens in the {what}, which holds {limit}: it is truncated",
                          stacklevel=3)


def llm_tokens(tokenizer, prompts: list[str], crop: int, max_length: int = MAX_LENGTH,
               template: str = PROMPT_TEMPLATE_VIDEO):
    """(input_ids, attention_mask) [B, crop + max_length] int32 of the templated prompts, right-padded.

    The window after the crop holds the prompt and its closing `<|eot_id|>`; longer prompts are
    truncated (as the release does) with a warning. `crop` must be `template_crop` of `template`.
    """
    texts = [template.format(p) for p in prompts]
    _warn_truncated([len(x) - crop for x in tokenizer(texts)["input_ids"]], max_length,
                    "text encoder's window (prompt + closing <|eot_id|>)")
    enc = tokenizer(texts, max_length=crop + max_length, padding="max_length", truncation=True, return_tensors="np")
    return enc["input_ids"].astype(np.int32), enc["attention_mask"].astype(np.int32)


def clip_tokens(tokenizer, prompts: list[str], max_length: int = CLIP_MAX_LENGTH):
    """(input_ids, attention_mask) [B, 77] int32 of the bare prompts, padded and truncated like the release."""
    _warn_truncated([len(x) for x in tokenizer(prompts)["input_ids"]], max_length,
                    "CLIP text encoder (start and end tokens included)")
    enc = tokenizer(prompts, max_length=max_length, padding="max_length", truncation=True, return_tensors="np")
    return enc["input_ids"].astype(np.int32), enc["attention_mask"].astype(np.int32)


@dataclasses.dataclass(frozen=True)
class VLMPrompt:
    """The VLM's token ids in the expanded form and the positions whose hidden states are kept."""

    input_ids: np.ndarray  # [L] int32, one image token per image-feature position
    keep: np.ndarray  # [K] int32 positions (146 for the release)


def _find(seq: list[int], sub: list[int]) -> list[int]:
    return [i for i in range(len(seq) - len(sub) + 1) if seq[i:i + len(sub)] == sub]


def vlm_prompt(tokenizer, image_token_id: int, image_seq_length: int, stride: int = IMAGE_STRIDE) -> VLMPrompt:
    """The release's VLM prompt, expanded, and its token selection (release.md E.3)."""
    got = tokenizer.convert_tokens_to_ids(IMAGE_TOKEN)
    if got != image_token_id:
        raise ValueError(f"the tokenizer maps {IMAGE_TOKEN!r} to {got}, but the VLM's image token id is "
                         f"{image_token_id}: use the tokenizer of the LLaVA checkpoint")
    ids = list(tokenizer(VLM_PROMPT)["input_ids"])
    header = list(tokenizer(USER_HEADER, add_special_tokens=False)["input_ids"])
    starts = _find(ids, header)
    if len(starts) != 1 or ids.count(image_token_id) != 1:
        raise ValueError(f"the VLM prompt must hold one user header {header} and one image token; found "
                         f"{len(starts)} and {ids.count(image_token_id)}")
    at = ids.index(image_token_id)
    expanded = ids[:at] + [image_token_id] * image_seq_length + ids[at + 1:]
    image = np.zeros(len(expanded), bool)
    image[at:at + image_seq_length] = True
    position = np.arange(len(expanded))
    keep = (position >= starts[0] + len(header)) & (~image | ((position - at) % stride == 0))
    return VLMPrompt(np.asarray(expanded, np.int32), np.flatnonzero(keep).astype(np.int32))
