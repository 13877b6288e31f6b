"""Selection attention as a Pallas TPU kernel: the selection table is scalar-prefetched into SMEM.

One ``pl.pallas_call`` with ``pltpu.PrefetchScalarGridSpec``. The grid is::

    (B, H, Qf, query tiles, C + memory blocks + K)     last axis: "arbitrary" (the online softmax)

and every step of the last axis visits one key block, in three phases:

* steps ``[0, C)``: the chunk's own frames (one frame of T tokens per step), in the order of the packed
  ``chunk_mask``; steps past the number of allowed frames are skipped;
* the next ``ceil(M / BM)`` steps: blocks of BM memory tokens, valid tokens packed first per head, the
  tail of the last block masked;
* the last ``K`` steps: the selected cache slots, one slot (T tokens) per step.

The index maps read the prefetched tables, so the pipeline DMAs exactly the selected frame of
``k_cache[b, slot, :, h, :]`` (a [T, D] tile of the cache viewed as ``[B, N, T, H*D]``; no gather, no copy
of the cache). Padded entries repeat the last valid slot, so the block index does not change and no DMA is
issued; ``pl.when`` skips their compute. Outside its own phase each source's index map holds its first (or
last) block, so switching phases does not re-fetch either. The softmax statistics (m, l) and the float32
accumulator live in VMEM scratch across the last grid axis; the output tile is written once, at the end.

TPU layout rules this relies on (checked only by lowering here, never on a TPU): the last two dims of
every block are (T, D) / (BQ, D) / (BM, D), so D must be a multiple of 128 (Wan: 128) and T, BQ, BM
multiples of 8 (T = 1560 at 480x832 is) or equal to the full dimension. A T that is not a multiple of 128
makes the score tile [BQ, T] lane-padded by Mosaic.
"""

from __future__ import annotations

import functools
import math

import jax
import jax.numpy as jnp
from jax.experimental import pallas as pl
from jax.experimental.pallas import tpu as pltpu

from fkv_jax.attention.selection import Selection
from fkv_jax.kernels.packing import chunk_frames, pack_indices, pack_memory
from fkv_jax.kernels.shapes import Dims, attention_dims

_NEG = -1e30  # finite "minus infinity", as in the XLA reference


def pick_block_q(group_tokens: int, max_rows: int = 512) -> int:
    """Largest divisor of Tq that is a multiple of 8 and at most ``max_rows``; Tq itself if none is."""
    best = 0
    for bq in range(8, min(group_tokens, max_rows) + 1, 8):
        if group_tokens % bq == 0:
            best = bq
    return best or group_tokens


