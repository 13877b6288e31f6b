"""pallas_tpu: TPU interpret mode on CPU against the XLA reference, and lowering for TPU.

No TPU is available: the interpreter checks the numbers (NaN-filled output buffers, out-of-bounds reads
raise), lowering checks that Pallas accepts the kernel for Mosaic TPU. Neither is a hardware test.
"""

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from jax.experimental.pallas import tpu as pltpu

from fkv_jax.attention import BACKENDS
from fkv_jax.attention.reference import selection_attention
from fkv_jax.attention.selection import Selection
from fkv_jax.kernels import pallas_tpu_attention
from fkv_jax.kernels.testing import random_problem, relative_error

REF = jax.jit(selection_attention)

INTERPRET = pltpu.InterpretParams(uninitialized_memory="nan", out_of_bounds_reads="raise")

CASES = {  # name: (problem sizes, kernel kwargs, tolerance)
    "f32 per-frame groups, 3 memory blocks, chunk mask": (
        dict(b=1, c=3, t=16, h=2, d=16, n=5, k=3, qf=3, m=20, dtype=jnp.float32), dict(block_m=8), 1e-5),
    "f32 one group, no memory, no chunk mask, 3 query tiles": (
        dict(b=2, c=3, t=8, h=2, d=16, n=6, k=4, qf=1, chunk_mask=False, dtype=jnp.float32), dict(block_q=8), 1e-5),
    "bf16 per-frame groups, memory": (
        dict(b=1, c=3, t=16, h=2, d=32, n=4, k=4, qf=3, m=5, dtype=jnp.bfloat16), {}, 1e-2),
}


@pytest.mark.parametrize("name", list(CASES))
def test_interpret_matches_reference(name):
    sizes, kwargs, tol = CASES[name]
    args, sel = random_problem(np.random.default_rng(len(name)), **sizes)
    out = jax.jit(lambda *a: pallas_tpu_attention(*a, interpret=INTERPRET, **kwargs))(*args, sel)
    assert out.dtype == args[0].dtype and out.shape == args[0].shape
    assert relative_error(out, REF(*args, sel)) <= tol


def test_empty_budget_reads_chunk_only():
    args, sel = random_problem(np.random.default_rng(0), b=1, c=2, t=8, h=1, d=8, n=3, k=2, qf=1)
    empty = Selection(frames=jnp.zeros((1, 1, 1, 0), jnp.int32), chunk_mask=sel.chunk_mask)
    out = pallas_tpu_attention(*args, empty, interpret=INTERPRET)
    assert relative_error(out, REF(*args, empty)) <= 1e-5


def test_registered_backend():
    assert BACKENDS["pallas_tpu"] is pallas_tpu_attention


@pytest.mark.parametrize("qf", [1, 3])
@pytest.mark.parametrize("dtype", [jnp.bfloat16, jnp.float32])
def test_lowers_for_tpu_at_480x832(qf, dtype):
    b, c, t, h, d, n, k, m = 1, 3, 1560, 12, 128, 21, 8, 64
    s = jax.ShapeDtypeStruct
    args = [s((b, c * t, h, d), dtype)] * 3 + [s((b, n, t, h, d), dtype)] * 2
    sel = Selection(frames=s((b, qf, h, k), jnp.int32), chunk_mask=s((b, qf, h, c), bool),
                    mem_k=s((b, m, h, d), dtype), mem_v=s((b, m, h, d), dtype), mem_valid=s((b, h, m), bool))
    exported = jax.export.export(jax.jit(pallas_tpu_attention), platforms=["tpu"])(*args, sel)
    assert "tpu_custom_call" in exported.mlir_module()
    assert exported.out_avals[0].shape == (b, c * t, h, d)
