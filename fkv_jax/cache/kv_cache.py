"""The fixed-shape KV cache: a pytree of arrays plus a static geometry.

Layout (heads-first, then frame slots; one latent frame = one contiguous slot of T tokens)::

    k, v:        [L, B, H, S + W, T, Dh]   keys stored after RoPE at their absolute frame index
    slot_frame:  int32[S + W]              absolute latent frame held by each slot, -1 if empty
    next_frame:  int32[]                   one past the last frame written

Slots ``[0, S)`` are the sink: the first S frames of the video land there and are never evicted. The other
``W`` slots are a ring: frame ``f >= S`` lives in slot ``S + (f - S) % W``. Which slots a chunk may read
is always derived from ``slot_frame`` (stored positions), never from slot order.

Upstream's parameters map onto the geometry like this (``C`` = frames per block):

* ``local_attn_size = N, sink_size = S``: the window of N frames counts the sink and the current chunk, so
  the ring holds ``W = N - S - C`` history frames (LongLive 12/3/3 -> 6; Self Forcing window 6, sink 3 -> 0).
* ``local_attn_size = -1``: global attention. Every frame is kept: ``S = 0`` and ``W = capacity``; writing
  beyond the capacity is refused by the rollout with an error naming the limit.

Heads come before slots so that attention kernels read ``k[l, b, h, slot]`` (a contiguous ``[T, Dh]``
tile) in place: TPUs tile the last two dims of an array by (8, 128), and (T, Dh) trailing dims need no
relayout; on CPU the (B, H) batch dims lead every attention matmul. See docs/design.md.

The cache changes only in :func:`write`, which the sampler calls once per chunk with the K/V of the
clean (t = 0) pass. Denoising passes read it and attend to their own K/V without storing them.
"""

from __future__ import annotations

import dataclasses

import jax
import jax.numpy as jnp
from jaxtyping import Array, Float, Int

Cache = dict  # {"k", "v", "slot_frame", "next_frame"}


@dataclasses.dataclass(frozen=True)
class CacheGeometry:
    num_layers: int
    batch: int
    sink: int  # S: sink slots
    ring: int  # W: ring slots for history frames
    tokens_per_frame: int  # T
    num_heads: int  # H
    head_dim: int  # Dh
    frames_per_block: int  # C
    global_attn: bool = False  # True for upstream's local_attn_size = -1
    grid_hw: tuple[int, int] | None = None  # token grid of a frame (rows, cols), when known
    dtype: str = "float32"  # of the cached K/V (set by the Sampler); policy memories of K/V copies use it too

    @property
    def num_slots(self) -> int:
        return self.sink + self.ring

    @property
    def capacity_frames(self) -> int:
        """Frames a global cache can hold (unbounded video length for a rolling cache)."""
        return self.num_slots

    def kv_bytes(self, dtype=None) -> int:
        """Resident bytes of k and v together (in ``dtype``, default the geometry's)."""
        dtype = self.dtype if dtype is None else dtype
        n = self.num_layers * self.batch * self.num_slots * self.tokens_per_frame * self.num_heads * self.head_dim
        return 2 * n * jnp.dtype(dtype).itemsize

    @classmethod
    def from_upstream(
        cls,
        *,
        local_attn_size: int,
        sink_size: int,
        frames_per_block: int,
        num_layers: int,
        batch: int,
        tokens_per_frame: int,
        num_heads: int,
        head_dim: int,
        capacity_frames: int | None = None,
        grid_hw: tuple[int, int] | None = None,
    ) -> "CacheGeometry":
        """Geometry from upstream's ``local_attn_size`` / ``sink_size`` (see the module docstring).

        ``capacity_frames`` is the size of a global cache (``local_attn_size = -1``), e.g. the video length.
        """
        common = dict(
            num_layers=num_layers,
            batch=batch,
            tokens_per_frame=tokens_per_frame,
            num_heads=num_heads,
            head_dim=head_dim,
            frames_per_block=frames_per_block,
            grid_hw=grid_hw,
        )
        if sink_size < 0:
            raise ValueError(f"sink_size must be >= 0, got {sink_size}")
        if local_attn_size == -1:
            if capacity_frames is None or capacity_frames < 1:
                raise ValueError("a global cache (local_attn_size=-1) needs capacity_frames >= 1")
            if sink_size:
                raise ValueError("sink_size only applies to a rolling cache (local_attn_size != -1)")
            return cls(sink=0, ring=capacity_frames, global_attn=True, **common)
        if local_attn_size < 1:
            raise ValueError(f"local_attn_size must be -1 (global) or a positive frame count, got {local_attn_size}")
        ring = local_attn_size - sink_size - frames_per_block
        if ring < 0:
            raise ValueError(
                f"local_attn_size={local_attn_size} cannot hold sink_size={sink_size} plus the current chunk of "
                f"{frames_per_block} frames: need local_attn_size >= {sink_size + frames_per_block}"
            )
        return cls(sink=sink_size, ring=ring, global_attn=False, **common)


