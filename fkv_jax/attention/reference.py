"""XLA reference attention: runs everywhere, defines the numbers every kernel is tested against.

Self-attention of a query chunk is a softmax over the union of
  * the chunk's own keys (bidirectional inside the chunk, as upstream), and
  * the cache slots allowed by ``slot_mask`` (one latent frame = one slot of ``T`` tokens).
It is computed as a blockwise online softmax over blocks of cache slots, so no [queries x all keys] score
matrix is ever materialised and memory stays bounded for long caches.
"""

from __future__ import annotations

import math

import jax
import jax.numpy as jnp

from fkv_jax.attention.selection import Selection

_NEG = -1e30  # finite "minus infinity": a fully masked block then contributes exp(-huge) = 0, never NaN


def dense_attention(q: jax.Array, k: jax.Array, v: jax.Array) -> jax.Array:
    """Plain softmax attention, no mask. q: [B, Sq, H, D]; k, v: [B, Sk, H, D] -> [B, Sq, H, D]."""
    scale = 1.0 / math.sqrt(q.shape[-1])
    s = jnp.einsum("bqhd,bkhd->bhqk", q.astype(jnp.float32) * scale, k.astype(jnp.float32))
    p = jax.nn.softmax(s, axis=-1)
    return jnp.einsum("bhqk,bkhd->bqhd", p, v.astype(jnp.float32)).astype(q.dtype)


def _block_update(carry, q, k, v, mask):
    """One online-softmax step. q: [B, G, Tq, H, D] (pre-scaled); k, v: [B, Sk, H, D];
    mask: bool broadcastable to [B, G, H, 1, Sk] or None."""
    m, l, acc = carry  # [B, G, H, Tq], [B, G, H, Tq], [B, G, Tq, H, D]
    s = jnp.einsum("bgqhd,bkhd->bghqk", q, k.astype(jnp.float32))
    if mask is not None:
        s = jnp.where(mask, s, _NEG)
    m_new = jnp.maximum(m, s.max(axis=-1))
    p = jnp.exp(s - m_new[..., None])
    corr = jnp.exp(m - m_new)
    l_new = l * corr + p.sum(axis=-1)
    acc_new = acc * jnp.moveaxis(corr, -1, 2)[..., None] + jnp.einsum("bghqk,bkhd->bgqhd", p, v.astype(jnp.float32))
    return m_new, l_new, acc_new


def pick_block_slots(num_slots: int, tokens_per_frame: int, max_tokens: int = 2048) -> int:
    """Largest divisor of ``num_slots`` whose block holds at most ``max_tokens`` keys (at least 1 slot)."""
    best = 1
    for kb in range(1, num_slots + 1):
        if num_slots % kb == 0 and kb * tokens_per_frame <= max_tokens:
            best = kb
    return best


