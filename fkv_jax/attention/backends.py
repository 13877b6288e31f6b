"""Attention backends: one table, chosen and checked before any work.

Every backend is a function ``fn(q, k_chunk, v_chunk, k_cache, v_cache, sel) -> out`` (shapes in
:mod:`fkv_jax.attention.selection`; the cache ``[B, H, N, T, D]``). :data:`BACKEND_TABLE` names each one by a
lazy ``"module:attr"`` reference, so importing this module (or :mod:`fkv_jax.attention`) imports no kernel.

:func:`resolve_backend` turns an ``--attention-backend`` value into ``(resolved_name, fn)`` and raises one
:class:`BackendError` (a ``ValueError`` with a one-line message naming the value and what is allowed or
missing) for: an unknown name, a missing dependency, the wrong platform, or a dtype, head dim or frame
shape the backend's kernel does not take. Call it with the model's sizes before loading weights;
:func:`fkv_jax.attention.attend` calls it again at trace time with the call's own shapes.

Platform rules (``platform`` / ``device_kind`` / ``compute_capability`` default to ``jax.devices()[0]``;
:func:`target` overrides them, e.g. for an ahead-of-time compile for a TPU on a CPU host):

============  ==========================================================================================
``xla``       everywhere, any float dtype (the reference).
``pallas_tpu`` TPU; bf16 or f32 q; D % 128 == 0 and T % 8 == 0 (Mosaic TPU's block rules).
``mosaic_gpu`` NVIDIA Hopper (compute capability 9.x, or a device kind naming H100 / H200 / H800 / GH200)
              with jaxlib's Mosaic GPU support (the CUDA plugin); bf16 or f16 q with a cache of the same
              dtype; D % 64 == 0, T >= 64 and Tq >= 64 (one 64-row WGMMA tile).
``triton``    a CUDA or ROCm GPU with ``jax_triton`` importable; bf16, f16 or f32 q, any float cache
              (cast per tile in the kernel); D a power of two >= 16.
``cpu_ffi``   an x86-64 CPU (AVX2 + FMA) with the C++ kernel that ``pip install -e .`` compiles
              (``fkv_jax/kernels/_cpu_attention*.so``, :mod:`fkv_jax.kernels.cpu_ffi`, called through
              ``jax.ffi``); float32 q, cache, chunk and memory tokens; D % 8 == 0. A missing or unloadable
              library is one BackendError naming why.
``auto``      TPU -> ``pallas_tpu``; Hopper -> ``mosaic_gpu``; other CUDA/ROCm GPUs -> ``triton`` when
              jax_triton imports; otherwise, or when the chosen kernel cannot take the call (its dtype or
              shape rules above), the next in this order that can: mosaic_gpu -> triton -> xla,
              pallas_tpu -> xla. CPU -> ``cpu_ffi`` when its library loads and the call is float32 with
              D % 8 == 0, else ``xla``.
============  ==========================================================================================

Interpreters on CPU: ``triton``, ``mosaic_gpu`` and ``pallas_tpu`` named explicitly on a CPU are refused
unless interpretation is asked for, with ``interpret=True`` or the environment variable ``FKV_INTERPRET=1``.
They then run in their interpreters (Triton's interpreter through ``jax.pure_callback``; Pallas'
Mosaic GPU / TPU interpreters), slowly, for checking a model without the hardware; the shape rules of the
real target still apply, except pallas_tpu's (8, 128) block rules, which only the TPU compiler enforces.
``auto`` on a CPU resolves to ``cpu_ffi`` or ``xla``, never to an interpreter.

Nothing is registered at run time: a custom or wrapped attention (e.g. :func:`fkv_jax.parallel.attention.sharded`)
is passed as a value, ``Sampler(attention=fn)``.
"""

from __future__ import annotations

import contextlib
import dataclasses
import functools
import importlib
import os
from collections.abc import Callable, Iterator, Mapping

import numpy as np

BACKEND_TABLE: dict[str, str] = {
    "xla": "fkv_jax.attention.reference:selection_attention",
    "pallas_tpu": "fkv_jax.kernels.pallas_tpu:pallas_tpu_attention",
    "mosaic_gpu": "fkv_jax.kernels.mosaic_gpu:mosaic_gpu_attention",
    "triton": "fkv_jax.kernels.triton_jax:triton_attention",
    "auto": "fkv_jax.attention.backends:auto_attention",
    "cpu_ffi": "fkv_jax.kernels.cpu_ffi:cpu_ffi_attention",
}

