"""``cpu_ffi``: a hand-written flash-attention kernel for x86 CPUs, called from XLA:CPU through ``jax.ffi``.

The C++ source is ``csrc/cpu_attention.{h,cc}``; ``pip install -e .`` (setup.py) compiles it into
``fkv_jax/kernels/_cpu_attention*.so`` with the XLA FFI headers of the jaxlib in the build environment
(``-O3 -march=x86-64-v3``, i.e. AVX2 + FMA; it refuses to load on a CPU without the instruction sets it was
compiled for). This module loads it with ``ctypes``, registers the
handler ``fkv_cpu_attention`` for the CPU platform once, and calls it with :func:`jax.ffi.ffi_call`.

What the kernel computes is exactly :func:`fkv_jax.attention.reference.selection_attention` (float32 in and
out, float32 accumulation): per (batch, query-frame group, head) a softmax over the allowed chunk frames, the
selected cache slots (read in place from ``[B, H, N, T, D]``, no copy) and the valid memory tokens; a query
with no readable key gets zeros. Work is split over (batch, group, head, query tile) on XLA:CPU's intra-op
thread pool. See docs/cpu_kernel.md for the design and the measurements.

If the library is missing (a build without a compiler, a non-x86 machine) or cannot load, the backend
raises one :class:`~fkv_jax.attention.backends.BackendError` line; nothing else in fkv_jax depends on it.
"""

from __future__ import annotations

import ctypes
import functools
import importlib.machinery
import platform
from pathlib import Path

import jax
import jax.numpy as jnp

from fkv_jax.attention.selection import Selection

TARGET_NAME = "fkv_cpu_attention"
LIBRARY_STEM = "_cpu_attention"
# Tile sizes picked by measurement at the mini shapes (docs/cpu_kernel.md); q_tile must be a multiple of 16.
DEFAULT_Q_TILE = 256
DEFAULT_K_TILE = 96


def library_path() -> Path | None:
    """The compiled kernel next to this module (``_cpu_attention<extension suffix>``), or None."""
    here = Path(__file__).resolve().parent
    for suffix in importlib.machinery.EXTENSION_SUFFIXES:
        path = here / f"{LIBRARY_STEM}{suffix}"
        if path.is_file():
            return path
    return None


@functools.cache
def _load() -> tuple[ctypes.CDLL | None, str | None]:
    """(library, None) when the kernel can run on this machine, else (None, why not)."""
    if platform.machine().lower() not in ("x86_64", "amd64"):
        return None, f"the kernel is x86-64 only (AVX2 + FMA), this machine is {platform.machine()}"
    path = library_path()
    if path is None:
        return None, (
            "the compiled kernel fkv_jax/kernels/_cpu_attention*.so is missing (it is built by "
            "`pip install -e .`, which needs a C++20 compiler; reinstall, or use --attention-backend xla)"
        )
    try:
        lib = ctypes.CDLL(str(path))
    except OSError as e:
        return None, f"the compiled kernel {path.name} does not load ({e}); reinstall with `pip install -e .`"
    lib.fkv_cpu_attention_supported.restype = ctypes.c_int
    lib.fkv_cpu_attention_isa.restype = ctypes.c_char_p
    if not lib.fkv_cpu_attention_supported():
        isa = lib.fkv_cpu_attention_isa().decode()
        return None, (
            f"the compiled kernel {path.name} was built for {isa}, which this CPU lacks; reinstall "
            f"here with `pip install -e .`"
        )
    return lib, None


def unavailable_reason() -> str | None:
    """Why the ``cpu_ffi`` kernel cannot run here (None when it can)."""
    return _load()[1]


def compiled_isa() -> str | None:
    """The instruction set the library was compiled for ("avx512vl" or "avx2+fma"), None if it does not load."""
    lib, _ = _load()
    return None if lib is None else lib.fkv_cpu_attention_isa().decode()


@functools.cache
def _register() -> None:
    lib, why = _load()
    if lib is None:
        from fkv_jax.attention.backends import BackendError

        raise BackendError(f"attention backend 'cpu_ffi' cannot run: {why}")
    jax.ffi.register_ffi_target(TARGET_NAME, jax.ffi.pycapsule(lib.FkvCpuAttention), platform="cpu")


