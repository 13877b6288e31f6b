"""LongLive prompt switching on the tiny model: the KV re-cache against an independent recomputation, both
``global_sink`` modes, early switches, a global cache, and the rollout loop without switches."""

from __future__ import annotations

import dataclasses

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from flax import nnx

import fkv_jax
from fkv_jax.attention.reference import dense_attention
from fkv_jax.model.embeddings import timestep_sinusoid_np
from fkv_jax.sampling.recache import PromptSchedule, PromptSwitcher, recache_frames
from fkv_jax.sampling.rollout import rollout

HW = (4, 6)  # latent size: 2 x 3 tokens per frame
FRAMES = 18


@pytest.fixture(scope="module")
def tiny():
    cfg = fkv_jax.model_preset("tiny")
    graphdef, params = nnx.split(fkv_jax.init_model(cfg, seed=0), nnx.Param)
    params = jax.device_put(params, jax.devices()[0])  # committed, like restored checkpoints: same executables
    rng = np.random.default_rng(0)
    noise = rng.standard_normal((1, FRAMES, 16, *HW), np.float32)
    ctx = [rng.standard_normal((1, cfg.text_len, cfg.text_dim), np.float32) for _ in range(3)]
    return cfg, graphdef, params, noise, ctx


def make_sampler(tiny, local):
    cfg, graphdef = tiny[:2]
    sc = dataclasses.replace(fkv_jax.sampler_preset("longlive"), local_attn_size=local, sink_size=3 if local > 0 else 0)
    return fkv_jax.Sampler(graphdef, cfg, sc, batch=1, latent_hw=HW, num_frames=FRAMES)


@pytest.fixture(scope="module")
def rolling(tiny):
    """Window 9 = sink 3 + ring 3 + chunk 3."""
    return make_sampler(tiny, 9)


def reference_recache(tiny, s, cache_before, latents, ctx, cur, global_sink):
    """The re-cache written out directly: one t = 0 forward over the n = min(N, cur) last clean latents with the
    new prompt, dense attention over an explicit key list (the n frames, or the kept sink + the frames that
    land in the window); returns {frame: K} for the frames the cache should then hold, and the sink mode."""
    cfg, graphdef, params = tiny[:3]
    model = nnx.merge(graphdef, params)
    n = recache_frames(s.geom, s.sampler_cfg.local_attn_size, cur)
    rs, sink, t = cur - n, s.geom.sink, s.geom.tokens_per_frame
    rewrite = (not global_sink) or rs == 0

    def attn_fn(layer, lx, q, k, v):
        ck, cv = lx
        if not rewrite:  # old sink + re-cached frames from rs + S on
            k = jnp.concatenate(
                [jnp.moveaxis(ck[:, :, :sink], 1, 3).reshape(1, -1, ck.shape[1], ck.shape[4]), k[:, sink * t :]], axis=1
            )
            v = jnp.concatenate(
                [jnp.moveaxis(cv[:, :, :sink], 1, 3).reshape(1, -1, cv.shape[1], cv.shape[4]), v[:, sink * t :]], axis=1
            )
        return dense_attention(q, k, v), None

    t0 = jnp.broadcast_to(jnp.asarray(timestep_sinusoid_np(np.zeros(1), cfg.freq_dim)), (1, n, cfg.freq_dim))
    ctx_kv = s.context_kv(params, ctx)
    fwd = jax.jit(lambda x, ck, cv, pos: model.forward(x, t0, ctx_kv, s.rope, pos, (ck, cv), attn_fn)[1])
    k_new = np.asarray(
        fwd(
            jnp.asarray(latents[:, rs:cur]),
            jnp.asarray(cache_before["k"]),
            jnp.asarray(cache_before["v"]),
            rs + jnp.arange(n),
        )
    )
    return {rs + j: k_new[:, :, :, j] for j in range(n)}, rewrite


def run_with_switch(tiny, s, switch, global_sink):
    params, noise, ctx = tiny[2], tiny[3], tiny[4]
    seen = {}

    def on_switch(start, seg, cache):
        seen.update(start=start, seg=seg, cache=jax.tree.map(np.asarray, cache))

    lat = rollout(
        s, params, ctx[:2], noise, switch_frames=[switch], global_sink=global_sink, seed=5, on_switch=on_switch
    ).latents
    # the cache just before the switch: the same rollout stopped at the switch frame (a prefix of the same run)
    pre = rollout(s, params, ctx[:1], noise[:, : seen["start"]], seed=5).cache
    return lat, seen, jax.tree.map(np.asarray, pre)


