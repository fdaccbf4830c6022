"""Kept only for benchmarks/generate.py, which imports it by this name: the tiny checkpoint folder now
lives in fixtures.py (import it from there in tests)."""

from fixtures import write_tiny_checkpoints  # noqa: F401
