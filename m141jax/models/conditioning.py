"""The DiT's text conditioning: ONE pytree, made by the encoders, read from training batches, fed to the
sampler and to `dit_forward` (release.md B.1, E).

    cond = Conditioning(text_states, text_mask, text_states_2)
    cond = Conditioning.from_batch(batch)                  # the keys text_states, text_mask, text_states_2
    null = Conditioning.from_batch(batch, prefix="null_")  # the empty prompt of a training batch
"""

from __future__ import annotations

import flax.struct
import jax

FIELDS = ("text_states", "text_mask", "text_states_2")


@flax.struct.dataclass
class Conditioning:
    """Text states [B, L, D] (LLM tokens, after the VLM image tokens if any), their mask [B, L] (valid
    tokens a prefix) and the pooled CLIP vector text_states_2 [B, D2]. A pytree: `jax.tree.map` reaches
    the three arrays, so it passes through jit, shardings and concatenation unchanged."""

    text_states: jax.Array
    text_mask: jax.Array
    text_states_2: jax.Array

    @classmethod
    def from_batch(cls, batch, prefix: str = "") -> Conditioning:
        """The conditioning held in a dict (a training batch, a parity file) under prefix + each field name."""
        missing = [prefix + k for k in FIELDS if prefix + k not in batch]
        if missing:
            raise KeyError(f"conditioning keys missing: {', '.join(missing)}")
        return cls(*(batch[prefix + k] for k in FIELDS))

    def to_dict(self, prefix: str = "") -> dict:
        """{prefix + field: array}, the inverse of `from_batch`."""
        return {prefix + k: getattr(self, k) for k in FIELDS}
