"""A user-written policy, composed from the library's parts in a file of its own (the README example)."""

import pytest
import dataclasses

import jax.numpy as jnp
import numpy as np

import fkv_jax
from fkv_jax.attention.selection import Selection, pack_mask
from fkv_jax.policies import Policy, importance_budgets
from fkv_jax.policies.retain import sink_slots, window_geometry
from fkv_jax.policies.scores import key_diversity


# --- README example: sink + per-frame top-k by key diversity with importance budgets --------------------
@dataclasses.dataclass(frozen=True, eq=False)
class SinkDiverseTopK(Policy):
    importance: np.ndarray = None  # [L, H] head importance
    window: int = 12  # frames the physical cache spans (upstream counting)
    sink: int = 1
    min_budget: int = 1  # extra history frames per head, on top of the sink
    max_budget: int = 4

    def geometry(self, base, num_frames=None):
        return window_geometry(base, self.window, self.sink, None)

    def select(self, call):
        budgets = importance_budgets(self.importance, self.min_budget, self.max_budget)  # [L, H] numpy
        div = key_diversity(call.cache_k[0], call.visible)  # [H, N] (batch 0 scores the batch)
        div = jnp.where(call.visible & ~sink_slots(call.geom, call.slot_frame), div, -jnp.inf)
        rank = (-div).argsort(-1).argsort(-1)  # 0 = most diverse
        keep = (rank < jnp.asarray(budgets)[call.layer][:, None]) & jnp.isfinite(div)
        keep = keep | sink_slots(call.geom, call.slot_frame)[None]  # [H, N]
        b = call.q.shape[0]
        return Selection(frames=pack_mask(jnp.broadcast_to(keep[None, None], (b, 1, *keep.shape)))), None


# ---------------------------------------------------------------------------------------------------------


@pytest.mark.slow
def test_user_policy_runs_in_the_sampler_and_honours_budgets():
    from flax import nnx

    cfg = fkv_jax.model_preset("tiny")
    graphdef, params = nnx.split(fkv_jax.init_model(cfg, seed=0), nnx.Param)
    imp = np.array([[0.0, 1.0], [0.5, 0.25]])
    pol = SinkDiverseTopK(importance=imp)
    s = fkv_jax.Sampler(graphdef, cfg, fkv_jax.sampler_preset("self_forcing"), batch=1, latent_hw=(8, 12), policy=pol)
    rng = np.random.default_rng(0)
    reads = []

    def count(blk, r):
        reads.append(blk)

    res = fkv_jax.rollout(
        s,
        params,
        [rng.standard_normal((1, 4, 64), np.float32)],
        rng.standard_normal((1, 18, 16, 8, 12), np.float32),
        on_chunk=count,
    )
    assert np.isfinite(res.latents).all() and s.trace_count == 1 and len(reads) == 6
    # budgets: importance 0 -> 1 extra frame, 1 -> 4 extra frames (min-max normalised, squared)
    np.testing.assert_array_equal(importance_budgets(imp, 1, 4), [[1, 4], [2, 1]])
    # the selection on the final cache reads the sink + exactly `budget` history frames per head
    from fkv_jax.attention.selection import to_slot_mask
    from fkv_jax.cache.kv_cache import visible_slots
    from fkv_jax.policies.base import Call

    cache = res.cache
    start = jnp.int32(18)
    call = Call(
        layer=0,
        step=jnp.int32(0),
        num_steps=4,
        start_frame=start,
        q=jnp.zeros((1, 72, 2, 64)),
        k_chunk=None,
        v_chunk=None,
        cache_k=cache["k"][0],
        cache_v=cache["v"][0],
        slot_frame=cache["slot_frame"],
        visible=visible_slots(s.geom, cache, start),
        layer_state=None,
        state=None,
        geom=s.geom,
    )
    read = np.asarray(to_slot_mask(pol.select(call)[0], s.geom.num_slots))[0, 0]
    np.testing.assert_array_equal(read.sum(-1), [1 + 1, 1 + 4])


def test_policies_holding_arrays_hash_and_compare_by_value():
    """One convention: frozen, eq=False dataclasses hashed by value (arrays by bytes), so equal
    configurations share compiled steps and differing arrays never collide."""
    from fkv_jax.policies import FocusedForcing, ForcingKV, HeadTable

    t1 = HeadTable(np.array([[True, False], [False, True]]))
    t2 = HeadTable(np.array([[True, False], [False, True]]))
    t3 = HeadTable(np.array([[False, False], [False, True]]))
    a, b, c = ForcingKV(head_table=t1), ForcingKV(head_table=t2), ForcingKV(head_table=t3)
    assert a == b and hash(a) == hash(b) and a is not b
    assert a != c and {a: 1, c: 2}[b] == 1
    imp = np.array([[0.0, 1.0], [0.5, 0.25]])
    f1, f2 = FocusedForcing(importance=imp), FocusedForcing(importance=imp.copy())
    assert f1 == f2 and hash(f1) == hash(f2)
    assert f1 != FocusedForcing(importance=imp * 2) and f1 != FocusedForcing(importance=imp, min_budget=1)
    assert ForcingKV() != FocusedForcing()
    user = SinkDiverseTopK(importance=imp)  # the README's user policy, declared the same way
    assert user == SinkDiverseTopK(importance=imp.copy()) and user != SinkDiverseTopK(importance=imp, window=9)
