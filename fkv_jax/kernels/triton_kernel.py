"""The Triton kernel for selection attention (the portable GPU path), and its CPU runner.

One program = ``BLOCK_Q`` query rows of one (b, group, head); it walks the packed tile list of
:func:`~fkv_jax.kernels.tiles.tile_table` (allowed chunk frames, valid memory tokens, selected cache slots),
loading each ``[BLOCK_K, D]`` tile of K and V by pointer arithmetic from its source (the cache is read in
place as ``[B, N * T, H, D]``), and runs the online softmax in float32 with ``tl.dot`` (bf16/f16 tensor
cores on GPU; ``input_precision="ieee"`` for float32 inputs). Rows outside ``[LO, HI)`` of a tile and query
rows past the group are masked, so any T and Tq work.

The same ``@triton.jit`` function is compiled for GPUs by jax-triton (:mod:`fkv_jax.kernels.triton_jax`)
and executed on CPU by Triton's interpreter (:func:`interpret_attention`, torch CPU tensors). Triton picks
one of the two when it is imported: ``TRITON_INTERPRET=1`` must be in the environment before ``import
triton`` for the interpreter, and must not be for jax-triton, so the two never share a process.
"""

from __future__ import annotations

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
    """q, kc, vc, out: [B, S, H, D]; km, vm: [B, ROWS_M, H, D]; kn, vn: [B, ROWS_N, H, D];
    table: int32 [B, QF, H, N_TILES, 4]; count: int32 [B, QF, H]. Grid: (cdiv(TQ, BLOCK_Q), QF * H, B)."""
    qt = tl.program_id(0)
    gh = tl.program_id(1)
    b = tl.program_id(2).to(tl.int64)
    g = gh // H
    h = gh % H
    hd = H * D
    rows = qt * BLOCK_Q + tl.arange(0, BLOCK_Q)
    row_ok = rows < TQ
    dcol = tl.arange(0, D)
    q_off = (b * S + g * TQ + rows)[:, None] * hd + h * D + dcol[None, :]
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
        if src == 0:
            k_base = kc_ptr + b * S * hd
            v_base = vc_ptr + b * S * hd
        elif src == 1:
            k_base = km_ptr + b * ROWS_M * hd
            v_base = vm_ptr + b * ROWS_M * hd
        else:
            k_base = kn_ptr + b * ROWS_N * hd
            v_base = vn_ptr + b * ROWS_N * hd
        key_ok = (krow >= lo) & (krow < hi)
        kv_off = (start + krow).to(tl.int64)[:, None] * hd + h * D + dcol[None, :]
        k = tl.load(k_base + kv_off, mask=key_ok[:, None], other=0.0)
        v = tl.load(v_base + kv_off, mask=key_ok[:, None], other=0.0)
        s = tl.dot(q, tl.trans(k), input_precision=PRECISION) * SCALE
        s = tl.where(key_ok[None, :], s, -1e30)
        m_new = tl.maximum(m, tl.max(s, 1))
        corr = tl.exp(m - m_new)
        p = tl.exp(s - m_new[:, None])
        l = l * corr + tl.sum(p, 1)
        acc = acc * corr[:, None] + tl.dot(p.to(v.dtype), v, input_precision=PRECISION)
        m = m_new
    l = tl.where(l == 0.0, 1.0, l)  # no key at all -> zeros
    out = acc / l[:, None]
    tl.store(out_ptr + q_off, out.to(out_ptr.dtype.element_ty), mask=row_ok[:, None])


def kernel_params(dims, mem_rows: int, cache_rows: int, n_tiles: int, dtype, block_q: int, block_k: int) -> dict:
    """The constexpr arguments of :func:`selection_attention_kernel` for one call."""
    if dims.head_dim & (dims.head_dim - 1) or dims.head_dim < 16 or block_q < 16 or block_k < 16:
        raise ValueError(f"triton needs a power-of-two head_dim >= 16 and blocks >= 16 (tl.dot), got "
                         f"D={dims.head_dim}, block_q={block_q}, block_k={block_k}")
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


def interpret_attention(q, k_chunk, v_chunk, k_cache, v_cache, sel, *, block_q: int = 16,
                        block_k: int = 16) -> np.ndarray:
    """Run :func:`selection_attention_kernel` in Triton's interpreter on CPU (torch CPU tensors).

    Needs ``TRITON_INTERPRET=1`` in the environment before triton was imported. Same arguments as
    :func:`~fkv_jax.kernels.triton_jax.triton_attention`; the XLA-side preparation (packing, tile table) is
    shared with it. The output buffer starts as NaN, so an element the kernel does not write stays NaN.
    Returns a numpy array [B, C*T, H, D] in q's dtype (bfloat16 as ``ml_dtypes.bfloat16``).
    """
    import torch

    from fkv_jax.kernels.triton_jax import prepare

    if not triton.knobs.runtime.interpret:
        raise RuntimeError("the Triton interpreter needs TRITON_INTERPRET=1 set before triton is imported")

    _interpreter_bf16_dot()
    dims, operands, params = prepare(q, k_chunk, v_chunk, k_cache, v_cache, sel, block_q=block_q, block_k=block_k)

    def to_torch(x):
        x = np.asarray(x)
        if x.dtype.name == "bfloat16":
            return torch.from_numpy(np.array(x).view(np.int16)).view(torch.bfloat16)
        return torch.from_numpy(np.array(x))  # a writable copy

    args = [to_torch(x) for x in operands]
    out = torch.full(args[0].shape, float("nan"), dtype=args[0].dtype)
    selection_attention_kernel[grid(dims, block_q)](*args, out, **params)
    if out.dtype == torch.bfloat16:
        return out.view(torch.int16).numpy().view(np.asarray(q).dtype)
    return out.numpy()
