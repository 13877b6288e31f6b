"""Attention over selected KV: the ``Selection`` contract and the backends that compute it.

``attend(q, k_chunk, v_chunk, k_cache, v_cache, selection, backend="xla")`` is the one entry point.
Backends are listed in :mod:`fkv_jax.attention.backends` (one table of lazy references, checked by
``resolve_backend``); ``xla`` is the reference and runs everywhere. Importing this package imports no kernel.
"""

from __future__ import annotations

from jaxtyping import Array, Float

from fkv_jax.attention.backends import (
    BACKENDS,
    BackendError,
    get_backend,
    problem_of,
    resolve_backend,
)
from fkv_jax.attention.reference import chunk_attention, dense_attention, selection_attention
from fkv_jax.attention.selection import Selection, from_slot_mask, pack_mask, to_slot_mask


def attend(
    q: Float[Array, "B CT H Dh"],
    k_chunk: Float[Array, "B CT H Dh"],
    v_chunk: Float[Array, "B CT H Dh"],
    k_cache: Float[Array, "B H N T Dh"],
    v_cache: Float[Array, "B H N T Dh"],
    selection: Selection,
    backend: str = "xla",
) -> Float[Array, "B CT H Dh"]:
    """Softmax attention of a chunk's queries over its own (allowed) keys, the selected cache slots and
    the valid memory tokens. Shapes: q, k_chunk, v_chunk [B, C*T, H, Dh]; k_cache, v_cache [B, H, N, T, Dh].

    ``backend`` is resolved and checked (:func:`~fkv_jax.attention.backends.resolve_backend`) for this call's
    dtypes and shapes at trace time; a problem is one :class:`BackendError`.
    """
    if backend not in BACKENDS:
        get_backend(backend)  # the unknown-name error, before any shape is read
    _, fn = resolve_backend(backend, **problem_of(q, k_cache, selection))
    return fn(q, k_chunk, v_chunk, k_cache, v_cache, selection)


__all__ = [
    "BACKENDS",
    "BackendError",
    "Selection",
    "attend",
    "chunk_attention",
    "dense_attention",
    "from_slot_mask",
    "get_backend",
    "pack_mask",
    "resolve_backend",
    "selection_attention",
    "to_slot_mask",
]
