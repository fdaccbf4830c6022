"""The PyTorch side of the DiT tests: a tiny diffusers HunyuanVideoTransformer3DModel with random
weights, the release's input assembly, and an independent diffusers -> release key renaming."""

from __future__ import annotations

import math

import numpy as np
import pytest

torch = pytest.importorskip("torch")
diffusers = pytest.importorskip("diffusers")
HunyuanVideoTransformer3DModel = diffusers.HunyuanVideoTransformer3DModel

TINY = dict(num_attention_heads=4, attention_head_dim=16, num_layers=2, num_single_layers=2, num_refiner_layers=2,
            mlp_ratio=4.0, patch_size=2, patch_size_t=1, text_embed_dim=32, pooled_projection_dim=16,
            rope_axes_dim=(4, 6, 6))


def make_model(seed: int = 0, i2v: bool = True, **over) -> HunyuanVideoTransformer3DModel:
    """Tiny diffusers DiT; every parameter random (diffusers zero-initialises modulation/final layers)."""
    torch.manual_seed(seed)
    kw = dict(TINY, in_channels=33 if i2v else 16, out_channels=16, guidance_embeds=not i2v,
              image_condition_type="latent_concat" if i2v else None)
    kw.update(over)
    model = HunyuanVideoTransformer3DModel(**kw).eval()
    with torch.no_grad():
        for name, p in model.named_parameters():
            norm_weight = p.ndim == 1 and "norm" in name and name.endswith("weight")
            p.copy_(torch.randn_like(p) * (0.1 if p.ndim == 1 else 0.2) + (1.0 if norm_weight else 0.0))
    return model


def correctly_rounded_timestep_embedding(timesteps, embedding_dim, flip_sin_to_cos=False, downscale_freq_shift=1,
                                         scale=1, max_period=10000):
    """diffusers' get_timestep_embedding with its one float32 `exp` rounded correctly.

    torch's CPU expf is off by one ulp for 2 of the 128 frequencies (CUDA's expf allows 2 ulp), and at
    t = 1000..6000 that moves the embedding by up to t·6e-8 ≈ 4e-4: no fp32 implementation is
    bit-defined there. m141jax uses the correctly rounded table; so does this reference.
    """
    half = embedding_dim // 2
    exponent = -math.log(max_period) * torch.arange(0, half, dtype=torch.float32) / (half - downscale_freq_shift)
    emb = scale * (timesteps[:, None].float() * torch.exp(exponent.double()).float()[None])
    emb = torch.cat([torch.sin(emb), torch.cos(emb)], dim=-1)
    return torch.cat([emb[:, half:], emb[:, :half]], dim=-1) if flip_sin_to_cos else emb


def release_input(latents, ref):
    """noise ‖ reference zero-padded after its frames ‖ mask of the reference frames (release.md B.1)."""
    b, _, f, h, w = latents.shape
    fr = ref.shape[2]
    mask = torch.zeros(b, 1, f, h, w)
    mask[:, :, :fr] = 1.0
    return torch.cat([latents, torch.nn.functional.pad(ref, (0, 0, 0, 0, 0, f - fr)), mask], 1)


def make_inputs(b=2, f=3, h=8, w=8, text_len=7, valid=(7, 4), seed=1, i2v=True, text_dim=32, pooled_dim=16):
    g = torch.Generator().manual_seed(seed)
    x = {"latents": torch.randn(b, 16, f, h, w, generator=g),
         "timestep": torch.tensor([1000.0, 625.0, 937.5, 833.3][:b]),
         "text_states": torch.randn(b, text_len, text_dim, generator=g),
         "text_mask": torch.tensor([[1] * n + [0] * (text_len - n) for n in valid]),
         "text_states_2": torch.randn(b, pooled_dim, generator=g)}
    if i2v:
        x["ref_latents"] = torch.randn(b, 16, 1, h, w, generator=g)
    else:
        x["guidance"] = torch.tensor([6000.0, 3500.0, 1000.0, 0.0][:b])
    return x


def reference_velocity(model, x) -> np.ndarray:
    hidden = release_input(x["latents"], x["ref_latents"]) if "ref_latents" in x else x["latents"]
    with torch.no_grad():
        out = model(hidden, x["timestep"], x["text_states"], x["text_mask"], x["text_states_2"],
                    guidance=x.get("guidance"), return_dict=False)[0]
    return out.numpy()


