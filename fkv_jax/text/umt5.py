"""The UMT5 text encoder (encoder only) in Flax NNX, with Wan2.1's structure (``wan/modules/t5.py``).

Per layer: ``x += attn(norm1(x))``, ``x += ffn(norm2(x))``; then a final norm. Specifically

* T5 RMS norm (no mean subtraction, weight only, eps 1e-6), statistics in float32;
* self-attention without bias and **without** ``1/sqrt(d)`` scaling; a relative position bias of its own in
  every layer (UMT5, ``shared_pos=False``): ``[num_buckets, heads]`` tables indexed by bidirectional log
  buckets of ``key - query`` (32 buckets, max distance 128); padded keys are masked out for every query;
* gated feed-forward ``fc2(fc1(x) * gelu_tanh(gate(x)))``.

Sizes are read from the weights by the converter; :class:`UMT5Config` records them. Blocks are stacked on a
leading layer axis (``nnx.vmap``) and run with ``lax.scan``, like the transformer.
"""

from __future__ import annotations

import dataclasses
import math
from typing import Any

import jax
import jax.numpy as jnp
import numpy as np
from flax import nnx


@dataclasses.dataclass(frozen=True)
class UMT5Config:
    """Sizes of a UMT5 encoder (defaults: ``umt5-xxl`` as Wan2.1 uses it)."""

    vocab_size: int = 256384
    dim: int = 4096
    dim_attn: int = 4096
    dim_ffn: int = 10240
    num_heads: int = 64
    num_layers: int = 24
    num_buckets: int = 32
    max_dist: int = 128
    eps: float = 1e-6
    text_len: int = 512  # tokens per prompt after padding / truncation (the DiT's text_len)
    name: str = "umt5-xxl"

    def __post_init__(self):
        if self.dim_attn % self.num_heads:
            raise ValueError(f"dim_attn={self.dim_attn} is not divisible by num_heads={self.num_heads}")
        if self.num_buckets % 2:
            raise ValueError(f"num_buckets={self.num_buckets} must be even (bidirectional buckets)")

    @property
    def head_dim(self) -> int:
        return self.dim_attn // self.num_heads

    def to_dict(self) -> dict[str, Any]:
        return dataclasses.asdict(self)

    @classmethod
    def from_dict(cls, d: dict[str, Any]) -> "UMT5Config":
        names = {f.name for f in dataclasses.fields(cls)}
        unknown = sorted(set(d) - names)
        if unknown:
            raise ValueError(f"unknown text encoder config keys: {unknown}")
        return cls(**d)


def relative_position_buckets(q_len: int, k_len: int, num_buckets: int = 32, max_dist: int = 128) -> np.ndarray:
    """int32 [q_len, k_len] bucket of each (query i, key j), bidirectional, from ``rel = j - i``.

    Half the buckets per direction (``rel > 0`` adds ``num_buckets // 2``); within a half, distances below
    ``half // 2`` get a bucket each, larger ones a logarithmic bucket up to ``max_dist``, clipped to the last.
    The log is evaluated in float32 with truncation, which reproduces the PyTorch reference bucket for bucket.
    """
    half = num_buckets // 2
    exact = half // 2
    rel = np.arange(k_len)[None, :] - np.arange(q_len)[:, None]
    out = np.where(rel > 0, half, 0)
    n = np.abs(rel)
    with np.errstate(divide="ignore"):
        ratio = np.log(n.astype(np.float32) / np.float32(exact)) / np.float32(math.log(max_dist / exact))
    large = exact + np.nan_to_num(ratio * np.float32(half - exact), neginf=0.0).astype(np.int64)
    large = np.minimum(large, half - 1)
    return (out + np.where(n < exact, n, large)).astype(np.int32)


def rms_norm(x: jax.Array, scale: jax.Array, eps: float) -> jax.Array:
    """T5 LayerNorm: ``x * rsqrt(mean(x^2) + eps) * scale``, statistics in float32."""
    xf = x.astype(jnp.float32)
    y = xf * jax.lax.rsqrt(jnp.mean(jnp.square(xf), axis=-1, keepdims=True) + eps)
    return y.astype(scale.dtype) * scale


class T5Norm(nnx.Module):
    def __init__(self, dim: int, eps: float, *, dtype=jnp.float32):
        self.eps = eps
        self.scale = nnx.Param(jnp.ones((dim,), dtype))

    def __call__(self, x):
        return rms_norm(x, self.scale[...], self.eps)


def _linear(din, dout, rngs, dtype):
    return nnx.Linear(din, dout, use_bias=False, rngs=rngs, param_dtype=dtype, dtype=dtype)


