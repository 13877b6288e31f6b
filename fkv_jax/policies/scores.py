"""Scorers: small pure functions that rank frames, segments or tokens."""

from __future__ import annotations

import jax
import jax.numpy as jnp


def segment_cosine(a: jax.Array, b: jax.Array, num_segments: int, eps: float = 1e-8) -> jax.Array:
    """Mean per-token cosine similarity of two frames' keys over ``num_segments`` contiguous raster segments.

    a, b: [T, F] (a token's features flattened, e.g. heads x head_dim). Returns [num_segments].
    """
    t = a.shape[0]
    if t % num_segments:
        raise ValueError(f"{t} tokens per frame do not split into {num_segments} segments")
    na = jnp.linalg.norm(a, axis=-1)
    nb = jnp.linalg.norm(b, axis=-1)
    cos = (a * b).sum(-1) / jnp.maximum(na * nb, eps)  # [T]
    return cos.reshape(num_segments, t // num_segments).mean(-1)


def pool_tokens(x: jax.Array, groups: int, alpha: float = 0.5) -> jax.Array:
    """Pool a frame's tokens in ``groups`` contiguous groups as alpha * mean + (1 - alpha) * max.

    x: [..., T, D] -> [..., groups, D].
    """
    t = x.shape[-2]
    if t % groups:
        raise ValueError(f"{t} tokens per frame do not split into {groups} pooling groups")
    g = x.reshape(*x.shape[:-2], groups, t // groups, x.shape[-1])
    return alpha * g.mean(-2) + (1 - alpha) * g.max(-2)


def zscore_rsqrt(x: jax.Array, axis: int = -1, eps: float = 1e-6) -> jax.Array:
    """(x - mean) * rsqrt(var_pop + eps) (Focused Forcing's attention z-score as executed)."""
    m = x.mean(axis, keepdims=True)
    v = jnp.square(x - m).mean(axis, keepdims=True)
    return (x - m) * jax.lax.rsqrt(v + eps)


def zscore_std(x: jax.Array, axis: int = -1, eps: float = 1e-6) -> jax.Array:
    """(x - mean) / (std_pop + eps) (Focused Forcing's diversity z-score as executed)."""
    m = x.mean(axis, keepdims=True)
    sd = jnp.sqrt(jnp.square(x - m).mean(axis, keepdims=True))
    return (x - m) / (sd + eps)


def key_diversity(keys: jax.Array, valid: jax.Array, eps: float = 1e-6) -> jax.Array:
    """Minus the mean cosine of each frame's keys to the mean key over frames (per token position).

    keys: [H, N, T, D] frames' keys (the cache's heads-first layout); valid: bool[N] which frames form the
    set. Returns D [H, N] (meaningful where valid). The mean key is normalised as m * rsqrt(|m|^2 + eps),
    each key as rsqrt(|k|^2 + eps), and the cosine is averaged over the frame's tokens.
    """
    w = valid.astype(keys.dtype)[None, :, None, None]
    m = (keys * w).sum(1) / jnp.maximum(w.sum(), 1)  # [H, T, D]
    m_hat = m * jax.lax.rsqrt(jnp.square(m).sum(-1, keepdims=True) + eps)
    cos = (keys * m_hat[:, None]).sum(-1) * jax.lax.rsqrt(jnp.square(keys).sum(-1) + eps)  # [H, N, T]
    return -cos.mean(-1)  # [H, N]


def pooled_keys(keys: jax.Array, groups: int, alpha: float = 0.5) -> jax.Array:
    """Each candidate frame's keys as Focused Forcing scores them: pooled in ``groups`` groups
    (:func:`pool_tokens`) and averaged over the groups. keys: [..., N, T, D] -> [..., N, D] (float32)."""
    return pool_tokens(keys.astype(jnp.float32), groups, alpha).mean(-2)


def attention_z(q: jax.Array, k_bar: jax.Array, groups: int, alpha: float = 0.5) -> jax.Array:
    """Focused Forcing's attention score from already pooled keys (:func:`pooled_keys`).

    q: [B, C, T, H, D] queries by frame; k_bar: [B, H, N, D]. Returns [B, C, H, N].
    """
    d = q.shape[-1]
    # the mean over group pairs of dot products is the dot product of the group means
    q_bar = pool_tokens(jnp.moveaxis(q.astype(jnp.float32), 3, 2), groups, alpha).mean(-2)  # [B, C, H, D]
    return zscore_rsqrt(jnp.einsum("bchd,bhnd->bchn", q_bar, k_bar) / jnp.sqrt(jnp.float32(d)), axis=-1)


def pooled_attention_z(q: jax.Array, keys: jax.Array, groups: int, alpha: float = 0.5) -> jax.Array:
    """Focused Forcing's attention score: per query frame and head, the mean over pooled group pairs of
    pooled q . pooled k / sqrt(D) for every candidate frame, z-scored over the candidates.

    q: [B, C, T, H, D] queries by frame; keys: [B, H, N, T, D] candidate frames (heads-first, as cached).
    Returns [B, C, H, N].
    """
    return attention_z(q, pooled_keys(keys, groups, alpha), groups, alpha)
