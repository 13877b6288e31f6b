"""Retainers: which cache slots are kept by position (sink, last frames) and how to fetch a frame's K/V."""

from __future__ import annotations

import jax
import jax.numpy as jnp

from fkv_jax.cache.kv_cache import CacheGeometry


def sink_slots(geom: CacheGeometry, slot_frame: jax.Array) -> jax.Array:
    """bool[N]: filled sink slots."""
    return (jnp.arange(geom.num_slots) < geom.sink) & (slot_frame >= 0)


def recent_slots(slot_frame: jax.Array, start_frame: jax.Array, frames) -> jax.Array:
    """bool[N]: slots holding one of the last ``frames`` frames before ``start_frame`` (``frames`` may be traced)."""
    return (slot_frame >= 0) & (slot_frame < start_frame) & (slot_frame >= start_frame - frames)


def frame_kv(
    cache_k: jax.Array,
    k_new: jax.Array,
    slot_frame: jax.Array,
    start_frame: jax.Array,
    frame: jax.Array,
    layer: int | None = None,
) -> jax.Array:
    """K (or V) of absolute ``frame``, from the cache if it is older than the chunk, else from the chunk's own.

    cache_k: [..., N, T, D] (heads-first: [B, H, N, T, D]), or with ``layer`` the whole cache [L, B, H, N, T, D]
    (one frame of that layer is read, never a copy of the layer); k_new: [..., C, T, D]; returns [..., T, D].
    """
    slot = jnp.argmax(slot_frame == frame)
    own = jnp.clip(frame - start_frame, 0, k_new.shape[-3] - 1)
    if layer is None:
        from_cache = jnp.take(cache_k, slot, axis=-3)
    else:  # [L, B, H, N, T, D] -> the frame's [B, H, T, D] of one layer, by a small dynamic slice
        start = (layer,) + (0,) * (cache_k.ndim - 4) + (slot, 0, 0)
        size = (1,) + cache_k.shape[1:-3] + (1,) + cache_k.shape[-2:]
        from_cache = jax.lax.dynamic_slice(cache_k, start, size)[0].squeeze(-3)
    from_chunk = jnp.take(k_new, own, axis=-3)
    return jnp.where(frame < start_frame, from_cache, from_chunk)


def window_geometry(base: CacheGeometry, local_attn_size: int, sink_size: int, capacity: int | None) -> CacheGeometry:
    """``base`` with another upstream-style window (``local_attn_size``, ``sink_size``; -1 = global of ``capacity``)."""
    return CacheGeometry.from_upstream(
        local_attn_size=local_attn_size,
        sink_size=sink_size,
        frames_per_block=base.frames_per_block,
        num_layers=base.num_layers,
        batch=base.batch,
        tokens_per_frame=base.tokens_per_frame,
        num_heads=base.num_heads,
        head_dim=base.head_dim,
        capacity_frames=capacity,
        grid_hw=base.grid_hw,
    )
