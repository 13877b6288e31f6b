"""Focused Forcing (Self Forcing variant): per (query frame, head) history selection with importance budgets.

Composition (defaults and behaviour of the authors' code, Self Forcing variant):

* cache: a window of ``local_attn_size`` frames with ``sink_size`` sink frames (21 / 15): the history is
  the sink plus the previous chunk, ``N - C = 18`` frames once the window is full;
* RoPE handler: at each chunk start the cached sink keys are re-rotated on their temporal channels so the
  sink starts at ``chunk start - local_attn_size`` (cumulative delta rotation, first move at chunk 8);
* scorers, once the window is full (chunk index >= local_attn_size / C - 1):
  - attention: queries and history keys pooled in ``pooled_tokens`` contiguous token groups as
    0.5 mean + 0.5 max, score = mean over group pairs of pooled q.k / sqrt(Dh), z-scored over the 18
    history frames as (A - mean) * rsqrt(var + 1e-6), per query frame and head, in every call;
  - diversity: minus the cosine of each history frame's keys to the mean key, z-scored as
    (D - mean) / (std + 1e-6), computed once per chunk (after the roll) for every layer;
  - S = attn_weight * A_z + (1 - attn_weight) * D_z;
* budget allocator: b = round(min + x^2 (max - min)) per (layer, head) from min-max normalised importance
  (Python rounding, half to even); the budget counts the 3 current frames and one front frame;
* retainers: the current chunk, the best of the first 3 history frames ("front"), plus the top
  clamp(b - 4, 0, 17) of the other history frames (ties toward the older frame);
* trigger: every denoising call and the clean pass, every layer.
"""

from __future__ import annotations

import dataclasses

import jax
import jax.numpy as jnp
import numpy as np

from fkv_jax.attention.selection import Selection, pack_mask
from fkv_jax.policies.base import Call, Policy, dense_selection
from fkv_jax.policies.retain import window_geometry
from fkv_jax.policies.scores import attention_z, key_diversity, pooled_attention_z, pooled_keys, zscore_std
from fkv_jax.model.rope import shift_temporal
from fkv_jax.policies.budgets import importance_budgets

FRONT = 3  # the front frame is the best of the first 3 history frames


def history_order(slot_frame: jax.Array, start_frame: jax.Array, hist: int) -> jax.Array:
    """int32[hist]: the slots of the ``hist`` oldest filled frames before the chunk, in frame order."""
    key = jnp.where((slot_frame >= 0) & (slot_frame < start_frame), slot_frame, jnp.iinfo(jnp.int32).max)
    return jnp.argsort(key)[:hist].astype(jnp.int32)


