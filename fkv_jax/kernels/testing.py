"""Random selection-attention problems for testing kernels against the XLA reference."""

from __future__ import annotations

import jax
import jax.numpy as jnp
import numpy as np

from fkv_jax.attention.selection import Selection


def random_problem(
    rng: np.random.Generator,
    *,
    b: int,
    c: int,
    t: int,
    h: int,
    d: int,
    n: int,
    k: int,
    qf: int,
    m: int = 0,
    chunk_mask: bool = True,
    dtype=jnp.float32,
):
    """q, k_chunk, v_chunk [B, C*T, H, D], k_cache, v_cache [B, H, N, T, D] (the cache layout) and a Selection.

    Budgets are ragged: each (b, group, head) selects a random number of distinct slots in [0, K] (the
    first row none, the last row K), left-packed with -1 padding. With ``chunk_mask`` each row allows a
    random non-empty subset of the chunk's frames, so every row has at least one key. With ``m`` memory
    tokens each head gets a random validity mask (none valid for head 0 of batch 0 when there are several
    (batch, head) pairs). Cache values are scaled
    up so that selecting a wrong slot cannot hide in the tolerance.
    """

    def rand(*shape, scale=1.0):
        return jnp.asarray(rng.standard_normal(shape).astype(np.float32) * scale, dtype)

    q, kc, vc = rand(b, c * t, h, d), rand(b, c * t, h, d), rand(b, c * t, h, d)
    kn, vn = rand(b, h, n, t, d, scale=2.0), rand(b, h, n, t, d, scale=2.0)
    frames = np.full((b, qf, h, k), -1, np.int32)
    rows = list(np.ndindex(b, qf, h))
    for i, idx in enumerate(rows):
        count = 0 if i == 0 else k if i == len(rows) - 1 else int(rng.integers(0, k + 1))
        frames[idx][:count] = rng.choice(n, min(count, n), replace=False)
    cmask = None
    if chunk_mask:
        cmask = rng.random((b, qf, h, c)) < 0.5
        cmask[
            np.arange(b)[:, None, None],
            np.arange(qf)[None, :, None],
            np.arange(h)[None, None, :],
            rng.integers(0, c, (b, qf, h)),
        ] = True
        cmask = jnp.asarray(cmask)
    mem_k = mem_v = mem_valid = None
    if m:
        mem_k, mem_v = rand(b, m, h, d), rand(b, m, h, d)
        valid = rng.random((b, h, m)) < 0.6
        if b * h > 1:
            valid[0, 0] = False
        mem_valid = jnp.asarray(valid)
    sel = Selection(frames=jnp.asarray(frames), chunk_mask=cmask, mem_k=mem_k, mem_v=mem_v, mem_valid=mem_valid)
    return (q, kc, vc, kn, vn), sel


def relative_error(out, ref) -> float:
    """||out - ref|| / ||ref|| in float64; NaN anywhere in ``out`` (an unwritten element) gives NaN."""
    out, ref = np.asarray(out, np.float64), np.asarray(jax.device_get(ref), np.float64)
    return float(np.linalg.norm(out - ref) / np.linalg.norm(ref))
