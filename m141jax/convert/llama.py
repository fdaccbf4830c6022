"""`llm` key map: a Hugging Face Llama (LlamaModel, LlamaForCausalLM, or the language model inside a LLaVA
folder) onto `m141jax.models.llama`. Only the language model is converted; the LM head is not used."""

from __future__ import annotations

from m141jax.config import LLAMA_PRESETS, LlamaConfig
from m141jax.convert.hf import (
    convert_with,
    find_prefix,
    heads_in,
    heads_out,
    ident,
    linear,
    llama_config_from_hf,
    unused,
)
from m141jax.convert.plan import Recipe, recipe
from m141jax.models.llama import abstract_params

ANCHOR = "embed_tokens.weight"


def llama_plan(c: LlamaConfig, prefix: str, root: tuple[str, ...] = ()) -> list[Recipe]:
    """Recipes for every Llama parameter from keys `{prefix}embed_tokens.weight`, `{prefix}layers.N....`."""
    D, H, KV, hd, M = c.hidden_size, c.num_heads, c.num_kv_heads, c.head_dim, c.mlp_hidden
    out = [recipe((*root, "embed_tokens", "embedding"), None, ident, (f"{prefix}embed_tokens.weight", (c.vocab_size, D))),
           recipe((*root, "norm", "scale"), None, ident, (f"{prefix}norm.weight", (D,)))]
    t = (*root, "layers")
    for i in range(c.num_layers):
        k = f"{prefix}layers.{i}"
        out += [
            recipe((*t, "input_layernorm", "scale"), i, ident, (f"{k}.input_layernorm.weight", (D,))),
            recipe((*t, "post_attention_layernorm", "scale"), i, ident, (f"{k}.post_attention_layernorm.weight", (D,))),
            recipe((*t, "q_proj", "kernel"), i, heads_in(H, hd), (f"{k}.self_attn.q_proj.weight", (H * hd, D))),
            recipe((*t, "k_proj", "kernel"), i, heads_in(KV, hd), (f"{k}.self_attn.k_proj.weight", (KV * hd, D))),
            recipe((*t, "v_proj", "kernel"), i, heads_in(KV, hd), (f"{k}.self_attn.v_proj.weight", (KV * hd, D))),
            recipe((*t, "o_proj", "kernel"), i, heads_out(H, hd), (f"{k}.self_attn.o_proj.weight", (D, H * hd))),
            recipe((*t, "gate_proj", "kernel"), i, linear, (f"{k}.mlp.gate_proj.weight", (M, D))),
            recipe((*t, "up_proj", "kernel"), i, linear, (f"{k}.mlp.up_proj.weight", (M, D))),
            recipe((*t, "down_proj", "kernel"), i, linear, (f"{k}.mlp.down_proj.weight", (D, M))),
        ]
    return out


def plan_for(cfg: LlamaConfig, keys):
    """(conversion plan, predicate of the source keys the plan leaves unused) for a state dict's keys."""
    prefix = find_prefix(keys, ANCHOR, "Llama language model")
    return llama_plan(cfg, prefix), lambda k: unused(k) or not k.startswith(prefix)


def convert(src: str, config: str | None, dtype, progress: bool = True):
    """(LlamaConfig, numpy parameter tree) from a Hugging Face Llama or LLaVA folder / weights file."""
    return convert_with(src, config, dtype, progress, what="llm", presets=LLAMA_PRESETS, from_hf=llama_config_from_hf,
                        default="llama-3-8b", plan_for=plan_for, abstract=abstract_params)
