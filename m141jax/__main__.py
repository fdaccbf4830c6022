import sys

from m141jax.cli import main

sys.exit(main())
