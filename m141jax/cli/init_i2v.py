"""`m141jax init-i2v --src T2V_CKPT --dst I2V_CKPT [--guidance 6.0] [--overwrite]`: the starting point of
image-to-video training from the public HunyuanVideo-T2V weights (m141jax/train/init_i2v.py).

T2V_CKPT is a converted T2V DiT (`tools/convert_torch_weights.py dit --config hunyuan-t2v-13b ...`);
I2V_CKPT is the 33-channel DiT `m141jax train init=I2V_CKPT` starts from, whose velocity at initialisation
equals the T2V model's at the embedded guidance scale --guidance, whatever the reference image.
"""

from __future__ import annotations

import sys

from m141jax.train.init_i2v import DEFAULT_GUIDANCE, init_i2v


def main(args) -> int:
    dst = init_i2v(args.src, args.dst, args.guidance, args.overwrite)
    print(f"wrote {dst} (I2V, 33 input channels; guidance {args.guidance:g} folded into the time embedding)",
          file=sys.stderr)
    return 0


def add_parser(sub) -> None:
    p = sub.add_parser("init-i2v", help="T2V DiT checkpoint -> 33-channel I2V DiT with the same velocity, for training")
    p.add_argument("--src", required=True, help="a converted T2V DiT checkpoint (16 input channels, guidance embedding)")
    p.add_argument("--dst", required=True, help="the I2V DiT checkpoint to write")
    p.add_argument("--guidance", type=float, default=DEFAULT_GUIDANCE,
                   help=f"embedded guidance scale folded into the time embedding (default {DEFAULT_GUIDANCE:g})")
    p.add_argument("--overwrite", action="store_true", help="replace DST if it is an m141jax DiT checkpoint")
    p.set_defaults(func=main)
