"""Attention over selected KV: the ``Selection`` contract and the backends that compute it.

``attend(q, k_chunk, v_chunk, k_cache, v_cache, selection, backend="xla")`` is the one entry point.
Backends are plain functions registered in ``BACKENDS``; ``xla`` is the reference and runs everywhere.
"""

from __future__ import annotations

from collections.abc import Callable

import jax

from fkv_jax.attention.reference import chunk_attention, dense_attention, selection_attention
from fkv_jax.attention.selection import Selection, from_slot_mask, pack_mask, to_slot_mask

# backend name -> fn(q, k_chunk, v_chunk, k_cache, v_cache, selection) -> out
BACKENDS: dict[str, Callable[..., jax.Array]] = {"xla": selection_attention}


def attend(q, k_chunk, v_chunk, k_cache, v_cache, selection: Selection, backend: str = "xla") -> jax.Array:
    """Softmax attention of a chunk's queries over its own (allowed) keys, the selected cache slots and
    the valid memory tokens. Shapes: q, k_chunk, v_chunk [B, C*T, H, Dh]; k_cache, v_cache [B, N, T, H, Dh]."""
    if backend not in BACKENDS:
        import fkv_jax.kernels  # noqa: F401  (registers pallas_tpu, mosaic_gpu, triton, auto)
    try:
        fn = BACKENDS[backend]
    except KeyError:
        raise ValueError(f"unknown attention backend {backend!r}; available: {sorted(BACKENDS)}") from None
    return fn(q, k_chunk, v_chunk, k_cache, v_cache, selection)


__all__ = ["BACKENDS", "Selection", "attend", "chunk_attention", "dense_attention", "from_slot_mask",
           "pack_mask", "selection_attention", "to_slot_mask"]
