"""Key-tile tables for the GPU kernels: every tile of keys one (batch, query group, head) reads, in order.

A GPU program walks a flat list of key tiles of ``BK`` rows. Each tile comes from one of three sources and
has a window of valid rows:

    columns of ``table[b, g, h, i]``:  SRC (0 chunk, 1 memory, 2 cache), START row, LO, HI

* chunk:  ``k_chunk[b, START : START + BK, h]`` (rows of the chunk, frame c at ``c * T``)
* memory: ``mem_k[b, START : START + BK, h]`` after :func:`~fkv_jax.kernels.packing.pack_memory`
* cache:  row ``START`` of the ``[N * T, D]`` plane of ``k_cache[b, h]`` (the cache ``[B, H, N, T, D]`` read in
  place; slot s starts at row ``s * T``)

and rows ``[LO, HI)`` of the tile are keys to use. A frame of T tokens is cut into ``ceil(T / BK)`` tiles;
when ``T >= BK`` the last one is shifted back to end exactly at the frame's end (its first rows, already
seen by the previous tile, are masked by LO), so no tile ever reads outside its frame: no out-of-bounds
TMA, no row of a neighbouring slot. Only valid tiles are listed, packed to the front; ``count[b, g, h]``
says how many.
"""

from __future__ import annotations

import jax
import jax.numpy as jnp

SRC_CHUNK, SRC_MEMORY, SRC_CACHE = 0, 1, 2


def _frame_tiles(fetch, count, frame_tokens: int, block_k: int, src: int):
    """Tiles of the frames ``fetch[..., :count]``. fetch: int32 [B, Qf, H, F]; returns [B, Qf, H, F * nT, 4] + valid."""
    nt = -(-frame_tokens // block_k)
    j = jnp.arange(nt, dtype=jnp.int32)
    off = jnp.minimum(j * block_k, max(frame_tokens - block_k, 0))  # [nT] tile start inside the frame
    lo = j * block_k - off
    hi = jnp.minimum(block_k, frame_tokens - off)
    start = fetch[..., None] * frame_tokens + off  # [B, Qf, H, F, nT]
    shape = start.shape
    cols = [jnp.full(shape, src, jnp.int32), start, jnp.broadcast_to(lo, shape), jnp.broadcast_to(hi, shape)]
    pos = jnp.arange(fetch.shape[-1], dtype=jnp.int32)
    valid = jnp.broadcast_to((pos < count[..., None])[..., None], shape)
    flat = shape[:3] + (shape[3] * shape[4],)
    return jnp.stack(cols, -1).reshape(*flat, 4), valid.reshape(flat)


def _memory_tiles(mem_count, rows: int, groups: int, block_k: int):
    """Tiles of the packed memory tokens. mem_count: int32 [B, H] -> [B, Qf, H, nTm, 4] + valid."""
    b, h = mem_count.shape
    nt = -(-rows // block_k)
    i = jnp.arange(nt, dtype=jnp.int32)
    off = jnp.minimum(i * block_k, max(rows - block_k, 0))
    cnt = mem_count[:, None, :, None]  # [B, 1, H, 1]
    shape = (b, groups, h, nt)
    cols = [
        jnp.full(shape, SRC_MEMORY, jnp.int32),
        jnp.broadcast_to(off, shape),
        jnp.broadcast_to(i * block_k - off, shape),
        jnp.broadcast_to(jnp.minimum(block_k, cnt - off), shape),
    ]
    valid = jnp.broadcast_to(i * block_k < cnt, shape)
    return jnp.stack(cols, -1), valid


def tile_table(
    *, chunk_fetch, chunk_count, slot_fetch, slot_count, mem_count, mem_rows: int, frame_tokens: int, block_k: int
) -> tuple[jax.Array, jax.Array]:
    """The packed tile list of every (b, g, h).

    Args:
      chunk_fetch, chunk_count: allowed chunk frames, int32 [B, Qf, H, C] / [B, Qf, H] (packed).
      slot_fetch, slot_count: selected cache slots, int32 [B, Qf, H, K] / [B, Qf, H] (packed), or None.
      mem_count: valid memory tokens per head int32 [B, H], or None without memory.
      mem_rows: rows of the packed memory arrays.
    Returns:
      table int32 [B, Qf, H, n_tiles, 4] (SRC, START, LO, HI; valid tiles first) and count int32 [B, Qf, H].
    """
    groups = chunk_fetch.shape[1]
    parts = [_frame_tiles(chunk_fetch, chunk_count, frame_tokens, block_k, SRC_CHUNK)]
    if mem_count is not None:
        parts.append(_memory_tiles(mem_count, mem_rows, groups, block_k))
    if slot_fetch is not None:
        parts.append(_frame_tiles(slot_fetch, slot_count, frame_tokens, block_k, SRC_CACHE))
    table = jnp.concatenate([p[0] for p in parts], axis=3)
    valid = jnp.concatenate([p[1] for p in parts], axis=3)
    n = valid.shape[-1]
    pos = jnp.arange(n, dtype=jnp.int32)
    order = jnp.argsort(jnp.where(valid, pos, n + pos), axis=-1)
    table = jnp.take_along_axis(table, order[..., None], axis=3)
    return table.astype(jnp.int32), valid.sum(-1).astype(jnp.int32)
