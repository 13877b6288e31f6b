"""Forcing-KV against the official code's run (tests/data/policies/forcing_kv_tiny*), plus hand-built cases."""

import dataclasses

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from helpers import DATA, load_policy_fixture, rel_err, run_reference_rollout
from fkv_jax.attention.selection import to_slot_mask
from fkv_jax.policies import ForcingKV, HeadTable, SinkWindow, make_policy

P = DATA / "policies"


@pytest.fixture(scope="module")
def fkv():
    return load_policy_fixture("forcing_kv_tiny")


run = run_reference_rollout


@pytest.mark.slow
def test_matches_official_code(fkv):
    policy = make_policy("forcing_kv", head_table=P / "forcingkv_heads_tiny.json", num_layers=4, num_heads=2)
    assert policy.ar_start == 2 and policy.sink_size == 1 and policy.num_frame_patch == 6
    outs = []
    s, res = run(fkv, policy, outs)
    ref = fkv[3]
    assert rel_err(res.latents, ref["latents_forcingkv"]) <= 1e-4
    for b in range(7):
        assert rel_err(outs[b].flows[0], ref["first_step_flow_forcingkv"][b]) <= 1e-4
        np.testing.assert_array_equal(outs[b].write_aux["selected"], ref["dyn_selected"][b])
        np.testing.assert_allclose(outs[b].write_aux["scores"], ref["dyn_scores"][b], atol=1e-5)
    assert s.trace_count == 1
    # the physical cache is sink 1 + anchor 1 frame, plus a one-frame segment buffer per layer
    assert (s.geom.sink, s.geom.ring) == (1, 1)
    assert res.state["layers"]["mem_k"].shape == (4, 1, 24, 2, 64)


@pytest.mark.slow
def test_all_static_equals_sink_plus_anchor_window(fkv):
    """Every head static (no segment buffer is read) == a plain sink 1 + 1-frame window."""
    _, a = run(fkv, ForcingKV(head_table=HeadTable.all_static(4, 2)))
    _, b = run(fkv, SinkWindow(local_attn_size=5, sink_size=1))
    np.testing.assert_array_equal(a.latents, b.latents)


@pytest.mark.slow
def test_selection_per_head_on_a_hand_built_cache(fkv):
    """Grouped layer: static heads read sink + last frame; dynamic heads also the memory tokens."""
    from fkv_jax.cache.kv_cache import CacheGeometry, init_cache, write
    from fkv_jax.policies.base import Call

    table = HeadTable(np.array([[True, False], [False, True]]))
    pol = ForcingKV(head_table=table, ar_start=0)
    base = CacheGeometry.from_upstream(
        local_attn_size=-1,
        sink_size=0,
        frames_per_block=3,
        num_layers=2,
        batch=1,
        tokens_per_frame=6,
        num_heads=2,
        head_dim=4,
        capacity_frames=30,
    )
    geom = pol.geometry(base)
    cache = init_cache(geom)
    for blk in range(3):
        kv = jnp.ones((2, 1, 2, 3, 6, 4)) * (blk + 1)  # [L, B, H, C, T, D]
        cache = write(geom, cache, kv, kv, jnp.int32(3 * blk))
    state = pol.init_state(geom)
    state["mem_count"] = jnp.int32(state["layers"]["mem_k"].shape[2])
    q = jnp.zeros((1, 18, 2, 4))
    for layer, expect_mem in ((0, [False, False]), (1, [False, True])):
        call = Call(
            layer=jnp.int32(layer),
            step=jnp.int32(0),
            num_steps=4,
            start_frame=jnp.int32(9),
            q=q,
            k_chunk=q,
            v_chunk=q,
            cache_k=cache["k"][layer],
            cache_v=cache["v"][layer],
            slot_frame=cache["slot_frame"],
            visible=jnp.ones((2,), bool),
            layer_state=jax.tree.map(lambda x: x[layer], state["layers"]),
            state=state,
            geom=geom,
        )
        sel, _ = pol.select(call)
        held = np.asarray(cache["slot_frame"])
        read = np.asarray(to_slot_mask(sel, geom.num_slots))[0, 0]  # [H, N]
        for h in range(2):
            assert sorted(held[read[h]]) == [0, 8]  # the sink frame and the anchor (last frame)
        np.testing.assert_array_equal(np.asarray(sel.mem_valid)[0].any(-1), expect_mem)


def test_keep_count_must_match_the_buffer():
    from fkv_jax.cache.kv_cache import CacheGeometry

    pol = ForcingKV(sim_retention_ratio=0.5)
    g = CacheGeometry.from_upstream(
        local_attn_size=-1,
        sink_size=0,
        frames_per_block=3,
        num_layers=2,
        batch=1,
        tokens_per_frame=24,
        num_heads=2,
        head_dim=4,
        capacity_frames=9,
    )
    with pytest.raises(ValueError, match="must equal dynamic_context_length"):
        pol.geometry(g)
    with pytest.raises(ValueError, match="do not split into num_frame_patch=5"):
        dataclasses.replace(pol, num_frame_patch=5).geometry(g)
