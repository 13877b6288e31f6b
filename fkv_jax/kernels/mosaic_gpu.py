"""Selection attention as a Pallas Mosaic GPU kernel (Hopper: TMA copies + WGMMA, bf16/f16 in, f32 accumulate).

Grid ``(query tiles, Qf * H, B)``; one CTA = one warpgroup = ``BQ = 64`` query rows of one (b, group, head).
The CTA walks the flat list of key tiles from :func:`~fkv_jax.kernels.tiles.tile_table` (allowed chunk
frames, valid memory tokens, selected cache slots; each a ``[BK, D]`` box, ``BK = 64`` rows): one TMA copy
per tile of K and of V straight out of the cache ``[B, H, N, T, D]`` as it is stored (a tile of a selected
frame is the contiguous box ``cache[b, h, slot, off:off + BK, :]``: no gather, no reshape, no copy of the
cache); chunk and memory tiles are ``[BK, D]`` boxes of ``[B, rows, H, D]`` with a row stride of H * D.
The loop is double-buffered: tile i + 1 is in flight while tile i is computed::

    S = Q K^T            wgmma, Q [BQ, D] and K [BK, D] (transposed view) in swizzled SMEM, f32 accumulator
    S = where(LO <= col < HI, S * scale, -1e30)         rows of the tile that are not keys
    online softmax (m, l in registers, f32)
    P -> SMEM (bf16/f16), O += P V                      wgmma, V [BK, D] in SMEM

T = 1560 is not a multiple of 64, so the last tile of a frame is shifted back to end at the frame's end and
its overlap masked; likewise the last query tile of a group is shifted back to end at the group's end (two
CTAs then write the same rows with the same values). Requirements: T >= BK, Tq >= BQ, D % 64 == 0.

P goes through SMEM (an SS wgmma) rather than registers (the RS form FlashAttention-3 uses) because jax
0.10.2's Mosaic GPU interpreter, which is how this kernel is tested on CPU, only takes SMEM operands.
No GPU has run this kernel: it is checked by the interpreter and by lowering for CUDA (docs/kernels.md).
"""

from __future__ import annotations

import functools
import math

import jax
import jax.numpy as jnp
from jax import lax
from jax.experimental import pallas as pl
from jax.experimental.pallas import mosaic_gpu as plgpu

from fkv_jax.attention.selection import Selection
from fkv_jax.kernels.packing import chunk_frames, pack_indices, pack_memory
from fkv_jax.kernels.shapes import Dims, stacked_layer
from fkv_jax.kernels.tiles import SRC_CACHE, SRC_CHUNK, SRC_MEMORY, tile_table

_NEG = -1e30


