"""XLA reference attention: runs everywhere, defines the numbers every kernel is tested against.

Self-attention of a query chunk is a softmax over the union of
  * the chunk's own keys (bidirectional inside the chunk, as upstream), and
  * the cache slots allowed by ``slot_mask`` (one latent frame = one slot of ``T`` tokens).

It is a tiled online softmax (flash-attention order) written with XLA ops, shaped for XLA:CPU:
  * queries are tiled too (a ``lax.scan`` over query tiles, each inside one query-frame group), and each
    tile walks the keys in tiles of at most ``k_tile`` keys (a ``fori_loop`` that stops at the last slot
    anyone reads), so a score tile is [B, H, q_tile, k_tile] and stays in cache; no
    [queries x all keys] matrix is ever materialised;
  * everything is heads-first ([B, H, tokens, D]), so the matmuls batch over (B, H) with no transposes in
    the loop (only chunk-sized ones before and after);
  * a key tile that every row may read skips the mask, a tile nobody may read is skipped entirely;
  * the softmax's exp is a polynomial XLA vectorises (:func:`_exp_nonpositive`);
  * selections whose heads read different numbers of slots run head by head when that saves work.
Tile sizes (:class:`XlaBlocks`) were picked by measurement on a 2-core x86 CPU (BENCHMARKS.md).
Scores and the accumulator are float32 (``preferred_element_type``); lower precision inputs are cast per tile,
never as a whole cache. A row with no readable key at all returns zeros (as the kernels do).
"""

from __future__ import annotations

import dataclasses
import math

import jax
import jax.numpy as jnp

from fkv_jax.attention.selection import Selection

_NEG = -1e30  # finite "minus infinity": a fully masked block then contributes exp(-huge) = 0, never NaN


@dataclasses.dataclass(frozen=True)
class XlaBlocks:
    """Tile sizes of the XLA attention (targets: the largest divisor of the real size that fits is used).

    q_tile: queries per tile, at most this many (a divisor of the query-frame group size).
    k_tile: keys per tile, at most this many: whole cache slots when a slot fits (a divisor of N for
      ``chunk_attention``), else an equal split of one slot's T tokens; the chunk's own keys are split the
      same way.
    split_heads: ``selection_attention`` runs each head on its own, each up to its own longest selection,
      instead of all heads up to the longest (smaller matmuls, but no work for the other heads' padding).
      None (default) decides per call at run time: split when batching the heads would compute over 20 %
      more key tiles than splitting them (per-head budgets, e.g. Focused Forcing's); both are compiled.
    """

    q_tile: int = 195
    k_tile: int = 390
    split_heads: bool | None = None

    def __post_init__(self):
        if self.q_tile < 1 or self.k_tile < 1:
            raise ValueError(f"XlaBlocks: q_tile and k_tile must be >= 1, got {self.q_tile}, {self.k_tile}")


DEFAULT_BLOCKS = XlaBlocks()


def dense_attention(q: jax.Array, k: jax.Array, v: jax.Array) -> jax.Array:
    """Plain softmax attention, no mask. q: [B, Sq, H, D]; k, v: [B, Sk, H, D] -> [B, Sq, H, D]."""
    scale = 1.0 / math.sqrt(q.shape[-1])
    s = jnp.einsum("bqhd,bkhd->bhqk", q.astype(jnp.float32) * scale, k.astype(jnp.float32))
    p = jax.nn.softmax(s, axis=-1)
    return jnp.einsum("bhqk,bkhd->bqhd", p, v.astype(jnp.float32)).astype(q.dtype)


def pick_block_slots(num_slots: int, tokens_per_frame: int, max_tokens: int = 2048) -> int:
    """Largest divisor of ``num_slots`` whose block holds at most ``max_tokens`` keys (at least 1 slot)."""
    best = 1
    for kb in range(1, num_slots + 1):
        if num_slots % kb == 0 and kb * tokens_per_frame <= max_tokens:
            best = kb
    return best


def _divisor_at_most(n: int, cap: int) -> int:
    """Largest divisor of ``n`` that is <= ``cap`` (at least 1)."""
    best = 1
    for d in range(1, min(n, max(cap, 1)) + 1):
        if n % d == 0:
            best = d
    return best


