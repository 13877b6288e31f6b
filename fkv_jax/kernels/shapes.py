"""Shape checks shared by the kernel backends: one place that reads the ``Selection`` contract's sizes."""

from __future__ import annotations

import dataclasses

import jax

from fkv_jax.attention.selection import Selection


@dataclasses.dataclass(frozen=True)
class Dims:
    """Static sizes of one attention call (see :mod:`fkv_jax.attention.selection`)."""

    batch: int  # B
    heads: int  # H
    head_dim: int  # D
    tokens: int  # S = C * T queries (and own keys) of the chunk
    slots: int  # N cache slots
    frame_tokens: int  # T tokens per latent frame
    chunk_frames: int  # C
    groups: int  # Qf query-frame groups
    budget: int  # K selected slots at most
    memory: int  # M memory tokens (0 without memory)

    @property
    def group_tokens(self) -> int:
        """Tq: queries per group."""
        return self.tokens // self.groups


def attention_dims(
    q: jax.Array, k_chunk: jax.Array, v_chunk: jax.Array, k_cache: jax.Array, v_cache: jax.Array, sel: Selection
) -> Dims:
    """Validate the shapes of one call and return its sizes.

    q, k_chunk, v_chunk: [B, C*T, H, D]; k_cache, v_cache: [B, H, N, T, D] (the cache's heads-first layout,
    read in place by every kernel); sel.frames: [B, Qf, H, K].
    """
    b, s, h, d = q.shape
    if k_chunk.shape != q.shape or v_chunk.shape != q.shape:
        raise ValueError(f"q, k_chunk, v_chunk must share a shape, got {q.shape}, {k_chunk.shape}, {v_chunk.shape}")
    if k_cache.shape != v_cache.shape or k_cache.ndim != 5 or k_cache.shape[:2] != (b, h) or k_cache.shape[4] != d:
        raise ValueError(f"k_cache, v_cache must be [B={b}, H={h}, N, T, D={d}], got {k_cache.shape}, {v_cache.shape}")
    n, t = k_cache.shape[2:4]
    if s % t:
        raise ValueError(f"the chunk's {s} tokens are not whole frames of T={t} tokens")
    c = s // t
    fb, qf, fh, k = sel.frames.shape
    if (fb, fh) != (b, h):
        raise ValueError(f"selection frames must be [B={b}, Qf, H={h}, K], got {sel.frames.shape}")
    if s % qf:
        raise ValueError(f"{s} queries do not split into Qf={qf} query-frame groups")
    if sel.chunk_mask is not None and sel.chunk_mask.shape != (b, qf, h, c):
        raise ValueError(f"chunk_mask must be [B, Qf, H, C] = {(b, qf, h, c)}, got {sel.chunk_mask.shape}")
    m = 0
    if sel.mem_k is not None:
        m = sel.mem_k.shape[1]
        if sel.mem_k.shape != (b, m, h, d) or sel.mem_v is None or sel.mem_v.shape != sel.mem_k.shape:
            raise ValueError(
                f"mem_k, mem_v must be [B, M, H, D], got {sel.mem_k.shape}, "
                f"{None if sel.mem_v is None else sel.mem_v.shape}"
            )
        if sel.mem_valid is not None and sel.mem_valid.shape != (b, h, m):
            raise ValueError(f"mem_valid must be [B, H, M] = {(b, h, m)}, got {sel.mem_valid.shape}")
    return Dims(
        batch=b, heads=h, head_dim=d, tokens=s, slots=n, frame_tokens=t, chunk_frames=c, groups=qf, budget=k, memory=m
    )


def stacked_layer(q, k_chunk, v_chunk, k_cache, v_cache, sel: Selection, layer) -> tuple[Dims, jax.Array, int]:
    """Sizes of a call whose cache may be layer-stacked, and the layer to read.

    ``k_cache, v_cache``: one layer's ``[B, H, N, T, D]`` with ``layer=None``, or the whole stacked cache
    ``[L, B, H, N, T, D]`` with ``layer`` (an int32 scalar, may be traced) so that a kernel reads
    ``cache[layer, b, h, slot]`` where it lies: a per-layer slice handed to a custom call is a copy.
    Returns (dims, layer index int32 [1] clipped to [0, L), L or 0 when not stacked).
    """
    import jax.numpy as jnp

    if k_cache.ndim == 6:
        if layer is None:
            raise ValueError(f"a layer-stacked cache {k_cache.shape} ([L, B, H, N, T, D]) needs layer=")
        if v_cache.shape != k_cache.shape:
            raise ValueError(f"k_cache, v_cache must share a shape, got {k_cache.shape}, {v_cache.shape}")
        view = jax.ShapeDtypeStruct(k_cache.shape[1:], k_cache.dtype)
        dims = attention_dims(q, k_chunk, v_chunk, view, view, sel)
        return dims, jnp.clip(jnp.asarray(layer, jnp.int32), 0, k_cache.shape[0] - 1).reshape(1), k_cache.shape[0]
    if layer is not None:
        raise ValueError(f"layer= goes with a layer-stacked cache [L, B, H, N, T, D], got {k_cache.shape}")
    return attention_dims(q, k_chunk, v_chunk, k_cache, v_cache, sel), jnp.zeros((1,), jnp.int32), 0
