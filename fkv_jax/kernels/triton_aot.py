"""Ahead-of-time compile of the Triton kernel for an H100/H200 (sm_90a) on a machine without a GPU.

:func:`compile_for_sm90` runs Triton's own compiler (``triton.compile`` on an ``ASTSource`` for
``GPUTarget("cuda", 90, 32)``: TTIR -> TTGIR -> LLVM IR -> PTX -> cubin) with the constexpr parameters and
launch configuration that :func:`fkv_jax.kernels.triton_jax.triton_attention` would use for the given
shapes, then runs the ptxas bundled with Triton (``-v --gpu-name=sm_90a``, as Triton's cubin step) on the
PTX to read what only a device load would otherwise report: registers per thread and spill bytes. Neither
step needs a GPU, a CUDA driver or jax-triton. Nothing here measures a time.

Hopper limits checked by :func:`check_sm90_limits`: 255 registers per thread, no spills, and at most 227 KB
(232,448 bytes) of shared memory per block (the opt-in maximum).
"""

from __future__ import annotations

import dataclasses
import os
import re
import subprocess
import tempfile
import time
from pathlib import Path

import numpy as np

from fkv_jax.kernels.shapes import Dims
from fkv_jax.kernels.triton_kernel import TritonBlocks, grid, kernel_params, selection_attention_kernel

SM90_MAX_SHARED = 232448  # bytes per block (227 KB, opt-in)
SM90_MAX_REGISTERS = 255  # per thread

_TRITON_TYPES = {"float32": "fp32", "bfloat16": "bf16", "float16": "fp16"}
_POINTERS = (
    "q_ptr",
    "kc_ptr",
    "vc_ptr",
    "km_ptr",
    "vm_ptr",
    "kn_ptr",
    "vn_ptr",
    "table_ptr",
    "count_ptr",
    "layer_ptr",
    "out_ptr",
)
_INT_POINTERS = ("table_ptr", "count_ptr", "layer_ptr")


def ptxas_path(arch: int = 90) -> Path:
    """The ptxas Triton itself uses to build the cubin for ``arch``.

    Triton 3.9 ships two: ``bin/ptxas`` (CUDA 12.9, PTX ISA <= 8.8, used below sm_90) and
    ``bin/ptxas-blackwell`` (CUDA 13.x, used for sm_90 and newer). Its sm_90 PTX declares the newer ISA
    version (9.x), which the CUDA 12.9 ptxas refuses ("Unsupported .version"), so the check runs the same
    binary as Triton's own cubin step.
    """
    from triton.backends.nvidia.compiler import get_ptxas

    return Path(get_ptxas(arch).path)


def parse_ptxas(log: str) -> dict:
    """Registers, spill bytes and static shared memory from ``ptxas -v`` output (the kernel's lines)."""
    regs = re.findall(r"Used (\d+) registers", log)
    spills = re.findall(r"(\d+) bytes spill stores, (\d+) bytes spill loads", log)
    smem = re.findall(r"(\d+) bytes smem", log)
    if not regs or not spills:
        raise RuntimeError(f"cannot read registers/spills from ptxas output:\n{log}")
    return dict(
        registers=max(int(r) for r in regs),
        spill_stores=sum(int(s) for s, _ in spills),
        spill_loads=sum(int(l) for _, l in spills),
        static_smem=sum(int(s) for s in smem),
    )


