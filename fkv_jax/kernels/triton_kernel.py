"""The Triton kernel for selection attention (the portable GPU path), and its CPU runner.

One program = ``BLOCK_Q`` query rows of one (b, group, head); it walks the packed tile list of
:func:`~fkv_jax.kernels.tiles.tile_table` (allowed chunk frames, valid memory tokens, selected cache slots),
loading each ``[BLOCK_K, D]`` tile of K and V by pointer arithmetic from its source, and runs the online
softmax in float32 with ``tl.dot`` (bf16/f16 tensor cores on GPU; ``input_precision="ieee"`` for float32).

Layouts read in place (no copy, no reshape of any operand outside the kernel):

* q, k_chunk, v_chunk, out: ``[B, S, H, D]``: row r of head h at ``((b * S + r) * H + h) * D``;
* packed memory ``[B, ROWS_M, H, D]`` (same strides);
* the cache ``[B, H, N, T, D]`` (heads first): slot s, token t of (b, h) is row ``s * T + t`` of the
  contiguous ``[N * T, D]`` plane at ``(b * H + h) * N * T * D``.

A cache whose dtype differs from q's (e.g. a float32 cache under bf16 queries) is cast per ``[BLOCK_K, D]``
tile right after its load, to q's dtype (what the XLA reference does); the products accumulate in float32.
Rows outside ``[LO, HI)`` of a tile and query rows past the group are masked, so any T and Tq work.

The same ``@triton.jit`` function is compiled for GPUs (jax-triton in :mod:`fkv_jax.kernels.triton_jax`, or
ahead of time by :mod:`fkv_jax.kernels.triton_aot`) and executed on CPU by Triton's interpreter
(:func:`run_interpreted`): the interpreter wraps the kernel's Python function explicitly, so it does not
depend on ``TRITON_INTERPRET`` and both can live in one process.
"""

from __future__ import annotations

import contextlib
import dataclasses
import math

import numpy as np
import triton
import triton.language as tl


@triton.jit
def selection_attention_kernel(
    q_ptr, kc_ptr, vc_ptr, km_ptr, vm_ptr, kn_ptr, vn_ptr, table_ptr, count_ptr, out_ptr,
    H: tl.constexpr, D: tl.constexpr, S: tl.constexpr, TQ: tl.constexpr, QF: tl.constexpr,
    ROWS_M: tl.constexpr, ROWS_N: tl.constexpr, N_TILES: tl.constexpr, SCALE: tl.constexpr,
    BLOCK_Q: tl.constexpr, BLOCK_K: tl.constexpr, PRECISION: tl.constexpr,
):
    """q, kc, vc, out: [B, S, H, D]; km, vm: [B, ROWS_M, H, D]; kn, vn: [B, H, ROWS_N = N * T, D] (the
    cache [B, H, N, T, D]); table: int32 [B, QF, H, N_TILES, 4]; count: int32 [B, QF, H].
    Grid: (cdiv(TQ, BLOCK_Q), QF * H, B)."""
    qt = tl.program_id(0)
    gh = tl.program_id(1)
    b = tl.program_id(2).to(tl.int64)
    g = gh // H
    h = gh % H
    hd = H * D
    rows = qt * BLOCK_Q + tl.arange(0, BLOCK_Q)
    row_ok = rows < TQ
    dcol = tl.arange(0, D)
    q_off = (b * S + g * TQ + rows)[:, None] * hd + h * D + dcol[None, :]  # [BLOCK_Q, D]
    q = tl.load(q_ptr + q_off, mask=row_ok[:, None], other=0.0)
    m = tl.full([BLOCK_Q], -1e30, tl.float32)
    l = tl.zeros([BLOCK_Q], tl.float32)
    acc = tl.zeros([BLOCK_Q, D], tl.float32)
    tile0 = (b * QF + g) * H + h
    n = tl.load(count_ptr + tile0)
    krow = tl.arange(0, BLOCK_K)
    for i in range(0, n):
        entry = table_ptr + (tile0 * N_TILES + i) * 4
        src = tl.load(entry)
        start = tl.load(entry + 1)
        lo = tl.load(entry + 2)
        hi = tl.load(entry + 3)
        key_ok = (krow >= lo) & (krow < hi)
        r = (start + krow).to(tl.int64)  # [BLOCK_K] source rows
        if src == 0:  # chunk [B, S, H, D]
            off = (b * S + r)[:, None] * hd + h * D + dcol[None, :]
            k = tl.load(kc_ptr + off, mask=key_ok[:, None], other=0.0).to(q.dtype)
            v = tl.load(vc_ptr + off, mask=key_ok[:, None], other=0.0).to(q.dtype)
        elif src == 1:  # packed memory [B, ROWS_M, H, D]
            off = (b * ROWS_M + r)[:, None] * hd + h * D + dcol[None, :]
            k = tl.load(km_ptr + off, mask=key_ok[:, None], other=0.0).to(q.dtype)
            v = tl.load(vm_ptr + off, mask=key_ok[:, None], other=0.0).to(q.dtype)
        else:  # cache [B, H, N * T, D], in place; a tile of another dtype is cast here, never the cache
            off = ((b * H + h) * ROWS_N + r)[:, None] * D + dcol[None, :]
            k = tl.load(kn_ptr + off, mask=key_ok[:, None], other=0.0).to(q.dtype)
            v = tl.load(vn_ptr + off, mask=key_ok[:, None], other=0.0).to(q.dtype)
        s = tl.dot(q, tl.trans(k), input_precision=PRECISION) * SCALE  # [BLOCK_Q, BLOCK_K] float32
        s = tl.where(key_ok[None, :], s, -1e30)
        m_new = tl.maximum(m, tl.max(s, 1))
        corr = tl.exp(m - m_new)
        p = tl.exp(s - m_new[:, None])
        l = l * corr + tl.sum(p, 1)
        acc = acc * corr[:, None] + tl.dot(p.to(q.dtype), v, input_precision=PRECISION)
        m = m_new
    l = tl.where(l == 0.0, 1.0, l)  # no key at all -> zeros
    out = acc / l[:, None]
    tl.store(out_ptr + q_off, out.to(out_ptr.dtype.element_ty), mask=row_ok[:, None])