@dataclasses.dataclass(frozen=True, eq=False)
class FocusedForcing(Policy):
    name = "focused_forcing"
    importance: np.ndarray | None = None  # float [L, H] head importance (needed unless min == max)
    local_attn_size: int = 21
    sink_size: int = 15
    min_budget: int = 4
    max_budget: int = 12
    attn_weight: float = 0.46
    pooled_tokens: int | None = None  # default: one group per latent token row (30 at 480P)
    pool_alpha: float = 0.5
    budget_gamma: float = 2.0
    sink_rerotation: bool = True

    # ---- static sizes -----------------------------------------------------------------------------
    def budgets(self, num_layers: int, num_heads: int) -> np.ndarray:
        if self.importance is None:
            if self.min_budget != self.max_budget:
                raise ValueError(
                    "focused_forcing needs per-head importance (--head-importance FILE.json) "
                    "unless min_budget == max_budget"
                )
            return np.full((num_layers, num_heads), self.min_budget, np.int32)
        imp = np.asarray(self.importance)
        if imp.shape != (num_layers, num_heads):
            raise ValueError(f"head importance has shape {imp.shape}; the model has ({num_layers}, {num_heads})")
        return importance_budgets(imp, self.min_budget, self.max_budget, self.budget_gamma)

    def geometry(self, base, num_frames=None):
        c = base.frames_per_block
        hist = self.local_attn_size - c
        if hist < FRONT + 1:
            raise ValueError(
                f"local_attn_size={self.local_attn_size} leaves {hist} history frames; need >= {FRONT + 1}"
            )
        if self.min_budget < FRONT + 1 or self.max_budget < self.min_budget:
            raise ValueError(f"need {FRONT + 1} <= min_budget <= max_budget, got {self.min_budget}, {self.max_budget}")
        self.budgets(base.num_layers, base.num_heads)
        geom = window_geometry(base, self.local_attn_size, self.sink_size, None)
        self._groups(geom)
        return geom

    def _groups(self, geom) -> int:
        if self.pooled_tokens is not None:
            groups = self.pooled_tokens
        elif geom.grid_hw is not None:
            groups = geom.grid_hw[0]  # one group per latent token row: 30 at 480P, as upstream
        else:
            raise ValueError("set pooled_tokens (the 480P default is 30 = one group per latent token row)")
        if geom.tokens_per_frame % groups:
            raise ValueError(f"pooled_tokens={groups} does not divide the {geom.tokens_per_frame} tokens of a frame")
        return groups

    # ---- state ------------------------------------------------------------------------------------
    def init_state(self, geom):
        hist = self.local_attn_size - geom.frames_per_block
        lbh = (geom.num_layers, geom.batch, geom.num_heads)
        return {
            "layers": {
                "div_z": jnp.zeros((*lbh, hist), jnp.float32),
                # the history frames' pooled keys (scores.pooled_keys), computed once per chunk: the history
                # does not change within a chunk, so no call re-reads the cache to score it
                "k_bar": jnp.zeros((*lbh, hist, geom.head_dim), jnp.float32),
            },
            "hist_slots": jnp.zeros((hist,), jnp.int32),  # history slots in frame order (once the window is full)
            "sink_pos": jnp.zeros((), jnp.int32),  # RoPE position of the first sink key
            # a size, not data: its length is the number of pooling groups, which on_chunk_start needs
            "pool_groups": jnp.zeros((self._groups(geom),), jnp.int8),
        }

    def _active(self, start_frame, c):
        return start_frame >= self.local_attn_size - c

    # ---- once per chunk: sink re-rotation, history order, key diversity ---------------------------
    def on_chunk_start(self, state, cache, start_frame):
        L, b, h, n, t, d = cache["k"].shape
        hist = state["hist_slots"].shape[0]
        c = self.local_attn_size - hist
        if self.sink_rerotation and self.sink_size:
            delta = jnp.maximum(start_frame - self.local_attn_size - state["sink_pos"], 0)
            ks = shift_temporal(cache["k"][:, :, :, : self.sink_size], delta)  # [L, B, H, S, T, D]
            cache = dict(cache, k=cache["k"].at[:, :, :, : self.sink_size].set(ks))
            state = dict(state, sink_pos=state["sink_pos"] + delta)
        order = history_order(cache["slot_frame"], start_frame, hist)
        keys = cache["k"][:, :, :, order]  # [L, B, H, hist, T, D]
        div = jax.vmap(jax.vmap(lambda k: key_diversity(k.astype(jnp.float32), jnp.ones((hist,), bool))))(keys)
        div_z = zscore_std(div, axis=-1)  # [L, B, H, hist]
        k_bar = pooled_keys(keys, state["pool_groups"].shape[0], self.pool_alpha)  # [L, B, H, hist, D]
        active = self._active(start_frame, c)
        layers = {"div_z": jnp.where(active, div_z, state["layers"]["div_z"]), "k_bar": k_bar}
        state = dict(state, hist_slots=order, layers=layers)
        return state, cache

    # ---- every call -------------------------------------------------------------------------------
    def select(self, call: Call):
        geom = call.geom
        b, sq, h, d = call.q.shape
        c, t = geom.frames_per_block, geom.tokens_per_frame
        hist_slots = call.state["hist_slots"]
        hist = hist_slots.shape[0]
        groups = self._groups(geom)
        budgets = jnp.asarray(self.budgets(geom.num_layers, geom.num_heads))[call.layer]  # [H]
        extra = jnp.clip(budgets - (c + 1), 0, hist - 1)  # [H]
        k_extra = int(np.clip(self.budgets(geom.num_layers, geom.num_heads).max() - (c + 1), 0, hist - 1))

        attn_z = attention_z(
            call.q.reshape(b, c, t, h, d), call.layer_state["k_bar"], groups, self.pool_alpha
        )  # [B, C, H, hist]
        score = self.attn_weight * attn_z + (1 - self.attn_weight) * call.layer_state["div_z"][:, None]
        front = jnp.argmax(score[..., :FRONT], axis=-1)  # [B, C, H], first maximum on ties
        pos = jnp.arange(hist)
        rest = jnp.where(pos == front[..., None], -jnp.inf, score)
        _, top = jax.lax.top_k(rest, k_extra) if k_extra else (None, jnp.zeros((b, c, h, 0), jnp.int32))
        keep_top = jnp.arange(k_extra) < extra[None, None, :, None]  # [1, 1, H, k_extra]
        chosen = (pos == front[..., None]) | jnp.any(
            (top[..., None] == pos) & keep_top[..., None], axis=-2
        )  # [B, C, H, hist]
        slot_mask = jnp.zeros((b, c, h, geom.num_slots), bool).at[..., hist_slots].set(chosen)
        sel_frames = pack_mask(slot_mask, 1 + k_extra)
        dense = dense_selection(call, call.visible)
        active = self._active(call.start_frame, c)
        k_max = max(geom.num_slots, 1 + k_extra)

        def pad(f):
            return jnp.pad(f, ((0, 0), (0, 0), (0, 0), (0, k_max - f.shape[-1])), constant_values=-1)

        frames = jnp.where(
            active, pad(sel_frames), pad(jnp.broadcast_to(dense.frames, (b, 1, h, dense.frames.shape[-1])).repeat(c, 1))
        )
        aux = {"attn_z": attn_z, "selected": jnp.where(active, slot_mask, False)}
        return Selection(frames=frames), aux


