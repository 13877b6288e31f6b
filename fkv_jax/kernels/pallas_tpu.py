"""Selection attention as a Pallas TPU kernel: the selection table is scalar-prefetched into SMEM.

One ``pl.pallas_call`` with ``pltpu.PrefetchScalarGridSpec``. The grid is::

    (B, H, Qf, query tiles, C + memory blocks + K)     last axis: "arbitrary" (the online softmax)

and every step of the last axis visits one key block, in three phases:

* steps ``[0, C)``: the chunk's own frames (one frame of T tokens per step), in the order of the packed
  ``chunk_mask``; steps past the number of allowed frames are skipped;
* the next ``ceil(M / BM)`` steps: blocks of BM memory tokens, valid tokens packed first per head, the
  tail of the last block masked;
* the last ``K`` steps: the selected cache slots, one slot (T tokens) per step.

The cache is read **in place** in its heads-first layout ``k_cache [B, H, N, T, D]``: the cache operands are
passed to the kernel as they are (no reshape, no transpose, no dtype cast), with a block
``(None, None, None, T, D)`` whose index map reads ``(b, h, slot)`` from the prefetched tables. The pipeline
DMAs exactly the selected ``[T, D]`` frame ``k_cache[b, h, slot]``, whose trailing dims are the full
array dims, so Mosaic's (8, 128) tiling rule holds for any T and D. A cache tile whose dtype differs from the
queries' is cast inside the kernel, tile by tile. A layer-stacked cache ``[L, B, H, N, T, D]`` with ``layer=``
(a scalar-prefetched index, traced or not) is read the same way, ``k_cache[layer, b, h, slot]``: a layer loop
should pass that rather than a slice ``cache[l]``, which XLA materialises (copies) for the custom call.

The chunk-sized operands (q, k_chunk, v_chunk and the output, [B, C*T, H, D]) are transposed heads-first,
``[B, H, C*T, D]`` / ``[B, H, C, T, D]``. XLA TPU's default layout of ``[B, S, H, D]`` with H = 12 (not a
multiple of 8) is already physically ``[B, H, S, D]``, so in the compiled program these transposes are
bitcasts (checked on the v5e HLO); elsewhere they are chunk-sized copies, never cache-sized.

Padded entries repeat the last valid slot, so the block index does not change and no DMA is issued;
``pl.when`` skips their compute. Outside its own phase each source's index map holds its first (or last)
block, so switching phases does not re-fetch either. The softmax statistics (m, l) and the float32
accumulator live in VMEM scratch across the last grid axis; the output tile is written once, at the end.

The call declares a ``pl.CostEstimate`` (see :func:`selection_cost`) computed from the static budget, so
XLA's cost analysis of a program containing the kernel counts the attention's FLOPs and HBM bytes.
"""

from __future__ import annotations

import dataclasses
import functools
import math

import jax
import jax.numpy as jnp
from jax.experimental import pallas as pl
from jax.experimental.pallas import tpu as pltpu

from fkv_jax.attention.selection import Selection
from fkv_jax.kernels.packing import chunk_frames, pack_indices, pack_memory
from fkv_jax.kernels.shapes import Dims, stacked_layer

_NEG = -1e30  # finite "minus infinity", as in the XLA reference


BIG_TILE_VMEM = 96 * 2**20  # scoped VMEM asked for when a query tile has more than 512 rows


def pick_block_q(group_tokens: int, max_rows: int = 1560) -> int:
    """Largest divisor of Tq that is a multiple of 8 and at most ``max_rows``; Tq itself if none is.

    Every query tile re-reads the K/V frames it visits, so larger tiles cut the kernel's HBM traffic: at
    Wan 480p (T = 1560) a whole frame of queries per tile reads K/V 3x per chunk instead of 13x with
    360-row tiles. Tiles above 512 rows get a 96 MiB scoped-VMEM limit (checked by compiling for v5e, v5p
    and v6e with libtpu: tests/test_tpu_aot.py)."""
    best = 0
    for bq in range(8, min(group_tokens, max_rows) + 1, 8):
        if group_tokens % bq == 0:
            best = bq
    return best or group_tokens