INTERPRET_ENV = "FKV_INTERPRET"
HOPPER_KINDS = ("H100", "H200", "H800", "GH200")


class BackendError(ValueError):
    """An attention backend that cannot run here or cannot take this problem (one-line message)."""


@dataclasses.dataclass(frozen=True)
class Target:
    """Where the attention will run. ``platform``: "cpu", "cuda", "rocm" or "tpu"."""

    platform: str
    device_kind: str = ""
    compute_capability: str = ""  # "9.0" on an H100/H200; "" when unknown or not CUDA


_TARGET: list[Target] = []  # the innermost ``with target(...)`` override


def _normalise_platform(platform: str) -> str:
    platform = platform.lower()
    return "cuda" if platform == "gpu" else platform


@contextlib.contextmanager
def target(platform: str, device_kind: str = "", compute_capability: str = ""):
    """Within the block, resolve backends for this target instead of ``jax.devices()[0]`` (an AOT compile
    for a TPU or GPU from a CPU host, or tests)."""
    _TARGET.append(Target(_normalise_platform(platform), device_kind, compute_capability))
    try:
        yield
    finally:
        _TARGET.pop()


def current_target(
    platform: str | None = None, device_kind: str | None = None, compute_capability: str | None = None
) -> Target:
    """The target: explicit arguments, else the innermost :func:`target` block, else ``jax.devices()[0]``."""
    if platform is None:
        if _TARGET:
            base = _TARGET[-1]
        else:
            import jax

            dev = jax.devices()[0]
            base = Target(
                _normalise_platform(dev.platform),
                str(getattr(dev, "device_kind", "")),
                str(getattr(dev, "compute_capability", "") or ""),
            )
    else:
        base = Target(_normalise_platform(platform))
    return Target(
        base.platform,
        base.device_kind if device_kind is None else device_kind,
        base.compute_capability if compute_capability is None else str(compute_capability),
    )


def target_compute_capability() -> int | None:
    """The compute capability (e.g. 90) of the innermost :func:`target` block, if it names one: what a GPU
    kernel compiled ahead of time for that target needs (None outside such a block: ask the device)."""
    if not _TARGET or not _TARGET[-1].compute_capability:
        return None
    major, _, minor = _TARGET[-1].compute_capability.partition(".")
    return int(major) * 10 + int(minor or 0)


def is_hopper(t: Target) -> bool:
    """An NVIDIA Hopper GPU: compute capability 9.x or a device kind naming one."""
    return t.platform == "cuda" and (
        t.compute_capability.startswith("9.") or any(k in t.device_kind.upper() for k in HOPPER_KINDS)
    )


def interpret_requested(interpret: bool | None = None) -> bool:
    """``interpret`` if given, else the ``FKV_INTERPRET`` environment variable (1/true/yes)."""
    if interpret is not None:
        return bool(interpret)
    return os.environ.get(INTERPRET_ENV, "").strip().lower() in ("1", "true", "yes")


def _load(ref: str) -> Callable:
    module, attr = ref.split(":")
    return getattr(importlib.import_module(module), attr)


def names() -> list[str]:
    """Every backend name."""
    return list(BACKEND_TABLE)


def get_backend(name: str) -> Callable:
    """The function of backend ``name`` as it is (no platform or shape checks; see :func:`resolve_backend`)."""
    if name not in BACKEND_TABLE:
        raise BackendError(f"unknown attention backend {name!r}; valid: {', '.join(names())}")
    return _load(BACKEND_TABLE[name])


# ---- dependencies ----------------------------------------------------------------------------------------


def jax_triton_available() -> bool:
    """``import jax_triton`` works (on a CPU-only jaxlib it needs the CUDA plugin's Python module)."""
    try:
        import jax_triton  # noqa: F401
    except ImportError:
        return False
    return True


def _module_available(name: str) -> bool:
    try:
        importlib.import_module(name)
    except ImportError:
        return False
    return True