def _kernel(*refs, dims: Dims, sources: tuple[int, ...], block_q: int, block_k: int, stacked: bool):
    n_src = len(sources)
    q_ref, kv_refs = refs[0], refs[1 : 1 + 2 * n_src]
    rest = refs[1 + 2 * n_src :]  # table, count, (layer,) out
    table_ref, count_ref, o_ref = rest[0], rest[1], rest[-1]
    layer_ref = rest[2] if stacked else None
    src_refs = {s: (kv_refs[2 * i], kv_refs[2 * i + 1]) for i, s in enumerate(sources)}
    d, tq, t, dtype = dims.head_dim, dims.group_tokens, dims.frame_tokens, q_ref.dtype
    scale = 1.0 / math.sqrt(d)

    def body(q_smem, k_smem, v_smem, p_smem, q_bar, k_bar, v_bar):
        b = lax.axis_index("b")
        gh = lax.axis_index("gh")
        g, h = lax.div(gh, jnp.int32(dims.heads)), lax.rem(gh, jnp.int32(dims.heads))
        q0 = g * tq + jnp.minimum(lax.axis_index("q") * block_q, tq - block_q)
        plgpu.copy_gmem_to_smem(q_ref.at[b, pl.ds(q0, block_q), h], q_smem, q_bar.at[0])
        n_tiles = count_ref[b, g, h]

        def fetch(i, slot):
            src, start = table_ref[b, g, h, i, 0], table_ref[b, g, h, i, 1]
            for sid, (kr, vr) in src_refs.items():

                @pl.when(src == sid)
                def _copy():
                    if sid == SRC_CACHE:  # [(L,) B, H, N, T, D]: a tile never leaves its frame (T >= BK)
                        frame, off = lax.div(start, jnp.int32(t)), lax.rem(start, jnp.int32(t))
                        lead = (layer_ref[0], b) if stacked else (b,)
                        k_box, v_box = (r.at[(*lead, h, frame, pl.ds(off, block_k))] for r in (kr, vr))
                    else:  # chunk / packed memory [B, rows, H, D]
                        k_box, v_box = (r.at[b, pl.ds(start, block_k), h] for r in (kr, vr))
                    plgpu.copy_gmem_to_smem(k_box, k_smem.at[slot], k_bar.at[slot])
                    plgpu.copy_gmem_to_smem(v_box, v_smem.at[slot], v_bar.at[slot])

        @pl.when(n_tiles > 0)
        def _first():
            fetch(0, 0)

        plgpu.barrier_wait(q_bar.at[0])

        def step(i, carry):
            m, l, acc = carry  # [BQ], [BQ], [BQ, D] float32
            slot = lax.rem(i, 2)

            @pl.when(i + 1 < n_tiles)
            def _prefetch():  # the other buffer was fully consumed by tile i - 1
                fetch(i + 1, 1 - slot)

            plgpu.barrier_wait(k_bar.at[slot])

            def qk(acc_ref):
                plgpu.wgmma(acc_ref, q_smem, plgpu.transpose_ref(k_smem.at[slot], (1, 0)))
                return acc_ref[...]

            s = pl.run_scoped(qk, plgpu.ACC((block_q, block_k), jnp.float32))  # [BQ, BK]
            lo, hi = table_ref[b, g, h, i, 2], table_ref[b, g, h, i, 3]
            cols = plgpu.broadcasted_iota(jnp.int32, (block_q, block_k), 1, layout=plgpu.Layout.WGMMA)
            s = jnp.where((cols >= lo) & (cols < hi), s * scale, _NEG)
            m_new = jnp.maximum(m, s.max(axis=1))
            corr = jnp.exp(m - m_new)
            p = jnp.exp(s - lax.broadcast_in_dim(m_new, s.shape, [0]))
            l = l * corr + p.sum(axis=1)
            p_smem[...] = p.astype(dtype)
            plgpu.commit_smem()
            plgpu.barrier_wait(v_bar.at[slot])

            def pv(acc_ref):
                plgpu.wgmma(acc_ref, p_smem, v_smem.at[slot])
                return acc_ref[...]

            acc = acc * lax.broadcast_in_dim(corr, acc.shape, [0]) + pl.run_scoped(
                pv, plgpu.ACC((block_q, d), jnp.float32)
            )
            return m_new, l, acc

        init = (
            plgpu.layout_cast(jnp.full((block_q,), _NEG, jnp.float32), plgpu.Layout.WGMMA.reduce(1)),
            plgpu.layout_cast(jnp.zeros((block_q,), jnp.float32), plgpu.Layout.WGMMA.reduce(1)),
            plgpu.layout_cast(jnp.zeros((block_q, d), jnp.float32), plgpu.Layout.WGMMA),
        )
        _, l, acc = lax.fori_loop(0, n_tiles, step, init)
        l = jnp.where(l == 0, 1.0, l)  # no key at all -> zeros
        q_smem[...] = (acc / lax.broadcast_in_dim(l, acc.shape, [0])).astype(dtype)
        plgpu.commit_smem()
        plgpu.copy_smem_to_gmem(q_smem, o_ref.at[b, pl.ds(q0, block_q), h])
        plgpu.wait_smem_to_gmem(0)

    def smem(shape):
        return plgpu.SMEM(shape, dtype, transforms=(plgpu.TilingTransform((8, 64)), plgpu.SwizzleTransform(128)))

    pl.run_scoped(
        body,
        smem((block_q, d)),
        smem((2, block_k, d)),
        smem((2, block_k, d)),
        smem((block_q, block_k)),
        plgpu.Barrier(num_barriers=1),
        plgpu.Barrier(num_barriers=2),
        plgpu.Barrier(num_barriers=2),
    )