_LOG2E = 1.4426950408889634
_LN2_HI, _LN2_LO = 0.693359375, -2.12194440e-4  # ln 2 = hi + lo, hi with few mantissa bits (n * hi is exact)
_EXP_COEFFS = (1.0, 1.0, 1 / 2, 1 / 6, 1 / 24, 1 / 120, 1 / 720)  # Taylor, degree 6: < 2e-7 on |r| <= ln2 / 2


def _exp_nonpositive(x: jax.Array) -> jax.Array:
    """exp(x) for float32 x <= 0 (every exponent of the online softmax is), as 2**n * exp(r).

    n = round(x / ln 2), r = x - n ln 2 (two-part ln 2, so r is accurate), exp(r) by a degree-6 polynomial:
    elementwise ops that XLA:CPU fuses and vectorises; measured ~10 % less CPU time per attention call than
    ``jnp.exp`` on a 2-core x86 CPU (BENCHMARKS.md). Below exp(-87.3) (2**-126) the result stays about
    2**-126 instead of going to 0: the row's maximum contributes exp(0) = 1, so this is far below float32
    rounding of the softmax sum.
    """
    x = jnp.maximum(x, -87.3)
    n = jnp.floor(x * _LOG2E + 0.5)  # [-126, 0]
    r = (x - n * _LN2_HI) - n * _LN2_LO  # [-ln2/2, ln2/2]
    p = _EXP_COEFFS[-1]
    for c in _EXP_COEFFS[-2::-1]:
        p = p * r + c
    scale = jax.lax.bitcast_convert_type((n.astype(jnp.int32) + 127) << 23, jnp.float32)  # 2**n
    return p * scale


def _queries(q: jax.Array) -> tuple[jax.Array, float]:
    """q [B, Sq, H, D] -> heads-first [B, H, Sq, D] (chunk-sized copy) and the score scale still to apply.

    float32 queries are pre-scaled (one multiply per query instead of per score); lower precision queries
    keep their dtype (the matmuls accumulate in float32) and the scale is applied to the float32 scores.
    """
    scale = 1.0 / math.sqrt(q.shape[-1])
    qh = jnp.moveaxis(q, 2, 1)
    if q.dtype == jnp.float32:
        return qh * scale, 1.0
    return qh, scale


def _update(carry, q, k, v, mask, scale):
    """One online-softmax step of a query tile over a key tile.

    q: [B, H, tq, D]; k, v: [B, H, tk, D] (cast to q's dtype here, a tile-sized op); mask: None (every key
    readable) or bool [B|1, H|1, tk]. carry: m, l [B, H, tq] and acc [B, H, tq, D], float32.
    """
    m, l, acc = carry
    k, v = k.astype(q.dtype), v.astype(q.dtype)
    s = jnp.einsum("bhqd,bhkd->bhqk", q, k, preferred_element_type=jnp.float32)  # [B, H, tq, tk]
    if scale != 1.0:
        s = s * scale
    if mask is not None:
        s = jnp.where(mask[:, :, None, :], s, _NEG)
    m_new = jnp.maximum(m, s.max(axis=-1))
    p = _exp_nonpositive(s - m_new[..., None])
    if mask is not None:  # a row whose keys are all masked so far must keep l = 0 (-> zeros, not a mean)
        p = jnp.where(mask[:, :, None, :], p, 0.0)
    corr = _exp_nonpositive(m - m_new)
    pv = jnp.einsum("bhqk,bhkd->bhqd", p.astype(v.dtype), v, preferred_element_type=jnp.float32)
    return m_new, l * corr + p.sum(axis=-1), acc * corr[..., None] + pv


def _masked_update(carry, q, fetch, mask, scale):
    """Update with a key tile whose readability ``mask`` [B|1, H|1, tk] is only known at run time: all
    readable -> no mask work, none -> skipped (``fetch`` not even run), else masked."""

    def full(c):
        k, v = fetch()
        return _update(c, q, k, v, None, scale)

    def part(c):
        k, v = fetch()
        return _update(c, q, k, v, mask, scale)

    branch = jnp.where(jnp.all(mask), 0, jnp.where(jnp.any(mask), 1, 2))
    return jax.lax.switch(branch, [full, part, lambda c: c], carry)


