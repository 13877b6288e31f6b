"""``backend="auto"``: kept for callers of ``choose_backend``; the rules live in
:mod:`fkv_jax.attention.backends` (TPU -> pallas_tpu, Hopper -> mosaic_gpu, other CUDA/ROCm GPUs -> triton
when jax_triton imports, else xla; CPU -> cpu_ffi when its library is built, else xla; a call the chosen
kernel cannot take falls back)."""

from __future__ import annotations

import jax

from fkv_jax.attention.selection import Selection


def jax_triton_available() -> bool:
    from fkv_jax.attention.backends import jax_triton_available as available

    return available()


def choose_backend(
    q: jax.Array,
    k_cache: jax.Array,
    sel: Selection,
    platform: str | None = None,
    device_kind: str | None = None,
    compute_capability: str | None = None,
) -> str:
    """Backend name ``auto`` picks for a call with these shapes (q [B, C*T, H, D], k_cache [B, H, N, T, D])
    on ``platform`` (default: the current target, see :func:`fkv_jax.attention.backends.current_target`)."""
    from fkv_jax.attention import backends

    t = backends.current_target(platform, device_kind, compute_capability)
    p = backends.problem_of(q, k_cache, sel)
    problem = backends.Problem(
        jax.numpy.dtype(p["dtype"]).name,
        jax.numpy.dtype(p["cache_dtype"]).name,
        p["head_dim"],
        p["tokens_per_frame"],
        p["query_tokens_per_group"],
    )
    return backends.choose(t, problem)


def auto_attention(q, k_chunk, v_chunk, k_cache, v_cache, sel: Selection) -> jax.Array:
    """Selection attention on the backend ``auto`` resolves to (:func:`fkv_jax.attention.backends.auto_attention`)."""
    from fkv_jax.attention.backends import auto_attention as call

    return call(q, k_chunk, v_chunk, k_cache, v_cache, sel)