def mosaic_gpu_attention(
    q,
    k_chunk,
    v_chunk,
    k_cache,
    v_cache,
    sel: Selection,
    *,
    block_q: int = 64,
    block_k: int = 64,
    interpret=None,
    layer=None,
) -> jax.Array:
    """Selection attention (same numbers as :func:`fkv_jax.attention.reference.selection_attention`).

    Args:
      q, k_chunk, v_chunk: [B, C*T, H, D] bfloat16 or float16; k_cache, v_cache: [B, H, N, T, D] same dtype
        (read in place: each tile is one TMA box ``cache[b, h, slot, off:off + BK, :]``).
      block_q, block_k: query rows per CTA (64: one warpgroup's WGMMA) and key rows per tile (multiple of 64).
      interpret: None on a GPU; ``fkv_jax.kernels.mosaic_gpu_interpret.interpret_params()`` to run on CPU.
      layer: with the layer-stacked cache ``k_cache, v_cache: [L, B, H, N, T, D]`` (what the sampler passes),
        the layer to read (int32 scalar, may be traced): the TMA boxes are ``cache[layer, b, h, slot, ...]``,
        so the layer loop never slices (copies) the cache.
    Returns:
      [B, C*T, H, D] in q's dtype; a (b, group, head) with no key at all gets zeros.
    """
    dims, layer_idx, stacked = stacked_layer(q, k_chunk, v_chunk, k_cache, v_cache, sel, layer)
    b, h, d = dims.batch, dims.heads, dims.head_dim
    n, t, qf = dims.slots, dims.frame_tokens, dims.groups
    if q.dtype not in (jnp.bfloat16, jnp.float16) or {k_chunk.dtype, v_chunk.dtype, k_cache.dtype, v_cache.dtype} != {
        q.dtype
    }:
        raise ValueError(
            f"mosaic_gpu needs bfloat16 or float16 inputs of one dtype, got q {q.dtype}, cache {k_cache.dtype}"
        )
    if d % 64 or block_q != 64 or block_k % 64:
        raise ValueError(
            f"mosaic_gpu needs D % 64 == 0, block_q == 64, block_k % 64 == 0 (got D={d}, "
            f"block_q={block_q}, block_k={block_k})"
        )
    if t < block_k or dims.group_tokens < block_q:
        raise ValueError(f"mosaic_gpu needs T={t} >= block_k={block_k} and Tq={dims.group_tokens} >= block_q")

    cfetch, ccount = chunk_frames(sel, b, qf, h, dims.chunk_frames)
    sources, operands = [SRC_CHUNK], [k_chunk, v_chunk]
    mem_count = mem_rows = None
    if dims.memory:
        mem_rows = max(dims.memory, block_k)
        mk, mv, mem_count = pack_memory(sel, mem_rows)
        sources.append(SRC_MEMORY)
        operands += [mk.astype(q.dtype), mv.astype(q.dtype)]
    sfetch = scount = None
    if n and dims.budget:
        sfetch, scount = pack_indices(sel.frames)
        sources.append(SRC_CACHE)
        operands += [k_cache, v_cache]  # [B, H, N, T, D] as they are: the kernel's TMA boxes index them
    table, count = tile_table(
        chunk_fetch=cfetch,
        chunk_count=ccount,
        slot_fetch=sfetch,
        slot_count=scount,
        mem_count=mem_count,
        mem_rows=mem_rows,
        frame_tokens=t,
        block_k=block_k,
    )
    kernel = functools.partial(
        _kernel, dims=dims, sources=tuple(sources), block_q=block_q, block_k=block_k, stacked=bool(stacked)
    )
    return plgpu.kernel(
        kernel,
        out_type=jax.ShapeDtypeStruct(q.shape, q.dtype),
        grid=(-(-dims.group_tokens // block_q), qf * h, b),
        grid_names=("q", "gh", "b"),
        compiler_params=plgpu.CompilerParams(approx_math=True),
        interpret=interpret,
    )(q, *operands, table, count, *([layer_idx] if stacked else []))


mosaic_gpu_attention.reads_stacked_cache = True  # the sampler hands it [L, B, H, N, T, D] + layer=
