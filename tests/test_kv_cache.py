import jax
import jax.numpy as jnp
import numpy as np
import pytest

from fkv_jax.cache.kv_cache import CacheGeometry, frames_in_slots, init_cache, visible_slots, write


def geom(local, sink, cap=None, c=3):
    return CacheGeometry.from_upstream(
        local_attn_size=local,
        sink_size=sink,
        frames_per_block=c,
        num_layers=2,
        batch=1,
        tokens_per_frame=2,
        num_heads=1,
        head_dim=2,
        capacity_frames=cap,
    )


def _write_chunks(g, n_chunks):
    cache = init_cache(g)
    c = g.frames_per_block
    for blk in range(n_chunks):
        frames = blk * c + jnp.arange(c)
        # tag each frame's keys with its frame index so we can see where it landed
        kv = jnp.broadcast_to(
            frames.astype(jnp.float32)[None, None, None, :, None, None], (2, 1, 1, c, 2, 2)
        )  # [L, B, H, C, T, D]
        cache = write(g, cache, kv, -kv, jnp.int32(blk * c))
    return cache


def test_geometry_follows_upstream_counting():
    assert (geom(12, 3).sink, geom(12, 3).ring) == (3, 6)  # LongLive
    assert (geom(6, 3).sink, geom(6, 3).ring) == (3, 0)  # Self Forcing window 6: only the sink
    assert (geom(9, 3).sink, geom(9, 3).ring) == (3, 3)
    g = geom(-1, 0, cap=21)
    assert g.global_attn and (g.sink, g.ring) == (0, 21)
    with pytest.raises(ValueError, match="need local_attn_size >= 6"):
        geom(5, 3)
    with pytest.raises(ValueError, match="capacity"):
        geom(-1, 0)


def test_ring_wraps_and_sink_is_never_evicted():
    g = geom(12, 3)  # 3 sink + 6 ring slots
    cache = _write_chunks(g, 6)  # frames 0..17
    held = frames_in_slots(cache)
    assert held[:3] == [0, 1, 2]  # sink
    assert sorted(held[3:]) == list(range(12, 18))  # last 6 history frames, wherever the ring put them
    # frame 12 went to ring slot 3 + (12 - 3) % 6 = 6 (wrap-around)
    assert held[6] == 12
    k = np.asarray(cache["k"])[0, 0, 0, :, 0, 0]
    np.testing.assert_array_equal(k, np.asarray(held, np.float32))  # contents follow the slot labels
    np.testing.assert_array_equal(np.asarray(cache["v"])[0, 0, 0, :, 0, 0], -k)
    assert int(cache["next_frame"]) == 18


def test_visible_slots_from_positions_not_order():
    g = geom(12, 3)
    cache = _write_chunks(g, 6)
    vis = np.asarray(visible_slots(g, cache, jnp.int32(18)))
    assert vis.all()
    # permute the ring slots: the visible set follows the stored frames, not where they sit in the ring
    perm = np.array([0, 1, 2, 8, 5, 3, 7, 4, 6])
    shuffled = jax.tree.map(lambda a: a, cache)
    shuffled["slot_frame"] = cache["slot_frame"][perm]
    held = np.asarray(shuffled["slot_frame"])
    vis2 = np.asarray(visible_slots(g, shuffled, jnp.int32(15)))  # as if re-generating frames 15..17
    np.testing.assert_array_equal(vis2, held < 15)
    vis3 = np.asarray(visible_slots(g, shuffled, jnp.int32(20)))  # window of 6 history frames before 20: 14..19
    np.testing.assert_array_equal(vis3, (held < 3) | (held >= 14))


def test_empty_and_future_slots_are_invisible():
    g = geom(-1, 0, cap=9)
    cache = _write_chunks(g, 2)
    vis = np.asarray(visible_slots(g, cache, jnp.int32(6)))
    np.testing.assert_array_equal(vis, [True] * 6 + [False] * 3)
    vis = np.asarray(visible_slots(g, cache, jnp.int32(3)))  # re-generating chunk 1: its own old slots hidden
    np.testing.assert_array_equal(vis, [True] * 3 + [False] * 6)


def test_ring_smaller_than_chunk_keeps_last_frames():
    g = geom(7, 3)  # ring of 1 frame, chunks of 3
    cache = _write_chunks(g, 3)
    assert frames_in_slots(cache) == [0, 1, 2, 8]


def test_window_only_sink():
    g = geom(6, 3)
    cache = _write_chunks(g, 4)
    assert frames_in_slots(cache) == [0, 1, 2]
    assert g.kv_bytes() == 2 * 2 * 1 * 3 * 2 * 1 * 2 * 4
