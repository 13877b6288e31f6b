"""Dummy Forcing (csguoh/DummyForcing): an online-once split of all heads into sink / local / dummy heads.

Composition (defaults = the official Self Forcing config: ``ar_start 1, local_context_length 1, num_dummy 180``
of 360 heads):

* cache: 1 sink frame + a ring of ``C * local_context_length`` frames (the upstream ``local_k`` of
  ``3 * HW * local_context_length`` tokens; ``C`` = frames per chunk, 3 upstream);
* before the switch (chunks ``<= ar_start``): every head reads what that cache holds (the sink frame + the
  last ``C * L`` frames) and the current chunk, as upstream;
* head partition, online once, at the clean (t = 0) pass of chunk ``ar_start``, in ``select``:
  - per layer, ``max(1, T // 3)`` query rows of the current chunk (``T`` tokens per frame; upstream: HW/3 rows
    drawn at random with replacement from the chunk; here a deterministic stride subsample, rows
    ``floor(i * C * T / R)``, ``i < R``, evenly spread over the chunk's frames);
  - softmax of ``q . k / sqrt(Dh)`` over ``[sink frame | ring frames read (mid) | current chunk]``; the mean
    over the rows of each group's summed mass gives ``p_first, p_mid, p_last`` per head (``select`` aux
    ``"mass"`` ``[B, H, 3]``, zeros in every other call);
* global programming over all heads of all layers, in ``on_write`` of that chunk (batch element 0, as
  upstream): ``p0 = p_first / sum over all heads of p_first``, ``p1 = p_mid / sum of p_mid`` (upstream
  normalises each group over the ``L * H`` heads, not per head), ``cost = max(p0, p1)``; the ``num_dummy``
  lowest-cost heads (ties to the lower ``layer * H + head``) are dummy; of the others ``p0 < p1`` -> local,
  else sink. Stored in ``state["layers"]["group"]`` ``int32 [L, H]`` (0 sink, 1 local, 2 dummy) and reused
  for every later chunk;
* after the switch (chunks ``> ar_start``): sink heads read the first frame, dummy heads the last history
  frame, local heads the last ``C * L`` frames; every head also reads the current chunk;
* RoPE: absolute (no re-indexing), as upstream.

Deviation: upstream also shrinks each head group's *storage* (sink and dummy heads keep one frame); our cache
is one fixed-shape tensor for all heads, so the saving here is attention work, the resident cache stays
``1 + C * L`` frames (already far below a full cache). For LongLive (``ar_start 2``) upstream's "first"
group is the first 3 frames (``HW = L`` in its classifier); here it is always the 1-frame sink.
"""

from __future__ import annotations

import dataclasses

import jax
import jax.numpy as jnp
import numpy as np

from fkv_jax.attention.selection import Selection, pack_mask
from fkv_jax.policies.base import Call, Policy
from fkv_jax.policies.retain import recent_slots, sink_slots, window_geometry

SINK, LOCAL, DUMMY = 0, 1, 2


def sample_rows(num_queries: int, num_rows: int) -> np.ndarray:
    """Deterministic stride subsample: ``num_rows`` query indices evenly spread over ``num_queries``."""
    r = max(1, min(num_rows, num_queries))
    return (np.arange(r) * num_queries) // r


def group_masses(
    q: jax.Array, k_chunk: jax.Array, cache_k: jax.Array, first: jax.Array, mid: jax.Array, rows: np.ndarray
) -> jax.Array:
    """Mean attention mass per head on [first slots | mid slots | own chunk]: float32 [B, H, 3].

    q, k_chunk: [B, C*T, H, D] rotated; cache_k: [B, H, N, T, D]; first, mid: bool [N] (disjoint);
    rows: the query rows used. The softmax runs over the union of the three groups.
    """
    b, _, h, d = q.shape
    n, t = cache_k.shape[2], cache_k.shape[3]
    qs = q[:, rows].astype(jnp.float32) / np.sqrt(d)  # [B, R, H, D]
    s_cache = jnp.einsum("brhd,bhntd->bhrnt", qs, cache_k.astype(jnp.float32))
    s_cache = jnp.where((first | mid)[:, None], s_cache, -jnp.inf).reshape(b, h, len(rows), n * t)
    s_chunk = jnp.einsum("brhd,bkhd->bhrk", qs, k_chunk.astype(jnp.float32))
    p = jax.nn.softmax(jnp.concatenate([s_cache, s_chunk], -1), axis=-1)
    p_slot = p[..., : n * t].reshape(b, h, len(rows), n, t).sum(-1)  # [B, H, R, N]
    p_first = (p_slot * first).sum(-1).mean(-1)
    p_mid = (p_slot * mid).sum(-1).mean(-1)
    p_last = p[..., n * t :].sum(-1).mean(-1)
    return jnp.stack([p_first, p_mid, p_last], -1)


