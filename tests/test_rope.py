import numpy as np
import jax.numpy as jnp

from fkv_jax.model.rope import apply_rope, chunk_cos_sin, make_rope_tables, rope_split


def test_split_matches_upstream_rule():
    assert rope_split(128) == (22, 21, 21)
    assert rope_split(64) == (12, 10, 10)
    assert rope_split(96) == (16, 16, 16)


def test_chunk_rotation_equals_complex_multiplication():
    d, gh, gw = 64, 3, 4
    tables = make_rope_tables(d, (gh, gw), max_frames=32)
    frames = np.array([5, 6], np.int32)
    cos, sin = chunk_cos_sin(tables, jnp.asarray(frames))
    x = np.random.default_rng(0).standard_normal((1, 2 * gh * gw, 2, d)).astype(np.float32)
    out = np.asarray(apply_rope(jnp.asarray(x), cos, sin))
    # independent float64 reference: pair j of token (f, y, x) rotated by pos * theta_j per axis
    ct, ch, cw = rope_split(d)
    ref = np.empty_like(x, dtype=np.float64)
    for i, (f, y, xx) in enumerate((f, y, xx) for f in frames for y in range(gh) for xx in range(gw)):
        ang = np.concatenate(
            [
                f * 10000.0 ** (-np.arange(ct) * 2 / (2 * ct)),
                y * 10000.0 ** (-np.arange(ch) * 2 / (2 * ch)),
                xx * 10000.0 ** (-np.arange(cw) * 2 / (2 * cw)),
            ]
        )
        z = x[0, i, :, 0::2] + 1j * x[0, i, :, 1::2]
        r = z * np.exp(1j * ang)
        ref[0, i, :, 0::2], ref[0, i, :, 1::2] = r.real, r.imag
    np.testing.assert_allclose(out, ref, atol=2e-6)


def test_rotation_depends_on_absolute_frame():
    tables = make_rope_tables(64, (2, 2), max_frames=16)
    c0, s0 = chunk_cos_sin(tables, jnp.arange(3, dtype=jnp.int32))
    c1, s1 = chunk_cos_sin(tables, jnp.arange(3, dtype=jnp.int32) + 4)
    assert not np.allclose(c0, c1)
    # spatial part identical, temporal part shifted
    np.testing.assert_array_equal(np.asarray(c0)[:, 12:], np.asarray(c1)[:, 12:])
