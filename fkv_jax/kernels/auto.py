"""``backend="auto"``: the fastest backend this platform and call support, decided at trace time.

* TPU -> ``pallas_tpu`` when D % 128 == 0 and T % 8 == 0 (its block layout rules);
* NVIDIA Hopper (compute capability 9.x) -> ``mosaic_gpu`` for bf16/f16 with D % 64 == 0, T >= 64, Tq >= 64;
* any other CUDA/ROCm GPU, or a Hopper call mosaic_gpu does not take -> ``triton`` if jax-triton imports;
* otherwise (CPU, or a shape no kernel takes) -> ``xla``.
"""

from __future__ import annotations

import jax
import jax.numpy as jnp

from fkv_jax.attention.selection import Selection


def jax_triton_available() -> bool:
    try:
        import jax_triton  # noqa: F401
    except ImportError:
        return False
    return True


def choose_backend(q: jax.Array, k_cache: jax.Array, sel: Selection, platform: str | None = None) -> str:
    """Backend name for a call with these shapes (q [B, C*T, H, D], k_cache [B, N, T, H, D]) on ``platform``
    (default: ``jax.default_backend()``)."""
    platform = platform or jax.default_backend()
    d, t = q.shape[-1], k_cache.shape[2]
    if platform == "tpu":
        return "pallas_tpu" if d % 128 == 0 and t % 8 == 0 else "xla"
    if platform in ("gpu", "cuda", "rocm"):
        device = jax.devices()[0]
        hopper = str(getattr(device, "compute_capability", "")).startswith("9.")
        tq = q.shape[1] // sel.frames.shape[1]
        if (hopper and q.dtype in (jnp.bfloat16, jnp.float16) and d % 64 == 0 and t >= 64 and tq >= 64
                and k_cache.dtype == q.dtype):
            return "mosaic_gpu"
        if d >= 16 and d & (d - 1) == 0 and jax_triton_available():
            return "triton"
    return "xla"


def auto_attention(q, k_chunk, v_chunk, k_cache, v_cache, sel: Selection) -> jax.Array:
    """Selection attention on the backend :func:`choose_backend` picks."""
    from fkv_jax.attention import BACKENDS

    return BACKENDS[choose_backend(q, k_cache, sel)](q, k_chunk, v_chunk, k_cache, v_cache, sel)