def _tiled(q, k_chunk, v_chunk, qf, blocks, chunk_mask, mem, cache_tiles):
    """The shared driver: scan over query tiles; per tile the chunk's keys, memory tokens, then the cache.

    chunk_mask: None or bool [B, H, G, C] (readable chunk frames per group); mem: None or (k, v, valid) with
    k, v [B, H, M, D] and valid None or bool [B, H, M]; cache_tiles: None (no cache) or
    ``cache_tiles(g) -> (count, tile_fn)`` with ``tile_fn(j) -> (fetch, mask)`` for the j-th cache key tile of
    query group g (dynamic count; ``fetch() -> (k, v)`` [B, H, tk, D], mask bool [B|1, H|1, tk]).
    """
    b, sq, h, d = q.shape
    if sq % qf:
        raise ValueError(f"{sq} queries do not split into {qf} query-frame groups")
    gs = sq // qf
    tq = _divisor_at_most(gs, blocks.q_tile)
    qh, scale = _queries(q)  # [B, H, Sq, D]
    kc, vc = jnp.moveaxis(k_chunk, 2, 1), jnp.moveaxis(v_chunk, 2, 1)  # [B, H, Sq, D]: chunk-sized copies
    if chunk_mask is not None:
        c = chunk_mask.shape[-1]
        if sq % c:
            raise ValueError(f"chunk_mask has {c} frames, which do not split the chunk's {sq} keys")
        cm_tok = jnp.repeat(chunk_mask, sq // c, axis=-1)  # [B, H, G, Sq]
    ck = _divisor_at_most(sq, blocks.k_tile)

    def one_tile(i):
        g = (i * tq) // gs
        qi = jax.lax.dynamic_slice_in_dim(qh, i * tq, tq, axis=2)  # [B, H, tq, D]
        carry = (
            jnp.full((b, h, tq), _NEG, jnp.float32),
            jnp.zeros((b, h, tq), jnp.float32),
            jnp.zeros((b, h, tq, d), jnp.float32),
        )

        def chunk_body(j, carry):  # the chunk's own keys, ck at a time
            def fetch():
                return (
                    jax.lax.dynamic_slice_in_dim(kc, j * ck, ck, axis=2),
                    jax.lax.dynamic_slice_in_dim(vc, j * ck, ck, axis=2),
                )

            if chunk_mask is None:
                return _update(carry, qi, *fetch(), None, scale)
            mk = jax.lax.dynamic_index_in_dim(cm_tok, g, axis=2, keepdims=False)  # [B, H, Sq]
            return _masked_update(carry, qi, fetch, jax.lax.dynamic_slice_in_dim(mk, j * ck, ck, axis=2), scale)

        carry = jax.lax.fori_loop(0, sq // ck, chunk_body, carry)
        if mem is not None:  # memory tokens (few): one tile
            mk_, mv_, mvalid = mem
            carry = _update(carry, qi, mk_, mv_, mvalid, scale)
        if cache_tiles is not None:
            count, tile_fn = cache_tiles(g)

            def body(j, carry):
                fetch, mask = tile_fn(j)
                return _masked_update(carry, qi, fetch, mask, scale)

            carry = jax.lax.fori_loop(0, count, body, carry)
        _, l, acc = carry
        return acc / jnp.where(l == 0.0, 1.0, l)[..., None]  # no key at all -> zeros

    _, out = jax.lax.scan(lambda c, i: (c, one_tile(i)), None, jnp.arange(sq // tq))  # [nt, B, H, tq, D]
    out = jnp.moveaxis(out, 0, 2).reshape(b, h, sq, d)
    return jnp.moveaxis(out, 1, 2).astype(q.dtype)  # [B, Sq, H, D]


def _slot_split(n: int, t: int, k_tile: int, block_slots: int | None = None) -> tuple[int, int]:
    """(slots per key tile, token tiles per slot): whole slots when one fits in ``k_tile``, else one slot
    cut into equal token tiles."""
    if block_slots is not None:
        return block_slots, 1
    if t <= k_tile:
        return pick_block_slots(n, t, k_tile), 1
    return 1, t // _divisor_at_most(t, k_tile)


def chunk_attention(
    q: jax.Array,
    k_chunk: jax.Array,
    v_chunk: jax.Array,
    k_cache: jax.Array,
    v_cache: jax.Array,
    slot_mask: jax.Array,
    *,
    block_slots: int | None = None,
    blocks: XlaBlocks = DEFAULT_BLOCKS,
) -> jax.Array:
    """Attention of a chunk's queries over its own keys plus the allowed cache slots.

    Args:
      q: [B, Sq, H, D] queries of the chunk (RoPE applied), Sq = Qf * Tq tokens.
      k_chunk, v_chunk: [B, Sq, H, D] the chunk's own keys / values.
      k_cache, v_cache: [B, H, N, T, D] cache slots (heads-first, keys already rotated).
      slot_mask: bool [B|1, Qf, H|1, N]: which slots each (query frame group, head) may read. ``Qf`` divides
        the chunk's queries into equal consecutive groups (1 = one selection for the whole chunk).
      block_slots: slots per key tile (must divide N); default from ``blocks.k_tile``.
      blocks: tile sizes (:class:`XlaBlocks`).
    Returns:
      [B, Sq, H, D] in q's dtype.
    """
    b, sq, h, d = q.shape
    n, t = k_cache.shape[2], k_cache.shape[3]
    qf = slot_mask.shape[1]
    kb, nsub = _slot_split(n, t, blocks.k_tile, block_slots)
    if kb < 1 or (n and n % kb):
        raise ValueError(f"block_slots={kb} does not divide the {n} cache slots")
    tt = t // nsub
    smask = jnp.moveaxis(slot_mask, 2, 1)  # [B|1, H|1, G, N]
    # per group: tiles up to the last slot that group reads (a dynamic trip count), so a half-empty global
    # cache costs what it holds, not its capacity
    if n:
        last = jnp.max(jnp.where(smask, jnp.arange(1, n + 1), 0), axis=(0, 1, 3))  # [G]

    def cache_tiles(g):
        mg = jax.lax.dynamic_index_in_dim(smask, g, axis=2, keepdims=False)  # [B|1, H|1, N]

        def tile_fn(j):
            s0, u = (j // nsub) * kb, (j % nsub) * tt

            def fetch():
                k = jax.lax.dynamic_slice(k_cache, (0, 0, s0, u, 0), (b, h, kb, tt, d)).reshape(b, h, kb * tt, d)
                v = jax.lax.dynamic_slice(v_cache, (0, 0, s0, u, 0), (b, h, kb, tt, d)).reshape(b, h, kb * tt, d)
                return k, v

            mb = jax.lax.dynamic_slice_in_dim(mg, s0, kb, axis=2)  # [B|1, H|1, kb]
            return fetch, jnp.repeat(mb, tt, axis=2)

        return ((last[g] + kb - 1) // kb) * nsub, tile_fn

    return _tiled(q, k_chunk, v_chunk, qf, blocks, None, None, cache_tiles if n else None)


def selection_attention(
    q: jax.Array,
    k_chunk: jax.Array,
    v_chunk: jax.Array,
    k_cache: jax.Array,
    v_cache: jax.Array,
    sel: Selection,
    *,
    blocks: XlaBlocks = DEFAULT_BLOCKS,
) -> jax.Array:
    """Attention over a :class:`~fkv_jax.attention.selection.Selection`: gathers only the selected slots.

    q, k_chunk, v_chunk: [B, Sq, H, D] (Sq = C * T); k_cache, v_cache: [B, H, N, T, D]. Each query tile
    gathers the slots of its own query-frame group, a key tile (``blocks.k_tile`` keys) at a time, and stops
    at that group's longest selection (selections are left-packed), so the cost follows what is selected,
    not the budget or the cache size. With ``blocks.split_heads`` each head runs alone up to its own longest
    selection (per-head budgets then cost their own size, not the largest head's).
    """
    b, sq, h, d = q.shape
    heads = jnp.arange(h)
    if blocks.split_heads is False or h == 1:
        return _selection(q, k_chunk, v_chunk, k_cache, v_cache, sel, blocks, heads)

    def one_head(i):  # chunk-sized slices of the queries and the selection; the cache is indexed in place
        def cut(x, axis):
            return None if x is None else jax.lax.dynamic_slice_in_dim(x, i, 1, axis=axis)

        sel_i = Selection(
            frames=cut(sel.frames, 2),
            chunk_mask=cut(sel.chunk_mask, 2),
            mem_k=cut(sel.mem_k, 2),
            mem_v=cut(sel.mem_v, 2),
            mem_valid=cut(sel.mem_valid, 1),
        )
        return _selection(cut(q, 2), cut(k_chunk, 2), cut(v_chunk, 2), k_cache, v_cache, sel_i, blocks, i[None])

    def split():
        out = jax.lax.map(one_head, heads)  # [H, B, Sq, 1, D]: one compiled body, a trip count per head
        return jnp.moveaxis(out[:, :, :, 0], 0, 2)

    if blocks.split_heads:
        return split()
    count = jnp.sum(sel.frames >= 0, axis=-1).max(axis=0)  # [Qf, H]: longest selection per (group, head)
    batched_work, split_work = h * jnp.sum(count.max(axis=1)), jnp.sum(count)
    return jax.lax.cond(
        batched_work * 5 > split_work * 6,
        split,
        lambda: _selection(q, k_chunk, v_chunk, k_cache, v_cache, sel, blocks, heads),
    )


def _selection(q, k_chunk, v_chunk, k_cache, v_cache, sel, blocks, heads):
    """selection_attention for the cache heads ``heads`` (int32 [H']); q, k_chunk, v_chunk, sel hold those
    heads only, the cache all of them."""
    b, sq, h, d = q.shape
    t = k_cache.shape[3]
    qf, kmax = sel.frames.shape[1], sel.frames.shape[3]
    if t <= blocks.k_tile:  # whole slots per key tile (the budget need not be a multiple: -1 padding)
        kb, nsub = max(1, min(kmax, blocks.k_tile // t)), 1
    else:
        kb, nsub = 1, t // _divisor_at_most(t, blocks.k_tile)
    tt = t // nsub
    frames = jnp.moveaxis(sel.frames, 2, 1)  # [B, H, G, K]
    if kmax % kb:
        frames = jnp.pad(frames, ((0, 0), (0, 0), (0, 0), (0, kb - kmax % kb)), constant_values=-1)
    counts = jnp.max(jnp.sum(frames >= 0, axis=-1), axis=(0, 1))  # [G]: longest selection per group
    bi = jnp.arange(b)[:, None, None, None]
    hi = heads[None, :, None, None]
    tok = jnp.arange(tt)

    def cache_tiles(g):
        fg = jax.lax.dynamic_index_in_dim(frames, g, axis=2, keepdims=False)  # [B, H, K']

        def tile_fn(j):
            slot = jax.lax.dynamic_slice_in_dim(fg, (j // nsub) * kb, kb, axis=2)  # [B, H, kb]
            ok = slot >= 0
            slot = jnp.maximum(slot, 0)[..., None]  # [B, H, kb, 1]
            u = (j % nsub) * tt

            def fetch():
                idx = (bi, hi, slot, u + tok) if nsub > 1 else (bi[..., 0], hi[..., 0], slot[..., 0])
                return k_cache[idx].reshape(b, h, kb * tt, d), v_cache[idx].reshape(b, h, kb * tt, d)

            return fetch, jnp.repeat(ok, tt, axis=2)

        return ((counts[g] + kb - 1) // kb) * nsub, tile_fn

    cmask = None if sel.chunk_mask is None else jnp.moveaxis(sel.chunk_mask, 2, 1)  # [B, H, G, C]
    mem = None
    if sel.mem_k is not None:
        mem = (jnp.moveaxis(sel.mem_k, 2, 1), jnp.moveaxis(sel.mem_v, 2, 1), sel.mem_valid)
    return _tiled(q, k_chunk, v_chunk, qf, blocks, cmask, mem, cache_tiles if kmax else None)
