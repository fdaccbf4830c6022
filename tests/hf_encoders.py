"""Helpers of the encoder tests: tiny random Hugging Face models saved as folders, converted with the
project's converter, and tiny offline tokenizers with the Llama-3 / CLIP special tokens."""

from __future__ import annotations

import json
from pathlib import Path

import torch

from m141jax.cli.convert import main as convert_main

LLAMA3_SPLIT = (r"(?i:'s|'t|'re|'ve|'m|'ll|'d)|[^\r\n\p{L}\p{N}]?\p{L}+|\p{N}{1,3}| ?[^\s\p{L}\p{N}]+[\r\n]*"
                r"|\s*[\r\n]+|\s+(?!\S)|\s+")
LLAMA3_SPECIAL = ["<|begin_of_text|>", "<|end_of_text|>", "<|start_header_id|>", "<|end_header_id|>", "<|eot_id|>",
                  "<image>", "<pad>"]


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