class T5Attention(nnx.Module):
    def __init__(self, cfg: UMT5Config, *, rngs, dtype=jnp.float32):
        self.num_heads = cfg.num_heads
        self.q = _linear(cfg.dim, cfg.dim_attn, rngs, dtype)
        self.k = _linear(cfg.dim, cfg.dim_attn, rngs, dtype)
        self.v = _linear(cfg.dim, cfg.dim_attn, rngs, dtype)
        self.o = _linear(cfg.dim_attn, cfg.dim, rngs, dtype)

    def __call__(self, x, bias):
        """x: [B, L, D]; bias: [B|1, H, L, L] position bias with masked keys at the float32 minimum."""
        b, l, _ = x.shape
        shape = (b, l, self.num_heads, -1)
        q, k, v = self.q(x).reshape(shape), self.k(x).reshape(shape), self.v(x).reshape(shape)
        logits = jnp.einsum("bqhd,bkhd->bhqk", q, k, preferred_element_type=jnp.float32) + bias
        p = jax.nn.softmax(logits, axis=-1).astype(v.dtype)
        return self.o(jnp.einsum("bhqk,bkhd->bqhd", p, v).reshape(b, l, -1))


class GatedFFN(nnx.Module):
    """``fc2(fc1(x) * gelu_tanh(gate(x)))``."""

    def __init__(self, cfg: UMT5Config, *, rngs, dtype=jnp.float32):
        self.gate = _linear(cfg.dim, cfg.dim_ffn, rngs, dtype)
        self.fc1 = _linear(cfg.dim, cfg.dim_ffn, rngs, dtype)
        self.fc2 = _linear(cfg.dim_ffn, cfg.dim, rngs, dtype)

    def __call__(self, x):
        return self.fc2(self.fc1(x) * jax.nn.gelu(self.gate(x), approximate=True))


class T5Block(nnx.Module):
    def __init__(self, cfg: UMT5Config, *, rngs, dtype=jnp.float32):
        self.norm1 = T5Norm(cfg.dim, cfg.eps, dtype=dtype)
        self.attn = T5Attention(cfg, rngs=rngs, dtype=dtype)
        self.norm2 = T5Norm(cfg.dim, cfg.eps, dtype=dtype)
        self.ffn = GatedFFN(cfg, rngs=rngs, dtype=dtype)
        self.pos_embedding = nnx.Param(jnp.zeros((cfg.num_buckets, cfg.num_heads), dtype))  # [buckets, heads]

    def __call__(self, x, buckets, key_mask):
        """buckets: int32 [L, L]; key_mask: bool [B, L] (True = a real token)."""
        pos = jnp.take(self.pos_embedding[...], buckets, axis=0).astype(jnp.float32)  # [L, L, H]
        pos = jnp.transpose(pos, (2, 0, 1))[None]  # [1, H, L, L]
        bias = jnp.where(key_mask[:, None, None, :], pos, jnp.finfo(jnp.float32).min)
        x = x + self.attn(self.norm1(x), bias)
        return x + self.ffn(self.norm2(x))


class UMT5Encoder(nnx.Module):
    """Token ids + attention mask -> hidden states [B, L, dim] (all positions; zero the padding yourself)."""

    def __init__(self, cfg: UMT5Config, *, rngs: nnx.Rngs, dtype=jnp.float32):
        self.cfg = cfg
        self.token_embedding = nnx.Param(jnp.zeros((cfg.vocab_size, cfg.dim), dtype))

        @nnx.split_rngs(splits=cfg.num_layers)
        @nnx.vmap(in_axes=(0,), out_axes=0)
        def make_blocks(r):
            return T5Block(cfg, rngs=r, dtype=dtype)

        self.blocks = make_blocks(rngs)
        self.norm = T5Norm(cfg.dim, cfg.eps, dtype=dtype)

    def __call__(self, ids: jax.Array, mask: jax.Array, buckets: jax.Array | None = None) -> jax.Array:
        """ids, mask: int [B, L]; buckets: optional precomputed :func:`relative_position_buckets` [L, L]."""
        cfg = self.cfg
        l = ids.shape[1]
        if buckets is None:
            buckets = jnp.asarray(relative_position_buckets(l, l, cfg.num_buckets, cfg.max_dist))
        x = jnp.take(self.token_embedding[...], ids, axis=0)
        key_mask = mask > 0
        gdef, state = nnx.split(self.blocks)

        def body(h, st):
            return nnx.merge(gdef, st)(h, buckets, key_mask), None

        x, _ = jax.lax.scan(body, x, state)
        return self.norm(x)


def abstract_encoder(cfg: UMT5Config, dtype=jnp.float32) -> UMT5Encoder:
    """The encoder with ``ShapeDtypeStruct`` leaves (nothing allocated)."""
    return nnx.eval_shape(lambda: UMT5Encoder(cfg, rngs=nnx.Rngs(0), dtype=dtype))


def abstract_params(cfg: UMT5Config, dtype=jnp.float32) -> dict:
    """The pure param dict of an encoder with this config, as ``ShapeDtypeStruct`` leaves."""
    return nnx.to_pure_dict(nnx.state(abstract_encoder(cfg, dtype), nnx.Param))


def zero_padding(hidden: np.ndarray | jax.Array, mask) -> jax.Array:
    """Zero every position at or past each row's length (``mask.gt(0).sum(1)``, as Self Forcing does)."""
    lens = (jnp.asarray(mask) > 0).sum(axis=1)
    keep = jnp.arange(hidden.shape[1])[None, :] < lens[:, None]
    return jnp.where(keep[..., None], hidden, 0)