def classify_heads(mass: jax.Array, num_dummy: int) -> tuple[jax.Array, jax.Array]:
    """Upstream's ``dynamic_head_programming``. mass: [L, H, 3] (p_first, p_mid, p_last).

    Returns (group int32 [L, H]: 0 sink, 1 local, 2 dummy; cost [L, H] = max(p0, p1)).
    """
    L, h, _ = mass.shape
    p = mass.astype(jnp.float32)
    p0 = p[..., 0] / jnp.maximum(p[..., 0].sum(), 1e-30)
    p1 = p[..., 1] / jnp.maximum(p[..., 1].sum(), 1e-30)
    cost = jnp.maximum(p0, p1)
    order = jnp.argsort(cost.reshape(-1), stable=True)
    dummy = jnp.zeros((L * h,), bool).at[order[:num_dummy]].set(True).reshape(L, h)
    group = jnp.where(dummy, DUMMY, jnp.where(p0 < p1, LOCAL, SINK)).astype(jnp.int32)
    return group, cost


@dataclasses.dataclass(frozen=True, eq=False)
class DummyForcing(Policy):
    name = "dummy_forcing"
    ar_start: int = 1
    local_context_length: int = 1
    num_dummy: int | None = None  # None: half of all heads (upstream 180 of 360)
    num_sample_rows: int | None = None  # None: T // 3 (upstream HW / 3)

    def dummies(self, num_layers: int, num_heads: int) -> int:
        n = num_layers * num_heads // 2 if self.num_dummy is None else self.num_dummy
        if not 0 <= n <= num_layers * num_heads:
            raise ValueError(f"num_dummy={n} must be in [0, {num_layers * num_heads}] (layers x heads)")
        return n

    def geometry(self, base, num_frames=None):
        if self.ar_start < 1:
            raise ValueError(
                "dummy_forcing needs ar_start >= 1: the classification compares sink and mid-context "
                "attention, which chunk 0 does not have"
            )
        if self.local_context_length < 1:
            raise ValueError("dummy_forcing needs local_context_length >= 1")
        self.dummies(base.num_layers, base.num_heads)
        c = base.frames_per_block
        return window_geometry(base, 1 + c * self.local_context_length + c, 1, None)

    def init_state(self, geom):
        return {"layers": {"group": jnp.full((geom.num_layers, geom.num_heads), LOCAL, jnp.int32)}}

    def _rows(self, c: int, t: int) -> np.ndarray:
        return sample_rows(c * t, max(1, t // 3) if self.num_sample_rows is None else self.num_sample_rows)

    def select(self, call: Call):
        geom = call.geom
        c, t = geom.frames_per_block, geom.tokens_per_frame
        b = call.q.shape[0]
        block = call.start_frame // c
        sink = sink_slots(geom, call.slot_frame) & call.visible
        last = recent_slots(call.slot_frame, call.start_frame, 1)
        local = recent_slots(call.slot_frame, call.start_frame, c * self.local_context_length)
        g = call.layer_state["group"][:, None]  # [H, 1]
        per_head = jnp.where(g == SINK, sink, jnp.where(g == DUMMY, last, local))  # [H, N]
        per_head = jnp.where(block > self.ar_start, per_head, call.visible[None])
        frames = pack_mask(jnp.broadcast_to(per_head[None, None], (b, 1, geom.num_heads, geom.num_slots)))

        mid = call.visible & ~sink
        mass = jax.lax.cond(
            call.is_clean_pass & (block == self.ar_start),
            lambda: group_masses(call.q, call.k_chunk, call.cache_k, sink, mid, self._rows(c, t)),
            lambda: jnp.zeros((b, geom.num_heads, 3), jnp.float32),
        )
        return Selection(frames=frames), {"mass": mass}

    def on_write(self, call):
        state, start_frame = call.state, call.start_frame
        L, _, h, c, _, _ = call.k_new.shape
        mass = call.clean_select["mass"][:, 0]  # [L, H, 3], batch element 0
        group, cost = classify_heads(mass, self.dummies(L, h))
        now = start_frame // c == self.ar_start
        new_group = jnp.where(now, group, state["layers"]["group"])
        return (
            {**state, "layers": {**state["layers"], "group": new_group}},
            {"group": new_group, "cost": jnp.where(now, cost, jnp.nan)},
        )