@dataclasses.dataclass(frozen=True)
class TritonBlocks:
    """Launch configuration of :func:`selection_attention_kernel` (what the GPU wrapper uses by default)."""

    block_q: int = 64  # query rows per program
    block_k: int = 64  # key rows per tile
    num_warps: int = 4
    num_stages: int = 2

    def __post_init__(self):
        for name in ("block_q", "block_k"):
            v = getattr(self, name)
            if v < 16 or v & (v - 1):
                raise ValueError(f"triton {name} must be a power of two >= 16 (tl.dot), got {v}")


SUPPORTED_DTYPES = ("float32", "bfloat16", "float16")


def check_head_dim(d: int) -> None:
    if d < 16 or d & (d - 1):
        raise ValueError(f"triton needs a power-of-two head_dim >= 16 (tl.dot, tl.arange), got head_dim={d}")


def kernel_params(dims, mem_rows: int, cache_rows: int, n_tiles: int, dtype, block_q: int, block_k: int) -> dict:
    """The constexpr arguments of :func:`selection_attention_kernel` for one call."""
    check_head_dim(dims.head_dim)
    TritonBlocks(block_q=block_q, block_k=block_k)
    return dict(H=dims.heads, D=dims.head_dim, S=dims.tokens, TQ=dims.group_tokens, QF=dims.groups,
                ROWS_M=mem_rows, ROWS_N=cache_rows, N_TILES=n_tiles, SCALE=1.0 / math.sqrt(dims.head_dim),
                BLOCK_Q=block_q, BLOCK_K=block_k, PRECISION="ieee" if np.dtype(dtype) == np.float32 else "tf32")


