"""The causal Wan2.1 DiT (Flax NNX) and its building blocks."""

from fkv_jax.model.transformer import CausalWanModel

__all__ = ["CausalWanModel"]
