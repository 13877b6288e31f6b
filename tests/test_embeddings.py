import jax
import jax.numpy as jnp
import numpy as np

from fkv_jax.model.embeddings import patchify, timestep_sinusoid, timestep_sinusoid_np, unpatchify


def test_sinusoid_cos_first_float64():
    e = timestep_sinusoid_np(np.array([937.5]), 256)
    w = 10000.0 ** (-np.arange(128) / 128)
    np.testing.assert_allclose(e[0, :128], np.cos(937.5 * w), atol=1e-7)
    np.testing.assert_allclose(e[0, 128:], np.sin(937.5 * w), atol=1e-7)
    # the in-graph float32 version is close but not exact at ~1000 rad
    np.testing.assert_allclose(np.asarray(timestep_sinusoid(jnp.array([937.5]), 256)), e, atol=5e-4)


def test_patchify_equals_strided_conv_and_inverts():
    rng = np.random.default_rng(0)
    x = rng.standard_normal((2, 3, 4, 6, 8)).astype(np.float32)  # [B, F, C, H, W]
    w = rng.standard_normal((5, 4, 1, 2, 2)).astype(np.float32)  # torch Conv3d [out, in, kt, kh, kw]
    tokens = np.asarray(patchify(jnp.asarray(x), (2, 2))) @ w.reshape(5, -1).T  # [B, F*gh*gw, 5]
    conv = jax.lax.conv_general_dilated(
        jnp.asarray(x.transpose(0, 2, 1, 3, 4)),
        jnp.asarray(w),
        (1, 2, 2),
        "VALID",
        dimension_numbers=("NCDHW", "OIDHW", "NCDHW"),
    )  # [B, 5, F, gh, gw]
    ref = np.asarray(conv).reshape(2, 5, -1).transpose(0, 2, 1)
    np.testing.assert_allclose(tokens, ref, rtol=1e-5, atol=1e-5)
    # unpatchify with the head's (q, r, c) channel order is the inverse of a (q, r, c)-ordered patchify
    y = rng.standard_normal((2, 3 * 3 * 4, 2 * 2 * 4)).astype(np.float32)
    img = np.asarray(unpatchify(jnp.asarray(y), 3, (3, 4), (2, 2), 4))  # [B, F, C, H, W]
    assert img.shape == (2, 3, 4, 6, 8)
    # token (f=1, y=2, x=3), q=1, r=0, channel c=2 -> pixel (1, 2, 2*2+1, 2*3+0)
    tok = 1 * 12 + 2 * 4 + 3
    assert img[0, 1, 2, 5, 6] == y[0, tok, 1 * 8 + 0 * 4 + 2]