def grid(dims, block_q: int) -> tuple[int, int, int]:
    return (-(-dims.group_tokens // block_q), dims.groups * dims.heads, dims.batch)


def _interpreter_bf16_dot() -> None:
    """Make the Triton interpreter's ``tl.dot`` read bfloat16 operands as numbers.

    Triton 3.9's interpreter stores bfloat16 as uint16 bit patterns and its ``create_dot`` multiplies those
    integers. This widens bfloat16 operands to float32 (exact) before the product, which accumulates in the
    accumulator's dtype (float32) as on a GPU. Other dtypes are untouched.
    """
    from triton.runtime import interpreter

    dot = interpreter.InterpreterBuilder.create_dot
    if getattr(dot, "widens_bf16", False):
        return

    def widen(x):
        if x.dtype != tl.bfloat16:
            return x
        return interpreter.TensorHandle((x.data.astype(np.uint32) << 16).view(np.float32), tl.float32)

    def create_dot(self, a, b, d, input_precision, max_num_imprecise_acc):
        return dot(self, widen(a), widen(b), d, input_precision, max_num_imprecise_acc)

    create_dot.widens_bf16 = True
    interpreter.InterpreterBuilder.create_dot = create_dot


_INTERPRETED: dict = {}


def _interpreted(fn):
    """``fn`` (a ``JITFunction``) as a Triton ``InterpretedFunction``, made once."""
    from triton.runtime.interpreter import InterpretedFunction

    if isinstance(fn, InterpretedFunction):
        return fn
    if fn.fn not in _INTERPRETED:
        _INTERPRETED[fn.fn] = InterpretedFunction(fn.fn)
    return _INTERPRETED[fn.fn]


@contextlib.contextmanager
def _device_calls_interpreted():
    """Within the block, a call of a compiled-mode ``@triton.jit`` function from interpreted code (the
    ``tl.max`` / ``tl.sum`` helpers of triton.language, decorated when triton was imported without
    TRITON_INTERPRET) runs it through the interpreter, as it would under TRITON_INTERPRET=1."""
    from triton.runtime.interpreter import _patch_lang
    from triton.runtime.jit import JITFunction

    def call(self, *args, **kwargs):
        # what InterpretedFunction.__call__ does, except that the language patch is undone afterwards
        # (Triton 3.9 leaves it in place, which breaks a later compile in the same process)
        scope = _patch_lang(self.fn)
        try:
            return _interpreted(self).rewrite()(*args, **kwargs)
        finally:
            scope.restore()

    original = JITFunction.__call__
    JITFunction.__call__ = call
    try:
        yield
    finally:
        JITFunction.__call__ = original


def run_interpreted(operands, params: dict, grid_shape: tuple[int, int, int], out_dtype) -> np.ndarray:
    """Execute the kernel in Triton's interpreter on CPU (torch CPU tensors) on numpy operands (q, kc, vc,
    km, vm, kn, vn, table, count, as :func:`fkv_jax.kernels.triton_jax.prepare` builds them).

    The output buffer starts as NaN, so an element the kernel does not write stays NaN. Returns a numpy
    array [B, C*T, H, D] of ``out_dtype`` (bfloat16 as ``ml_dtypes.bfloat16``).
    """
    import torch

    _interpreter_bf16_dot()

    def to_torch(x):
        x = np.asarray(x)
        if x.dtype.name == "bfloat16":
            return torch.from_numpy(np.array(x).view(np.int16)).view(torch.bfloat16)
        return torch.from_numpy(np.array(x))  # a writable copy

    args = [to_torch(x) for x in operands]
    out_np_dtype = np.dtype(out_dtype)
    tdtype = torch.bfloat16 if out_np_dtype.name == "bfloat16" else getattr(torch, out_np_dtype.name)
    out = torch.full(args[0].shape, float("nan"), dtype=tdtype)
    with _device_calls_interpreted():
        _interpreted(selection_attention_kernel)[grid_shape](*args, out, **params)
    if out.dtype == torch.bfloat16:
        return out.view(torch.int16).numpy().view(out_np_dtype)
    return out.numpy()


def interpret_attention(q, k_chunk, v_chunk, k_cache, v_cache, sel, *, block_q: int = 16,
                        block_k: int = 16) -> np.ndarray:
    """Run :func:`selection_attention_kernel` in Triton's interpreter on CPU, eagerly (tests).

    Same arguments as :func:`~fkv_jax.kernels.triton_jax.triton_attention`; the XLA-side preparation
    (packing, tile table) is shared with it. Returns a numpy array [B, C*T, H, D] in q's dtype.
    """
    from fkv_jax.kernels.triton_jax import prepare

    dims, operands, params = prepare(q, k_chunk, v_chunk, k_cache, v_cache, sel, block_q=block_q, block_k=block_k)
    return run_interpreted([np.asarray(x) for x in operands], params, grid(dims, block_q), q.dtype)
