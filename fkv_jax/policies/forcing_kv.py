"""Forcing-KV: offline static/dynamic heads, with a segment buffer of recently evicted keys for dynamic heads.

Composition (defaults = the official code's behaviour):

* cache: ``sink_size`` sink frames + a ring of ``max(spatial, temporal)`` recent frames (retainers);
* head partition: an offline table (static / dynamic per layer and head);
* static heads read sink + the last ``spatial_context_length`` frames + the current chunk;
* dynamic heads read sink + the last ``temporal_context_length`` frames + the current chunk + memory tokens:
  the ``round(C * n * r)`` raster segments (``n = num_frame_patch``) with the *lowest* adjacent-frame key
  cosine among the C frames leaving the dynamic ring (scorer), chosen jointly, kept in index order;
* trigger: the buffer is replaced in the clean (t = 0) pass of every grouped block; the scores come from
  layer ``score_layer`` (1) of batch element 0, post-RoPE keys of that layer's dynamic heads flattened
  over heads x head_dim, and the same segment indices are used by every layer;
* timing: head grouping switches on after block ``ar_start``; before that, and in layer 0 always, every
  head reads sink + the last ``max(spatial, temporal)`` frames;
* RoPE: absolute (keys keep the phase they were cached with).
"""

from __future__ import annotations

import dataclasses

import jax
import jax.numpy as jnp
import numpy as np

from fkv_jax.attention.selection import Selection, pack_mask
from fkv_jax.cache.kv_cache import CacheGeometry
from fkv_jax.policies.base import Call, Policy
from fkv_jax.policies.heads import HeadTable
from fkv_jax.policies.retain import frame_kv, recent_slots, sink_slots, window_geometry
from fkv_jax.policies.scores import segment_cosine


