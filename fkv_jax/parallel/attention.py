"""Attention backends under ``jax.shard_map`` on a ``(data, model)`` mesh: each device runs the kernel on
its own batch rows and heads. Heads never interact in attention, so there is no communication."""

from __future__ import annotations

import functools

import jax
from jax.sharding import Mesh
from jax.sharding import PartitionSpec as P

from fkv_jax.attention.backends import get_backend
from fkv_jax.attention.selection import Selection
from fkv_jax.parallel.shardings import HEADS

CACHE = P("data", "model", None, None, None)  # [B, H, N, T, D]


def selection_specs(sel: Selection) -> Selection:
    """PartitionSpecs with the structure of ``sel`` (absent optional fields stay None)."""

    def maybe(x, spec):
        return None if x is None else spec

    return Selection(
        frames=HEADS,
        chunk_mask=maybe(sel.chunk_mask, HEADS),
        mem_k=maybe(sel.mem_k, HEADS),
        mem_v=maybe(sel.mem_v, HEADS),
        mem_valid=maybe(sel.mem_valid, P("data", "model", None)),
    )


def sharded(mesh: Mesh, fn):
    """``fn(q, k_chunk, v_chunk, k_cache, v_cache, sel)`` run per device under ``jax.shard_map``: a function in,
    a function out (nothing is registered anywhere).

    q, k_chunk, v_chunk: [B, C*T, H, D] and k_cache, v_cache: [B, H, N, T, D] split as (data, model) on
    (B, H); the Selection likewise.
    """
    kernel = fn

    def call(q, k_chunk, v_chunk, k_cache, v_cache, sel: Selection):
        mapped = jax.shard_map(
            kernel,
            mesh=mesh,
            in_specs=(HEADS, HEADS, HEADS, CACHE, CACHE, selection_specs(sel)),
            out_specs=HEADS,
            check_vma=False,
        )
        return mapped(q, k_chunk, v_chunk, k_cache, v_cache, sel)

    return call


def sharded_attention(mesh: Mesh, backend: str = "xla", **backend_kwargs):
    """:func:`sharded` of the backend named ``backend`` (``backend_kwargs`` go to the kernel, e.g.
    ``interpret=...``)."""
    return sharded(mesh, functools.partial(get_backend(backend), **backend_kwargs))