def cpu_ffi_attention(
    q: jax.Array,
    k_chunk: jax.Array,
    v_chunk: jax.Array,
    k_cache: jax.Array,
    v_cache: jax.Array,
    sel: Selection,
    *,
    q_tile: int = DEFAULT_Q_TILE,
    k_tile: int = DEFAULT_K_TILE,
    threads: int = 0,
    layer=None,
) -> jax.Array:
    """Selection attention by the C++ kernel. q, k_chunk, v_chunk: float32 [B, Sq, H, D] (Sq = C * T);
    k_cache, v_cache: float32 [B, H, N, T, D], read in place, or the layer-stacked [L, B, H, N, T, D] with
    ``layer`` (an int32 scalar, may be traced; the sampler passes these, so no layer slice is copied);
    ``sel`` as for every backend.

    q_tile: queries per task (a multiple of 16); k_tile: keys per online-softmax step; threads: workers (0 =
    XLA:CPU's intra-op pool size). Returns float32 [B, Sq, H, D].
    """
    from fkv_jax.attention.backends import BackendError

    _register()
    b, sq, h, d = q.shape
    if k_cache.ndim == 6:
        if layer is None:
            raise ValueError(f"a layer-stacked cache {k_cache.shape} ([L, B, H, N, T, D]) needs layer=")
        layer_idx = jnp.asarray(layer, jnp.int32).reshape(1)
    elif layer is not None:
        raise ValueError(f"layer= goes with a layer-stacked cache [L, B, H, N, T, D], got {k_cache.shape}")
    else:
        layer_idx = jnp.zeros((1,), jnp.int32)
    arrays = {"q": q, "k_chunk": k_chunk, "v_chunk": v_chunk, "k_cache": k_cache, "v_cache": v_cache}
    if sel.mem_k is not None:
        arrays.update(mem_k=sel.mem_k, mem_v=sel.mem_v)
    bad = {k: jnp.dtype(v.dtype).name for k, v in arrays.items() if v.dtype != jnp.float32}
    if bad:
        raise BackendError(f"attention backend 'cpu_ffi' cannot run: float32 only, got {bad}")
    if d % 8 or q_tile < 16 or q_tile % 16 or k_tile < 1:
        raise BackendError(
            f"attention backend 'cpu_ffi' cannot run: head_dim={d}, q_tile={q_tile}, k_tile={k_tile} "
            f"(needs head_dim % 8 == 0, q_tile a multiple of 16)"
        )
    qf, kmax = sel.frames.shape[1], sel.frames.shape[3]
    if sq % qf:
        raise ValueError(f"{sq} queries do not split into {qf} query-frame groups")
    frames = jnp.broadcast_to(sel.frames.astype(jnp.int32), (b, qf, h, kmax))
    if sel.chunk_mask is None:
        cmask = jnp.ones((b, qf, h, 1), jnp.bool_)  # the whole chunk as one readable frame
    else:
        c = sel.chunk_mask.shape[-1]
        if sq % c:
            raise ValueError(f"chunk_mask has {c} frames, which do not split the chunk's {sq} keys")
        cmask = jnp.broadcast_to(sel.chunk_mask.astype(jnp.bool_), (b, qf, h, c))
    if sel.mem_k is None:
        mem_k = mem_v = jnp.zeros((b, 0, h, d), jnp.float32)
        mem_valid = jnp.zeros((b, h, 0), jnp.bool_)
    else:
        m = sel.mem_k.shape[1]
        mem_k, mem_v = sel.mem_k, sel.mem_v
        mem_valid = (
            jnp.ones((b, h, m), jnp.bool_)
            if sel.mem_valid is None
            else jnp.broadcast_to(sel.mem_valid.astype(jnp.bool_), (b, h, m))
        )
    call = jax.ffi.ffi_call(TARGET_NAME, jax.ShapeDtypeStruct(q.shape, jnp.float32), vmap_method="sequential")
    return call(
        q,
        k_chunk,
        v_chunk,
        k_cache,
        v_cache,
        frames,
        cmask,
        mem_k,
        mem_v,
        mem_valid,
        layer_idx,
        q_tile=int(q_tile),
        k_tile=int(k_tile),
        threads=int(threads),
    )


cpu_ffi_attention.reads_stacked_cache = True  # the sampler hands it [L, B, H, N, T, D] + layer=

__all__ = [
    "DEFAULT_K_TILE",
    "DEFAULT_Q_TILE",
    "compiled_isa",
    "cpu_ffi_attention",
    "library_path",
    "unavailable_reason",
]
