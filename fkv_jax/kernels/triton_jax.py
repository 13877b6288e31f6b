"""The Triton kernel on GPU through jax-triton's ``triton_call`` (the portable GPU path).

``import jax_triton`` needs the CUDA (or ROCm) jaxlib plugin: jax-triton 0.3.1 serialises the compiled kernel
with ``jaxlib.gpu_triton``, which the CPU-only jaxlib does not have. This module imports it only when the
backend is called, so everything else (and the Triton interpreter path) works without it.
"""

from __future__ import annotations

import functools

import jax

from fkv_jax.attention.selection import Selection
from fkv_jax.kernels.packing import chunk_frames, pack_indices, pack_memory
from fkv_jax.kernels.shapes import Dims, attention_dims
from fkv_jax.kernels.tiles import tile_table
from fkv_jax.kernels.triton_kernel import grid, kernel_params, selection_attention_kernel


def prepare(q, k_chunk, v_chunk, k_cache, v_cache, sel: Selection, *, block_q: int, block_k: int
            ) -> tuple[Dims, list[jax.Array], dict]:
    """Kernel operands (q, kc, vc, km, vm, kn, vn, table, count) and constexpr parameters.

    An absent source (no memory, empty cache or budget) is passed as the chunk's K/V again; the tile table
    never points at it.
    """
    dims = attention_dims(q, k_chunk, v_chunk, k_cache, v_cache, sel)
    operands = _operands(q, k_chunk, v_chunk, k_cache, v_cache, sel, dims=dims, block_k=block_k)
    mem_rows = dims.memory or dims.tokens
    cache_rows = dims.slots * dims.frame_tokens if dims.slots and dims.budget else dims.tokens
    params = kernel_params(dims, mem_rows, cache_rows, operands[7].shape[3], q.dtype, block_q, block_k)
    return dims, operands, params


@functools.partial(jax.jit, static_argnames=("dims", "block_k"))
def _operands(q, k_chunk, v_chunk, k_cache, v_cache, sel: Selection, *, dims: Dims, block_k: int) -> list[jax.Array]:
    b, h, d, n, t = dims.batch, dims.heads, dims.head_dim, dims.slots, dims.frame_tokens
    cfetch, ccount = chunk_frames(sel, b, dims.groups, h, dims.chunk_frames)
    km, vm, mem_count = k_chunk, v_chunk, None
    if dims.memory:
        km, vm, mem_count = pack_memory(sel, dims.memory)
        km, vm = km.astype(q.dtype), vm.astype(q.dtype)
    kn, vn, sfetch, scount = k_chunk, v_chunk, None, None
    if n and dims.budget:
        sfetch, scount = pack_indices(sel.frames)
        kn, vn = k_cache.reshape(b, n * t, h, d), v_cache.reshape(b, n * t, h, d)
    table, count = tile_table(chunk_fetch=cfetch, chunk_count=ccount, slot_fetch=sfetch, slot_count=scount,
                              mem_count=mem_count, mem_rows=dims.memory, frame_tokens=t, block_k=block_k)
    return [q, k_chunk, v_chunk, km, vm, kn, vn, table, count]


def triton_attention(q, k_chunk, v_chunk, k_cache, v_cache, sel: Selection, *, block_q: int = 64,
                     block_k: int = 64, num_warps: int = 4, num_stages: int = 2,
                     compute_capability: int | None = None) -> jax.Array:
    """Selection attention (same numbers as :func:`fkv_jax.attention.reference.selection_attention`) as a
    Triton kernel called through ``jax_triton.triton_call``; runs on CUDA (and ROCm) GPUs.

    q, k_chunk, v_chunk: [B, C*T, H, D]; k_cache, v_cache: [B, N, T, H, D]; one dtype (bf16, f16 or f32).
    ``compute_capability`` (e.g. 90) lets the kernel be compiled without a GPU (lowering tests).
    Returns [B, C*T, H, D] in q's dtype.
    """
    import jax_triton as jt

    dims, operands, params = prepare(q, k_chunk, v_chunk, k_cache, v_cache, sel, block_q=block_q, block_k=block_k)
    return jt.triton_call(
        *operands, kernel=selection_attention_kernel, out_shape=jax.ShapeDtypeStruct(q.shape, q.dtype),
        grid=grid(dims, block_q), num_warps=num_warps, num_stages=num_stages,
        compute_capability=compute_capability, name="fkv_selection_attention", **params)


__all__ = ["prepare", "triton_attention"]
