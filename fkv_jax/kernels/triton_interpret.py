"""The Triton kernel in Triton's interpreter, on CPU: for checking numbers without a GPU.

Everything that touches Triton's interpreter lives here, apart from the kernel and its launch wrapper:

* :func:`interpret_attention` runs the kernel eagerly on numpy arrays (tests);
* :func:`triton_interpret_attention` is the same as a ``jax.pure_callback`` (traceable, jittable), which is what
  ``backend="triton"`` means on a CPU with ``FKV_INTERPRET=1``.

Triton 3.9's interpreter needs two adjustments, both scoped to an interpreted run (:func:`_interpreter_patches`):
its ``tl.dot`` multiplies bfloat16 bit patterns as integers (operands are widened to float32 here), and a
compiled-mode ``@triton.jit`` helper called from interpreted code must run interpreted (and the language patch
that implies is undone afterwards, so a later real compile in the same process still works).
"""

from __future__ import annotations

import contextlib

import jax
import numpy as np
import triton.language as tl

from fkv_jax.attention.selection import Selection
from fkv_jax.kernels.triton_jax import prepare
from fkv_jax.kernels.triton_kernel import TritonBlocks, grid, selection_attention_kernel


@contextlib.contextmanager
def _interpreter_bf16_dot():
    """Within the block, the Triton interpreter's ``tl.dot`` reads bfloat16 operands as numbers.

    Triton 3.9's interpreter stores bfloat16 as uint16 bit patterns and its ``create_dot`` multiplies those
    integers. This widens bfloat16 operands to float32 (exact) before the product, which accumulates in the
    accumulator's dtype (float32) as on a GPU. Other dtypes are untouched.
    """
    from triton.runtime import interpreter

    dot = interpreter.InterpreterBuilder.create_dot

    def widen(x):
        if x.dtype != tl.bfloat16:
            return x
        return interpreter.TensorHandle((x.data.astype(np.uint32) << 16).view(np.float32), tl.float32)

    def create_dot(self, a, b, d, input_precision, max_num_imprecise_acc):
        return dot(self, widen(a), widen(b), d, input_precision, max_num_imprecise_acc)

    interpreter.InterpreterBuilder.create_dot = create_dot
    try:
        yield
    finally:
        interpreter.InterpreterBuilder.create_dot = dot


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
    km, vm, kn, vn, table, count, layer, as :func:`fkv_jax.kernels.triton_jax.prepare` builds them).

    The output buffer starts as NaN, so an element the kernel does not write stays NaN. Returns a numpy
    array [B, C*T, H, D] of ``out_dtype`` (bfloat16 as ``ml_dtypes.bfloat16``).
    """
    import torch

    def to_torch(x):
        x = np.asarray(x)
        if x.dtype.name == "bfloat16":
            return torch.from_numpy(np.array(x).view(np.int16)).view(torch.bfloat16)
        return torch.from_numpy(np.array(x))  # a writable copy

    args = [to_torch(x) for x in operands]
    out_np_dtype = np.dtype(out_dtype)
    tdtype = torch.bfloat16 if out_np_dtype.name == "bfloat16" else getattr(torch, out_np_dtype.name)
    out = torch.full(args[0].shape, float("nan"), dtype=tdtype)
    with _interpreter_bf16_dot(), _device_calls_interpreted():
        _interpreted(selection_attention_kernel)[grid_shape](*args, out, **params)
    if out.dtype == torch.bfloat16:
        return out.view(torch.int16).numpy().view(out_np_dtype)
    return out.numpy()


def interpret_attention(
    q, k_chunk, v_chunk, k_cache, v_cache, sel, *, block_q: int = 16, block_k: int = 16, layer=None
) -> np.ndarray:
    """Run :func:`selection_attention_kernel` in Triton's interpreter on CPU, eagerly (tests).

    Same arguments as :func:`~fkv_jax.kernels.triton_jax.triton_attention`; the XLA-side preparation
    (packing, tile table) is shared with it. Returns a numpy array [B, C*T, H, D] in q's dtype.
    """
    dims, operands, params = prepare(
        q, k_chunk, v_chunk, k_cache, v_cache, sel, block_q=block_q, block_k=block_k, layer=layer
    )
    return run_interpreted([np.asarray(x) for x in operands], params, grid(dims, block_q), q.dtype)


def triton_interpret_attention(
    q, k_chunk, v_chunk, k_cache, v_cache, sel: Selection, *, block_q: int = 32, block_k: int = 32, layer=None
) -> jax.Array:
    """The same kernel in Triton's interpreter on the host, as a ``jax.pure_callback`` (traceable, jittable;
    CPU only, slow: for checking a model with ``backend="triton"`` on a machine without a GPU).

    The callback receives the cache buffers as they are (the host's own arrays on CPU). Returns
    [B, C*T, H, D] in q's dtype.
    """
    TritonBlocks(block_q=block_q, block_k=block_k)
    dims, operands, params = prepare(
        q, k_chunk, v_chunk, k_cache, v_cache, sel, block_q=block_q, block_k=block_k, layer=layer
    )
    shape = grid(dims, block_q)

    def host(*arrays):
        return run_interpreted(arrays, params, shape, q.dtype)

    return jax.pure_callback(host, jax.ShapeDtypeStruct(q.shape, q.dtype), *operands)


triton_interpret_attention.reads_stacked_cache = True  # like the GPU wrapper: [L, B, H, N, T, D] + layer=

__all__ = ["interpret_attention", "run_interpreted", "triton_interpret_attention"]