def to_release_names(sd: dict) -> dict:
    """Rename a diffusers state dict to the release's names (release.md B.8 / anchors §3), fusing qkv and the
    single blocks' linear1 / linear2, and swapping the final modulation back to (shift, scale)."""
    out = {}
    cat = lambda *ks: torch.cat([sd[k] for k in ks])  # noqa: E731

    def move(dst, src):
        for s in ("weight", "bias"):
            if f"{src}.{s}" in sd:
                out[f"{dst}.{s}"] = sd[f"{src}.{s}"]

    move("img_in.proj", "x_embedder.proj")
    move("time_in.mlp.0", "time_text_embed.timestep_embedder.linear_1")
    move("time_in.mlp.2", "time_text_embed.timestep_embedder.linear_2")
    move("guidance_in.mlp.0", "time_text_embed.guidance_embedder.linear_1")
    move("guidance_in.mlp.2", "time_text_embed.guidance_embedder.linear_2")
    move("vector_in.in_layer", "time_text_embed.text_embedder.linear_1")
    move("vector_in.out_layer", "time_text_embed.text_embedder.linear_2")
    move("txt_in.input_embedder", "context_embedder.proj_in")
    te = "context_embedder.time_text_embed"
    move("txt_in.t_embedder.mlp.0", f"{te}.timestep_embedder.linear_1")
    move("txt_in.t_embedder.mlp.2", f"{te}.timestep_embedder.linear_2")
    move("txt_in.c_embedder.linear_1", f"{te}.text_embedder.linear_1")
    move("txt_in.c_embedder.linear_2", f"{te}.text_embedder.linear_2")
    move("final_layer.linear", "proj_out")
    for s in ("weight", "bias"):
        scale, shift = sd[f"norm_out.linear.{s}"].chunk(2)
        out[f"final_layer.adaLN_modulation.1.{s}"] = torch.cat([shift, scale])
    i = 0
    while f"context_embedder.token_refiner.refiner_blocks.{i}.norm1.weight" in sd:
        a, r = f"context_embedder.token_refiner.refiner_blocks.{i}", f"txt_in.individual_token_refiner.blocks.{i}"
        move(f"{r}.norm1", f"{a}.norm1")
        move(f"{r}.norm2", f"{a}.norm2")
        for s in ("weight", "bias"):
            out[f"{r}.self_attn_qkv.{s}"] = cat(*(f"{a}.attn.to_{n}.{s}" for n in "qkv"))
        move(f"{r}.self_attn_proj", f"{a}.attn.to_out.0")
        move(f"{r}.mlp.fc1", f"{a}.ff.net.0.proj")
        move(f"{r}.mlp.fc2", f"{a}.ff.net.2")
        move(f"{r}.adaLN_modulation.1", f"{a}.norm_out.linear")
        i += 1
    i = 0
    while f"transformer_blocks.{i}.norm1.linear.weight" in sd:
        a, r = f"transformer_blocks.{i}", f"double_blocks.{i}"
        move(f"{r}.img_mod.linear", f"{a}.norm1.linear")
        move(f"{r}.txt_mod.linear", f"{a}.norm1_context.linear")
        for s in ("weight", "bias"):
            out[f"{r}.img_attn_qkv.{s}"] = cat(*(f"{a}.attn.to_{n}.{s}" for n in "qkv"))
            out[f"{r}.txt_attn_qkv.{s}"] = cat(*(f"{a}.attn.add_{n}_proj.{s}" for n in "qkv"))
        out[f"{r}.img_attn_q_norm.weight"] = sd[f"{a}.attn.norm_q.weight"]
        out[f"{r}.img_attn_k_norm.weight"] = sd[f"{a}.attn.norm_k.weight"]
        out[f"{r}.txt_attn_q_norm.weight"] = sd[f"{a}.attn.norm_added_q.weight"]
        out[f"{r}.txt_attn_k_norm.weight"] = sd[f"{a}.attn.norm_added_k.weight"]
        move(f"{r}.img_attn_proj", f"{a}.attn.to_out.0")
        move(f"{r}.txt_attn_proj", f"{a}.attn.to_add_out")
        move(f"{r}.img_mlp.fc1", f"{a}.ff.net.0.proj")
        move(f"{r}.img_mlp.fc2", f"{a}.ff.net.2")
        move(f"{r}.txt_mlp.fc1", f"{a}.ff_context.net.0.proj")
        move(f"{r}.txt_mlp.fc2", f"{a}.ff_context.net.2")
        i += 1
    i = 0
    while f"single_transformer_blocks.{i}.norm.linear.weight" in sd:
        a, r = f"single_transformer_blocks.{i}", f"single_blocks.{i}"
        for s in ("weight", "bias"):
            out[f"{r}.linear1.{s}"] = cat(*(f"{a}.attn.to_{n}.{s}" for n in "qkv"), f"{a}.proj_mlp.{s}")
        move(f"{r}.linear2", f"{a}.proj_out")
        move(f"{r}.modulation.linear", f"{a}.norm.linear")
        out[f"{r}.q_norm.weight"] = sd[f"{a}.attn.norm_q.weight"]
        out[f"{r}.k_norm.weight"] = sd[f"{a}.attn.norm_k.weight"]
        i += 1
    assert sum(v.numel() for v in out.values()) == sum(v.numel() for v in sd.values()), "a tensor was dropped"
    return out
