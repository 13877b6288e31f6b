"""Training-time attention of the toy model: teacher forcing with block-causal masks (reference section 4.6).

The training sequence is ``[clean frames | noisy frames]`` (RoPE positions identical for both halves), cut
into blocks of ``frames_per_block`` frames:

* a clean token of block j attends to clean blocks ``<= j`` (block-causal, as the KV cache's clean passes);
* a noisy token of block j attends to clean blocks ``< j`` and to its own noisy block (as a denoising pass
  that reads the cache and its own chunk).

:func:`teacher_forcing_mask` is that rule as an explicit boolean matrix (the definition, used by the tests);
:func:`teacher_forcing_attention` computes the same attention without any ``[2S, 2S]`` score matrix: block
by block, each query set reads one contiguous key set (a quarter of the dense version's score entries plus
the diagonal blocks).
"""

from __future__ import annotations

import math

import jax
import jax.numpy as jnp
import numpy as np

_NEG = -1e30


def block_causal_mask(num_frames: int, frames_per_block: int, tokens_per_frame: int) -> np.ndarray:
    """bool [S, S] (S = frames * tokens): query token q may read key token k iff block(k) <= block(q)."""
    blk = np.arange(num_frames * tokens_per_frame) // (frames_per_block * tokens_per_frame)
    return blk[None, :] <= blk[:, None]


def teacher_forcing_mask(num_frames: int, frames_per_block: int, tokens_per_frame: int) -> np.ndarray:
    """bool [2S, 2S] over ``[clean | noisy]`` tokens (rows = queries, columns = keys)."""
    s = num_frames * tokens_per_frame
    idx = np.arange(2 * s)
    noisy = idx >= s
    blk = (idx % s) // (frames_per_block * tokens_per_frame)
    qn, kn = noisy[:, None], noisy[None, :]
    qb, kb = blk[:, None], blk[None, :]
    clean_key = ~kn & ((kb < qb) | ((kb == qb) & ~qn))
    noisy_key = kn & qn & (kb == qb)
    return clean_key | noisy_key


def dense_masked_attention(q: jax.Array, k: jax.Array, v: jax.Array, mask: np.ndarray) -> jax.Array:
    """Reference: softmax attention with an explicit [Sq, Sk] mask. q, k, v: [B, S, H, D]."""
    scale = 1.0 / math.sqrt(q.shape[-1])
    s = jnp.einsum("bqhd,bkhd->bhqk", q.astype(jnp.float32) * scale, k.astype(jnp.float32))
    s = jnp.where(jnp.asarray(mask)[None, None], s, _NEG)
    p = jax.nn.softmax(s, axis=-1)
    return jnp.einsum("bhqk,bkhd->bqhd", p, v.astype(jnp.float32)).astype(q.dtype)


def _attend(q: jax.Array, k: jax.Array, v: jax.Array) -> jax.Array:
    """Unmasked softmax attention in float32. q: [B, Sq, H, D]; k, v: [B, Sk, H, D]."""
    s = jnp.einsum("bqhd,bkhd->bhqk", q, k)
    return jnp.einsum("bhqk,bkhd->bqhd", jax.nn.softmax(s, axis=-1), v)


def teacher_forcing_attention(q: jax.Array, k: jax.Array, v: jax.Array, num_blocks: int) -> jax.Array:
    """Attention under :func:`teacher_forcing_mask`. q, k, v: [B, 2S, H, D] ([clean | noisy]) -> [B, 2S, H, D].

    Block by block (a Python loop: the number of blocks is small and static), every query set reads one
    contiguous key set, so no mask is needed: clean block j reads clean blocks ``0..j``; noisy block j reads
    clean blocks ``0..j-1`` followed by its own noisy block. Only the allowed score entries are computed.
    """
    b, s2, h, d = q.shape
    s = s2 // 2
    tb = s // num_blocks  # tokens per block
    qf = q.astype(jnp.float32) * (1.0 / math.sqrt(d))
    kf, vf = k.astype(jnp.float32), v.astype(jnp.float32)
    clean_out, noisy_out = [], []
    for j in range(num_blocks):
        lo, hi = j * tb, (j + 1) * tb
        clean_out.append(_attend(qf[:, lo:hi], kf[:, :hi], vf[:, :hi]))
        kn = jnp.concatenate([kf[:, :lo], kf[:, s + lo : s + hi]], axis=1)
        vn = jnp.concatenate([vf[:, :lo], vf[:, s + lo : s + hi]], axis=1)
        noisy_out.append(_attend(qf[:, s + lo : s + hi], kn, vn))
    return jnp.concatenate(clean_out + noisy_out, axis=1).astype(q.dtype)
