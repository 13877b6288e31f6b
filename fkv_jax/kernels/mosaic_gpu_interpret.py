"""Running the Mosaic GPU kernel on CPU: jax 0.10.2's (private) Mosaic GPU interpreter, plus one missing piece.

The interpreter (``jax._src.pallas.mosaic_gpu.interpret``) simulates GMEM/SMEM, TMA copies, barriers and
WGMMA, and fills fresh buffers (the kernel's output included) with NaN, so an element the kernel never
writes shows up. In 0.10.2 its WGMMA cannot read an operand through ``plgpu.transpose_ref`` (it raises
``'TransposeTransform' object has no attribute 'indices'``), which every Q K^T needs, and ``plgpu.layout_cast``
(a register-layout hint) has no CPU rule. :func:`interpret_params` installs a WGMMA callback that reads the
operand, applies the transpose, and otherwise does what the interpreter's own does (``acc += a @ b`` in the
accumulator's dtype), and lowers ``layout_cast`` as the identity on CPU. Neither changes anything on a GPU:
this is test machinery for CPU.
"""

from __future__ import annotations

import jax
import numpy as np
from jax._src.interpreters import mlir
from jax._src.pallas.mosaic.interpret import utils as interpret_utils
from jax._src.pallas.mosaic_gpu.core import layout_cast_p
from jax._src.pallas.mosaic_gpu.interpret import gpu_callbacks
from jax._src.pallas.mosaic_gpu.interpret.params import InterpretGPUParams
from jax._src.state.types import TransposeTransform


def _read(memory, key_array, transforms, thread, info):
    """Contents of an SMEM operand seen through its transforms (indexers, then an optional transpose)."""
    perm = None
    indexers = []
    for tr in gpu_callbacks._remove_noop_transforms(transforms):
        if isinstance(tr, TransposeTransform):
            perm = tr.permutation
        elif perm is not None:
            raise NotImplementedError("indexing a transposed WGMMA operand")
        else:
            indexers.append(tr)
    rng = interpret_utils.to_range(jax.tree.map(int, tuple(indexers)))
    x, _, _ = memory.get_buffer_content(
        gpu_callbacks.HostAllocationKey.from_array(key_array), rng, thread, logging_info=info
    )
    return x if perm is None else np.transpose(x, perm)


def _wgmma(
    *,
    token,
    device_id,
    grid_point_coords,
    thread_id,
    acc_allocation_key_as_array,
    acc_transforms,
    acc_dtype,
    a_allocation_key_as_array,
    a_transforms,
    b_allocation_key_as_array,
    b_transforms,
    source_info=None,
):
    memory = gpu_callbacks._get_shared_memory()
    thread = memory.get_global_thread_id(int(device_id), int(thread_id))
    info = interpret_utils.GPULoggingInfo(
        device_id=int(device_id),
        grid_point_coords=tuple(int(x) for x in grid_point_coords),
        thread_id=int(thread_id),
        source_info=source_info,
    )
    a = _read(memory, a_allocation_key_as_array, a_transforms, thread, info)
    b = _read(memory, b_allocation_key_as_array, b_transforms, thread, info)
    acc_key = gpu_callbacks.HostAllocationKey.from_array(acc_allocation_key_as_array)
    acc_rng = interpret_utils.to_range(jax.tree.map(int, gpu_callbacks._remove_noop_transforms(acc_transforms)))
    acc, _, _ = memory.get_buffer_content(acc_key, acc_rng, thread, logging_info=info)
    memory.store_buffer_content(acc_key, acc_rng, acc + np.matmul(a, b, dtype=acc_dtype), thread, logging_info=info)
    return token


def interpret_params(**kwargs) -> InterpretGPUParams:
    """``InterpretGPUParams(**kwargs)`` for :func:`~fkv_jax.kernels.mosaic_gpu.mosaic_gpu_attention`, with
    transposed WGMMA operands supported (see the module docstring)."""
    gpu_callbacks.wgmma = _wgmma
    mlir.register_lowering(layout_cast_p, lambda ctx, x, **_: [x], platform="cpu")
    return InterpretGPUParams(**kwargs)
