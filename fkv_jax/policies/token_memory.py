"""Token memory: a per-(layer, head) buffer of individually chosen tokens, refreshed at every cache write.

The shared mechanism of the LLM-style baselines (H2O, SnapKV, R-KV) and of Deep Forcing's compressed region:

* physical cache: ``sink_size`` sink frames + a ring of the last ``recent_frames`` frames; every head reads
  all of them (plus the current chunk), as a plain sink + window cache does;
* memory (policy state, fixed shape): per layer and head up to ``Mc`` tokens ``mem_k, mem_v [B, Mc, H, Dh]``
  with ``mem_valid [B, H, Mc]`` (which entries hold a token), ``mem_score`` (the score that kept it),
  ``mem_src`` (``frame * T + token``, the token's origin) and ``mem_pos`` (the temporal RoPE position its key
  is currently rotated at; the origin frame unless a policy re-rotates). Every query of the chunk reads its
  head's valid memory tokens (``Selection.mem_*``). Entries are kept in origin order, valid first;
* trigger: ``on_write`` after the clean (t = 0) pass of every chunk. Candidates = the current memory U every
  token of the frames this write pushes out of the ring (the ``C`` frames ``start - W + i``, ``i < C``,
  that are not sink frames; for ``W < C`` some of them are the chunk's own frames, which the write drops);
* scorer (pluggable, :meth:`TokenMemory.score_candidates`): one float per candidate and head;
* budget allocator: ``uniform`` keeps the top ``M`` per head; ``adakv`` keeps the layer's global top ``M * H``
  with a per-head floor of ``floor(adakv_floor * M)`` (Ada-KV's ``alpha * B / H``), capped at the per-head
  buffer size ``Mc = ceil(adakv_cap * M)`` (the largest over layers; Ada-KV's varlen cache has no cap).
  ``layer_schedule = "pyramid"`` gives layer ``l`` the PyramidKV budget ``M_l`` (same total over layers).
  Per-head budgets are expressed by ``mem_valid``; the buffers are sized for the largest.

``M = round(memory_frames * T)`` tokens per head on average (``T`` tokens per frame). Attention mass (for the
H2O / SnapKV / R-KV scorers) is the clean pass's own softmax over everything it read (chunk, sink, ring,
memory), recomputed in ``on_write`` from the clean pass's queries (``needs_clean_queries``), one layer at a time
and in blocks of queries, so no ``[queries x keys]`` matrix of the whole layer is ever materialised.

RoPE: memory keys are stored as the cache stores them, rotated at their absolute frame (the sampler's
``rope_mode="absolute"``). The ``window_relative`` mode caches un-rotated keys and re-rotates the cache at
every call, which the memory (kept outside the cache) does not follow: not supported.
"""

from __future__ import annotations

import dataclasses
import math
from typing import Any

import jax
import jax.numpy as jnp
import numpy as np

from fkv_jax.cache.kv_cache import CacheGeometry, slot_of_frames, visible_slots
from fkv_jax.policies.base import Call, Policy, WriteCall, dense_selection
from fkv_jax.policies.budgets import (
    ALLOCATORS,
    adakv_head_budgets,
    head_capacity,
    pyramid_budgets,
    uniform_head_budgets,
)
from fkv_jax.policies.retain import frame_kv, window_geometry

_BIG = np.iinfo(np.int32).max


# ---- small pure parts ------------------------------------------------------------------------------------
def _divisor_at_most(n: int, k: int) -> int:
    return max(d for d in range(1, min(n, max(k, 1)) + 1) if n % d == 0)


