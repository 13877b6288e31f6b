"""Budget allocators: fixed, importance^gamma, PyramidKV layer schedule, Ada-KV global top-B with a floor."""

import jax.numpy as jnp
import numpy as np
import pytest

from fkv_jax.policies import budgets as B
from fkv_jax.policies.focused_forcing import importance_budgets


def test_fixed_and_importance():
    np.testing.assert_array_equal(B.fixed_budgets(3, 2, 7), np.full((3, 2), 7))
    assert B.importance_budgets is importance_budgets  # the one implementation, re-exported
    imp = np.array([[0.0, 1.0], [0.5, 0.25]])
    np.testing.assert_array_equal(B.importance_budgets(imp, 4, 12), [[4, 12], [6, 4]])  # 4 + 8 x^2, half to even


def test_pyramid_schedule():
    np.testing.assert_array_equal(B.pyramid_budgets(4, 10, 20), [20, 13, 7, 0])
    np.testing.assert_array_equal(B.pyramid_budgets(1, 9), [9])
    for L, avg, beta in ((30, 1560, 20), (7, 3, 2), (12, 100, 5)):
        b = B.pyramid_budgets(L, avg, beta)
        assert b.sum() == L * avg  # same total as a uniform budget
        assert (np.diff(b) <= 0).all() and b[0] > b[-1]  # decreasing from the first layer to the last
        assert abs(b[-1] - avg / beta) < 1 and abs(b[0] - (2 * avg - avg / beta)) < 1
    with pytest.raises(ValueError):
        B.pyramid_budgets(0, 4)


def adakv_reference(scores, valid, total, alpha, cap=None):
    """Ada-KV in plain numpy: every head's top floor(alpha*B/H) first, then the best remaining scores."""
    h, n = scores.shape
    cap = n if cap is None else cap
    floor = int(total * alpha / h)
    counts = np.zeros(h, int)
    pool = []
    for i in range(h):
        order = [j for j in np.argsort(-scores[i], kind="stable") if valid[i, j]][:cap]
        counts[i] = min(floor, len(order))
        pool += [(-scores[i, j], i) for j in order[counts[i] :]]
    for _, i in sorted(pool)[: max(total - counts.sum(), 0)]:
        counts[i] += 1
    return counts


def test_adakv_matches_reference_and_honours_floor_and_total():
    rng = np.random.default_rng(0)
    for trial in range(20):
        h, n = 4, 12
        # head 0 holds the large scores, so without the floor it would take most of the budget
        scores = rng.random((h, n)) * np.array([10.0, 1.0, 0.5, 0.1])[:, None]
        valid = rng.random((h, n)) < 0.9
        total, alpha = int(rng.integers(4, 30)), float(rng.choice([0.0, 0.2, 0.5]))
        cap = None if trial % 2 else 8
        got = np.asarray(B.adakv_head_budgets(jnp.asarray(scores), jnp.asarray(valid), total, alpha, cap))
        np.testing.assert_array_equal(got, adakv_reference(scores, valid, total, alpha, cap))
        avail = np.minimum(valid.sum(1), n if cap is None else cap)
        assert got.sum() == min(total, avail.sum())
        assert (got >= np.minimum(int(total * alpha / h), avail)).all() and (got <= avail).all()


def test_adakv_floor_example():
    s = jnp.array([[5.0, 4, 3, 2], [1, 0.5, 0.2, 0.1], [0.05, 0.04, 0.03, 0.02]])
    v = jnp.ones(s.shape, bool)
    np.testing.assert_array_equal(B.adakv_head_budgets(s, v, 6, 0.0), [4, 2, 0])  # plain global top-6
    np.testing.assert_array_equal(B.adakv_head_budgets(s, v, 6, 0.5), [4, 1, 1])  # floor = 6 * 0.5 / 3 = 1
    np.testing.assert_array_equal(B.adakv_head_budgets(s, v, 6, 0.0, cap=3), [3, 3, 0])
    # batched leading axes and a traced total
    got = B.adakv_head_budgets(jnp.stack([s, s[::-1]]), jnp.stack([v, v]), jnp.int32(6), 0.5)
    np.testing.assert_array_equal(got, [[4, 1, 1], [1, 1, 4]])


def test_uniform_and_capacity():
    valid = jnp.array([[True, True, False], [False, False, False]])
    np.testing.assert_array_equal(B.uniform_head_budgets(valid, 1), [1, 0])
    np.testing.assert_array_equal(B.uniform_head_budgets(valid, 5), [2, 0])
    assert B.head_capacity(10, 4, "uniform", 2.0) == 10
    assert B.head_capacity(10, 4, "adakv", 2.5) == 25
    assert B.head_capacity(10, 2, "adakv", 3.0) == 20  # never more than the whole layer
    with pytest.raises(ValueError, match="unknown allocator"):
        B.head_capacity(10, 4, "pyramid", 2.0)
