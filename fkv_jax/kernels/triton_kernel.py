"""The Triton kernel for selection attention (the portable GPU path), and its CPU runner.

One program = ``BLOCK_Q`` query rows of one (b, group, head); it walks the packed tile list of
:func:`~fkv_jax.kernels.tiles.tile_table` (allowed chunk frames, valid memory tokens, selected cache slots),
loading each ``[BLOCK_K, D]`` tile of K and V by pointer arithmetic from its source, and runs the online
softmax in float32 with ``tl.dot`` (bf16/f16 tensor cores on GPU; ``input_precision="ieee"`` for float32).

Layouts read in place (no copy, no reshape of any operand outside the kernel):

* q, k_chunk, v_chunk, out: ``[B, S, H, D]``: row r of head h at ``((b * S + r) * H + h) * D``;
* packed memory ``[B, ROWS_M, H, D]`` (same strides);
* the cache ``[B, H, N, T, D]`` (heads first): slot s, token t of (b, h) is row ``s * T + t`` of the
  contiguous ``[N * T, D]`` plane at ``(b * H + h) * N * T * D``; with the whole layer-stacked cache
  ``[L, B, H, N, T, D]`` and a layer index (an int32 operand, so one compiled kernel serves every layer), the
  plane of layer l starts ``l * B * H * N * T * D`` further on: the sampler's layer loop never slices the cache.

A cache whose dtype differs from q's (e.g. a float32 cache under bf16 queries) is cast per ``[BLOCK_K, D]``
tile right after its load, to q's dtype (what the XLA reference does); the products accumulate in float32.
Rows outside ``[LO, HI)`` of a tile and query rows past the group are masked, so any T and Tq work.

The same ``@triton.jit`` function is compiled for GPUs (jax-triton in :mod:`fkv_jax.kernels.triton_jax`, or
ahead of time by :mod:`fkv_jax.kernels.triton_aot`) and executed on CPU by Triton's interpreter
(:func:`run_interpreted`): the interpreter wraps the kernel's Python function explicitly, so it does not
depend on ``TRITON_INTERPRET`` and both can live in one process.
"""

from __future__ import annotations

import dataclasses
import math

import numpy as np
import triton
import triton.language as tl


@triton.jit
def selection_attention_kernel(
    q_ptr,
    kc_ptr,
    vc_ptr,
    km_ptr,
    vm_ptr,
    kn_ptr,
    vn_ptr,
    table_ptr,
    count_ptr,
    layer_ptr,
    out_ptr,
    H: tl.constexpr,
    D: tl.constexpr,
    S: tl.constexpr,
    TQ: tl.constexpr,
    QF: tl.constexpr,
    ROWS_M: tl.constexpr,
    ROWS_N: tl.constexpr,
    N_TILES: tl.constexpr,
    LAYER_STRIDE: tl.constexpr,
    SCALE: tl.constexpr,
    BLOCK_Q: tl.constexpr,
    BLOCK_K: tl.constexpr,
    PRECISION: tl.constexpr,
):
    """q, kc, vc, out: [B, S, H, D]; km, vm: [B, ROWS_M, H, D]; kn, vn: [B, H, ROWS_N = N * T, D] (the
    cache [B, H, N, T, D]), or the layer-stacked cache [L, B, H, N * T, D] of which layer ``layer_ptr[0]`` is
    read (LAYER_STRIDE = B * H * N * T * D elements; 0 for one layer's cache); table: int32
    [B, QF, H, N_TILES, 4]; count: int32 [B, QF, H]; layer: int32 [1]. Grid: (cdiv(TQ, BLOCK_Q), QF * H, B)."""
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
    layer_base = tl.load(layer_ptr).to(tl.int64) * LAYER_STRIDE  # start of the layer read in a stacked cache
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
            off = layer_base + ((b * H + h) * ROWS_N + r)[:, None] * D + dcol[None, :]
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


def kernel_params(
    dims, mem_rows: int, cache_rows: int, n_tiles: int, dtype, block_q: int, block_k: int, layer_stride: int = 0
) -> dict:
    """The constexpr arguments of :func:`selection_attention_kernel` for one call."""
    check_head_dim(dims.head_dim)
    TritonBlocks(block_q=block_q, block_k=block_k)
    return dict(
        H=dims.heads,
        D=dims.head_dim,
        S=dims.tokens,
        TQ=dims.group_tokens,
        QF=dims.groups,
        ROWS_M=mem_rows,
        ROWS_N=cache_rows,
        N_TILES=n_tiles,
        LAYER_STRIDE=layer_stride,
        SCALE=1.0 / math.sqrt(dims.head_dim),
        BLOCK_Q=block_q,
        BLOCK_K=block_k,
        PRECISION="ieee" if np.dtype(dtype) == np.float32 else "tf32",
    )


def grid(dims, block_q: int) -> tuple[int, int, int]:
    return (-(-dims.group_tokens // block_q), dims.groups * dims.heads, dims.batch)