@dataclasses.dataclass(frozen=True, eq=False)
class FocusedForcingLongLive(FocusedForcing):
    """Focused Forcing, LongLive variant: frames of the current chunk can be pruned too.

    Per (query frame, head) it keeps the front frame (best of the first 3 history frames) and the query's
    own frame; the remaining ``budget - 2`` are split between the other history frames and the other frames
    of the chunk as ``prefix = need * n_prefix // (n_prefix + n_tail)`` (the rest to the chunk), each part
    filled by score. LongLive's absolute RoPE is kept (no sink re-rotation). Scores are computed per call
    over history and chunk frames together (diversity too, since the chunk's keys change every call).
    Assumptions (no reference run of this variant exists): the z-scores span history + chunk frames, and
    the chunk part is ranked by the same score S as the history.
    """

    name = "focused_forcing_longlive"
    local_attn_size: int = 12
    sink_size: int = 3
    active_from_chunk: int = 6
    sink_rerotation: bool = False

    def _active(self, start_frame, c):
        return start_frame >= self.active_from_chunk * c

    def on_chunk_start(self, state, cache, start_frame):
        hist = state["hist_slots"].shape[0]
        return dict(state, hist_slots=history_order(cache["slot_frame"], start_frame, hist)), cache

    def select(self, call: Call):
        geom = call.geom
        b, sq, h, d = call.q.shape
        c, t = geom.frames_per_block, geom.tokens_per_frame
        hist_slots = call.state["hist_slots"]
        hist = hist_slots.shape[0]
        groups = self._groups(geom)
        budgets = jnp.asarray(self.budgets(geom.num_layers, geom.num_heads))[call.layer]  # [H]
        need = jnp.clip(budgets - 2, 0, hist - 1 + c - 1)
        n_prefix, n_tail = hist - 1, c - 1
        prefix_q = need * n_prefix // (n_prefix + n_tail)
        tail_q = jnp.minimum(need - prefix_q, n_tail)

        kc = jnp.moveaxis(call.k_chunk.reshape(b, c, t, h, d), 3, 1).astype(jnp.float32)  # [B, H, C, T, D]
        kh = call.cache_k[:, :, hist_slots].astype(jnp.float32)  # [B, H, hist, T, D]
        keys = jnp.concatenate([kh, kc], axis=2)  # [B, H, hist + C, T, D] candidates
        attn_z = pooled_attention_z(call.q.reshape(b, c, t, h, d), keys, groups, self.pool_alpha)
        div = jax.vmap(lambda k: key_diversity(k, jnp.ones((hist + c,), bool)))(keys)  # [B, H, hist + C]
        score = self.attn_weight * attn_z + (1 - self.attn_weight) * zscore_std(div, axis=-1)[:, None]

        pos = jnp.arange(hist + c)
        front = jnp.argmax(score[..., :FRONT], axis=-1)  # [B, C, H]
        own = hist + jnp.arange(c)[None, :, None]  # [1, C, 1]
        fixed = (pos == front[..., None]) | (pos == own[..., None])  # [B, C, H, hist + C]
        is_prefix = pos < hist

        def top_in(group, quota):
            s = jnp.where(group & ~fixed, score, -jnp.inf)
            rank = (-s).argsort(-1, stable=True).argsort(-1, stable=True)
            return (rank < quota[None, None, :, None]) & jnp.isfinite(s)

        chosen = fixed | top_in(is_prefix, prefix_q) | top_in(~is_prefix, tail_q)
        slot_mask = jnp.zeros((b, c, h, geom.num_slots), bool).at[..., hist_slots].set(chosen[..., :hist])
        k_max = geom.num_slots
        active = self._active(call.start_frame, c)
        dense = jnp.broadcast_to(call.visible, (b, c, h, geom.num_slots))
        frames = pack_mask(jnp.where(active, slot_mask, dense), k_max)
        chunk_mask = jnp.where(active, chosen[..., hist:], True)
        aux = {"attn_z": attn_z, "selected": jnp.where(active, chosen, False)}
        return Selection(frames=frames, chunk_mask=chunk_mask), aux
