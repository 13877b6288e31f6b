"""Dummy Forcing, Deep Forcing and the token-memory LLM baselines (H2O, SnapKV, R-KV).

Hand-built caches with planted keys / attention where the right answer is known, then one short rollout of
each policy (static shapes: one trace for every chunk).
"""

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from flax import nnx

import fkv_jax
from fkv_jax.attention.selection import to_slot_mask
from fkv_jax.cache.kv_cache import CacheGeometry, init_cache, visible_slots, write
from fkv_jax.model.rope import apply_rope, chunk_cos_sin, make_rope_tables
from fkv_jax.policies import POLICIES, DeepForcing, DummyForcing, Full, H2O, RKV, SnapKV, make_policy
from fkv_jax.policies.base import Call, WriteCall
from fkv_jax.sampling.rollout import rollout
from fkv_jax.model.rope import shift_temporal
from fkv_jax.policies.dummy_forcing import DUMMY, LOCAL, SINK, classify_heads
from fkv_jax.policies.token_memory import attention_mass, mean_cosine_to_others, pool1d, resident_bytes

NEW = ("dummy_forcing", "deep_forcing", "h2o", "snapkv", "rkv")


# ---- helpers ------------------------------------------------------------------------------------------
def geometry(policy, *, c=2, t=4, h=2, d=8, layers=1):
    base = CacheGeometry.from_upstream(
        local_attn_size=-1,
        sink_size=0,
        frames_per_block=c,
        num_layers=layers,
        batch=1,
        tokens_per_frame=t,
        num_heads=h,
        head_dim=d,
        capacity_frames=64,
        grid_hw=(2, t // 2),
    )
    return policy.geometry(base)


def stack_chunk(frames):
    """Per-frame keys [L, B, T, H, D] -> one chunk in the cache layout [L, B, H, C, T, D]."""
    return jnp.moveaxis(jnp.stack(frames, axis=2), 4, 2)


def filled_cache(geom, frames, keys):
    """Write ``frames`` (a multiple of C) of K = V = keys[f] ([L, B, T, H, D] each) chunk by chunk."""
    cache = init_cache(geom)
    c = geom.frames_per_block
    for s in range(0, frames, c):
        kv = stack_chunk([keys[f] for f in range(s, s + c)])
        cache = write(geom, cache, kv, kv, jnp.int32(s))
    return cache


def random_keys(geom, n, scale=0.1, seed=0):
    rng = np.random.default_rng(seed)
    shape = (geom.num_layers, 1, geom.tokens_per_frame, geom.num_heads, geom.head_dim)
    return [jnp.asarray(scale * rng.standard_normal(shape), jnp.float32) for _ in range(n)]


def kept(state, layer=0, head=0):
    """Origin (frame * T + token) of the valid memory entries of one head."""
    ls = jax.device_get(state["layers"])
    return sorted(int(s) for s, ok in zip(ls["mem_src"][layer, 0, head], ls["mem_valid"][layer, 0, head]) if ok)


_JIT = {}


def jitted(policy, method):
    """One compiled ``policy.<method>`` per policy configuration (policies are frozen, hashable dataclasses)."""
    key = (policy, method)
    if key not in _JIT:
        _JIT[key] = jax.jit(getattr(policy, method))
    return _JIT[key]


def write_chunk(policy, geom, cache, state, keys, start, q):
    """on_write of the chunk at ``start`` whose K = V = keys[start..start+C-1] and clean queries ``q``."""
    c = geom.frames_per_block
    kv = stack_chunk([keys[f] for f in range(start, start + c)])
    return jitted(policy, "on_write")(WriteCall(state, cache, kv, kv, jnp.int32(start), clean_select=None, clean_q=q))


# ---- H2O / SnapKV / R-KV ------------------------------------------------------------------------------
def planted(geom, frames=6, seed=0):
    """Keys with one attention magnet per head: head 0 at frame 2 token 1, head 1 at frame 3 token 2; the
    chunk's queries all point along e_0, so the magnet (20 e_0) takes nearly all the mass."""
    keys = random_keys(geom, frames, seed=seed)
    e0 = jnp.zeros(geom.head_dim).at[0].set(1.0)
    keys[2] = keys[2].at[:, :, 1, 0].set(20 * e0)
    keys[3] = keys[3].at[:, :, 2, 1].set(20 * e0)
    q = jnp.broadcast_to(
        e0, (geom.num_layers, 1, geom.frames_per_block * geom.tokens_per_frame, geom.num_heads, geom.head_dim)
    )
    return keys, q


@pytest.mark.parametrize("cls", [H2O, SnapKV, RKV])
def test_attention_magnet_is_kept(cls):
    pol = (
        cls(sink_size=1, recent_frames=2, memory_frames=1.0, kernel_size=1)
        if cls is not H2O
        else cls(sink_size=1, recent_frames=2, memory_frames=1.0)
    )
    geom = geometry(pol)
    keys, q = planted(geom)
    cache = filled_cache(geom, 4, keys)  # sink: frame 0; ring: frames 2, 3
    state, aux = write_chunk(pol, geom, cache, pol.init_state(geom), keys, 4, q)  # frames 2, 3 leave the ring
    t = geom.tokens_per_frame
    assert 2 * t + 1 in kept(state, head=0) and 3 * t + 2 in kept(state, head=1)
    # budget: exactly M = T tokens per head, all from the evicted frames 2 and 3
    np.testing.assert_array_equal(aux["kept_per_head"], [[[t, t]]])
    assert all(2 * t <= s < 4 * t for h in range(2) for s in kept(state, head=h))
    # the kept keys are the candidates' keys
    ls = state["layers"]
    i = int(np.flatnonzero(np.asarray(ls["mem_src"][0, 0, 0]) == 2 * t + 1)[0])
    np.testing.assert_array_equal(ls["mem_k"][0, 0, i, 0], keys[2][0, 0, 1, 0])


def test_pool1d_and_redundancy_parts():
    x = jnp.array([[0.0, 1, 5, 2, 0, 0, 3]])
    np.testing.assert_allclose(pool1d(x, 3, "max"), [[1, 5, 5, 5, 2, 3, 3]])
    np.testing.assert_allclose(pool1d(x, 3, "avg"), [[1 / 3, 2, 8 / 3, 7 / 3, 2 / 3, 1, 1]], rtol=1e-6)  # zeros padded
    np.testing.assert_array_equal(pool1d(x, 1, "avg"), x)
    rng = np.random.default_rng(0)
    k = rng.standard_normal((1, 6, 2, 5)).astype(np.float32)
    valid = np.ones((1, 2, 6), bool)
    valid[0, 1, 4:] = False
    got = np.asarray(mean_cosine_to_others(jnp.asarray(k), jnp.asarray(valid)))
    for h in range(2):
        kk = k[0, valid[0, h], h]
        kn = kk / np.linalg.norm(kk, axis=-1, keepdims=True)
        cos = kn @ kn.T
        want = (cos.sum(1) - 1) / (len(kk) - 1)
        np.testing.assert_allclose(got[0, h, valid[0, h]], want, rtol=1e-5, atol=1e-6)
    assert (got[0, 1, 4:] == 0).all()


def test_snapkv_pooling_keeps_the_neighbourhood():
    """Kernel 5: the magnet's +-2 raster neighbours share its smoothed score, so M = 5 keeps exactly them."""
    pol = SnapKV(sink_size=1, recent_frames=2, memory_frames=5 / 8, kernel_size=5, pooling="avg")
    geom = geometry(pol, t=8)
    keys, q = planted(geom)
    keys[2] = keys[2].at[:, :, 4, 0].set(keys[2][:, :, 1, 0]).at[:, :, 1, 0].set(0.0)  # magnet at token 4
    cache = filled_cache(geom, 4, keys)
    state, _ = write_chunk(pol, geom, cache, pol.init_state(geom), keys, 4, q)
    assert kept(state, head=0) == [16 + 2, 16 + 3, 16 + 4, 16 + 5, 16 + 6]


def test_h2o_accumulates_and_snapkv_does_not():
    """A memory token with a large accumulated score survives in H2O; SnapKV (this chunk only) drops it."""
    res = {}
    for cls in (H2O, SnapKV):
        pol = (
            cls(sink_size=1, recent_frames=2, memory_frames=1.0)
            if cls is H2O
            else cls(sink_size=1, recent_frames=2, memory_frames=1.0, kernel_size=1)
        )
        geom = geometry(pol)
        keys, q = planted(geom)
        cache = filled_cache(geom, 4, keys)
        st = pol.init_state(geom)
        old = jnp.zeros(geom.head_dim).at[0].set(-5.0)  # the queries ignore it now
        ls = dict(st["layers"])
        ls["mem_k"] = ls["mem_k"].at[0, 0, 0].set(old)
        ls["mem_v"] = ls["mem_v"].at[0, 0, 0].set(old)
        ls["mem_valid"] = ls["mem_valid"].at[0, 0, :, 0].set(True)
        ls["mem_src"] = ls["mem_src"].at[0, 0, :, 0].set(5)
        ls["mem_pos"] = ls["mem_pos"].at[0, 0, :, 0].set(1)
        ls["mem_score"] = ls["mem_score"].at[0, 0, :, 0].set(100.0)
        state, _ = write_chunk(pol, geom, cache, {**st, "layers": ls}, keys, 4, q)
        res[cls.name] = kept(state, head=0)
    assert 5 in res["h2o"] and 5 not in res["snapkv"]


def test_h2o_running_scores_follow_the_slots():
    pol = H2O(sink_size=1, recent_frames=2, memory_frames=1.0)
    geom = geometry(pol)
    t, c = geom.tokens_per_frame, geom.frames_per_block
    keys, q = planted(geom)
    cache = filled_cache(geom, 4, keys)
    st0 = pol.init_state(geom)
    state, _ = write_chunk(pol, geom, cache, st0, keys, 4, q)
    # the clean pass's softmax over chunk (frames 4, 5) + sink (frame 0) + ring (frames 2, 3) + empty memory
    kv = jnp.concatenate([keys[4], keys[5]], axis=2)[0]  # [B, C*T, H, D]
    m_chunk, m_cache, _ = attention_mass(
        q[0],
        kv,
        cache["k"][0],
        visible_slots(geom, cache, jnp.int32(4)),
        st0["layers"]["mem_k"][0],
        st0["layers"]["mem_valid"][0],
    )
    # token-major views: chunk [B, C, T, H], cache [B, N, T, H]
    m_chunk = np.moveaxis(np.asarray(m_chunk), 1, 2).reshape(1, c, t, 2)
    m_cache = np.moveaxis(np.asarray(m_cache), 1, 3)
    np.testing.assert_allclose(m_chunk.sum((1, 2)) + m_cache.sum((1, 2)), 1.0, rtol=1e-5)  # per head
    ss = np.moveaxis(np.asarray(state["layers"]["slot_score"])[0], 1, 3)  # [B, H, N, T] -> [B, N, T, H]
    held = list(np.asarray(cache["slot_frame"]))  # [0, 3, 2] before the write; frames 4, 5 replace 3 and 2
    np.testing.assert_allclose(ss[:, 0], m_cache[:, 0], rtol=1e-5)  # the sink keeps adding
    np.testing.assert_allclose(ss[:, held.index(2)], m_chunk[:, 0], rtol=1e-5)  # frame 4 took frame 2's slot
    np.testing.assert_allclose(ss[:, held.index(3)], m_chunk[:, 1], rtol=1e-5)  # frame 5 took frame 3's slot
    # the kept memory tokens carry the mass their frame (2 or 3) had in the ring
    ls = jax.device_get(state["layers"])
    for h in range(2):
        for i in np.flatnonzero(ls["mem_valid"][0, 0, h]):
            f, tok = divmod(int(ls["mem_src"][0, 0, h, i]), t)
            np.testing.assert_allclose(ls["mem_score"][0, 0, h, i], m_cache[0, held.index(f), tok, h], rtol=1e-5)


def test_rkv_drops_a_redundant_duplicate():
    """Head 0's evicted keys are orthogonal except a = b (duplicates). By attention a = b > c > d1 > d2 > rest:
    SnapKV keeps {a, b, c, d1}; R-KV's redundancy term costs a and b, so it keeps {a, c, d1, d2}: one copy."""
    d, t = 8, 4
    eye = jnp.eye(d)
    res = {}
    for pol in (
        SnapKV(sink_size=1, recent_frames=2, memory_frames=1.0, kernel_size=1),
        RKV(sink_size=1, recent_frames=2, memory_frames=1.0, kernel_size=1),
    ):
        geom = geometry(pol)
        keys = [jnp.zeros((1, 1, t, 2, d)) for _ in range(6)]
        keys[2] = keys[2].at[0, 0, :, 0].set(jnp.stack([eye[0], eye[0], eye[2], eye[3]]))  # a, b, rest
        keys[3] = keys[3].at[0, 0, :, 0].set(jnp.stack([eye[1], eye[4], eye[5], eye[6]]))  # c, d1, d2, rest
        q = jnp.broadcast_to(
            np.sqrt(d) * (2.2 * eye[0] + 2.0 * eye[1] + 1.0 * eye[4] + 0.9 * eye[5]), (1, 1, 2 * t, 2, d)
        )
        cache = filled_cache(geom, 4, keys)
        state, _ = write_chunk(pol, geom, cache, pol.init_state(geom), keys, 4, q)
        res[pol.name] = kept(state)
    a, b, c, d1, d2 = 2 * t, 2 * t + 1, 3 * t, 3 * t + 1, 3 * t + 2
    assert res["snapkv"] == [a, b, c, d1]
    assert res["rkv"] == [a, c, d1, d2]  # b, the redundant copy, is dropped (a wins the tie: lower index)


def test_adakv_allocator_in_token_memory():
    """Head 0 attends to the evicted frames, head 1 to its own chunk: Ada-KV moves budget to head 0."""
    pol = SnapKV(
        sink_size=1,
        recent_frames=2,
        memory_frames=1.0,
        kernel_size=1,
        allocator="adakv",
        adakv_floor=0.5,
        adakv_cap=2.0,
    )
    geom = geometry(pol)
    t = geom.tokens_per_frame
    rng = np.random.default_rng(1)
    e0 = jnp.zeros(geom.head_dim).at[0].set(1.0)
    keys = random_keys(geom, 6)
    for f in (2, 3):  # head 0's evicted keys: strong, varied logits
        keys[f] = keys[f].at[0, 0, :, 0].set(jnp.asarray(rng.uniform(2, 4, (t, 1))) * e0)
    for f in (4, 5):  # head 1's chunk keys take its attention
        keys[f] = keys[f].at[0, 0, :, 1].set(6 * e0)
    q = jnp.broadcast_to(e0, (1, 1, 2 * t, 2, geom.head_dim))
    cache = filled_cache(geom, 4, keys)
    st = pol.init_state(geom)
    assert st["layers"]["mem_k"].shape[2] == 2 * t  # per-head capacity ceil(2.0 * M)
    state, aux = write_chunk(pol, geom, cache, st, keys, 4, q)
    per_head = np.asarray(aux["kept_per_head"])[0, 0]
    assert per_head.sum() == 2 * t  # the layer's budget M * H
    assert per_head.min() >= int(0.5 * 2 * t / 2)  # the floor alpha * B / H
    assert per_head[0] > per_head[1]
    np.testing.assert_array_equal(np.asarray(state["layers"]["mem_valid"]).sum(-1)[0, 0], per_head)


# ---- Deep Forcing -------------------------------------------------------------------------------------
def roped(geom, raw, frame):
    """Keys [L, B, T, H, D] roped at ``frame`` (the model's RoPE)."""
    tables = make_rope_tables(geom.head_dim, geom.grid_hw, 64)
    cos, sin = chunk_cos_sin(tables, jnp.array([frame], jnp.int32))
    return jax.vmap(lambda x: apply_rope(x, cos, sin))(raw)


def test_shift_temporal_moves_a_key_in_time():
    g = geometry(SnapKV(), d=16)
    raw = jnp.asarray(np.random.default_rng(0).standard_normal((1, 1, 4, 2, 16)), jnp.float32)
    np.testing.assert_allclose(shift_temporal(roped(g, raw, 3), 7), roped(g, raw, 10), atol=1e-5)


def test_deep_forcing_compression_and_rope_layout():
    # S = 1, C_f = 1, R = 2: N = 4 frames of history; C = 2 frames per chunk, T = 4
    pol = DeepForcing(sink_size=1, recent_frames=2, memory_frames=1)
    geom = geometry(pol, d=16)
    t, c = geom.tokens_per_frame, geom.frames_per_block
    rng = np.random.default_rng(0)
    raw = [jnp.asarray(0.1 * rng.standard_normal((1, 1, t, 2, 16)), jnp.float32) for _ in range(8)]
    # head 0's magnet: frame 3, token 2 (grid row 1, column 0) along channel 12, a width channel that RoPE
    # leaves alone at column 0; every recent query points along it
    e12 = jnp.zeros(16).at[12].set(1.0)
    raw[3] = raw[3].at[0, 0, 2, 0].set(30 * e12)
    keys = [roped(geom, raw[f], f) for f in range(8)]
    q = jnp.broadcast_to(e12, (1, 1, c * t, 2, 16))
    state = pol.init_state(geom)
    cache = init_cache(geom)
    for start in (0, 2, 4):
        state, cache = jitted(pol, "on_chunk_start")(state, cache, jnp.int32(start))
        state, _ = write_chunk(pol, geom, cache, state, keys, start, q)
        kv = stack_chunk([keys[f] for f in range(start, start + c)])
        cache = write(geom, cache, kv, kv, jnp.int32(start))
        ls = jax.device_get(state["layers"])
        if start == 0:  # nothing has left the window yet
            assert kept(state) == []
        if start == 2:  # frame 1 left the ring; it fits the memory: kept whole, at its own position
            assert kept(state) == list(range(t, 2 * t)) and (ls["mem_pos"][0, 0, 0, :t] == 1).all()
    # the write at 4: candidates = memory (frame 1) + frames 2, 3 leaving the ring -> one frame's worth kept
    assert 3 * t + 2 in kept(state, head=0)
    assert len(kept(state, head=0)) == t and len(kept(state, head=1)) == t
    # RoPE: next chunk starts at 6, recent frames 4, 5; the memory sits at 6 - 2 - 1 = 3 (one frame's worth)
    ls = jax.device_get(state["layers"])
    assert (ls["mem_pos"][0, 0][ls["mem_valid"][0, 0]] == 3).all()
    # each kept key is its raw key roped at position 3 (temporal channels moved, spatial kept)
    for h in range(2):
        for i in np.flatnonzero(ls["mem_valid"][0, 0, h]):
            src = int(ls["mem_src"][0, 0, h, i])
            f, tok = divmod(src, t)
            want = roped(geom, raw[f], 3)[0, 0, tok, h]
            np.testing.assert_allclose(ls["mem_k"][0, 0, i, h], want, atol=1e-5)
    # the recent queries' per-frame sums are stored for frames 4, 5
    np.testing.assert_array_equal(np.sort(np.asarray(state["q_frame"])), [4, 5])
    # the sink moves at the next chunk start: frame 0 sits just before the memory, at 6 - 4 = 2
    state2, cache2 = jitted(pol, "on_chunk_start")(state, cache, jnp.int32(6))
    assert int(state2["sink_pos"]) == 2
    np.testing.assert_allclose(cache2["k"][:, :, :, 0], jnp.moveaxis(roped(geom, raw[0], 2), 3, 2), atol=1e-5)
    np.testing.assert_array_equal(cache2["k"][:, :, :, 1:], cache["k"][:, :, :, 1:])


def test_deep_forcing_options_are_checked():
    with pytest.raises(ValueError, match="whole number"):
        geometry(DeepForcing(memory_frames=1.5))
    with pytest.raises(ValueError, match="uniform"):
        geometry(DeepForcing(allocator="adakv"))
    assert DeepForcing().window_frames == 16


# ---- Dummy Forcing ------------------------------------------------------------------------------------
def test_dummy_classification_on_planted_masses():
    mass = jnp.array([[[0.6, 0.1, 0.3], [0.1, 0.6, 0.3]], [[0.05, 0.05, 0.9], [0.3, 0.2, 0.5]]])
    group, cost = classify_heads(mass, 1)
    # p0 = p_first / 1.05, p1 = p_mid / 0.95 over all heads; the lowest max(p0, p1) is dummy
    np.testing.assert_array_equal(group, [[SINK, LOCAL], [DUMMY, SINK]])
    np.testing.assert_allclose(cost, [[0.6 / 1.05, 0.6 / 0.95], [0.05 / 0.95, 0.3 / 1.05]], rtol=1e-6)
    np.testing.assert_array_equal(classify_heads(mass, 0)[0], [[SINK, LOCAL], [LOCAL, SINK]])
    assert (classify_heads(mass, 4)[0] == DUMMY).all()


def dummy_select(pol, geom, cache, state, start, step, q, k_chunk):
    """``pol.select`` of layer 0 on a hand-built cache, compiled once per (policy, geometry)."""
    key = (pol, geom, "select")
    if key not in _JIT:

        def f(ck, cv, sf, ls, start, step, q, k_chunk):
            call = Call(
                layer=jnp.int32(0),
                step=step,
                num_steps=4,
                start_frame=start,
                q=q,
                k_chunk=k_chunk,
                v_chunk=k_chunk,
                cache_k=ck,
                cache_v=cv,
                slot_frame=sf,
                visible=visible_slots(geom, {"slot_frame": sf}, start),
                layer_state=ls,
                state={},
                geom=geom,
            )
            return pol.select(call)

        _JIT[key] = jax.jit(f)
    return _JIT[key](
        cache["k"][0],
        cache["v"][0],
        cache["slot_frame"],
        jax.tree.map(lambda x: x[0], state["layers"]),
        jnp.int32(start),
        jnp.int32(step),
        q,
        k_chunk,
    )


def test_dummy_masses_selection_and_switch():
    pol = DummyForcing(ar_start=1, local_context_length=1, num_dummy=1)
    c, t, d = 3, 6, 8
    geom = geometry(pol, c=c, t=t, d=d)
    assert (geom.sink, geom.ring) == (1, 3)
    e0, e1 = jnp.eye(d)[0], jnp.eye(d)[1]
    keys = random_keys(geom, 12)
    keys[0] = keys[0].at[0, 0, :, 0].set(8 * e0)  # head 0 looks at the sink frame
    keys[2] = keys[2].at[0, 0, :, 1].set(8 * e1)  # head 1 looks at the mid context
    cache = filled_cache(geom, 3, keys)  # chunk 0 written; chunk 1 (frames 3..5) is being generated
    state = pol.init_state(geom)
    q = jnp.broadcast_to(jnp.stack([e0, e1]), (1, c * t, 2, d))
    k_chunk = jnp.zeros((1, c * t, 2, d))
    sel, aux = dummy_select(pol, geom, cache, state, 3, 4, q, k_chunk)  # clean pass of chunk 1
    m = np.asarray(aux["mass"])[0]  # [H, 3]
    assert m[0].argmax() == 0 and m[1].argmax() == 1
    np.testing.assert_allclose(m.sum(-1), 1.0, rtol=1e-5)
    _, aux0 = dummy_select(pol, geom, cache, state, 3, 0, q, k_chunk)  # a denoising call: no work
    assert not np.asarray(aux0["mass"]).any()
    # before the switch every head reads the whole cache (sink + ring)
    read = np.asarray(to_slot_mask(sel, geom.num_slots))[0, 0]
    held = np.asarray(cache["slot_frame"])
    assert [sorted(held[read[h]]) for h in range(2)] == [[0, 1, 2], [0, 1, 2]]
    # on_write classifies at chunk ar_start only (one layer: with num_dummy = 1 the cheaper head is dummy)
    kv = stack_chunk(keys[3:6])
    clean = {"mass": aux["mass"][None]}
    st1, waux = jitted(pol, "on_write")(WriteCall(state, cache, kv, kv, jnp.int32(3), clean_select=clean))
    p0, p1 = m[:, 0] / m[:, 0].sum(), m[:, 1] / m[:, 1].sum()
    cost = np.maximum(p0, p1)
    want = [DUMMY if h == cost.argmin() else (LOCAL if p0[h] < p1[h] else SINK) for h in range(2)]
    np.testing.assert_array_equal(st1["layers"]["group"][0], want)
    st_other, _ = jitted(pol, "on_write")(
        WriteCall(state, cache, kv, kv, jnp.int32(6), clean_select=clean)
    )  # another chunk: unchanged
    np.testing.assert_array_equal(st_other["layers"]["group"], state["layers"]["group"])
    # after the switch: sink head -> frame 0, dummy head -> last frame, local head -> last C * L frames
    cache = filled_cache(geom, 9, keys)
    for groups, expect in (([SINK, DUMMY], [[0], [8]]), ([LOCAL, SINK], [[6, 7, 8], [0]])):
        st = {"layers": {"group": jnp.array([groups], jnp.int32)}}
        sel, _ = dummy_select(pol, geom, cache, st, 9, 0, q, k_chunk)
        read = np.asarray(to_slot_mask(sel, geom.num_slots))[0, 0]
        held = np.asarray(cache["slot_frame"])
        assert [sorted(held[read[h]].tolist()) for h in range(2)] == expect


# ---- registry, presets, rollouts, memory ---------------------------------------------------------------
def test_registered_with_presets():
    for name in NEW:
        assert name in POLICIES
        pol = make_policy(name)
        assert pol.name == name
    assert make_policy("deep_forcing").window_frames == 16
    assert make_policy("dummy_forcing").num_dummy is None
    assert make_policy("snapkv", {"allocator": "adakv", "layer_schedule": "pyramid"}).allocator == "adakv"


SMALL = {
    "dummy_forcing": {},
    "deep_forcing": {"sink_size": 2, "recent_frames": 2, "memory_frames": 1},
    "h2o": {},
    "snapkv": {},
    "rkv": {},
}


@pytest.fixture(scope="module")
def tiny():
    cfg = fkv_jax.model_preset("tiny")
    graphdef, params = nnx.split(fkv_jax.init_model(cfg, seed=0), nnx.Param)
    return cfg, graphdef, params


@pytest.mark.slow
@pytest.mark.parametrize("name", NEW)
def test_rollout_compiles_once(tiny, name):
    cfg, graphdef, params = tiny
    pol = make_policy(name, SMALL[name])
    frames = 12
    s = fkv_jax.Sampler(
        graphdef, cfg, fkv_jax.sampler_preset("self_forcing"), batch=1, latent_hw=(8, 12), num_frames=frames, policy=pol
    )
    rng = np.random.default_rng(0)
    ctx = rng.standard_normal((1, 8, cfg.text_dim)).astype(np.float32)
    noise = rng.standard_normal((1, frames, 16, 8, 12)).astype(np.float32)
    out = []
    res = rollout(s, params, [ctx], noise, on_chunk=lambda b, r: out.append(jax.device_get(r.write_aux)))
    assert s.trace_count == 1 and np.isfinite(res.latents).all()
    if name == "dummy_forcing":  # classified once, at chunk 1, half of the 4 heads dummy
        assert (np.asarray(out[-1]["group"]) == DUMMY).sum() == 2
        np.testing.assert_array_equal(out[-1]["group"], out[1]["group"])
    else:  # the memory is full (M per head) once enough frames have left the ring
        m = res.state["layers"]["mem_k"].shape[2]
        assert (np.asarray(out[-1]["kept_per_head"]) == m).all()


@pytest.mark.parametrize("name", NEW)
def test_resident_bytes_below_full_for_long_videos(name):
    """Wan2.1-1.3B sizes at 480P (abstract shapes, nothing allocated), a 240-frame video."""
    cfg = fkv_jax.model_preset("wan2.1-t2v-1.3b")
    t = 30 * 52
    base = CacheGeometry.from_upstream(
        local_attn_size=-1,
        sink_size=0,
        frames_per_block=3,
        num_layers=cfg.num_layers,
        batch=1,
        tokens_per_frame=t,
        num_heads=cfg.num_heads,
        head_dim=cfg.head_dim,
        capacity_frames=240,
        grid_hw=(30, 52),
    )

    def nbytes(pol):
        g = pol.geometry(base, 240)
        return resident_bytes(g, jax.eval_shape(lambda: pol.init_state(g)), jnp.bfloat16)

    full = nbytes(Full())
    ours = nbytes(make_policy(name))
    assert ours < full / 8, (name, ours / full)