def _memory_block(m: int, max_rows: int) -> tuple[int, int]:
    """(BM rows per memory block, padded rows Mp): one block up to ``max_rows``; else the largest multiple of
    8 dividing M (rounded up to 8) that is at least half of ``max_rows`` (no padded block: Forcing-KV's 1560
    memory tokens at 480p are 3 x 520), else blocks of ``max_rows``."""
    m8 = max(8, -(-m // 8) * 8)
    if m8 <= max_rows:
        return m8, m8
    for bm in range(max_rows - max_rows % 8, max_rows // 2 - 1, -8):
        if m8 % bm == 0:
            return bm, m8
    return max_rows, -(-m // max_rows) * max_rows


@dataclasses.dataclass(frozen=True)
class Plan:
    """Static tiling of one call: query tile, memory blocks and the number of steps per source."""

    block_q: int  # BQ query rows per tile
    query_tiles: int  # Tq / BQ
    block_m: int  # BM memory rows per block (0 without memory)
    memory_blocks: int  # ceil(M / BM)
    slot_steps: int  # K (0 when the cache has no slot or the budget is 0)


def make_plan(dims: Dims, block_q: int | None = None, block_m: int = 1024) -> Plan:
    tq = dims.group_tokens
    bq = block_q or pick_block_q(tq)
    if tq % bq:
        raise ValueError(f"block_q={bq} does not divide the {tq} queries of a group")
    bm, nmb = 0, 0
    if dims.memory:
        bm, rows = _memory_block(dims.memory, block_m)
        nmb = rows // bm
    return Plan(
        block_q=bq, query_tiles=tq // bq, block_m=bm, memory_blocks=nmb, slot_steps=dims.budget if dims.slots else 0
    )


def selection_cost(
    dims: Dims, plan: Plan, *, q_bytes: int, chunk_bytes: int, cache_bytes: int, memory_bytes: int = 0
) -> pl.CostEstimate:
    """The kernel's declared cost for the static (maximum) budget: every allowed chunk frame, every memory
    block and all K slots visited by every (b, group, head). ``*_bytes`` are item sizes in bytes.

    * flops: ``4 * Tq * keys * D`` per (b, group, head) (QK^T and PV, 2 flops per multiply-add), with
      ``keys = C*T + Mp + K*T`` (Mp: memory rows padded to whole blocks);
    * transcendentals: one ``exp`` per score plus one per query row and step (the rescale factor);
    * bytes: what the DMAs move. q is read and the output written once. Per query tile, K/V frames of the
      chunk (C of them; when C = 1 the block index never changes within a (b, h) and the frame is read
      once per (b, h)), the memory blocks (once per (b, h) when there is a single block, the block index
      then being constant) and the K selected slots (when K = 1, once per (b, group, h)). The SMEM tables
      are counted too. A smaller actual selection reads less: this is an upper bound that a full selection
      reaches.
    """
    b, h, d, t, c = dims.batch, dims.heads, dims.head_dim, dims.frame_tokens, dims.chunk_frames
    qf, tq, k = dims.groups, dims.group_tokens, plan.slot_steps
    rows = b * qf * h  # (b, group, head) rows
    tiles = rows * plan.query_tiles
    mem_rows = plan.block_m * plan.memory_blocks
    keys = c * t + mem_rows + k * t
    steps = c + plan.memory_blocks + k
    flops = 4 * tq * keys * d * rows
    transcendentals = (tq * keys + tq * steps) * rows
    frame = 2 * t * d  # K and V of one frame, elements
    chunk_reads = (b * h if c == 1 else tiles * c) * frame * chunk_bytes
    mem_reads = (b * h if plan.memory_blocks == 1 else tiles * plan.memory_blocks) * 2 * plan.block_m * d * memory_bytes
    slot_reads = (rows if k == 1 else tiles * k) * frame * cache_bytes if k else 0
    tables = 4 * (rows * (c + 1) + rows * (max(k, 1) + 1) + b * h + 1)
    qo = 2 * dims.batch * dims.tokens * h * d * q_bytes
    return pl.CostEstimate(
        flops=int(flops),
        transcendentals=int(transcendentals),
        bytes_accessed=int(qo + chunk_reads + mem_reads + slot_reads + tables),
    )


def _kernel(
    cfetch_ref,
    ccount_ref,
    sfetch_ref,
    scount_ref,
    mcount_ref,
    layer_ref,  # scalar prefetch (SMEM)
    *refs,
    dims: Dims,
    n_mem_blocks: int,
    block_m: int,
    n_slot_steps: int,
    precision,
):
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
        if k_tile.dtype != q.dtype:  # a cache (or memory) in another dtype: cast this tile only
            k_tile, v_tile = k_tile.astype(q.dtype), v_tile.astype(q.dtype)
        s = (
            jax.lax.dot_general(
                q, k_tile, (((1,), (1,)), ((), ())), preferred_element_type=jnp.float32, precision=precision
            )
            * scale
        )  # [BQ, Tk]
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


def pallas_tpu_attention(
    q,
    k_chunk,
    v_chunk,
    k_cache,
    v_cache,
    sel: Selection,
    *,
    layer=None,
    block_q: int | None = None,
    block_m: int = 1024,
    vmem_limit_bytes: int | None = None,
    interpret=False,
) -> jax.Array:
    """Selection attention (same numbers as :func:`fkv_jax.attention.reference.selection_attention`).

    Args:
      q, k_chunk, v_chunk: [B, C*T, H, D]; k_cache, v_cache: [B, H, N, T, D] (read in place, any float
        dtype: tiles are cast to q's dtype in the kernel); sel: the Selection.
      layer: with a layer-stacked cache ``k_cache, v_cache: [L, B, H, N, T, D]``, the layer to read (an
        int32 scalar, may be traced, e.g. a ``lax.scan`` counter). The kernel then reads
        ``k_cache[layer, b, h, slot]`` in place: a model whose layer loop hands each layer a slice
        ``cache[l]`` makes XLA materialise that slice (a copy of the layer's cache) for the custom call,
        while the whole stacked cache passed with ``layer`` is read where it lies.
      block_q: query rows per tile (divides Tq = C*T / Qf); default :func:`pick_block_q`.
      block_m: memory tokens per grid step at most (a multiple of 8).
      vmem_limit_bytes: Mosaic's scoped VMEM limit (default: the compiler's for tiles up to 512 rows, else
        ``BIG_TILE_VMEM``); larger query tiles need more (the [BQ, T] float32 score tile).
      interpret: False on TPU; ``True`` or ``pltpu.InterpretParams()`` to run on CPU.
    Returns:
      [B, C*T, H, D] in q's dtype. A (b, group, head) with no key at all (no chunk frame, slot or memory
      token) gets zeros; the reference's value there is an average over masked keys, i.e. undefined.
    """
    dims, layer_idx, _ = stacked_layer(q, k_chunk, v_chunk, k_cache, v_cache, sel, layer)
    b, h, d, s = dims.batch, dims.heads, dims.head_dim, dims.tokens
    t, c, qf, k = dims.frame_tokens, dims.chunk_frames, dims.groups, dims.budget
    plan = make_plan(dims, block_q, block_m)
    bq, nq, n_mem_blocks, n_slot_steps = plan.block_q, plan.query_tiles, plan.memory_blocks, plan.slot_steps
    block_m = plan.block_m
    if vmem_limit_bytes is None and bq > 512:
        vmem_limit_bytes = BIG_TILE_VMEM

    cfetch, ccount = chunk_frames(sel, b, qf, h, c)  # [B, Qf, H, C], [B, Qf, H]
    if k:
        sfetch, scount = pack_indices(sel.frames)  # [B, Qf, H, K], [B, Qf, H]
    else:  # SMEM tables must not be empty
        sfetch, scount = jnp.zeros((b, qf, h, 1), jnp.int32), jnp.zeros((b, qf, h), jnp.int32)
    if dims.memory:
        mk, mv, mcount = pack_memory(sel, block_m * n_mem_blocks)  # [B, Mp, H, D] x2, [B, H]
    else:
        mcount = jnp.zeros((b, h), jnp.int32)
    steps = c + n_mem_blocks + n_slot_steps

    # Chunk-sized operands heads-first (on TPU, XLA's default layout of [B, S, H, D] with H = 12 is already
    # physically [B, H, S, D], so these transposes are bitcasts there); the cache is passed as it is.
    qv = jnp.swapaxes(q, 1, 2)  # [B, H, S, D]
    kc, vc = (jnp.swapaxes(x, 1, 2).reshape(b, h, c, t, d) for x in (k_chunk, v_chunk))  # [B, H, C, T, D]

    def flat(bb, g, hh):
        return (bb * qf + g) * h + hh

    def q_map(bb, hh, g, qi, j, *_):
        return bb, hh, g * nq + qi, 0

    def chunk_map(bb, hh, g, qi, j, cf, *_):
        return bb, hh, cf[flat(bb, g, hh) * c + jnp.minimum(j, c - 1)], 0, 0

    def mem_map(bb, hh, g, qi, j, *_):
        return bb, hh, jnp.clip(j - c, 0, n_mem_blocks - 1), 0

    def slot_map(bb, hh, g, qi, j, cf, cc, sf, sc, mc, lr):  # k_cache[(layer,) b, h, slot]: a whole [T, D] block
        slot = sf[flat(bb, g, hh) * k + jnp.clip(j - c - n_mem_blocks, 0, k - 1)]
        return (lr[0], bb, hh, slot, 0, 0) if k_cache.ndim == 6 else (bb, hh, slot, 0, 0)

    frame_spec = [pl.BlockSpec((None, None, None, t, d), chunk_map)] * 2
    mem_spec = [pl.BlockSpec((None, None, block_m, d), mem_map)] * 2 if n_mem_blocks else []
    slot_block = (None,) * (k_cache.ndim - 2) + (t, d)
    slot_spec = [pl.BlockSpec(slot_block, slot_map)] * 2 if n_slot_steps else []
    operands = [qv, kc, vc] + ([jnp.swapaxes(mk, 1, 2), jnp.swapaxes(mv, 1, 2)] if n_mem_blocks else [])
    operands += [k_cache, v_cache] if n_slot_steps else []
    grid_spec = pltpu.PrefetchScalarGridSpec(
        num_scalar_prefetch=6,
        grid=(b, h, qf, nq, steps),
        in_specs=[pl.BlockSpec((None, None, bq, d), q_map)] + frame_spec + mem_spec + slot_spec,
        out_specs=pl.BlockSpec((None, None, bq, d), q_map),
        scratch_shapes=[
            pltpu.VMEM((bq, 1), jnp.float32),
            pltpu.VMEM((bq, 1), jnp.float32),
            pltpu.VMEM((bq, d), jnp.float32),
        ],
    )
    precision = jax.lax.Precision.HIGHEST if q.dtype == jnp.float32 else None
    kernel = functools.partial(
        _kernel, dims=dims, n_mem_blocks=n_mem_blocks, block_m=block_m, n_slot_steps=n_slot_steps, precision=precision
    )
    cost = selection_cost(
        dims,
        plan,
        q_bytes=q.dtype.itemsize,
        chunk_bytes=k_chunk.dtype.itemsize,
        cache_bytes=k_cache.dtype.itemsize,
        memory_bytes=sel.mem_k.dtype.itemsize if dims.memory else 0,
    )
    out = pl.pallas_call(
        kernel,
        out_shape=jax.ShapeDtypeStruct((b, h, s, d), q.dtype),
        grid_spec=grid_spec,
        compiler_params=pltpu.CompilerParams(
            dimension_semantics=("parallel", "parallel", "parallel", "parallel", "arbitrary"),
            vmem_limit_bytes=vmem_limit_bytes,
        ),
        cost_estimate=cost,
        interpret=interpret,
        name="fkv_selection_attention",
    )(
        cfetch.reshape(-1),
        ccount.reshape(-1),
        sfetch.reshape(-1),
        scount.reshape(-1),
        mcount.reshape(-1),
        layer_idx,
        *operands,
    )
    return jnp.swapaxes(out, 1, 2)  # [B, S, H, D]


pallas_tpu_attention.reads_stacked_cache = True  # the sampler hands it [L, B, H, N, T, D] + layer=
