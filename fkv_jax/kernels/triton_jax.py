"""The Triton kernel called from JAX: on GPU through jax-triton's ``triton_call``, on CPU in Triton's
interpreter through ``jax.pure_callback`` (so ``attend(..., backend="triton")`` runs inside a jitted model on
CPU when interpretation is asked for; see :mod:`fkv_jax.attention.backends`).

``import jax_triton`` needs the CUDA (or ROCm) jaxlib plugin: jax-triton 0.3.1 serialises the compiled kernel
with ``jaxlib.gpu_triton``, which the CPU-only jaxlib does not have. This module imports it only when the
GPU backend is called, so everything else (and the interpreter path) works without it.

Operands go to the kernel as they are: the cache ``[B, H, N, T, D]`` is passed whole (no reshape, no copy,
no dtype cast); the only XLA-side work is the tile table and the packed memory tokens (small).
"""

from __future__ import annotations

import functools

import jax
import jax.numpy as jnp

from fkv_jax.attention.selection import Selection
from fkv_jax.kernels.packing import chunk_frames, pack_indices, pack_memory
from fkv_jax.kernels.shapes import Dims, stacked_layer
from fkv_jax.kernels.tiles import tile_table
from fkv_jax.kernels.triton_kernel import TritonBlocks, grid, kernel_params, selection_attention_kernel


def prepare(
    q, k_chunk, v_chunk, k_cache, v_cache, sel: Selection, *, block_q: int, block_k: int, layer=None
) -> tuple[Dims, list[jax.Array], dict]:
    """Kernel operands (q, kc, vc, km, vm, kn, vn, table, count, layer) and constexpr parameters.

    kn, vn are ``k_cache``, ``v_cache`` themselves: one layer's ``[B, H, N, T, D]``, or with ``layer`` the
    whole stacked ``[L, B, H, N, T, D]`` (see :func:`fkv_jax.kernels.shapes.stacked_layer`). An absent source
    (no memory, empty cache or budget) is passed as the chunk's K/V again; the tile table never points at it.
    """
    dims, layer_idx, stacked = stacked_layer(q, k_chunk, v_chunk, k_cache, v_cache, sel, layer)
    has_cache = bool(dims.slots and dims.budget)
    km, vm, table, count = _tables(
        k_chunk, v_chunk, sel, dims=dims, block_k=block_k, has_cache=has_cache, dtype=jnp.dtype(q.dtype).name
    )
    kn, vn = (k_cache, v_cache) if has_cache else (k_chunk, v_chunk)
    mem_rows = dims.memory or dims.tokens
    cache_rows = dims.slots * dims.frame_tokens if has_cache else dims.tokens
    stride = dims.batch * dims.heads * cache_rows * dims.head_dim if stacked and has_cache else 0
    params = kernel_params(dims, mem_rows, cache_rows, table.shape[3], q.dtype, block_q, block_k, stride)
    return dims, [q, k_chunk, v_chunk, km, vm, kn, vn, table, count, layer_idx], params


@functools.partial(jax.jit, static_argnames=("dims", "block_k", "has_cache", "dtype"))
def _tables(k_chunk, v_chunk, sel: Selection, *, dims: Dims, block_k: int, has_cache: bool, dtype: str):
    """Packed memory (km, vm [B, M, H, D] in q's dtype, or the chunk's K/V as placeholders), the tile table
    int32 [B, Qf, H, n_tiles, 4] and its counts [B, Qf, H]. Never touches the cache."""
    b, h = dims.batch, dims.heads
    cfetch, ccount = chunk_frames(sel, b, dims.groups, h, dims.chunk_frames)
    km, vm, mem_count = k_chunk, v_chunk, None
    if dims.memory:
        km, vm, mem_count = pack_memory(sel, dims.memory)
        km, vm = km.astype(dtype), vm.astype(dtype)
    sfetch = scount = None
    if has_cache:
        sfetch, scount = pack_indices(sel.frames)
    table, count = tile_table(
        chunk_fetch=cfetch,
        chunk_count=ccount,
        slot_fetch=sfetch,
        slot_count=scount,
        mem_count=mem_count,
        mem_rows=dims.memory,
        frame_tokens=dims.frame_tokens,
        block_k=block_k,
    )
    return km, vm, table, count


def triton_attention(
    q,
    k_chunk,
    v_chunk,
    k_cache,
    v_cache,
    sel: Selection,
    *,
    block_q: int = 64,
    block_k: int = 64,
    num_warps: int = 4,
    num_stages: int = 2,
    compute_capability: int | None = None,
    layer=None,
) -> jax.Array:
    """Selection attention (same numbers as :func:`fkv_jax.attention.reference.selection_attention`) as a
    Triton kernel called through ``jax_triton.triton_call``; runs on CUDA (and ROCm) GPUs.

    q, k_chunk, v_chunk: [B, C*T, H, D] bf16, f16 or f32; k_cache, v_cache: [B, H, N, T, D] in q's dtype or
    another float dtype (cast per tile in the kernel), or the layer-stacked ``[L, B, H, N, T, D]`` with
    ``layer`` (an int32 scalar, may be traced): read in place, no per-layer slice. ``compute_capability``
    (e.g. 90) lets the kernel be compiled without a GPU (lowering tests); it defaults to the one named by an enclosing
    ``fkv_jax.attention.backends.target(...)`` block (an ahead-of-time compile), else jax-triton asks the GPU.
    Returns [B, C*T, H, D] in q's dtype.
    """
    import jax_triton as jt

    if compute_capability is None:  # inside ``fkv_jax.attention.backends.target(...)``: compile for that GPU
        from fkv_jax.attention.backends import target_compute_capability

        compute_capability = target_compute_capability()
    TritonBlocks(block_q=block_q, block_k=block_k, num_warps=num_warps, num_stages=num_stages)
    dims, operands, params = prepare(
        q, k_chunk, v_chunk, k_cache, v_cache, sel, block_q=block_q, block_k=block_k, layer=layer
    )
    return jt.triton_call(
        *operands,
        kernel=selection_attention_kernel,
        out_shape=jax.ShapeDtypeStruct(q.shape, q.dtype),
        grid=grid(dims, block_q),
        num_warps=num_warps,
        num_stages=num_stages,
        compute_capability=compute_capability,
        name="fkv_selection_attention",
        **params,
    )


triton_attention.reads_stacked_cache = True  # the sampler hands it [L, B, H, N, T, D] + layer=

__all__ = ["prepare", "triton_attention"]
