"""mosaic_gpu: jax's Mosaic GPU interpreter on CPU against the XLA reference, and lowering for CUDA.

No GPU is available: the interpreter simulates TMA copies, barriers and WGMMA (its fresh buffers, the
output included, are NaN, so an unwritten element fails); lowering checks that Pallas accepts the kernel
for Mosaic GPU. The PTX/SASS compile happens only on a GPU: neither is a hardware test.
"""

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from fkv_jax.attention import BACKENDS
from fkv_jax.attention.reference import selection_attention
from fkv_jax.attention.selection import Selection
from fkv_jax.kernels import mosaic_gpu_attention
from fkv_jax.kernels.mosaic_gpu_interpret import interpret_params
from fkv_jax.kernels.testing import random_problem, relative_error

REF = jax.jit(selection_attention)

CASES = {  # T = 80 is not a multiple of the 64-row tiles: shifted last tiles, masked overlap
    "per-frame groups, memory, chunk mask, D=64": dict(b=1, c=2, t=80, h=1, d=64, n=4, k=2, qf=2, m=70),
    "one group, two heads, no memory, D=128": dict(b=1, c=2, t=64, h=2, d=128, n=3, k=2, qf=1, chunk_mask=False),
}


@pytest.mark.parametrize("name", list(CASES))
def test_interpret_matches_reference_bf16(name):
    args, sel = random_problem(np.random.default_rng(len(name)), dtype=jnp.bfloat16, **CASES[name])
    fn = jax.jit(lambda *a: mosaic_gpu_attention(*a, interpret=interpret_params(uninitialized_memory="nan")))
    out = fn(*args, sel)
    assert out.dtype == jnp.bfloat16 and out.shape == args[0].shape
    assert relative_error(out, REF(*args, sel)) <= 1e-2


def test_rejects_float32_and_small_frames():
    args, sel = random_problem(np.random.default_rng(0), b=1, c=2, t=64, h=1, d=64, n=2, k=1, qf=1)
    with pytest.raises(ValueError, match="bfloat16 or float16"):
        mosaic_gpu_attention(*args, sel)
    args, sel = random_problem(np.random.default_rng(0), b=1, c=2, t=32, h=1, d=64, n=2, k=1, qf=1,
                               dtype=jnp.bfloat16)
    with pytest.raises(ValueError, match="T=32 >= block_k=64"):
        mosaic_gpu_attention(*args, sel)


def test_registered_backend():
    assert BACKENDS["mosaic_gpu"] is mosaic_gpu_attention


@pytest.mark.parametrize("qf", [1, 3])
@pytest.mark.parametrize("d", [64, 128])
def test_lowers_for_cuda_at_480x832(qf, d):
    b, c, t, h, n, k, m = 1, 3, 1560, 12, 21, 8, 64
    s, dt = jax.ShapeDtypeStruct, jnp.bfloat16
    args = [s((b, c * t, h, d), dt)] * 3 + [s((b, n, t, h, d), dt)] * 2
    sel = Selection(frames=s((b, qf, h, k), jnp.int32), chunk_mask=s((b, qf, h, c), bool),
                    mem_k=s((b, m, h, d), dt), mem_v=s((b, m, h, d), dt), mem_valid=s((b, h, m), bool))
    exported = jax.export.export(jax.jit(mosaic_gpu_attention), platforms=["cuda"])(*args, sel)
    assert "mosaic_gpu" in exported.mlir_module()