def mosaic_gpu_available() -> bool:
    """Pallas' Mosaic GPU frontend imports and jaxlib has the Mosaic GPU runtime (the CUDA plugin's
    ``jax_cuda12_plugin`` / ``jax_cuda13_plugin`` module) that compiles its kernels on a GPU."""
    if not _module_available("jax.experimental.pallas.mosaic_gpu"):
        return False
    return _module_available("jax_cuda12_plugin") or _module_available("jax_cuda13_plugin")


def cpu_ffi_unavailable() -> str | None:
    """Why the compiled CPU kernel of ``cpu_ffi`` cannot run here (None when it can); loads it on first call."""
    return _load("fkv_jax.kernels.cpu_ffi:unavailable_reason")()


def _triton_interpreter_available() -> bool:
    return _module_available("triton") and _module_available("torch")


# ---- rules -----------------------------------------------------------------------------------------------


def _dtype_name(dtype) -> str:
    if dtype is None:
        return ""
    try:
        return np.dtype(dtype).name
    except TypeError:
        import jax.numpy as jnp

        try:
            return jnp.dtype(dtype).name
        except TypeError:
            raise BackendError(f"dtype {dtype!r} is not a dtype (allowed: float32, bfloat16, float16)") from None


@dataclasses.dataclass(frozen=True)
class Problem:
    """What the backend rules look at: dtypes and the sizes that matter to the kernels' layouts."""

    dtype: str
    cache_dtype: str
    head_dim: int
    tokens_per_frame: int
    query_tokens_per_group: int | None = None


def _shape_problem(name: str, p: Problem, t: Target, interpret: bool) -> str | None:
    """Why backend ``name`` cannot take problem ``p`` (None when it can)."""
    floats = ("float32", "bfloat16", "float16")
    if name == "xla":
        if p.dtype not in floats or p.cache_dtype not in floats:
            return f"dtype {p.dtype} with cache {p.cache_dtype} (allowed: {', '.join(floats)})"
        return None
    if name == "pallas_tpu":
        if p.dtype not in ("float32", "bfloat16") or p.cache_dtype not in floats:
            return f"dtype {p.dtype} (allowed: float32, bfloat16; cache any of {', '.join(floats)})"
        if not interpret and (p.head_dim % 128 or p.tokens_per_frame % 8):
            return (
                f"head_dim={p.head_dim}, tokens_per_frame={p.tokens_per_frame} (Mosaic TPU blocks need "
                f"head_dim % 128 == 0 and tokens_per_frame % 8 == 0)"
            )
        return None
    if name == "mosaic_gpu":
        if p.dtype not in ("bfloat16", "float16") or p.cache_dtype != p.dtype:
            return (
                f"dtype {p.dtype} with cache {p.cache_dtype} (allowed: bfloat16 or float16, the cache in "
                f"the same dtype)"
            )
        tq = p.query_tokens_per_group
        if p.head_dim % 64 or p.tokens_per_frame < 64 or (tq is not None and tq < 64):
            return (
                f"head_dim={p.head_dim}, tokens_per_frame={p.tokens_per_frame}, query_tokens_per_group={tq} "
                f"(needs head_dim % 64 == 0, tokens_per_frame >= 64, query_tokens_per_group >= 64)"
            )
        return None
    if name == "triton":
        if p.dtype not in floats or p.cache_dtype not in floats:
            return f"dtype {p.dtype} with cache {p.cache_dtype} (allowed: {', '.join(floats)})"
        if p.head_dim < 16 or p.head_dim & (p.head_dim - 1):
            return f"head_dim={p.head_dim} (needs a power of two >= 16)"
        return None
    if name == "cpu_ffi":
        if p.dtype != "float32" or p.cache_dtype != "float32":
            return f"dtype {p.dtype} with cache {p.cache_dtype} (allowed: float32 with a float32 cache)"
        if p.head_dim % 8:
            return f"head_dim={p.head_dim} (needs head_dim % 8 == 0)"
        return None
    return None


