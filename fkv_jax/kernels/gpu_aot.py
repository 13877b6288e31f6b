"""Deviceless XLA:GPU compile for an H200 (sm_90a) on a CPU-only machine, Mosaic GPU kernels included.

jaxlib's CUDA PJRT plugin (``jax-cuda12-pjrt``, with ``jax-cuda12-plugin``; no GPU, no driver) builds a
compile-only CUDA topology from a ``GpuTargetConfigProto`` (:data:`H200_TARGET_CONFIG`). ``jax.jit(f).lower(
...).compile()`` on its device then runs the real XLA:GPU compiler; for a ``plgpu.kernel`` that includes
the Mosaic GPU pipeline of the ``mosaic_gpu_v2`` custom call (Mosaic GPU MLIR -> NVVM -> PTX -> ptxas ->
cubin, inside the plugin). With ``MOSAIC_GPU_DUMP_TO`` set, the plugin writes the kernel's PTX and ptxas
``-v`` output, from which :func:`compile_for_h200` reads registers and spills.

Nothing runs and nothing is timed. The target config is written here from NVIDIA's published H200 SXM
figures (132 SMs, 227 KB opt-in shared memory per block, 228 KB per SM, 64 K registers, 141 GB HBM3e at
4.8 TB/s, 50 MB L2); XLA uses it for its cost model and launch limits, not for correctness.

Install (a CPU venv; about 500 MB; not in the ``test`` extra)::

    pip install --no-deps jax-cuda12-plugin==0.10.2 jax-cuda12-pjrt==0.10.2

Every ``import jax`` then logs "Could not find cuda drivers"; keep ``JAX_PLATFORMS=cpu`` so that the
default backend stays the CPU.
"""

from __future__ import annotations

import os
import re
import tempfile
from pathlib import Path

H200_TARGET_CONFIG = """
gpu_device_info {
  threads_per_block_limit: 1024
  threads_per_warp: 32
  shared_memory_per_block: 49152
  shared_memory_per_core: 233472
  threads_per_core_limit: 2048
  core_count: 132
  fpus_per_core: 128
  block_dim_limit_x: 2147483647
  block_dim_limit_y: 65535
  block_dim_limit_z: 65535
  memory_bandwidth: 4800000000000
  l2_cache_size: 52428800
  clock_rate_ghz: 1.98
  device_memory_size: 150754820096
  shared_memory_per_block_optin: 232448
  cuda_compute_capability {
    major: 9
    minor: 0
  }
  registers_per_core_limit: 65536
  registers_per_block_limit: 65536
}
platform_name: "CUDA"
dnn_version_info {
  major: 9
  minor: 8
}
device_description_str: "NVIDIA H200"
"""

INSTALL_HINT = "pip install --no-deps jax-cuda12-plugin==0.10.2 jax-cuda12-pjrt==0.10.2 (no GPU or driver needed)"


def cuda_pjrt_available() -> bool:
    """The CUDA PJRT plugin (``jax_plugins.xla_cuda12``) and the CUDA jaxlib plugin are installed."""
    import importlib.util

    try:
        return (
            importlib.util.find_spec("jax_plugins.xla_cuda12") is not None
            and importlib.util.find_spec("jax_cuda12_plugin") is not None
        )
    except ImportError:  # no jax_plugins namespace at all
        return False


def h200_device():
    """A compile-only H200 device (a one-GPU CUDA topology built from :data:`H200_TARGET_CONFIG`)."""
    if not cuda_pjrt_available():
        raise RuntimeError(f"a deviceless CUDA compile needs jaxlib's CUDA PJRT plugin: {INSTALL_HINT}")
    from jax.experimental import topologies

    topo = topologies.get_topology_desc("h200", platform="cuda", target_config=H200_TARGET_CONFIG, topology="1x1x1")
    return topo.devices[0]


def _parse_ptxas(text: str) -> dict:
    regs = [int(x) for x in re.findall(r"Used (\d+) registers", text)]
    spills = [(int(a), int(b)) for a, b in re.findall(r"(\d+) bytes spill stores, (\d+) bytes spill loads", text)]
    return dict(
        registers=max(regs) if regs else None,
        spill_stores=sum(a for a, _ in spills) if spills else None,
        spill_loads=sum(b for _, b in spills) if spills else None,
    )


# XLA:GPU options for programs that call a kernel on one layer of a stacked cache ``[L, B, H, N, T, D]`` inside
# a loop over layers: without dynamic-slice fusion XLA copies each layer's slice (a whole layer's cache) into
# a fresh buffer before every kernel call; with it, the ``mosaic_gpu_v2`` call receives the slice's address
# in place (jax-triton 0.3.1's ``triton_kernel_call``, a legacy custom call, is not fused and keeps the
# copy). Pass as ``compiler_options`` to ``.compile()``, or in XLA_FLAGS as
# ``--xla_gpu_enable_dynamic_slice_fusion=true``.
GPU_COMPILER_OPTIONS = {"xla_gpu_enable_dynamic_slice_fusion": True}