@pytest.mark.slow
@pytest.mark.parametrize("global_sink", [True, False])
def test_cache_after_switch_equals_a_fresh_recache(tiny, rolling, global_sink):
    s = rolling  # window 9: n = 9 frames re-run from rs = 3
    lat, seen, pre = run_with_switch(tiny, s, switch=12, global_sink=global_sink)
    cache = seen["cache"]
    assert seen["start"] == 12 and seen["seg"] == 1
    ks, rewrite = reference_recache(tiny, s, pre, lat, tiny[4][1], 12, global_sink)
    assert rewrite == (not global_sink)
    frames = list(cache["slot_frame"])
    if global_sink:  # the sink keeps the old prompt's frames 0-2, untouched
        assert frames == [0, 1, 2, 9, 10, 11]
        np.testing.assert_array_equal(cache["k"][:, :, :, :3], pre["k"][:, :, :, :3])
        np.testing.assert_array_equal(cache["v"][:, :, :, :3], pre["v"][:, :, :, :3])
    else:  # the sink becomes the first 3 re-cached frames (rs = 12 - 9 = 3)
        assert frames == [3, 4, 5, 9, 10, 11]
    for slot, f in enumerate(frames):
        if slot >= 3 or not global_sink:
            np.testing.assert_allclose(cache["k"][:, :, :, slot], ks[f], rtol=1e-5, atol=2e-6)


def test_switch_changes_the_rest_of_the_video_only(tiny, rolling):
    s = rolling
    params, noise, ctx = tiny[2], tiny[3], tiny[4]
    plain = rollout(s, params, ctx[:1], noise, seed=5).latents
    switched = rollout(s, params, ctx[:2], noise, switch_frames=[10], seed=5).latents  # takes effect at the chunk at 12
    np.testing.assert_array_equal(plain[:, :12], switched[:, :12])
    assert np.abs(plain[:, 12:] - switched[:, 12:]).mean() > 1e-3
    assert PromptSchedule(("a", "b"), (10,)).segment_of_chunk(9) == 0
    assert PromptSchedule(("a", "b"), (10,)).segment_of_chunk(12) == 1


def test_early_switch_rewrites_the_sink_in_both_modes(tiny, rolling):
    """rs = 0 (cur <= local_attn_size): upstream's recompute flag is off, so even global_sink writes frames 0-2."""
    s = rolling
    lat, seen, pre = run_with_switch(tiny, s, switch=9, global_sink=True)
    cache = seen["cache"]
    ks, rewrite = reference_recache(tiny, s, pre, lat, tiny[4][1], 9, True)
    assert rewrite and list(cache["slot_frame"]) == [0, 1, 2, 6, 7, 8]
    for slot, f in enumerate(cache["slot_frame"]):
        np.testing.assert_allclose(cache["k"][:, :, :, slot], ks[f], rtol=1e-5, atol=2e-6)
    assert not np.allclose(cache["k"][:, :, :, :3], pre["k"][:, :, :, :3])  # the old prompt's sink is gone


def test_recache_lengths(rolling):
    from fkv_jax.cache.kv_cache import CacheGeometry

    assert [recache_frames(rolling.geom, 9, cur) for cur in (3, 9, 12, 300)] == [3, 9, 9, 9]
    g = CacheGeometry.from_upstream(
        local_attn_size=-1,
        sink_size=0,
        frames_per_block=3,
        num_layers=1,
        batch=1,
        tokens_per_frame=1,
        num_heads=1,
        head_dim=2,
        capacity_frames=30,
    )
    assert recache_frames(g, -1, 21) == 21  # a global cache re-runs every frame


def test_schedule_and_switcher_errors(tiny):
    with pytest.raises(ValueError, match="3 prompts need 2 switch frames"):
        PromptSchedule(("a", "b", "c"), (4,))
    with pytest.raises(ValueError, match="strictly increasing"):
        PromptSchedule(("a", "b", "c"), (8, 4))
    with pytest.raises(ValueError, match="not inside"):
        PromptSchedule(("a", "b"), (30,)).check_length(18)
    from fkv_jax.policies import make_policy

    cfg, graphdef = tiny[:2]
    s = fkv_jax.Sampler(
        graphdef,
        cfg,
        fkv_jax.sampler_preset("longlive"),
        batch=1,
        latent_hw=HW,
        num_frames=FRAMES,
        policy=make_policy("window", {}, num_layers=cfg.num_layers, num_heads=cfg.num_heads),
    )
    with pytest.raises(ValueError, match="plain cache"):
        PromptSwitcher(s)