def launch_problem(
    *,
    batch: int = 1,
    heads: int = 12,
    head_dim: int = 128,
    frame_tokens: int = 1560,
    chunk_frames: int = 3,
    slots: int = 21,
    budget: int | None = None,
    groups: int = 1,
    memory: int = 0,
    layers: int = 30,
    dtype: str = "bfloat16",
    blocks: TritonBlocks = TritonBlocks(),
) -> tuple[Dims, dict]:
    """(Dims, constexpr parameters) of one call, as :func:`fkv_jax.kernels.triton_jax.prepare` computes them
    (defaults: Wan2.1-1.3B at 480x832, 3-frame chunks, a 21-slot cache, every slot selectable, read from the
    sampler's 30-layer stacked cache; ``layers=0``: one layer's cache)."""
    budget = slots if budget is None else budget
    tokens = chunk_frames * frame_tokens
    dims = Dims(
        batch=batch,
        heads=heads,
        head_dim=head_dim,
        tokens=tokens,
        slots=slots,
        frame_tokens=frame_tokens,
        chunk_frames=chunk_frames,
        groups=groups,
        budget=budget,
        memory=memory,
    )
    if tokens % groups:
        raise ValueError(f"{tokens} queries do not split into groups={groups}")
    has_cache = bool(slots and budget)
    nt = -(-frame_tokens // blocks.block_k)
    n_tiles = chunk_frames * nt + (-(-memory // blocks.block_k) if memory else 0) + (budget * nt if has_cache else 0)
    params = kernel_params(
        dims,
        memory or tokens,
        slots * frame_tokens if has_cache else tokens,
        n_tiles,
        np.dtype(_np_dtype(dtype)),
        blocks.block_q,
        blocks.block_k,
        batch * heads * slots * frame_tokens * head_dim if layers and has_cache else 0,
    )
    return dims, params


def _np_dtype(name: str):
    if name == "bfloat16":
        import ml_dtypes

        return ml_dtypes.bfloat16
    return np.dtype(name)


def compile_for_sm90(
    *,
    dtype: str = "bfloat16",
    cache_dtype: str | None = None,
    blocks: TritonBlocks = TritonBlocks(),
    ptxas: bool = True,
    workdir: str | os.PathLike | None = None,
    **problem,
) -> dict:
    """Compile :func:`~fkv_jax.kernels.triton_kernel.selection_attention_kernel` to PTX and cubin for sm_90a.

    Args:
      dtype: q / k_chunk / v_chunk / memory / output dtype ("bfloat16", "float16", "float32").
      cache_dtype: the cache's dtype (default ``dtype``); a different one is cast per tile in the kernel.
      blocks: launch configuration (the wrapper's defaults).
      ptxas: also run the bundled ``ptxas -arch=sm_90a -v`` on the PTX.
      workdir: where the PTX and ptxas output go (default: a temporary directory, removed).
      problem: shapes, see :func:`launch_problem`.
    Returns:
      a dict: ``target``, ``dtype``, ``cache_dtype``, the launch configuration and constexprs, ``shared``
      (bytes of shared memory per block, Triton's metadata), ``ptx_bytes``, ``cubin_bytes``, ``wgmma`` (the
      number of wgmma instructions in the PTX), ``compile_s`` (seconds on this CPU); with ``ptxas``:
      ``registers``, ``spill_stores``, ``spill_loads``, ``static_smem``, ``ptxas_log``.
    Raises:
      ValueError for an unsupported dtype or shape; Triton's own error when it does not compile.
    """
    import triton
    from triton.backends.compiler import GPUTarget
    from triton.compiler import ASTSource

    cache_dtype = cache_dtype or dtype
    for name, value in (("dtype", dtype), ("cache_dtype", cache_dtype)):
        if value not in _TRITON_TYPES:
            raise ValueError(f"{name}={value!r} is not one of {sorted(_TRITON_TYPES)}")
    dims, params = launch_problem(dtype=dtype, blocks=blocks, **problem)
    fn = _compilable(selection_attention_kernel)
    elem = {
        "q_ptr": dtype,
        "kc_ptr": dtype,
        "vc_ptr": dtype,
        "km_ptr": dtype,
        "vm_ptr": dtype,
        "kn_ptr": cache_dtype,
        "vn_ptr": cache_dtype,
        "out_ptr": dtype,
    }
    signature = {}
    for arg in fn.arg_names:
        if arg in _POINTERS:
            signature[arg] = "*i32" if arg in _INT_POINTERS else "*" + _TRITON_TYPES[elem[arg]]
        else:
            signature[arg] = "constexpr"
    # XLA buffers are at least 16-byte aligned: the pointer specialisation jax-triton also applies
    attrs = {(fn.arg_names.index(a),): [["tt.divisibility", 16]] for a in _POINTERS}
    src = ASTSource(fn=fn, signature=signature, constexprs=params, attrs=attrs)
    t0 = time.perf_counter()
    compiled = triton.compile(
        src,
        target=GPUTarget("cuda", 90, 32),
        options=dict(num_warps=blocks.num_warps, num_stages=blocks.num_stages, enable_fp_fusion=True),
    )
    compile_s = time.perf_counter() - t0
    ptx = compiled.asm["ptx"]
    report = dict(
        target="cuda sm_90a (GPUTarget('cuda', 90, 32))",
        dtype=dtype,
        cache_dtype=cache_dtype,
        dims=dataclasses.asdict(dims),
        block_q=blocks.block_q,
        block_k=blocks.block_k,
        num_warps=blocks.num_warps,
        num_stages=blocks.num_stages,
        constexprs=dict(params),
        grid=grid(dims, blocks.block_q),
        shared=int(compiled.metadata.shared),
        ptx_bytes=len(ptx),
        cubin_bytes=len(compiled.asm["cubin"]),
        wgmma=len(re.findall(r"\bwgmma\.mma_async", ptx)),
        ptx_target=(re.search(r"\.target\s+(\S+)", ptx) or [None, None])[1],
        compile_s=round(compile_s, 2),
    )
    if ptxas:
        with tempfile.TemporaryDirectory() as tmp:
            out = Path(workdir) if workdir is not None else Path(tmp)
            out.mkdir(parents=True, exist_ok=True)
            ptx_file = out / f"selection_attention_{dtype}_{cache_dtype}.ptx"
            ptx_file.write_text(ptx)
            # the flags of Triton's own cubin step (--regAllocOptLevel=2: its ptxas 13.x workaround)
            r = subprocess.run(
                [
                    str(ptxas_path()),
                    "-v",
                    "--regAllocOptLevel=2",
                    "--gpu-name=sm_90a",
                    str(ptx_file),
                    "-o",
                    str(ptx_file.with_suffix(".cubin")),
                ],
                capture_output=True,
                text=True,
                timeout=300,
            )
            if r.returncode:
                raise RuntimeError(f"ptxas failed ({r.returncode}):\n{r.stderr[-3000:]}")
            log = r.stdout + r.stderr
        report.update(parse_ptxas(log), ptxas=str(ptxas_path()), ptxas_log=log)
    return report


def _compilable(kernel):
    """The kernel as a ``JITFunction`` even when TRITON_INTERPRET=1 made ``@triton.jit`` build an
    interpreted one."""
    from triton.runtime.jit import JITFunction

    return kernel if isinstance(kernel, JITFunction) else JITFunction(kernel.fn)


def check_sm90_limits(report: dict) -> list[str]:
    """The Hopper limits a :func:`compile_for_sm90` report breaks (empty when it fits)."""
    problems = []
    if report["shared"] > SM90_MAX_SHARED:
        problems.append(f"shared memory {report['shared']} B > {SM90_MAX_SHARED} B")
    if "registers" in report:
        if report["registers"] > SM90_MAX_REGISTERS:
            problems.append(f"{report['registers']} registers > {SM90_MAX_REGISTERS}")
        if report["spill_stores"] or report["spill_loads"]:
            problems.append(f"spills: {report['spill_stores']} B stores, {report['spill_loads']} B loads")
    return problems


__all__ = [
    "SM90_MAX_REGISTERS",
    "SM90_MAX_SHARED",
    "check_sm90_limits",
    "compile_for_sm90",
    "launch_problem",
    "parse_ptxas",
    "ptxas_path",
]