@dataclasses.dataclass(frozen=True, eq=False)
class ForcingKV(Policy):
    name = "forcing_kv"
    head_table: HeadTable | None = None  # None: every head static (a sink + anchor window)
    sink_size: int = 1
    ar_start: int = 2
    spatial_context_length: int = 1
    temporal_context_length: int = 1
    dynamic_context_length: int = 1
    dynamic_temporal_enabled: bool = True
    num_frame_patch: int = 6
    sim_retention_ratio: float = 0.33
    score_layer: int = 1

    # ---- static checks and derived sizes ----------------------------------------------------------
    def _table(self, geom: CacheGeometry) -> np.ndarray:
        if self.head_table is None:
            return np.zeros((geom.num_layers, geom.num_heads), bool)
        if self.head_table.dynamic.shape != (geom.num_layers, geom.num_heads):
            raise ValueError(
                f"head table is {self.head_table.dynamic.shape} (layers, heads); the model has "
                f"({geom.num_layers}, {geom.num_heads})"
            )
        return self.head_table.dynamic

    def keep_segments(self, frames_per_block: int) -> int:
        return int(round(frames_per_block * self.num_frame_patch * self.sim_retention_ratio))

    def buffer_tokens(self, geom: CacheGeometry) -> int:
        return self.keep_segments(geom.frames_per_block) * (geom.tokens_per_frame // self.num_frame_patch)

    def geometry(self, base, num_frames=None):
        if not 1 <= self.temporal_context_length <= 3 or self.spatial_context_length < 1:
            raise ValueError("forcing_kv needs 1 <= temporal_context_length <= 3 and spatial_context_length >= 1")
        c, t = base.frames_per_block, base.tokens_per_frame
        if t % self.num_frame_patch:
            raise ValueError(f"{t} tokens per frame do not split into num_frame_patch={self.num_frame_patch} segments")
        keep = self.keep_segments(c)
        if self.dynamic_temporal_enabled and keep != self.dynamic_context_length * self.num_frame_patch:
            raise ValueError(
                f"round({c} * num_frame_patch * sim_retention_ratio) = {keep} segments must equal "
                f"dynamic_context_length * num_frame_patch = {self.dynamic_context_length * self.num_frame_patch}"
            )
        ring = max(self.spatial_context_length, self.temporal_context_length)
        geom = window_geometry(base, self.sink_size + ring + c, self.sink_size, None)
        self._table(geom)
        if (
            self.dynamic_temporal_enabled
            and not self._table(geom)[self.score_layer].any()
            and self._table(geom)[1:].any()
        ):
            raise ValueError(f"score_layer={self.score_layer} has no dynamic head to score segments with")
        return geom

    # ---- state ------------------------------------------------------------------------------------
    def init_state(self, geom):
        m = self.buffer_tokens(geom) if self.dynamic_temporal_enabled else 0
        shape = (geom.num_layers, geom.batch, m, geom.num_heads, geom.head_dim)
        return {
            "layers": {"mem_k": jnp.zeros(shape, geom.dtype), "mem_v": jnp.zeros(shape, geom.dtype)},
            "mem_count": jnp.zeros((), jnp.int32),
        }

    def _grouped(self, layer, start_frame, c):
        return (start_frame // c > self.ar_start) & (layer != 0)

    # ---- attention --------------------------------------------------------------------------------
    def select(self, call: Call):
        geom = call.geom
        dyn = jnp.asarray(self._table(geom))[call.layer]  # bool[H]
        sink = sink_slots(geom, call.slot_frame)
        ring = max(self.spatial_context_length, self.temporal_context_length)
        pre = sink | recent_slots(call.slot_frame, call.start_frame, ring)
        static = sink | recent_slots(call.slot_frame, call.start_frame, self.spatial_context_length)
        dynamic = sink | recent_slots(call.slot_frame, call.start_frame, self.temporal_context_length)
        grouped = self._grouped(call.layer, call.start_frame, geom.frames_per_block)
        per_head = jnp.where(grouped, jnp.where(dyn[:, None], dynamic[None], static[None]), pre[None])  # [H, N]
        b = call.q.shape[0]
        frames = pack_mask(jnp.broadcast_to(per_head[None, None], (b, 1, geom.num_heads, geom.num_slots)))
        sel = Selection(frames=frames)
        m = call.layer_state["mem_k"].shape[1]
        if m:
            valid = grouped & dyn[:, None] & (jnp.arange(m) < call.state["mem_count"])[None]  # [H, M]
            sel = dataclasses.replace(
                sel,
                mem_k=call.layer_state["mem_k"],
                mem_v=call.layer_state["mem_v"],
                mem_valid=jnp.broadcast_to(valid[None], (b, geom.num_heads, m)),
            )
        return sel, None

    # ---- the clean pass: refresh the segment buffer -----------------------------------------------
    def on_write(self, call):
        """call.k_new, v_new: [L, B, H, C, T, Dh] of the clean pass; ``call.cache`` is the pre-write cache."""
        state, cache, k_new, v_new, start_frame = call.state, call.cache, call.k_new, call.v_new, call.start_frame
        if not self.dynamic_temporal_enabled:
            return state, None
        L, b, h, c, t, d = k_new.shape
        n = self.num_frame_patch
        seg = t // n
        keep = self.keep_segments(c)
        table = jnp.asarray(self.head_table.dynamic if self.head_table is not None else np.zeros((L, h), bool))
        # candidates: the C frames leaving the dynamic ring, each compared with the frame after it
        cand = start_frame - self.temporal_context_length + jnp.arange(c + 1)

        def frames_of(
            kk, kn, layer=None
        ):  # [B, H, N, T, D] (or [L, ...] + layer), [B, H, C, T, D] -> [C+1, B, H, T, D]
            return jax.vmap(lambda f: frame_kv(kk, kn, cache["slot_frame"], start_frame, f, layer))(cand)

        ls = self.score_layer
        keys = frames_of(cache["k"], k_new[ls], ls)[:, 0]  # batch element 0: [C + 1, H, T, D]
        keys = jnp.moveaxis(keys * table[ls][None, :, None, None], 1, 2).reshape(c + 1, t, h * d)
        scores = jax.vmap(lambda a, bb: segment_cosine(a, bb, n))(keys[:-1], keys[1:])  # [C, n]
        _, idx = jax.lax.top_k(-scores.reshape(-1), keep)
        idx = jnp.sort(idx)  # kept in temporal / raster order
        tok = ((idx // n) * t + (idx % n) * seg)[:, None] + jnp.arange(seg)[None]  # [keep, seg] in [C*T)
        tok = tok.reshape(-1)

        def gather(cache_x, new_x):  # one layer -> [B, keep*seg, H, D]
            fr = frames_of(cache_x, new_x)[:c]  # [C, B, H, T, D]
            return jnp.transpose(fr, (1, 0, 3, 2, 4)).reshape(b, c * t, h, d)[:, tok]

        mem_k = jax.vmap(gather)(cache["k"], k_new).astype(state["layers"]["mem_k"].dtype)
        mem_v = jax.vmap(gather)(cache["v"], v_new).astype(state["layers"]["mem_v"].dtype)
        active = self._grouped(1, start_frame, c)  # a grouped block: the buffer is (re)filled
        new = {
            "layers": {
                "mem_k": jnp.where(active, mem_k, state["layers"]["mem_k"]),
                "mem_v": jnp.where(active, mem_v, state["layers"]["mem_v"]),
            },
            "mem_count": jnp.where(active, jnp.int32(keep * seg), state["mem_count"]),
        }
        aux = {"selected": jnp.where(active, idx, -1), "scores": jnp.where(active, scores, jnp.nan)}
        return new, aux