def _platform_problem(name: str, t: Target, interpret: bool) -> str | None:
    """Why backend ``name`` cannot run on target ``t`` (wrong platform or missing dependency)."""
    hint = f"use --attention-backend xla or auto, or on CPU set {INTERPRET_ENV}=1 to run its interpreter"
    if name == "xla":
        return None
    if name == "pallas_tpu":
        if t.platform == "tpu" or (t.platform == "cpu" and interpret):
            return None
        return f"needs a TPU, this platform is {t.platform}; {hint}"
    if name == "mosaic_gpu":
        if t.platform == "cpu" and interpret:
            return (
                None
                if _module_available("jax.experimental.pallas.mosaic_gpu")
                else "needs jax.experimental.pallas.mosaic_gpu, which does not import"
            )
        if not is_hopper(t):
            kind = t.device_kind or t.platform
            return f"needs an NVIDIA Hopper GPU (H100/H200, sm_90), this device is {kind}; {hint}"
        if not mosaic_gpu_available():
            return "needs Mosaic GPU support: jaxlib's CUDA plugin (pip install 'jax[cuda12]'), which is missing"
        return None
    if name == "triton":
        if t.platform == "cpu" and interpret:
            return (
                None
                if _triton_interpreter_available()
                else "needs triton and torch for Triton's interpreter on CPU, which do not import"
            )
        if t.platform not in ("cuda", "rocm"):
            return f"needs a CUDA or ROCm GPU, this platform is {t.platform}; {hint}"
        if not jax_triton_available():
            return "needs jax_triton (pip install jax-triton, with jaxlib's CUDA plugin), which does not import"
        return None
    if name == "cpu_ffi":
        if t.platform != "cpu":
            return f"needs a CPU (it is an XLA:CPU custom call), this platform is {t.platform}"
        return cpu_ffi_unavailable()
    return None


def choose(t: Target, p: Problem) -> str:
    """The name ``auto`` resolves to on ``t`` for ``p`` (see the module docstring)."""
    if t.platform == "tpu":
        order = ["pallas_tpu"]
    elif t.platform == "cuda":
        order = (["mosaic_gpu"] if is_hopper(t) else []) + ["triton"]
    elif t.platform == "rocm":
        order = ["triton"]
    elif t.platform == "cpu":
        order = ["cpu_ffi"]  # measured faster than xla on CPU (docs/cpu_kernel.md); xla when it cannot run
    else:
        order = []
    for name in order:
        if _platform_problem(name, t, False) is None and _shape_problem(name, p, t, False) is None:
            return name
    return "xla"


def _bind(name: str, fn: Callable, t: Target, interpret: bool) -> Callable:
    """The callable to use: on a CPU with interpretation, the kernel's interpreter entry point."""
    if not (interpret and t.platform == "cpu"):
        return fn
    if name == "triton":
        return _load("fkv_jax.kernels.triton_interpret:triton_interpret_attention")
    if name == "mosaic_gpu":
        params = _load("fkv_jax.kernels.mosaic_gpu_interpret:interpret_params")()
        return functools.partial(fn, interpret=params)
    if name == "pallas_tpu":
        from jax.experimental.pallas import tpu as pltpu

        return functools.partial(fn, interpret=pltpu.InterpretParams())
    return fn


def resolve_backend(
    name: str,
    *,
    platform: str | None = None,
    device_kind: str | None = None,
    compute_capability: str | None = None,
    dtype,
    cache_dtype=None,
    head_dim: int,
    tokens_per_frame: int,
    query_tokens_per_group: int | None = None,
    interpret: bool | None = None,
) -> tuple[str, Callable]:
    """Check backend ``name`` for this target and problem; return ``(resolved_name, fn)``.

    Args:
      name: an ``--attention-backend`` value (a key of :data:`BACKEND_TABLE` or a registered name).
      platform, device_kind, compute_capability: the target (default: :func:`current_target`).
      dtype: the queries' (compute) dtype; cache_dtype: the KV cache's (default ``dtype``).
      head_dim: D; tokens_per_frame: T (tokens of one cache slot); query_tokens_per_group: Tq, the queries
        sharing one selection (C*T for per-chunk selections, T for per-frame ones), None if unknown.
      interpret: run kernels named on a CPU in their interpreters (default: ``FKV_INTERPRET``).
    Returns:
      the concrete backend name (``auto`` resolved) and the function to call.
    Raises:
      BackendError: one line naming the value and what is allowed or missing.
    """
    if name not in BACKEND_TABLE:
        raise BackendError(f"unknown attention backend {name!r}; valid: {', '.join(names())}")
    t = current_target(platform, device_kind, compute_capability)
    interp = interpret_requested(interpret)
    p = Problem(
        _dtype_name(dtype),
        _dtype_name(cache_dtype) or _dtype_name(dtype),
        int(head_dim),
        int(tokens_per_frame),
        None if query_tokens_per_group is None else int(query_tokens_per_group),
    )
    resolved = choose(t, p) if name == "auto" else name
    why = _platform_problem(resolved, t, interp) or _shape_problem(resolved, p, t, interp and t.platform == "cpu")
    if why:
        raise BackendError(
            f"attention backend {name!r} {'(auto: ' + resolved + ') ' if name == 'auto' else ''}cannot run: {why}"
        )
    return resolved, _bind(resolved, _load(BACKEND_TABLE[resolved]), t, interp)