def attention_mass(
    q: jax.Array,
    k_chunk: jax.Array,
    k_cache: jax.Array,
    slot_mask: jax.Array,
    mem_k: jax.Array | None = None,
    mem_valid: jax.Array | None = None,
    block: int = 512,
) -> tuple[jax.Array, jax.Array, jax.Array | None]:
    """Mean softmax attention mass each key receives from the queries ``q``.

    The softmax of a query runs over the chunk's keys (all allowed), the tokens of the cache slots with
    ``slot_mask`` and the valid memory tokens, exactly what the attention call with that selection computes.

    Args:
      q: [B, Q, H, D] rotated queries; k_chunk: [B, Qk, H, D]; k_cache: [B, H, N, T, D] (as cached);
      slot_mask: bool [N]; mem_k: [B, M, H, D] with mem_valid bool [B, H, M] (optional); block: queries per block.
    Returns:
      mass over the chunk's keys [B, H, Qk], the cache tokens [B, H, N, T] and the memory [B, H, M] (or None),
      averaged over the queries (each query's masses sum to 1).
    """
    b, nq, h, d = q.shape
    n, t = k_cache.shape[2], k_cache.shape[3]
    qk = k_chunk.shape[1]
    parts = [jnp.moveaxis(k_chunk, 2, 1), k_cache.reshape(b, h, n * t, d)]
    masks = [jnp.ones((b, h, qk), bool), jnp.broadcast_to(jnp.repeat(slot_mask, t)[None, None], (b, h, n * t))]
    m = 0
    if mem_k is not None:
        m = mem_k.shape[1]
        parts.append(jnp.moveaxis(mem_k, 2, 1))
        masks.append(jnp.ones((b, h, m), bool) if mem_valid is None else mem_valid)
    keys = jnp.concatenate([p.astype(jnp.float32) for p in parts], axis=2)  # [B, H, K, D]
    mask = jnp.concatenate(masks, axis=-1)  # [B, H, K]
    qb = _divisor_at_most(nq, block)
    qs = (q.astype(jnp.float32) / math.sqrt(d)).reshape(b, nq // qb, qb, h, d)

    def body(acc, qblk):  # qblk: [B, qb, H, D]
        s = jnp.einsum("bqhd,bhkd->bhqk", qblk, keys)
        s = jnp.where(mask[:, :, None], s, -jnp.inf)
        return acc + jax.nn.softmax(s, axis=-1).sum(2), None

    acc, _ = jax.lax.scan(body, jnp.zeros(mask.shape, jnp.float32), jnp.moveaxis(qs, 1, 0))
    acc = acc / nq
    chunk = acc[..., :qk]  # [B, H, Qk]
    cache = acc[..., qk : qk + n * t].reshape(b, h, n, t)
    return chunk, cache, (acc[..., qk + n * t :] if m else None)


def pool1d(x: jax.Array, kernel: int, mode: str = "avg") -> jax.Array:
    """1-D pooling along the last axis, stride 1, ``kernel // 2`` padding on both sides (PyTorch's
    ``avg_pool1d`` with zero padding counted / ``max_pool1d``), as SnapKV and kvpress smooth scores."""
    if kernel <= 1:
        return x
    pad = [(0, 0)] * (x.ndim - 1) + [(kernel // 2, kernel // 2)]
    win, strides = (1,) * (x.ndim - 1) + (kernel,), (1,) * x.ndim
    if mode == "avg":
        return jax.lax.reduce_window(x, 0.0, jax.lax.add, win, strides, pad) / kernel
    if mode == "max":
        return jax.lax.reduce_window(x, -jnp.inf, jax.lax.max, win, strides, pad)
    raise ValueError(f"pooling must be 'avg' or 'max', got {mode!r}")


def mean_cosine_to_others(keys: jax.Array, valid: jax.Array, eps: float = 1e-8) -> jax.Array:
    """Mean cosine similarity of each key to the *other* valid keys of its head, in O(N D).

    keys: [B, N, H, D]; valid: bool [B, H, N]. Returns [B, H, N] (0 where fewer than two keys are valid).
    ``mean_{j != i} cos(k_i, k_j) = (k^_i . sum_j k^_j - |k^_i|^2) / (n - 1)`` with ``k^ = k / max(|k|, eps)``.
    """
    k = jnp.moveaxis(keys.astype(jnp.float32), 1, 2)  # [B, H, N, D]
    kn = k / jnp.maximum(jnp.linalg.norm(k, axis=-1, keepdims=True), eps)
    kn = kn * valid[..., None]
    total = kn.sum(2, keepdims=True)
    cnt = valid.sum(-1, keepdims=True)
    red = ((kn * total).sum(-1) - (kn * kn).sum(-1)) / jnp.maximum(cnt - 1, 1)
    return jnp.where(valid & (cnt > 1), red, 0.0)


def masked_softmax(x: jax.Array, valid: jax.Array) -> jax.Array:
    """Softmax over the valid entries of the last axis (0 elsewhere)."""
    return jnp.where(valid, jax.nn.softmax(jnp.where(valid, x, -jnp.inf), axis=-1), 0.0)


def take_per_head(x: jax.Array, idx: jax.Array) -> jax.Array:
    """x: [B, N, H, ...] token-major; idx: int [B, H, K] -> [B, K, H, ...] (each head its own tokens)."""
    i = jnp.moveaxis(idx, 1, 2)
    i = i.reshape(*i.shape, *([1] * (x.ndim - 3)))
    return jnp.take_along_axis(x, i, axis=1)


def cache_geometry_of(k_new: jax.Array, sink: int, ring: int) -> CacheGeometry:
    """The geometry of the cache ``on_write`` is about to write into, from the chunk's K [L, B, H, C, T, Dh]."""
    L, b, h, c, t, d = k_new.shape
    return CacheGeometry(
        num_layers=L, batch=b, sink=sink, ring=ring, tokens_per_frame=t, num_heads=h, head_dim=d, frames_per_block=c
    )


# ---- the mechanism ---------------------------------------------------------------------------------------
@dataclasses.dataclass(frozen=True)
class LayerInputs:
    """One layer's slice of what ``on_write`` maps over (every field has a leading [L] axis before the map)."""

    cache_k: jax.Array  # [B, H, N, T, D] the pre-write cache
    cache_v: jax.Array  # [B, H, N, T, D]
    k_new: jax.Array  # [B, H, C, T, D] the chunk's clean K/V
    v_new: jax.Array  # [B, H, C, T, D]
    state: dict  # the layer's slice of state["layers"]
    budget: jax.Array  # int32[] the layer's average per-head memory budget
    q: jax.Array | None = None  # [B, C*T, H, D] the clean pass's queries (needs_clean_queries)
    extra: Any = None  # what :meth:`TokenMemory.extra_layer_inputs` adds (a subclass's own pytree)


jax.tree_util.register_dataclass(
    LayerInputs, data_fields=["cache_k", "cache_v", "k_new", "v_new", "state", "budget", "q", "extra"], meta_fields=[]
)


@dataclasses.dataclass(frozen=True)
class Evicted:
    """Which frames a write evicts from the ring, and how to read them out of the cache or the chunk."""

    frames: jax.Array  # int32 [C] absolute frames leaving the ring
    slot_frame: jax.Array  # int32 [N]
    start_frame: jax.Array  # int32[]

    def __call__(self, cache_x: jax.Array, new_x: jax.Array) -> jax.Array:
        """[B, H, N, T, R] (cache), [B, H, C, T, R] (chunk) -> the evicted frames' rows [B, C*T, H, R]."""
        fr = jax.vmap(lambda f: frame_kv(cache_x, new_x, self.slot_frame, self.start_frame, f))(self.frames)
        fr = jnp.transpose(fr, (1, 0, 3, 2, 4))  # [B, C, T, H, R]: C frames, not the cache
        b, c, t, h, r = fr.shape
        return fr.reshape(b, c * t, h, r)


@dataclasses.dataclass(frozen=True)
class ScoreInputs:
    """What a scorer sees for one layer: its inputs, the evicted-frame reader and, when the policy
    ``uses_mass``, the clean pass's attention mass (heads-first, as the cache)."""

    layer: LayerInputs
    evicted: Evicted
    written: jax.Array  # int32 [C] slots the chunk's frames go to
    mass_cand: jax.Array | None = None  # [B, H, Nc] mean mass each candidate received
    mass_cache: jax.Array | None = None  # [B, H, N, T]
    mass_chunk: jax.Array | None = None  # [B, H, C, T]


@dataclasses.dataclass(frozen=True, eq=False)
class Candidates:
    """One layer's candidates: the memory entries first, then the evicted frames' tokens (origin order)."""

    k: jax.Array  # [B, Nc, H, D]
    v: jax.Array  # [B, Nc, H, D]
    valid: jax.Array  # bool [B, H, Nc]
    src: jax.Array  # int32 [B, H, Nc]  frame * T + token
    pos: jax.Array  # int32 [B, H, Nc]  temporal RoPE position of the key as stored
    num_mem: int  # Mc: the first Mc candidates are the memory entries


@dataclasses.dataclass(frozen=True, eq=False)
class TokenMemory(Policy):
    """Sink + ring cache plus a per-head token memory refreshed from evicted frames (see the module docstring).

    Subclasses implement :meth:`score_candidates`; the base keeps the newest tokens (score = origin index),
    i.e. a longer window at token granularity.
    """

    name = "token_memory"
    needs_clean_queries = True
    uses_mass = False  # the scorer needs the clean pass's attention mass

    sink_size: int = 1
    recent_frames: int = 3
    memory_frames: float = 1.0
    allocator: str = "uniform"
    adakv_floor: float = 0.2
    adakv_cap: float = 2.0
    layer_schedule: str = "uniform"
    pyramid_beta: float = 20.0
    query_block: int = 512

    # ---- static sizes -------------------------------------------------------------------------------
    def layer_budgets(self, num_layers: int, tokens_per_frame: int) -> np.ndarray:
        """int32 [L]: average per-head memory budget of each layer (``M`` or the PyramidKV schedule)."""
        m = int(round(self.memory_frames * tokens_per_frame))
        if self.layer_schedule == "uniform":
            return np.full((num_layers,), m, np.int32)
        if self.layer_schedule == "pyramid":
            return pyramid_budgets(num_layers, m, self.pyramid_beta)
        raise ValueError(f"layer_schedule must be 'uniform' or 'pyramid', got {self.layer_schedule!r}")

    def capacity(self, num_layers: int, tokens_per_frame: int, num_heads: int) -> int:
        """Mc: per-head memory entries (the same for every layer, the largest any layer needs)."""
        mb = self.layer_budgets(num_layers, tokens_per_frame)
        return max(head_capacity(int(x), num_heads, self.allocator, self.adakv_cap) for x in mb)

    def geometry(self, base, num_frames=None):
        if self.sink_size < 0 or self.recent_frames < 0 or self.memory_frames < 0:
            raise ValueError(f"{self.name}: sink_size, recent_frames and memory_frames must be >= 0")
        if self.allocator not in ALLOCATORS:
            raise ValueError(f"{self.name}: allocator must be one of {ALLOCATORS}, got {self.allocator!r}")
        if not 0 <= self.adakv_floor <= 1 or self.adakv_cap < 1:
            raise ValueError(f"{self.name}: need 0 <= adakv_floor <= 1 and adakv_cap >= 1")
        self.layer_budgets(base.num_layers, base.tokens_per_frame)
        return window_geometry(base, self.sink_size + self.recent_frames + base.frames_per_block, self.sink_size, None)

    # ---- state --------------------------------------------------------------------------------------
    def init_state(self, geom):
        L, b, h, d = geom.num_layers, geom.batch, geom.num_heads, geom.head_dim
        mc = self.capacity(L, geom.tokens_per_frame, h)
        layers = {
            "mem_k": jnp.zeros((L, b, mc, h, d), geom.dtype),
            "mem_v": jnp.zeros((L, b, mc, h, d), geom.dtype),
            "mem_score": jnp.zeros((L, b, h, mc), jnp.float32),
            "mem_valid": jnp.zeros((L, b, h, mc), bool),
            "mem_src": jnp.full((L, b, h, mc), -1, jnp.int32),
            "mem_pos": jnp.full((L, b, h, mc), -1, jnp.int32),
        }
        layers.update(self.extra_layer_state(geom))
        return {"layers": layers, **self.extra_shared_state(geom)}

    def extra_layer_state(self, geom) -> dict:
        return {}

    def extra_shared_state(self, geom) -> dict:
        return {}

    # ---- attention: sink + ring for every head, plus the head's memory tokens ------------------------
    def select(self, call: Call):
        ls = call.layer_state
        sel = dense_selection(call, call.visible)
        return dataclasses.replace(sel, mem_k=ls["mem_k"], mem_v=ls["mem_v"], mem_valid=ls["mem_valid"]), None

    # ---- hooks --------------------------------------------------------------------------------------
    def score_candidates(self, cand: Candidates, x: ScoreInputs) -> tuple[jax.Array, dict]:
        """float [B, H, Nc] (higher = keep; invalid entries are ignored) and per-layer state updates."""
        return cand.src.astype(jnp.float32), {}

    def extra_layer_inputs(self, call: WriteCall) -> Any:
        """A pytree of per-layer arrays (leading [L]) handed to :meth:`score_candidates` as
        ``x.layer.extra``; None by default."""
        return None

    def place(self, mem: dict, x: ScoreInputs, next_start: jax.Array) -> dict:
        """Post-process the kept memory of one layer (e.g. re-rotate keys); default: keys stay as they are."""
        return mem

    def shared_update(self, call: WriteCall) -> dict:
        """Updates of the shared (non-layer) state entries."""
        return {}

    # ---- the clean pass: refresh the memory ---------------------------------------------------------
    def on_write(self, call: WriteCall):
        state, cache, k_new, v_new, start_frame = call.state, call.cache, call.k_new, call.v_new, call.start_frame
        L, b, h, c, t, d = k_new.shape
        geom = cache_geometry_of(k_new, self.sink_size, self.recent_frames)
        sf = cache["slot_frame"]
        vis = visible_slots(geom, cache, start_frame)  # what every head of the clean pass read
        ev = start_frame - self.recent_frames + jnp.arange(c, dtype=jnp.int32)  # frames leaving the ring
        ev_ok = ev >= self.sink_size
        written = slot_of_frames(geom, start_frame + jnp.arange(c, dtype=jnp.int32))
        q_all = call.clean_q
        if self.needs_clean_queries and q_all is None:
            raise ValueError(f"{self.name}.on_write needs the clean pass's queries (WriteCall.clean_q)")
        budgets = jnp.asarray(self.layer_budgets(L, t))
        mc = state["layers"]["mem_k"].shape[2]
        xs = LayerInputs(
            cache_k=cache["k"],
            cache_v=cache["v"],
            k_new=k_new,
            v_new=v_new,
            state=state["layers"],
            budget=budgets,
            q=q_all,
            extra=self.extra_layer_inputs(call),
        )
        ev_src = (ev[:, None] * t + jnp.arange(t, dtype=jnp.int32)[None]).reshape(-1)  # [C*T]
        evicted = Evicted(frames=ev, slot_frame=sf, start_frame=start_frame)

        def layer(li: LayerInputs):
            ls = li.state
            cand = Candidates(
                k=jnp.concatenate([ls["mem_k"], evicted(li.cache_k, li.k_new).astype(ls["mem_k"].dtype)], axis=1),
                v=jnp.concatenate([ls["mem_v"], evicted(li.cache_v, li.v_new).astype(ls["mem_v"].dtype)], axis=1),
                valid=jnp.concatenate([ls["mem_valid"], jnp.broadcast_to(jnp.repeat(ev_ok, t), (b, h, c * t))], -1),
                src=jnp.concatenate([ls["mem_src"], jnp.broadcast_to(ev_src, (b, h, c * t))], -1),
                pos=jnp.concatenate([ls["mem_pos"], jnp.broadcast_to(ev_src // t, (b, h, c * t))], -1),
                num_mem=mc,
            )
            if self.uses_mass:
                k_chunk = jnp.moveaxis(li.k_new, 1, 3).reshape(b, c * t, h, d)  # token-major, chunk-sized
                m_chunk, m_cache, m_mem = attention_mass(
                    li.q, k_chunk, li.cache_k, vis, ls["mem_k"], ls["mem_valid"], self.query_block
                )
                m_chunk = m_chunk.reshape(b, h, c, t)
                m_ev = evicted(m_cache[..., None], m_chunk[..., None])[..., 0]  # [B, C*T, H]
                x = ScoreInputs(
                    layer=li,
                    evicted=evicted,
                    written=written,
                    mass_cache=m_cache,
                    mass_chunk=m_chunk,
                    mass_cand=jnp.concatenate([m_mem, jnp.moveaxis(m_ev, 1, 2)], -1),
                )
            else:
                x = ScoreInputs(layer=li, evicted=evicted, written=written)
            score, updates = self.score_candidates(cand, x)
            score = jnp.where(cand.valid, score.astype(jnp.float32), -jnp.inf)
            if self.allocator == "adakv":
                cap = min(mc, cand.valid.shape[-1])
                per_head = adakv_head_budgets(score, cand.valid, li.budget * h, self.adakv_floor, cap)
            else:
                per_head = uniform_head_budgets(cand.valid, li.budget)
            _, idx = jax.lax.top_k(score, mc)  # [B, H, Mc] best first
            keep = (jnp.arange(mc) < per_head[..., None]) & jnp.take_along_axis(cand.valid, idx, -1)
            # memory in origin order, valid entries first
            src = jnp.take_along_axis(cand.src, idx, -1)
            order = jnp.argsort(jnp.where(keep, src, _BIG), axis=-1)
            idx, keep = jnp.take_along_axis(idx, order, -1), jnp.take_along_axis(keep, order, -1)
            kz = keep[..., None].swapaxes(1, 2)  # [B, Mc, H, 1]
            mem = {
                "mem_k": jnp.where(kz, take_per_head(cand.k, idx), 0.0).astype(ls["mem_k"].dtype),
                "mem_v": jnp.where(kz, take_per_head(cand.v, idx), 0.0).astype(ls["mem_v"].dtype),
                "mem_score": jnp.where(keep, jnp.take_along_axis(score, idx, -1), 0.0),
                "mem_valid": keep,
                "mem_src": jnp.where(keep, jnp.take_along_axis(cand.src, idx, -1), -1),
                "mem_pos": jnp.where(keep, jnp.take_along_axis(cand.pos, idx, -1), -1),
            }
            mem = self.place(mem, x, start_frame + c)
            new_ls = {**ls, **mem, **updates}
            return new_ls, {"kept_per_head": keep.sum(-1).astype(jnp.int32)}

        new_layers, aux = jax.lax.map(layer, xs)
        new_state = {**state, "layers": new_layers, **self.shared_update(call)}
        return new_state, aux

    # ---- bookkeeping ------------------------------------------------------------------------------------
    def memory_tokens(self, geom) -> int:
        return self.capacity(geom.num_layers, geom.tokens_per_frame, geom.num_heads)


def resident_bytes(geom: CacheGeometry, state: Any, cache_dtype=None) -> int:
    """Resident bytes of a policy: its physical KV cache plus every array of its state."""
    return geom.kv_bytes(cache_dtype) + sum(int(np.prod(x.shape)) * x.dtype.itemsize for x in jax.tree.leaves(state))
