import jax.numpy as jnp
import numpy as np
import pytest

from fkv_jax.attention.reference import chunk_attention, pick_block_slots


def _naive(q, kc, vc, kcache, vcache, mask):
    """Full softmax over [chunk keys | allowed cache tokens], per (query group, head), float64."""
    b, sq, h, d = q.shape
    n, t = kcache.shape[1:3]
    qf = mask.shape[1]
    out = np.zeros((b, sq, h, d))
    mask = np.broadcast_to(mask, (b, qf, h, n))
    for bi in range(b):
        for g in range(qf):
            rows = slice(g * sq // qf, (g + 1) * sq // qf)
            for hi in range(h):
                ks = [kc[bi, :, hi]] + [kcache[bi, s, :, hi] for s in range(n) if mask[bi, g, hi, s]]
                vs = [vc[bi, :, hi]] + [vcache[bi, s, :, hi] for s in range(n) if mask[bi, g, hi, s]]
                k, v = np.concatenate(ks).astype(np.float64), np.concatenate(vs).astype(np.float64)
                s_ = q[bi, rows, hi].astype(np.float64) @ k.T / np.sqrt(d)
                p = np.exp(s_ - s_.max(-1, keepdims=True))
                out[bi, rows, hi] = (p / p.sum(-1, keepdims=True)) @ v
    return out


@pytest.mark.parametrize("block_slots", [1, 2, 6])
def test_matches_naive_softmax_with_ragged_masks(block_slots):
    rng = np.random.default_rng(1)
    b, c, t, h, d, n = 2, 3, 4, 3, 8, 6
    q = rng.standard_normal((b, c * t, h, d)).astype(np.float32)
    kc, vc = (rng.standard_normal((b, c * t, h, d)).astype(np.float32) for _ in range(2))
    kcache, vcache = (rng.standard_normal((b, n, t, h, d)).astype(np.float32) * 3 for _ in range(2))
    mask = rng.random((b, c, h, n)) < 0.5  # per (query frame, head) selections
    mask[0, 0, 0] = False  # an entry that reads nothing but its own chunk
    out = chunk_attention(*(jnp.asarray(a) for a in (q, kc, vc, kcache, vcache, mask)), block_slots=block_slots)
    np.testing.assert_allclose(np.asarray(out), _naive(q, kc, vc, kcache, vcache, mask), rtol=1e-5, atol=1e-5)


def test_masked_slots_are_ignored_even_if_huge():
    rng = np.random.default_rng(2)
    q = rng.standard_normal((1, 4, 1, 8)).astype(np.float32)
    kc = rng.standard_normal((1, 4, 1, 8)).astype(np.float32)
    kcache = np.full((1, 2, 4, 1, 8), 1e4, np.float32)  # would dominate the softmax if read
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


def test_selection_path_equals_naive_with_chunk_mask_and_memory():
    from fkv_jax.attention import attend

    rng = np.random.default_rng(3)
    b, c, t, h, d, n, m = 2, 3, 4, 2, 8, 7, 5
    sel, mask, chunk = _random_selection(rng, b, c, h, n, 4, c)
    q = rng.standard_normal((b, c * t, h, d)).astype(np.float32)
    kc, vc = (rng.standard_normal((b, c * t, h, d)).astype(np.float32) for _ in range(2))
    kcache, vcache = (rng.standard_normal((b, n, t, h, d)).astype(np.float32) for _ in range(2))
    mk, mv = (rng.standard_normal((b, m, h, d)).astype(np.float32) for _ in range(2))
    mvalid = rng.random((b, h, m)) < 0.6
    import dataclasses

    sel = dataclasses.replace(sel, mem_k=jnp.asarray(mk), mem_v=jnp.asarray(mv), mem_valid=jnp.asarray(mvalid))
    out = np.asarray(attend(*(jnp.asarray(a) for a in (q, kc, vc, kcache, vcache)), sel))
    # naive: per (b, group, head) concatenate allowed keys
    ref = np.zeros((b, c * t, h, d))
    for bi in range(b):
        for g in range(c):
            rows = slice(g * t, (g + 1) * t)
            for hi in range(h):
                ks = [kc[bi, f * t:(f + 1) * t, hi] for f in range(c) if chunk[bi, g, hi, f]]
                vs = [vc[bi, f * t:(f + 1) * t, hi] for f in range(c) if chunk[bi, g, hi, f]]
                ks += [mk[bi, j:j + 1, hi] for j in range(m) if mvalid[bi, hi, j]]
                vs += [mv[bi, j:j + 1, hi] for j in range(m) if mvalid[bi, hi, j]]
                ks += [kcache[bi, s, :, hi] for s in range(n) if mask[bi, g, hi, s]]
                vs += [vcache[bi, s, :, hi] for s in range(n) if mask[bi, g, hi, s]]
                k, v = np.concatenate(ks).astype(np.float64), np.concatenate(vs).astype(np.float64)
                s_ = q[bi, rows, hi].astype(np.float64) @ k.T / np.sqrt(d)
                p = np.exp(s_ - s_.max(-1, keepdims=True))
                ref[bi, rows, hi] = (p / p.sum(-1, keepdims=True)) @ v
    np.testing.assert_allclose(out, ref, rtol=1e-5, atol=1e-5)


def test_dense_mask_and_selection_agree():
    from fkv_jax.attention.selection import from_slot_mask, to_slot_mask
    from fkv_jax.attention.reference import selection_attention

    rng = np.random.default_rng(4)
    b, c, t, h, d, n = 1, 3, 4, 2, 8, 6
    mask = rng.random((1, 1, 1, n)) < 0.5
    q, kc, vc = (rng.standard_normal((b, c * t, h, d)).astype(np.float32) for _ in range(3))
    kcache, vcache = (rng.standard_normal((b, n, t, h, d)).astype(np.float32) for _ in range(2))
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