def problem_of(q, k_cache, sel) -> dict:
    """The keyword arguments of :func:`resolve_backend` that one call's shapes give
    (q [B, C*T, H, D], k_cache [B, H, N, T, D], sel.frames [B, Qf, H, K])."""
    return dict(
        dtype=q.dtype,
        cache_dtype=k_cache.dtype,
        head_dim=q.shape[-1],
        tokens_per_frame=k_cache.shape[3],
        query_tokens_per_group=q.shape[1] // sel.frames.shape[1],
    )


def _reads_stacked_cache(fn: Callable) -> bool:
    while fn is not None:
        if getattr(fn, "reads_stacked_cache", False):
            return True
        fn = getattr(fn, "func", None)
    return False


def auto_attention(q, k_chunk, v_chunk, k_cache, v_cache, sel, layer=None):
    """Selection attention on the backend ``auto`` resolves to for this call's shapes (at trace time).

    Like the kernels, it takes the layer-stacked cache ``[L, B, H, N, T, D]`` with ``layer`` (what the sampler
    passes): a backend that reads the stacked cache in place gets it whole, the others ``cache[layer]``."""
    if k_cache.ndim == 6:
        if layer is None:
            raise ValueError(f"a layer-stacked cache {k_cache.shape} ([L, B, H, N, T, D]) needs layer=")
        import jax

        view = jax.ShapeDtypeStruct(k_cache.shape[1:], k_cache.dtype)
        _, fn = resolve_backend("auto", **problem_of(q, view, sel))
        if _reads_stacked_cache(fn):
            return fn(q, k_chunk, v_chunk, k_cache, v_cache, sel, layer=layer)
        k_cache = jax.lax.dynamic_index_in_dim(k_cache, layer, 0, keepdims=False)
        v_cache = jax.lax.dynamic_index_in_dim(v_cache, layer, 0, keepdims=False)
        return fn(q, k_chunk, v_chunk, k_cache, v_cache, sel)
    if layer is not None:
        raise ValueError(f"layer= goes with a layer-stacked cache [L, B, H, N, T, D], got {k_cache.shape}")
    _, fn = resolve_backend("auto", **problem_of(q, k_cache, sel))
    return fn(q, k_chunk, v_chunk, k_cache, v_cache, sel)


auto_attention.reads_stacked_cache = True  # the sampler hands it [L, B, H, N, T, D] + layer=


class _Backends(Mapping):
    """``fkv_jax.attention.BACKENDS``: name -> function, loaded on first access (read-only)."""

    def __getitem__(self, name: str) -> Callable:
        if name not in self:
            raise KeyError(name)
        return get_backend(name)

    def __contains__(self, name) -> bool:
        return name in BACKEND_TABLE

    def __iter__(self) -> Iterator[str]:
        return iter(names())

    def __len__(self) -> int:
        return len(BACKEND_TABLE)

    def __repr__(self) -> str:
        return f"BACKENDS({', '.join(names())})"


BACKENDS = _Backends()

__all__ = [
    "BACKENDS",
    "BACKEND_TABLE",
    "BackendError",
    "INTERPRET_ENV",
    "Problem",
    "Target",
    "auto_attention",
    "choose",
    "cpu_ffi_unavailable",
    "current_target",
    "get_backend",
    "interpret_requested",
    "is_hopper",
    "jax_triton_available",
    "mosaic_gpu_available",
    "names",
    "problem_of",
    "resolve_backend",
    "target",
    "target_compute_capability",
]