def _memory_block(m: int, max_rows: int) -> tuple[int, int]:
    """(BM rows per memory block, padded rows Mp): one block up to ``max_rows``, else blocks of it."""
    if m <= max_rows:
        bm = max(8, -(-m // 8) * 8)
        return bm, bm
    return max_rows, -(-m // max_rows) * max_rows


def _kernel(cfetch_ref, ccount_ref, sfetch_ref, scount_ref, mcount_ref,  # scalar prefetch (SMEM)
            *refs, dims: Dims, n_mem_blocks: int, block_m: int, n_slot_steps: int, precision):
    q_ref, kc_ref, vc_ref, *refs = refs
    if n_mem_blocks:
        km_ref, vm_ref, *refs = refs
    if n_slot_steps:
        ks_ref, vs_ref, *refs = refs
    o_ref, m_sc, l_sc, acc_sc = refs
    b, h, g, j = pl.program_id(0), pl.program_id(1), pl.program_id(2), pl.program_id(4)
    c = dims.chunk_frames
    row = (b * dims.groups + g) * dims.heads + h  # flat (b, g, h)
    scale = 1.0 / math.sqrt(dims.head_dim)

    @pl.when(j == 0)
    def _init():
        m_sc[...] = jnp.full(m_sc.shape, _NEG, jnp.float32)
        l_sc[...] = jnp.zeros(l_sc.shape, jnp.float32)
        acc_sc[...] = jnp.zeros(acc_sc.shape, jnp.float32)

    def update(k_tile, v_tile, valid=None):  # k_tile, v_tile: [Tk, D]; valid: bool [1, Tk]
        q = q_ref[...]  # [BQ, D]
        s = jax.lax.dot_general(q, k_tile, (((1,), (1,)), ((), ())), preferred_element_type=jnp.float32,
                                precision=precision) * scale  # [BQ, Tk]
        if valid is not None:
            s = jnp.where(valid, s, _NEG)
        m_prev = m_sc[...]  # [BQ, 1]
        m_new = jnp.maximum(m_prev, s.max(axis=1, keepdims=True))
        p = jnp.exp(s - m_new)
        corr = jnp.exp(m_prev - m_new)
        l_sc[...] = corr * l_sc[...] + p.sum(axis=1, keepdims=True)
        pv = jnp.dot(p.astype(v_tile.dtype), v_tile, preferred_element_type=jnp.float32, precision=precision)
        acc_sc[...] = corr * acc_sc[...] + pv
        m_sc[...] = m_new

    @pl.when(j < ccount_ref[row])
    def _chunk_frame():
        update(kc_ref[...], vc_ref[...])

    if n_mem_blocks:
        i = j - c
        n_valid = mcount_ref[b * dims.heads + h] - i * block_m

        @pl.when((i >= 0) & (i < n_mem_blocks) & (n_valid > 0))
        def _memory():
            cols = jax.lax.broadcasted_iota(jnp.int32, (1, block_m), 1)
            update(km_ref[...], vm_ref[...], cols < n_valid)

    if n_slot_steps:
        sj = j - c - n_mem_blocks

        @pl.when((sj >= 0) & (sj < scount_ref[row]))
        def _cache_slot():
            update(ks_ref[...], vs_ref[...])

    @pl.when(j == pl.num_programs(4) - 1)
    def _finish():
        l = l_sc[...]
        o_ref[...] = (acc_sc[...] / jnp.where(l == 0, 1.0, l)).astype(o_ref.dtype)  # no key at all -> 0


def pallas_tpu_attention(q, k_chunk, v_chunk, k_cache, v_cache, sel: Selection, *, block_q: int | None = None,
                         block_m: int = 512, interpret=False) -> jax.Array:
    """Selection attention (same numbers as :func:`fkv_jax.attention.reference.selection_attention`).

    Args:
      q, k_chunk, v_chunk: [B, C*T, H, D]; k_cache, v_cache: [B, N, T, H, D]; sel: the Selection.
      block_q: query rows per tile (divides Tq = C*T / Qf); default :func:`pick_block_q`.
      block_m: memory tokens per grid step at most (a multiple of 8).
      interpret: False on TPU; ``True`` or ``pltpu.InterpretParams()`` to run on CPU.
    Returns:
      [B, C*T, H, D] in q's dtype. A (b, group, head) with no key at all (no chunk frame, slot or memory
      token) gets zeros; the reference's value there is an average over masked keys, i.e. undefined.
    """
    dims = attention_dims(q, k_chunk, v_chunk, k_cache, v_cache, sel)
    b, h, d, s = dims.batch, dims.heads, dims.head_dim, dims.tokens
    n, t, c, qf, k = dims.slots, dims.frame_tokens, dims.chunk_frames, dims.groups, dims.budget
    tq = dims.group_tokens
    bq = block_q or pick_block_q(tq)
    if tq % bq:
        raise ValueError(f"block_q={bq} does not divide the {tq} queries of a group")
    nq = tq // bq

    cfetch, ccount = chunk_frames(sel, b, qf, h, c)  # [B, Qf, H, C], [B, Qf, H]
    if k:
        sfetch, scount = pack_indices(sel.frames)  # [B, Qf, H, K], [B, Qf, H]
    else:  # SMEM tables must not be empty
        sfetch, scount = jnp.zeros((b, qf, h, 1), jnp.int32), jnp.zeros((b, qf, h), jnp.int32)
    n_mem_blocks = 0
    if dims.memory:
        block_m, rows = _memory_block(dims.memory, block_m)
        mk, mv, mcount = pack_memory(sel, rows)  # [B, Mp, H, D] x2, [B, H]
        n_mem_blocks = rows // block_m
    else:
        mcount = jnp.zeros((b, h), jnp.int32)
    n_slot_steps = k if n else 0  # an empty cache has nothing to select
    steps = c + n_mem_blocks + n_slot_steps

    # Views that put (tokens, D) last: free reshapes, no copy of the cache.
    qv = q.reshape(b, s, h * d)
    kc, vc = (x.reshape(b, c, t, h * d) for x in (k_chunk, v_chunk))
    ks, vs = (x.reshape(b, n, t, h * d) for x in (k_cache, v_cache))

    def flat(bb, g, hh):
        return (bb * qf + g) * h + hh

    def q_map(bb, hh, g, qi, j, *_):
        return bb, g * nq + qi, hh

    def chunk_map(bb, hh, g, qi, j, cf, *_):
        return bb, cf[flat(bb, g, hh) * c + jnp.minimum(j, c - 1)], 0, hh

    def mem_map(bb, hh, g, qi, j, *_):
        return bb, jnp.clip(j - c, 0, n_mem_blocks - 1), hh

    def slot_map(bb, hh, g, qi, j, cf, cc, sf, *_):
        return bb, sf[flat(bb, g, hh) * k + jnp.clip(j - c - n_mem_blocks, 0, k - 1)], 0, hh

    frame_spec = [pl.BlockSpec((None, None, t, d), chunk_map)] * 2
    mem_spec = [pl.BlockSpec((None, block_m, d), mem_map)] * 2 if n_mem_blocks else []
    slot_spec = [pl.BlockSpec((None, None, t, d), slot_map)] * 2 if n_slot_steps else []
    operands = [qv, kc, vc] + ([mk.reshape(b, -1, h * d), mv.reshape(b, -1, h * d)] if n_mem_blocks else [])
    operands += [ks, vs] if n_slot_steps else []
    grid_spec = pltpu.PrefetchScalarGridSpec(
        num_scalar_prefetch=5,
        grid=(b, h, qf, nq, steps),
        in_specs=[pl.BlockSpec((None, bq, d), q_map)] + frame_spec + mem_spec + slot_spec,
        out_specs=pl.BlockSpec((None, bq, d), q_map),
        scratch_shapes=[pltpu.VMEM((bq, 1), jnp.float32), pltpu.VMEM((bq, 1), jnp.float32),
                        pltpu.VMEM((bq, d), jnp.float32)],
    )
    precision = jax.lax.Precision.HIGHEST if q.dtype == jnp.float32 else None
    kernel = functools.partial(_kernel, dims=dims, n_mem_blocks=n_mem_blocks, block_m=block_m,
                               n_slot_steps=n_slot_steps, precision=precision)
    out = pl.pallas_call(
        kernel,
        out_shape=jax.ShapeDtypeStruct((b, s, h * d), q.dtype),
        grid_spec=grid_spec,
        compiler_params=pltpu.CompilerParams(
            dimension_semantics=("parallel", "parallel", "parallel", "parallel", "arbitrary")),
        interpret=interpret,
        name="fkv_selection_attention",
    )(cfetch.reshape(-1), ccount.reshape(-1), sfetch.reshape(-1), scount.reshape(-1), mcount.reshape(-1), *operands)
    return out.reshape(b, s, h, d)
