"""Accelerated backends of :func:`fkv_jax.attention.attend` (named in :mod:`fkv_jax.attention.backends`).

* ``pallas_tpu``: Pallas TPU kernel, selection table scalar-prefetched into SMEM.
* ``mosaic_gpu``: Pallas Mosaic GPU kernel for Hopper (TMA copies, WGMMA).
* ``triton``: Triton kernel through jax-triton (any CUDA/ROCm GPU); Triton's interpreter on CPU.
* ``auto``: tpu -> pallas_tpu, Hopper -> mosaic_gpu, other GPUs -> triton, else xla (per call's shapes).

Every kernel reads the cache ``[B, H, N, T, D]`` in place. Kernels import only the ``Selection`` contract
(and the shared shape/packing helpers); the backend table imports them lazily, nothing here registers.
No GPU or TPU has run them: they are checked by interpreters on CPU and by compiling for the targets
(docs/kernels.md). Every backend computes exactly :func:`fkv_jax.attention.reference.selection_attention`.
"""

from __future__ import annotations

from fkv_jax.kernels.auto import auto_attention, choose_backend
from fkv_jax.kernels.mosaic_gpu import mosaic_gpu_attention
from fkv_jax.kernels.pallas_tpu import pallas_tpu_attention


def triton_attention(q, k_chunk, v_chunk, k_cache, v_cache, sel, **kwargs):
    """:func:`fkv_jax.kernels.triton_jax.triton_attention`, imported on first use (needs triton, and
    jax-triton with a GPU jaxlib when called)."""
    from fkv_jax.kernels.triton_jax import triton_attention as call

    return call(q, k_chunk, v_chunk, k_cache, v_cache, sel, **kwargs)


__all__ = ["auto_attention", "choose_backend", "mosaic_gpu_attention", "pallas_tpu_attention", "triton_attention"]
