import jax.numpy as jnp
import numpy as np
import pytest

from fkv_jax.attention.reference import XlaBlocks, chunk_attention, pick_block_slots


def _naive(q, kc, vc, kcache, vcache, mask):
    """Full softmax over [chunk keys | allowed cache tokens], per (query group, head), float64."""
    b, sq, h, d = q.shape
    n, t = kcache.shape[2:4]
    qf = mask.shape[1]
    out = np.zeros((b, sq, h, d))
    mask = np.broadcast_to(mask, (b, qf, h, n))
    for bi in range(b):
        for g in range(qf):
            rows = slice(g * sq // qf, (g + 1) * sq // qf)
            for hi in range(h):
                ks = [kc[bi, :, hi]] + [kcache[bi, hi, s] for s in range(n) if mask[bi, g, hi, s]]
                vs = [vc[bi, :, hi]] + [vcache[bi, hi, s] for s in range(n) if mask[bi, g, hi, s]]
                k, v = np.concatenate(ks).astype(np.float64), np.concatenate(vs).astype(np.float64)
                s_ = q[bi, rows, hi].astype(np.float64) @ k.T / np.sqrt(d)
                p = np.exp(s_ - s_.max(-1, keepdims=True))
                out[bi, rows, hi] = (p / p.sum(-1, keepdims=True)) @ v
    return out


# (block_slots, XlaBlocks): whole-slot key tiles of 1, 2 and all 6 slots; query tiles of 1 row, of a
# non-divisor target (5 -> 4) and of the whole group; key tiles smaller than a slot (token tiles: 4 -> 2, 1)
_TILINGS = [
    (1, XlaBlocks()),
    (2, XlaBlocks(q_tile=1)),
    (6, XlaBlocks(q_tile=5)),
    (None, XlaBlocks(k_tile=2)),
    (None, XlaBlocks(q_tile=2, k_tile=1)),
    (None, XlaBlocks(q_tile=100, k_tile=9)),
]


@pytest.mark.parametrize("block_slots,blocks", _TILINGS)
def test_matches_naive_softmax_with_ragged_masks(block_slots, blocks):
    rng = np.random.default_rng(1)
    b, c, t, h, d, n = 2, 3, 4, 3, 8, 6
    q = rng.standard_normal((b, c * t, h, d)).astype(np.float32)
    kc, vc = (rng.standard_normal((b, c * t, h, d)).astype(np.float32) for _ in range(2))
    kcache, vcache = (rng.standard_normal((b, h, n, t, d)).astype(np.float32) * 3 for _ in range(2))
    mask = rng.random((b, c, h, n)) < 0.5  # per (query frame, head) selections
    mask[0, 0, 0] = False  # an entry that reads nothing but its own chunk
    mask[1, 2] = True  # an entry that reads every slot (tiles with no mask work)
    out = chunk_attention(
        *(jnp.asarray(a) for a in (q, kc, vc, kcache, vcache, mask)), block_slots=block_slots, blocks=blocks
    )
    np.testing.assert_allclose(np.asarray(out), _naive(q, kc, vc, kcache, vcache, mask), rtol=1e-5, atol=1e-5)


def test_shared_mask_prefix_and_empty_cache():
    """The global-cache case (one mask for all rows, a filled prefix) and a cache with no slot at all."""
    rng = np.random.default_rng(5)
    b, c, t, h, d, n = 1, 3, 5, 2, 8, 7
    q, kc, vc = (rng.standard_normal((b, c * t, h, d)).astype(np.float32) for _ in range(3))
    kcache, vcache = (rng.standard_normal((b, h, n, t, d)).astype(np.float32) for _ in range(2))
    mask = np.zeros((1, 1, 1, n), bool)
    mask[..., :4] = True
    out = chunk_attention(
        *(jnp.asarray(a) for a in (q, kc, vc, kcache, vcache, mask)), blocks=XlaBlocks(q_tile=3, k_tile=10)
    )
    np.testing.assert_allclose(np.asarray(out), _naive(q, kc, vc, kcache, vcache, mask), rtol=1e-5, atol=1e-5)
    empty = np.zeros((b, h, 0, t, d), np.float32)
    out = chunk_attention(*(jnp.asarray(a) for a in (q, kc, vc, empty, empty, np.zeros((1, 1, 1, 0), bool))))
    np.testing.assert_allclose(
        np.asarray(out), _naive(q, kc, vc, empty, empty, np.zeros((1, 1, 1, 0), bool)), rtol=1e-5, atol=1e-5
    )


def test_bad_tilings_are_clear_errors():
    with pytest.raises(ValueError, match="q_tile and k_tile must be >= 1"):
        XlaBlocks(q_tile=0)
    z = jnp.zeros((1, 6, 1, 4))
    with pytest.raises(ValueError, match="block_slots=4 does not divide the 6 cache slots"):
        chunk_attention(
            z, z, z, jnp.zeros((1, 1, 6, 2, 4)), jnp.zeros((1, 1, 6, 2, 4)), jnp.ones((1, 1, 1, 6), bool), block_slots=4
        )
    with pytest.raises(ValueError, match="do not split into 4 query-frame groups"):
        chunk_attention(z, z, z, jnp.zeros((1, 1, 6, 2, 4)), jnp.zeros((1, 1, 6, 2, 4)), jnp.ones((1, 4, 1, 6), bool))


def test_masked_slots_are_ignored_even_if_huge():
    rng = np.random.default_rng(2)
    q = rng.standard_normal((1, 4, 1, 8)).astype(np.float32)
    kc = rng.standard_normal((1, 4, 1, 8)).astype(np.float32)
    kcache = np.full((1, 1, 2, 4, 8), 1e4, np.float32)  # would dominate the softmax if read
    mask = np.zeros((1, 1, 1, 2), bool)
    out = chunk_attention(*(jnp.asarray(a) for a in (q, kc, kc, kcache, kcache, mask)))
    np.testing.assert_allclose(np.asarray(out), _naive(q, kc, kc, kcache, kcache, mask), rtol=1e-5, atol=1e-6)
    assert np.all(np.isfinite(np.asarray(out)))


def test_block_size_choice():
    assert pick_block_slots(21, 1560) == 1
    assert pick_block_slots(21, 24) == 21
    assert pick_block_slots(9, 416) == 3


def _random_selection(rng, b, qf, h, n, kmax, c):
    from fkv_jax.attention.selection import Selection, pack_mask

    mask = rng.random((b, qf, h, n)) < 0.5
    mask[0, 0, 0] = False
    frames = np.asarray(pack_mask(jnp.asarray(mask), kmax))
    # truncate rows with more than kmax selected to keep mask and frames consistent
    mask = np.zeros_like(mask)
    for idx in np.ndindex(*frames.shape[:3]):
        for s in frames[idx]:
            if s >= 0:
                mask[idx + (s,)] = True
    chunk = rng.random((b, qf, h, c)) < 0.7
    chunk[..., 0] = True  # every query sees at least one chunk frame
    return Selection(frames=jnp.asarray(frames), chunk_mask=jnp.asarray(chunk)), mask, chunk


def _naive_selection(q, kc, vc, kcache, vcache, mask, chunk, mk, mv, mvalid):
    """float64 softmax per (b, group, head) over the allowed chunk frames, valid memory tokens and selected
    slots; a row with no key at all is zeros."""
    b, sq, h, d = q.shape
    c, m = chunk.shape[-1], mvalid.shape[-1]
    n = kcache.shape[2]
    qf = chunk.shape[1]
    tq, tc = sq // qf, sq // c
    ref = np.zeros((b, sq, h, d))
    for bi in range(b):
        for g in range(qf):
            rows = slice(g * tq, (g + 1) * tq)
            for hi in range(h):
                ks = [kc[bi, f * tc : (f + 1) * tc, hi] for f in range(c) if chunk[bi, g, hi, f]]
                vs = [vc[bi, f * tc : (f + 1) * tc, hi] for f in range(c) if chunk[bi, g, hi, f]]
                ks += [mk[bi, j : j + 1, hi] for j in range(m) if mvalid[bi, hi, j]]
                vs += [mv[bi, j : j + 1, hi] for j in range(m) if mvalid[bi, hi, j]]
                ks += [kcache[bi, hi, s] for s in range(n) if mask[bi, g, hi, s]]
                vs += [vcache[bi, hi, s] for s in range(n) if mask[bi, g, hi, s]]
                if not ks:
                    continue
                k, v = np.concatenate(ks).astype(np.float64), np.concatenate(vs).astype(np.float64)
                s_ = q[bi, rows, hi].astype(np.float64) @ k.T / np.sqrt(d)
                p = np.exp(s_ - s_.max(-1, keepdims=True))
                ref[bi, rows, hi] = (p / p.sum(-1, keepdims=True)) @ v
    return ref


@pytest.mark.parametrize(
    "blocks",
    [XlaBlocks(), XlaBlocks(q_tile=1, k_tile=12, split_heads=False), XlaBlocks(q_tile=3, k_tile=2, split_heads=True)],
)
def test_selection_path_equals_naive_with_chunk_mask_and_memory(blocks):
    """Default tiles (heads split or not at run time); 3 slots per key tile with a budget of 4 (a padded last
    tile), heads batched; token tiles (k_tile < T), each head on its own."""
    from fkv_jax.attention.reference import selection_attention

    rng = np.random.default_rng(3)
    b, c, t, h, d, n, m = 2, 3, 4, 2, 8, 7, 5
    sel, mask, chunk = _random_selection(rng, b, c, h, n, 4, c)
    q = rng.standard_normal((b, c * t, h, d)).astype(np.float32)
    kc, vc = (rng.standard_normal((b, c * t, h, d)).astype(np.float32) for _ in range(2))
    kcache, vcache = (rng.standard_normal((b, h, n, t, d)).astype(np.float32) for _ in range(2))
    mk, mv = (rng.standard_normal((b, m, h, d)).astype(np.float32) for _ in range(2))
    mvalid = rng.random((b, h, m)) < 0.6
    import dataclasses

    sel = dataclasses.replace(sel, mem_k=jnp.asarray(mk), mem_v=jnp.asarray(mv), mem_valid=jnp.asarray(mvalid))
    out = np.asarray(selection_attention(*(jnp.asarray(a) for a in (q, kc, vc, kcache, vcache)), sel, blocks=blocks))
    ref = _naive_selection(q, kc, vc, kcache, vcache, mask, chunk, mk, mv, mvalid)
    np.testing.assert_allclose(out, ref, rtol=1e-5, atol=1e-5)


def test_attend_is_the_selection_path():
    from fkv_jax.attention import attend
    from fkv_jax.attention.reference import selection_attention

    rng = np.random.default_rng(6)
    sel, _, _ = _random_selection(rng, 1, 3, 2, 5, 3, 3)
    args = [jnp.asarray(rng.standard_normal(s).astype(np.float32)) for s in [(1, 9, 2, 8)] * 3 + [(1, 2, 5, 3, 8)] * 2]
    np.testing.assert_array_equal(np.asarray(attend(*args, sel)), np.asarray(selection_attention(*args, sel)))


def test_rows_with_no_key_at_all_are_zeros():
    """A (b, group, head) whose chunk frames are all masked, with no slot and no valid memory token, gets zeros
    (as the kernels do), even when the masked keys are huge; its neighbours are unaffected."""
    from fkv_jax.attention.reference import selection_attention
    from fkv_jax.attention.selection import Selection

    rng = np.random.default_rng(7)
    b, c, t, h, d, n, m = 1, 3, 4, 2, 8, 5, 3
    q = rng.standard_normal((b, c * t, h, d)).astype(np.float32)
    kc = rng.standard_normal((b, c * t, h, d)).astype(np.float32) * 100
    vc = rng.standard_normal((b, c * t, h, d)).astype(np.float32)
    kcache, vcache = (rng.standard_normal((b, h, n, t, d)).astype(np.float32) for _ in range(2))
    frames = np.array([[[[2, 0], [-1, -1]], [[-1, -1], [4, -1]], [[1, 3], [0, 2]]]], np.int32)  # [1, 3, 2, 2]
    chunk = np.ones((b, c, h, c), bool)
    chunk[0, 1, 0] = False  # group 1, head 0: no chunk frame, no slot, no memory -> nothing to read
    mk = rng.standard_normal((b, m, h, d)).astype(np.float32)
    mvalid = np.zeros((b, h, m), bool)
    sel = Selection(
        frames=jnp.asarray(frames),
        chunk_mask=jnp.asarray(chunk),
        mem_k=jnp.asarray(mk),
        mem_v=jnp.asarray(mk),
        mem_valid=jnp.asarray(mvalid),
    )
    mask = np.zeros((b, c, h, n), bool)
    for g in range(c):
        for hi in range(h):
            mask[0, g, hi, frames[0, g, hi][frames[0, g, hi] >= 0]] = True
    for blocks in (XlaBlocks(split_heads=False), XlaBlocks(q_tile=2, k_tile=4, split_heads=True)):
        out = np.asarray(
            selection_attention(*(jnp.asarray(a) for a in (q, kc, vc, kcache, vcache)), sel, blocks=blocks)
        )
        assert np.all(np.isfinite(out))
        np.testing.assert_array_equal(out[0, t : 2 * t, 0], 0.0)
        ref = _naive_selection(q, kc, vc, kcache, vcache, mask, chunk, mk, mk, mvalid)
        np.testing.assert_allclose(out, ref, rtol=1e-5, atol=1e-5)


def _all_eqns(jaxpr):
    """Every equation of a jaxpr, inside scans, loops and conds too."""
    for e in jaxpr.eqns:
        yield e
        for v in e.params.values():
            for x in v if isinstance(v, (tuple, list)) else (v,):
                inner = getattr(x, "jaxpr", x)
                if hasattr(inner, "eqns"):
                    yield from _all_eqns(inner)


def test_bf16_accumulates_in_float32_and_never_upcasts_the_cache():
    """bf16 q/k/v with a bf16 cache: every matmul accumulates in float32 (preferred_element_type), no op
    converts a cache-sized array, and the result matches a float64 softmax of the same bf16 inputs to bf16
    output rounding (4096 cached keys: a bf16 accumulator would drift well past that)."""
    import jax

    from fkv_jax.attention.reference import selection_attention
    from fkv_jax.attention.selection import from_slot_mask

    rng = np.random.default_rng(8)
    b, c, t, h, d, n = 1, 2, 64, 2, 16, 64
    bf = jnp.bfloat16
    q, kc, vc = (jnp.asarray(rng.standard_normal((b, c * t, h, d)), bf) for _ in range(3))
    kcache, vcache = (jnp.asarray(rng.standard_normal((b, h, n, t, d)), bf) for _ in range(2))
    mask = jnp.ones((1, 1, 1, n), bool)
    sel = from_slot_mask(mask, b, h)
    f64 = [np.asarray(x, np.float64) for x in (q, kc, vc, kcache, vcache)]
    ref = _naive(*f64, np.asarray(mask))
    for fn, last in ((chunk_attention, mask), (selection_attention, sel)):
        out = fn(q, kc, vc, kcache, vcache, last)
        assert out.dtype == bf
        np.testing.assert_allclose(np.asarray(out, np.float64), ref, rtol=2e-2, atol=2e-2)
        jaxpr = jax.make_jaxpr(fn)(q, kc, vc, kcache, vcache, last)
        eqns = list(_all_eqns(jaxpr.jaxpr))
        dots = [e for e in eqns if e.primitive.name == "dot_general"]
        assert dots and all(e.params["preferred_element_type"] == jnp.float32 for e in dots)
        cache_size = kcache.size
        upcasts = [
            e for e in eqns if e.primitive.name == "convert_element_type" and e.outvars[0].aval.size >= cache_size
        ]
        assert not upcasts


def test_dense_mask_and_selection_agree():
    from fkv_jax.attention.selection import from_slot_mask, to_slot_mask
    from fkv_jax.attention.reference import selection_attention

    rng = np.random.default_rng(4)
    b, c, t, h, d, n = 1, 3, 4, 2, 8, 6
    mask = rng.random((1, 1, 1, n)) < 0.5
    q, kc, vc = (rng.standard_normal((b, c * t, h, d)).astype(np.float32) for _ in range(3))
    kcache, vcache = (rng.standard_normal((b, h, n, t, d)).astype(np.float32) for _ in range(2))
    sel = from_slot_mask(jnp.asarray(mask), b, h)
    np.testing.assert_array_equal(np.asarray(to_slot_mask(sel, n)), np.broadcast_to(mask, (b, 1, h, n)))
    a = chunk_attention(*(jnp.asarray(x) for x in (q, kc, vc, kcache, vcache, mask)))
    s = selection_attention(*(jnp.asarray(x) for x in (q, kc, vc, kcache, vcache)), sel)
    np.testing.assert_allclose(np.asarray(a), np.asarray(s), rtol=1e-5, atol=1e-6)


def test_unknown_backend_is_a_clear_error():
    from fkv_jax.attention import attend
    from fkv_jax.attention.selection import Selection

    with pytest.raises(ValueError, match="unknown attention backend 'cuda'"):
        attend(None, None, None, None, None, Selection(frames=jnp.zeros((1, 1, 1, 1), jnp.int32)), backend="cuda")


def test_cpu_roofline_bench_runs_and_agrees(capsys):
    """``python -m fkv_jax.bench.attention --cpu-roofline`` at tiny sizes: every entry point is timed and
    matches a float64 softmax (and torch SDPA when torch imports)."""
    from fkv_jax.bench.attention import cpu_roofline

    rows = cpu_roofline(1, geometry=dict(c=3, t=8, h=2, d=16), caches=((0, 3), (2, 3)))
    assert [r["keys"] for r in rows] == [24, 40]
    for r in rows:
        assert {"chunk", "sel1", "sel3"} <= set(r["errs"])
        assert all(e <= 1e-5 for e in r["errs"].values())
        assert r["chunk_ms"] > 0 and r["matmul_gflops"] > 0 and r["frac_matmul_cpu"] > 0
    assert "% matmul wall/CPU" in capsys.readouterr().out


def test_polynomial_exp_matches_exp_on_the_softmax_range():
    from fkv_jax.attention.reference import _exp_nonpositive

    x = np.concatenate([-np.logspace(-8, np.log10(87.0), 20001), [0.0, -1e-30]]).astype(np.float32)
    got = np.asarray(_exp_nonpositive(jnp.asarray(x)), np.float64)
    want = np.exp(x.astype(np.float64))
    assert np.max(np.abs(got - want) / want) < 5e-7, np.max(np.abs(got - want) / want)
    assert got[-2] == 1.0
    # below float32's normal range it returns ~2**-126, never inf or NaN
    tiny = np.asarray(_exp_nonpositive(jnp.asarray([-100.0, -1e30, -np.inf], jnp.float32)))
    assert np.all(np.isfinite(tiny)) and np.all(tiny <= 2.0**-125)