def chunk_attention(
    q: jax.Array,
    k_chunk: jax.Array,
    v_chunk: jax.Array,
    k_cache: jax.Array,
    v_cache: jax.Array,
    slot_mask: jax.Array,
    *,
    block_slots: int | None = None,
) -> jax.Array:
    """Attention of a chunk's queries over its own keys plus the allowed cache slots.

    Args:
      q: [B, Sq, H, D] queries of the chunk (RoPE applied), Sq = Qf * Tq tokens.
      k_chunk, v_chunk: [B, Sq, H, D] the chunk's own keys / values.
      k_cache, v_cache: [B, N, T, H, D] cache slots (keys already rotated).
      slot_mask: bool [B|1, Qf, H|1, N]: which slots each (query frame group, head) may read. ``Qf`` divides
        the chunk's queries into equal consecutive groups (1 = one selection for the whole chunk).
      block_slots: slots per online-softmax block (must divide N); default picks <= 2048 keys per block.
    Returns:
      [B, Sq, H, D] in q's dtype.
    """
    b, sq, h, d = q.shape
    n, t = k_cache.shape[1], k_cache.shape[2]
    qf = slot_mask.shape[1]
    if sq % qf:
        raise ValueError(f"{sq} queries do not split into {qf} query-frame groups")
    kb = block_slots or pick_block_slots(n, t)
    if n % kb:
        raise ValueError(f"block_slots={kb} does not divide the {n} cache slots")
    scale = 1.0 / math.sqrt(d)
    qg = (q.astype(jnp.float32) * scale).reshape(b, qf, sq // qf, h, d)  # [B, G, Tq, H, D]
    tq = sq // qf

    carry = (
        jnp.full((b, qf, h, tq), _NEG, jnp.float32),
        jnp.zeros((b, qf, h, tq), jnp.float32),
        jnp.zeros((b, qf, tq, h, d), jnp.float32),
    )
    carry = _block_update(carry, qg, k_chunk, v_chunk, None)

    # mask per key token of a block: [B|1, G, H|1, 1, kb*T]
    def body(i, carry):
        k_blk = jax.lax.dynamic_slice_in_dim(k_cache, i * kb, kb, axis=1).reshape(b, kb * t, h, d)
        v_blk = jax.lax.dynamic_slice_in_dim(v_cache, i * kb, kb, axis=1).reshape(b, kb * t, h, d)
        m_blk = jax.lax.dynamic_slice_in_dim(slot_mask, i * kb, kb, axis=3)  # [B|1, G, H|1, kb]
        m_tok = jnp.repeat(m_blk, t, axis=3)[:, :, :, None, :]
        return _block_update(carry, qg, k_blk, v_blk, m_tok)

    if n:
        # Only blocks up to the last slot anyone reads are visited (a dynamic trip count), so a half-empty
        # global cache costs what it holds, not its capacity.
        used = jnp.any(slot_mask, axis=(0, 1, 2))  # [N]
        last = jnp.max(jnp.where(used, jnp.arange(1, n + 1), 0))
        carry = jax.lax.fori_loop(0, (last + kb - 1) // kb, body, carry)
    _, l, acc = carry
    out = acc / jnp.moveaxis(l, -1, 2)[..., None]
    return out.reshape(b, sq, h, d).astype(q.dtype)


def selection_attention(
    q: jax.Array,
    k_chunk: jax.Array,
    v_chunk: jax.Array,
    k_cache: jax.Array,
    v_cache: jax.Array,
    sel: Selection,
) -> jax.Array:
    """Attention over a :class:`~fkv_jax.attention.selection.Selection`: gathers only the selected slots.

    q, k_chunk, v_chunk: [B, Sq, H, D] (Sq = C * T); k_cache, v_cache: [B, N, T, H, D]. The loop over the
    budget axis stops at the longest selection in the batch (selections are left-packed), so the cost
    follows what is selected, not the budget or the cache size.
    """
    b, sq, h, d = q.shape
    t = k_cache.shape[2]
    qf, kmax = sel.frames.shape[1], sel.frames.shape[3]
    if sq % qf:
        raise ValueError(f"{sq} queries do not split into {qf} query-frame groups")
    tq = sq // qf
    scale = 1.0 / math.sqrt(d)
    qg = (q.astype(jnp.float32) * scale).reshape(b, qf, tq, h, d)  # [B, G, Tq, H, D]
    carry = (
        jnp.full((b, qf, h, tq), _NEG, jnp.float32),
        jnp.zeros((b, qf, h, tq), jnp.float32),
        jnp.zeros((b, qf, tq, h, d), jnp.float32),
    )
    # own chunk (optionally masked per frame)
    cmask = None
    if sel.chunk_mask is not None:
        c = sel.chunk_mask.shape[-1]
        cmask = jnp.repeat(sel.chunk_mask, sq // c, axis=-1)[:, :, :, None, :]  # [B, G, H, 1, Sq]
    carry = _block_update(carry, qg, k_chunk, v_chunk, cmask)
    # memory tokens shared by all query groups
    if sel.mem_k is not None:
        mvalid = None if sel.mem_valid is None else sel.mem_valid[:, None, :, None, :]  # [B, 1, H, 1, M]
        carry = _block_update(carry, qg, sel.mem_k, sel.mem_v, mvalid)

    # Gather kb selected slots per step (kb * T <= ~2048 keys): few, reasonably sized matmuls.
    kb = max(1, min(kmax, 2048 // max(t, 1))) if kmax else 1
    frames = sel.frames
    if kmax % kb:
        frames = jnp.pad(frames, ((0, 0), (0, 0), (0, 0), (0, kb - kmax % kb)), constant_values=-1)
    bi = jnp.arange(b)[:, None, None, None]
    hi = jnp.arange(h)[None, None, :, None]

    def body(j, carry):
        slot = jax.lax.dynamic_slice_in_dim(frames, j * kb, kb, axis=3)  # [B, G, H, kb]
        ok = slot >= 0
        slot = jnp.maximum(slot, 0)
        # advanced indices split by a slice: the broadcast index dims come first -> [B, G, H, kb, T, D]
        kj = k_cache[bi, slot, :, hi, :].astype(jnp.float32)
        vj = v_cache[bi, slot, :, hi, :].astype(jnp.float32)
        m, l, acc = carry
        s = jnp.einsum("bgqhd,bghjkd->bghqjk", qg, kj)
        s = jnp.where(ok[:, :, :, None, :, None], s, _NEG).reshape(b, qf, h, tq, kb * t)
        m_new = jnp.maximum(m, s.max(axis=-1))
        p = jnp.exp(s - m_new[..., None])
        corr = jnp.exp(m - m_new)
        acc = acc * jnp.moveaxis(corr, -1, 2)[..., None] + jnp.einsum(
            "bghqk,bghkd->bgqhd", p, vj.reshape(b, qf, h, kb * t, d))
        return m_new, l * corr + p.sum(-1), acc

    if kmax:
        used = jnp.max(jnp.sum(sel.frames >= 0, axis=-1))
        carry = jax.lax.fori_loop(0, (used + kb - 1) // kb, body, carry)
    _, l, acc = carry
    out = acc / jnp.moveaxis(l, -1, 2)[..., None]
    return out.reshape(b, sq, h, d).astype(q.dtype)
