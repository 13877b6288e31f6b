"""Small XLA-side preprocessing shared by the kernels: what to visit, packed to the front, and how many.

Every kernel walks three key sources per (batch, query group, head): the allowed frames of the chunk, the
valid memory tokens and the selected cache slots. Turning masks into left-packed index lists with counts
here lets each kernel loop over exactly what is read and skip the rest without per-token masks.
"""

from __future__ import annotations

import jax
import jax.numpy as jnp

from fkv_jax.attention.selection import Selection


def pack_indices(idx: jax.Array) -> tuple[jax.Array, jax.Array]:
    """int32[..., K] entries (-1 = unused, in any order) -> (fetch [..., K], count [...]).

    ``fetch`` holds the valid entries first, in their original order, then the last valid entry repeated (0
    when there is none): a pipeline that fetches ``fetch[j]`` at step j then never fetches a new block after
    the last valid one.
    """
    k = idx.shape[-1]
    valid = idx >= 0
    pos = jnp.arange(k, dtype=jnp.int32)
    order = jnp.argsort(jnp.where(valid, pos, k + pos), axis=-1)
    packed = jnp.take_along_axis(idx, order, axis=-1)
    count = valid.sum(-1).astype(jnp.int32)
    last = jnp.take_along_axis(packed, jnp.maximum(count - 1, 0)[..., None], axis=-1)
    fetch = jnp.where(pos < count[..., None], packed, jnp.where(count[..., None] > 0, last, 0))
    return fetch.astype(jnp.int32), count


def chunk_frames(sel: Selection, batch: int, groups: int, heads: int, frames: int) -> tuple[jax.Array, jax.Array]:
    """Allowed frames of the current chunk: (fetch int32 [B, Qf, H, C], count int32 [B, Qf, H])."""
    if sel.chunk_mask is None:
        idx = jnp.broadcast_to(jnp.arange(frames, dtype=jnp.int32), (batch, groups, heads, frames))
    else:
        idx = jnp.where(sel.chunk_mask, jnp.arange(frames, dtype=jnp.int32), -1)
    return pack_indices(idx)


def pack_memory(sel: Selection, rows: int) -> tuple[jax.Array, jax.Array, jax.Array]:
    """Valid memory tokens first, per (batch, head), zero-padded to ``rows`` >= M rows.

    Returns mem_k, mem_v [B, rows, H, D] and count int32 [B, H] (valid tokens per head).
    """
    b, m, h, _ = sel.mem_k.shape
    if sel.mem_valid is None:
        mk, mv, count = sel.mem_k, sel.mem_v, jnp.full((b, h), m, jnp.int32)
    else:
        pos = jnp.arange(m, dtype=jnp.int32)
        order = jnp.argsort(jnp.where(sel.mem_valid, pos, m + pos), axis=-1)  # [B, H, M]
        order = jnp.swapaxes(order, 1, 2)[..., None]  # [B, M, H, 1]
        mk = jnp.take_along_axis(sel.mem_k, order, axis=1)
        mv = jnp.take_along_axis(sel.mem_v, order, axis=1)
        count = sel.mem_valid.sum(-1).astype(jnp.int32)
    pad = ((0, 0), (0, rows - m), (0, 0), (0, 0))
    return jnp.pad(mk, pad), jnp.pad(mv, pad), count
