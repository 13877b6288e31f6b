"""Attention backends under ``jax.shard_map`` on a ``(data, model)`` mesh: each device runs the kernel on
its own batch rows and heads. Heads never interact in attention, so there is no communication."""

from __future__ import annotations

import functools

import jax
from jax.sharding import Mesh
from jax.sharding import PartitionSpec as P

import fkv_jax.kernels  # noqa: F401  (registers the kernel backends)
from fkv_jax.attention import BACKENDS
from fkv_jax.attention.selection import Selection
from fkv_jax.parallel.shardings import HEADS

CACHE = P("data", "model", None, None, None)  # [B, H, N, T, D]


def selection_specs(sel: Selection) -> Selection:
    """PartitionSpecs with the structure of ``sel`` (absent optional fields stay None)."""
    def maybe(x, spec):
        return None if x is None else spec

    return Selection(frames=HEADS, chunk_mask=maybe(sel.chunk_mask, HEADS), mem_k=maybe(sel.mem_k, HEADS),
                     mem_v=maybe(sel.mem_v, HEADS), mem_valid=maybe(sel.mem_valid, P("data", "model", None)))


def sharded_attention(mesh: Mesh, backend: str = "xla", **backend_kwargs):
    """``fn(q, k_chunk, v_chunk, k_cache, v_cache, sel)`` running ``BACKENDS[backend]`` per device.

    q, k_chunk, v_chunk: [B, C*T, H, D] and k_cache, v_cache: [B, H, N, T, D] split as (data, model) on
    (B, H); the Selection likewise. ``backend_kwargs`` go to the kernel (e.g. ``interpret=...``).
    """
    kernel = functools.partial(BACKENDS[backend], **backend_kwargs)

    def call(q, k_chunk, v_chunk, k_cache, v_cache, sel: Selection):
        mapped = jax.shard_map(kernel, mesh=mesh, in_specs=(HEADS, HEADS, HEADS, CACHE, CACHE, selection_specs(sel)),
                               out_specs=HEADS, check_vma=False)
        return mapped(q, k_chunk, v_chunk, k_cache, v_cache, sel)

    return call


def register_sharded(mesh: Mesh, backend: str, **backend_kwargs) -> str:
    """Register :func:`sharded_attention` of ``backend`` on ``mesh`` in ``BACKENDS``; return its name.

    The name spells the backend, the mesh (axis sizes and device ids) and the kwargs, so the same
    combination always maps to the same entry.
    """
    ids = ",".join(str(d.id) for d in mesh.devices.flat)
    opts = ",".join(f"{k}={v!r}" for k, v in sorted(backend_kwargs.items()))
    name = f"{backend}[{opts}]@{dict(mesh.shape)}:{ids}"
    if name not in BACKENDS:
        BACKENDS[name] = sharded_attention(mesh, backend, **backend_kwargs)
    return name
