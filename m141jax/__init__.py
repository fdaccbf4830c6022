"""m141jax: Magic 1-For-1 (arXiv 2502.07701) in JAX/Flax."""

__version__ = "0.1.0"
