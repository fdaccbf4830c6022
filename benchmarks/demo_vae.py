"""How sharp can the demo's VAE be? The demo VAE (`m141jax.demo.recipe.train_vae`, optionally with another
architecture) trained for --steps on the demo's training clips, then scored on its reconstructions of the
development split's clips (`m141jax.demo.quality`: held-out and training captions) by the demo's targets:
colour, direction, shape, one object in every frame, temporal consistency and edge sharpness over the true
clips'. Every generated demo clip is decoded by this VAE, so its reconstructions bound what the DiTs reach.

    python benchmarks/demo_vae.py [--steps 5400] [--set block_out_channels=16,32,64] [--set latent_channels=16]
                                  [--batch 2] [--lr 1e-3] [--kl-weight 1e-4] [--edge-weight 0] [--latent-noise 0]
                                  [--foreground-margin 0]
                                  [--image-batch 0]
    RESULT demo_vae_recipe steps=… config=… train_s=… colour=… direction=… shape=… single_all_frames=… …
           bleed_outside=… bleed_inside=… circle=… square=… triangle=… fill_circle=… …

`--checkpoints DIR` scores the VAE of a checkpoint folder instead (e.g. the shipped one,
m141jax/demo/checkpoints), without training: `RESULT demo_vae_checkpoint n=… colour=… …`; with
`--radius LOW,HIGH` on clips whose objects' half-extent is drawn from another range than the dataset's
(`shapes.RADIUS`), e.g. an older VAE on today's clips.
"""

from __future__ import annotations

import argparse
import sys
import time
from pathlib import Path

import numpy as np

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))  # run from a source checkout

import jax  # noqa: E402
from common import override, result  # noqa: E402

from m141jax import components, pipeline  # noqa: E402
from m141jax.components import Component  # noqa: E402
from m141jax.data import shapes  # noqa: E402
from m141jax.demo import data as demo_data  # noqa: E402
from m141jax.demo import quality, recipe  # noqa: E402


def reconstruction_scores(vae: Component, truth: np.ndarray, captions: list[str]) -> dict[str, float]:
    """The demo's targets on the VAE's reconstructions of clips, made as demo_quality.py's `demo_vae` lines are,
    the edge bleed (`quality.edge_bleed`: the true clips' own about 0.14 outside, 0.87 inside) and the shape per
    captioned shape (`quality.shape_by_caption`)."""
    recon = np.asarray(pipeline.decode_frames(vae, demo_data.clean_latents(vae, truth, progress=False)))
    outside, inside = quality.edge_bleed(recon, truth)
    return {**quality.metrics(recon, captions, truth), "bleed_outside": outside, "bleed_inside": inside,
            **quality.shape_by_caption(recon, captions)}


def _radius(text: str) -> tuple[float, float]:
    try:
        low, high = (float(v) for v in text.split(","))
    except ValueError:
        raise argparse.ArgumentTypeError(f"{text!r} is not LOW,HIGH in px, e.g. 7,9") from None
    return low, high


def main() -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    p.add_argument("--steps", type=int, default=recipe.VAE_STEPS)
    p.add_argument("--set", action="append", default=[], help="a VAEConfig field, e.g. latent_channels=16")
    p.add_argument("--batch", type=int, default=2, help="clips per step")
    p.add_argument("--lr", type=float, default=recipe.VAE_LR)
    p.add_argument("--kl-weight", type=float, default=recipe.KL_WEIGHT)
    p.add_argument("--edge-weight", type=float, default=recipe.EDGE_WEIGHT, help="γ of the VAE loss' gradient term")
    p.add_argument("--latent-noise", type=float, default=recipe.LATENT_NOISE,
                   help="α of the decoder's latent noise (m141jax.train.vae.noised_latents; 0: none)")
    p.add_argument("--foreground-margin", type=int, default=recipe.FOREGROUND_MARGIN,
                   help="px around the object that weigh as much as it (0: the object alone)")
    p.add_argument("--image-batch", type=int, default=recipe.IMAGE_BATCH,
                   help="single frames of an image step after each clip step (0: none)")
    p.add_argument("--per-combination", type=int, default=3, help="dev clips per caption combination")
    p.add_argument("--checkpoints", help="score the VAE of this checkpoint folder (no training)")
    p.add_argument("--radius", type=_radius, default=shapes.RADIUS,
                   help="LOW,HIGH: the scored clips' range of object half-extents in px (default: the dataset's)")
    args = p.parse_args()
    if args.radius != shapes.RADIUS and not args.checkpoints:
        p.error("--radius scores a checkpoint folder's VAE (--checkpoints): the trained VAE learns the dataset's")
    clips = [quality.split_clips("dev", kind, args.per_combination, args.radius) for kind in quality.CAPTION_SETS]
    truth, captions = np.concatenate([v for v, _ in clips]), [c for _, cs in clips for c in cs]
    if args.checkpoints:
        vae = components.load_component(args.checkpoints, "vae", "fp32")
        result("demo_vae_checkpoint", n=len(captions), radius_low=args.radius[0], radius_high=args.radius[1],
               **reconstruction_scores(vae, truth, captions))
        return 0
    cfg = override(recipe.VAE, args.set)
    data = shapes.ShapesDataset(recipe.VIDEOS, "train", seed=0)
    videos = np.stack([data[i][0] for i in range(len(data))])
    start = time.perf_counter()
    cfg, params = recipe.train_vae(videos, args.steps, batch=args.batch, lr=args.lr, cfg=cfg,
                                   kl_weight=args.kl_weight, edge_weight=args.edge_weight, image_batch=args.image_batch,
                                   latent_noise=args.latent_noise, foreground_margin=args.foreground_margin)
    train_s = time.perf_counter() - start
    scores = reconstruction_scores(Component(cfg, jax.device_put(params)), truth, captions)
    result("demo_vae_recipe", steps=args.steps, config=",".join(args.set) or "recipe", batch=args.batch, lr=args.lr,
           kl_weight=args.kl_weight, edge_weight=args.edge_weight, image_batch=args.image_batch,
           latent_noise=args.latent_noise, foreground_margin=args.foreground_margin, train_s=train_s,
           n=len(captions), **scores)
    return 0


if __name__ == "__main__":
    sys.exit(main())
