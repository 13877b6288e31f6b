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