def compile_for_h200(
    fn,
    *args,
    dump_dir: str | os.PathLike | None = None,
    min_elements: int | None = None,
    compiler_options: dict | None = None,
) -> dict:
    """Compile ``jax.jit(fn)(*args)`` for a deviceless H200; ``args`` are ``jax.ShapeDtypeStruct`` pytrees
    (their shardings are replaced by the H200 device's). ``compiler_options``: XLA options for this compile
    (e.g. :data:`GPU_COMPILER_OPTIONS`).

    Returns a dict: ``device_kind``; ``memory`` (``memory_analysis`` fields, bytes); ``large_ops`` (ops of
    the optimised HLO outside custom calls that touch >= ``min_elements`` elements, see
    :func:`~fkv_jax.kernels.hlo_check.large_hlo_ops_outside_kernels`; when ``min_elements`` is given);
    ``custom_calls`` (their targets); for Mosaic GPU kernels ``mosaic_kernels``: one entry per kernel
    with ``ptx_target``, ``wgmma`` and ``tma`` instruction counts, ``registers``, ``spill_stores``,
    ``spill_loads`` (from the plugin's ptxas output) and ``shared`` (dynamic shared memory per block).
    """
    import jax
    from jax.sharding import SingleDeviceSharding

    from fkv_jax.kernels.hlo_check import large_hlo_ops_outside_kernels

    dev = h200_device()
    sharding = SingleDeviceSharding(dev)
    args = jax.tree.map(lambda a: jax.ShapeDtypeStruct(a.shape, a.dtype, sharding=sharding), args)
    with tempfile.TemporaryDirectory() as tmp:
        out = Path(dump_dir) if dump_dir is not None else Path(tmp)
        out.mkdir(parents=True, exist_ok=True)
        saved = {
            k: os.environ.get(k)
            for k in (
                "MOSAIC_GPU_DUMP_TO",
                "MOSAIC_GPU_DUMP_PTX",
                "MOSAIC_GPU_DUMP_PTXAS",
                "MOSAIC_GPU_DUMP_MLIR_PASSES",
            )
        }
        os.environ.update(
            MOSAIC_GPU_DUMP_TO=str(out),
            MOSAIC_GPU_DUMP_PTX="1",
            MOSAIC_GPU_DUMP_PTXAS="1",
            MOSAIC_GPU_DUMP_MLIR_PASSES="1",
        )
        try:
            compiled = jax.jit(fn).lower(*args).compile(compiler_options)
        finally:
            for k, v in saved.items():
                if v is None:
                    os.environ.pop(k, None)
                else:
                    os.environ[k] = v
        kernels = []
        for ptx in sorted(out.glob("*.ptx")):
            text = ptx.read_text()
            log = ptx.with_suffix(".ptxas")
            entry = dict(
                name=ptx.stem,
                ptx_target=(re.search(r"\.target\s+(\S+)", text) or [None, None])[1],
                wgmma=len(re.findall(r"wgmma\.mma_async", text)),
                tma=len(re.findall(r"cp\.async\.bulk\.tensor", text)),
            )
            entry.update(_parse_ptxas(log.read_text() if log.exists() else ""))
            passes = ptx.with_suffix(".mlir-passes.log")
            smem = re.search(r"dynamic_shared_memory_size %c(\d+)_i32", passes.read_text()) if passes.exists() else None
            entry["shared"] = int(smem.group(1)) if smem else None  # dynamic shared memory per block, bytes
            kernels.append(entry)
    hlo = compiled.as_text()
    mem = compiled.memory_analysis()
    report = dict(
        device_kind=dev.device_kind,
        memory={
            k: int(getattr(mem, k))
            for k in ("argument_size_in_bytes", "output_size_in_bytes", "temp_size_in_bytes", "alias_size_in_bytes")
        },
        custom_calls=sorted(set(re.findall(r'custom_call_target="([^"]+)"', hlo))),
        mosaic_kernels=kernels,
    )
    if min_elements is not None:
        report["large_ops"] = large_hlo_ops_outside_kernels(hlo, min_elements)
    return report


def mosaic_gpu_mlir(fn, *args) -> list[str]:
    """The Mosaic GPU MLIR modules (text) of the ``plgpu.kernel`` calls in ``jax.jit(fn)(*args)``, as Pallas
    hands them to the ``mosaic_gpu_v2`` custom call when lowering for ``cuda``: what can be produced without
    jaxlib's CUDA plugin. (Captured through a private jax 0.10.2 hook, ``mosaic.gpu.core``'s lowering rule.)"""
    import jax
    from jax.experimental.mosaic.gpu import core

    modules = []
    rule = core._mosaic_gpu_lowering_rule

    def capture(ctx, *operands, module, **kwargs):
        module.operation.verify()
        modules.append(module.operation.get_asm(enable_debug_info=False))
        return rule(ctx, *operands, module=module, **kwargs)

    core._mosaic_gpu_lowering_rule = capture
    try:
        jax.export.export(jax.jit(lambda *a: fn(*a)), platforms=["cuda"])(*args)  # a new function: no cached lowering
    finally:
        core._mosaic_gpu_lowering_rule = rule
    return modules


__all__ = [
    "GPU_COMPILER_OPTIONS",
    "H200_TARGET_CONFIG",
    "INSTALL_HINT",
    "compile_for_h200",
    "cuda_pjrt_available",
    "h200_device",
    "mosaic_gpu_mlir",
]