def init_cache(geom: CacheGeometry, dtype=None) -> Cache:
    """An empty cache (all slots empty), K/V in ``dtype`` (default ``geom.dtype``)."""
    dtype = geom.dtype if dtype is None else dtype
    shape = (geom.num_layers, geom.batch, geom.num_heads, geom.num_slots, geom.tokens_per_frame, geom.head_dim)
    return {
        "k": jnp.zeros(shape, dtype),
        "v": jnp.zeros(shape, dtype),
        "slot_frame": jnp.full((geom.num_slots,), -1, jnp.int32),
        "next_frame": jnp.zeros((), jnp.int32),
    }


def slot_of_frames(geom: CacheGeometry, frames: jax.Array) -> jax.Array:
    """Slot of each frame when written together as one chunk; ``num_slots`` (out of range) = not stored.

    Sink frames (f < S) go to slot f. A history frame goes to the ring slot ``S + (f - S) % W``; when the
    chunk has more frames than the ring (W < C) only its last W frames are kept, so no two frames of one
    write share a slot.
    """
    s, w = geom.sink, geom.ring
    end = frames.max() + 1
    if w > 0:
        ring_slot = s + jnp.mod(frames - s, w)
        keep = frames >= end - w
    else:
        ring_slot = jnp.zeros_like(frames)
        keep = jnp.zeros(frames.shape, bool)
    return jnp.where(frames < s, frames, jnp.where(keep, ring_slot, geom.num_slots)).astype(jnp.int32)


def write(
    geom: CacheGeometry,
    cache: Cache,
    k_new: Float[Array, "L B H C T Dh"],
    v_new: Float[Array, "L B H C T Dh"],
    start_frame: Int[Array, ""],
) -> Cache:
    """Store a chunk's clean K/V. k_new, v_new: [L, B, H, C, T, Dh] for frames start_frame .. start_frame+C-1.

    An in-place scatter of C frames into the donated buffers (no copy of the cache)."""
    c = k_new.shape[3]
    frames = start_frame + jnp.arange(c, dtype=jnp.int32)
    slots = slot_of_frames(geom, frames)  # [C]
    return {
        "k": cache["k"].at[:, :, :, slots].set(k_new.astype(cache["k"].dtype), mode="drop"),
        "v": cache["v"].at[:, :, :, slots].set(v_new.astype(cache["v"].dtype), mode="drop"),
        "slot_frame": cache["slot_frame"].at[slots].set(frames, mode="drop"),
        "next_frame": jnp.maximum(cache["next_frame"], start_frame + c).astype(jnp.int32),
    }


def visible_slots(geom: CacheGeometry, cache: Cache, start_frame: jax.Array) -> jax.Array:
    """bool[N]: slots a chunk starting at ``start_frame`` reads under upstream's window rule.

    Sink slots are always visible once filled; a ring slot is visible if it holds a frame of the last W
    frames before the chunk (all earlier frames for a global cache).
    """
    sf = cache["slot_frame"]
    filled = (sf >= 0) & (sf < start_frame)
    is_sink = jnp.arange(geom.num_slots) < geom.sink
    if geom.global_attn:
        return filled
    return filled & (is_sink | (sf >= start_frame - geom.ring))


def frames_in_slots(cache: Cache) -> list[int]:
    """Host helper for tests and logs: the frames held, in slot order (-1 = empty)."""
    return [int(x) for x in jax.device_get(cache["slot_frame"])]
