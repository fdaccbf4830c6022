#!/usr/bin/env python
"""Convert PyTorch weights to an m141jax Orbax checkpoint. See `--help` and the README."""

import os
import sys

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))

from m141jax.cli.convert import main  # noqa: E402

if __name__ == "__main__":
    sys.exit(main())
