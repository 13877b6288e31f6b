"""Wan2.1 3D rotary position embedding (interleaved pairs, split temporal / height / width).

Each head's ``D`` channels form ``D/2`` complex pairs from adjacent channels ``(2j, 2j+1)``. The pairs are
split ``c - 2*(c//3), c//3, c//3`` (``c = D/2``; 22/21/21 for ``D = 128``) between the temporal, height and
width axes. Angles are built on the host in float64 (as upstream) and stored as float32 cos/sin tables; a
jitted step gathers the temporal rows of its chunk with a traced start frame, so no retrace per chunk.
"""

from __future__ import annotations

import dataclasses

import jax
import jax.numpy as jnp
import numpy as np

THETA = 10000.0


def rope_split(head_dim: int) -> tuple[int, int, int]:
    """Number of complex pairs given to (time, height, width)."""
    c = head_dim // 2
    return c - 2 * (c // 3), c // 3, c // 3


def _angles(num_pos: int, num_pairs: int, dim_for_freq: int) -> np.ndarray:
    # freq_i = theta^(-2i/dim_for_freq), i < num_pairs, all in float64.
    freqs = 1.0 / THETA ** (np.arange(0, dim_for_freq, 2, dtype=np.float64)[:num_pairs] / dim_for_freq)
    return np.outer(np.arange(num_pos, dtype=np.float64), freqs)  # [num_pos, num_pairs]


@dataclasses.dataclass(frozen=True)
class RopeTables:
    """cos/sin tables, float32. ``t: [max_frames, ct]``, ``h: [gh, ch]``, ``w: [gw, cw]``."""

    t_cos: np.ndarray
    t_sin: np.ndarray
    h_cos: np.ndarray
    h_sin: np.ndarray
    w_cos: np.ndarray
    w_sin: np.ndarray


def make_rope_tables(head_dim: int, grid_hw: tuple[int, int], max_frames: int = 1024) -> RopeTables:
    ct, ch, cw = rope_split(head_dim)
    gh, gw = grid_hw
    # Upstream builds each axis' frequencies over twice its pair count: 2*ct and 2*ch dims.
    at = _angles(max_frames, ct, 2 * ct)
    ah = _angles(gh, ch, 2 * ch)
    aw = _angles(gw, cw, 2 * cw)
    f32 = np.float32
    return RopeTables(
        np.cos(at).astype(f32),
        np.sin(at).astype(f32),
        np.cos(ah).astype(f32),
        np.sin(ah).astype(f32),
        np.cos(aw).astype(f32),
        np.sin(aw).astype(f32),
    )


def chunk_cos_sin(tables: RopeTables, frame_pos: jax.Array) -> tuple[jax.Array, jax.Array]:
    """cos/sin for every token of a chunk whose frames sit at absolute positions ``frame_pos``.

    Args:
      frame_pos: int32 [F] absolute latent-frame index of each frame (traced is fine).
    Returns:
      cos, sin: float32 [F * gh * gw, D/2], tokens in (f, y, x) row-major order.
    """
    gh, gw = tables.h_cos.shape[0], tables.w_cos.shape[0]
    nf = frame_pos.shape[0]
    t_cos = jnp.take(jnp.asarray(tables.t_cos), frame_pos, axis=0)  # [F, ct]
    t_sin = jnp.take(jnp.asarray(tables.t_sin), frame_pos, axis=0)

    def expand(c_t, c_h, c_w):
        ct, ch, cw = c_t.shape[-1], c_h.shape[-1], c_w.shape[-1]
        a = jnp.broadcast_to(c_t[:, None, None, :], (nf, gh, gw, ct))
        b = jnp.broadcast_to(jnp.asarray(c_h)[None, :, None, :], (nf, gh, gw, ch))
        c = jnp.broadcast_to(jnp.asarray(c_w)[None, None, :, :], (nf, gh, gw, cw))
        return jnp.concatenate([a, b, c], axis=-1).reshape(nf * gh * gw, ct + ch + cw)

    return expand(t_cos, tables.h_cos, tables.w_cos), expand(t_sin, tables.h_sin, tables.w_sin)


def temporal_freqs(head_dim: int) -> np.ndarray:
    """float64 [ct]: the angle per frame of each temporal pair (a key roped at frame p turns by p * freq)."""
    ct = rope_split(head_dim)[0]
    return _angles(2, ct, 2 * ct)[1]


def rotate(x: jax.Array, cos: jax.Array, sin: jax.Array) -> jax.Array:
    """Rotate the interleaved complex pairs ``(x[2j], x[2j+1])`` of ``x [..., 2P]`` by angles with
    ``cos, sin`` broadcastable to ``[..., P]``; computed in float32, returned in x's dtype. The one place the
    rotation is written: RoPE, temporal re-rotation and shifting keys in time all use it."""
    xf = x.astype(jnp.float32).reshape(*x.shape[:-1], x.shape[-1] // 2, 2)
    re, im = xf[..., 0], xf[..., 1]
    out = jnp.stack([re * cos - im * sin, re * sin + im * cos], axis=-1)
    return out.reshape(x.shape).astype(x.dtype)


def _rotate_temporal_pairs(x: jax.Array, cos: jax.Array, sin: jax.Array) -> jax.Array:
    """Rotate only the first ``ct`` (temporal) pairs of x [..., D]; cos, sin broadcastable to [..., ct]."""
    ct = rope_split(x.shape[-1])[0]
    return jnp.concatenate([rotate(x[..., : 2 * ct], cos, sin), x[..., 2 * ct :]], axis=-1)


def apply_rope(x: jax.Array, cos: jax.Array, sin: jax.Array) -> jax.Array:
    """Rotate interleaved pairs. x: [B, S, H, D]; cos, sin: [S, D/2]."""
    return rotate(x, cos[None, :, None, :], sin[None, :, None, :])


def rotate_temporal(x: jax.Array, tables: RopeTables, pos: jax.Array) -> jax.Array:
    """Rotate only the temporal channels of ``x`` by frame position ``pos`` (may be negative).

    x: [..., F, T, D] (heads-first, e.g. a cache [L, B, H, N, T, D]) with ``pos`` broadcastable to
    x.shape[:-2] (one position per frame).
    """
    p = jnp.abs(pos)
    c = jnp.take(jnp.asarray(tables.t_cos), p, axis=0)  # [..., ct]
    s = jnp.take(jnp.asarray(tables.t_sin), p, axis=0) * jnp.sign(pos)[..., None].astype(jnp.float32)
    return _rotate_temporal_pairs(x, c[..., None, :], s[..., None, :])  # broadcast over T


def shift_temporal(k: jax.Array, delta: jax.Array) -> jax.Array:
    """Advance the temporal RoPE of keys by ``delta`` frames. k: [..., Dh]; delta broadcastable to k[..., 0].

    Wan's RoPE gives the first ``ct`` complex pairs to time, so rotating them by ``delta * freq_j`` turns a key
    roped at frame ``p`` into the same key roped at ``p + delta``.
    """
    ang = jnp.asarray(delta, jnp.float32)[..., None] * jnp.asarray(temporal_freqs(k.shape[-1]), jnp.float32)
    return _rotate_temporal_pairs(k, jnp.cos(ang), jnp.sin(ang))
