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

pytestmark = pytest.mark.kernels

REF = jax.jit(selection_attention)

INTERPRET = pltpu.InterpretParams(uninitialized_memory="nan", out_of_bounds_reads="raise")

CASES = {  # name: (problem sizes, kernel kwargs, tolerance)
    "f32 per-frame groups, 3 memory blocks, chunk mask": (
        dict(b=1, c=3, t=16, h=2, d=16, n=5, k=3, qf=3, m=20, dtype=jnp.float32),
        dict(block_m=8),
        1e-5,
    ),
    "f32 one group, no memory, no chunk mask, 3 query tiles": (
        dict(b=2, c=3, t=8, h=2, d=16, n=6, k=4, qf=1, chunk_mask=False, dtype=jnp.float32),
        dict(block_q=8),
        1e-5,
    ),
    "bf16 per-frame groups, memory": (
        dict(b=1, c=3, t=16, h=2, d=32, n=4, k=4, qf=3, m=5, dtype=jnp.bfloat16),
        {},
        1e-2,
    ),
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
    args = [s((b, c * t, h, d), dtype)] * 3 + [s((b, h, n, t, d), dtype)] * 2
    sel = Selection(
        frames=s((b, qf, h, k), jnp.int32),
        chunk_mask=s((b, qf, h, c), bool),
        mem_k=s((b, m, h, d), dtype),
        mem_v=s((b, m, h, d), dtype),
        mem_valid=s((b, h, m), bool),
    )
    exported = jax.export.export(jax.jit(pallas_tpu_attention), platforms=["tpu"])(*args, sel)
    assert "tpu_custom_call" in exported.mlir_module()
    assert exported.out_avals[0].shape == (b, c * t, h, d)


# ---- the declared pl.CostEstimate against a count made from a concrete selection ---------------------------


def _count_from_selection(sel, dims, plan, itemsize):
    """FLOPs, exp count and DMA bytes of one call, counted from the selection by walking the kernel's grid
    in order and fetching a block whenever its index differs from the previous step's (the TPU pipeline's
    rule). Independent of ``selection_cost``."""
    b, h, d, t, c, qf = dims.batch, dims.heads, dims.head_dim, dims.frame_tokens, dims.chunk_frames, dims.groups
    bq, nq, bm, nmb, k = plan.block_q, plan.query_tiles, plan.block_m, plan.memory_blocks, plan.slot_steps
    frames = np.asarray(sel.frames)
    cmask = np.ones((b, qf, h, c), bool) if sel.chunk_mask is None else np.asarray(sel.chunk_mask)
    mvalid = np.ones((b, h, dims.memory), bool) if sel.mem_valid is None else np.asarray(sel.mem_valid)
    flops = exps = 0
    last = {}
    fetched = {"q": 0, "chunk": 0, "mem": 0, "slot": 0, "out": 0}
    for bb, hh, g, qi in np.ndindex(b, h, qf, nq):
        allowed = [f for f in range(c) if cmask[bb, g, hh, f]]
        slots = [int(s) for s in frames[bb, g, hh] if s >= 0]
        nvalid = int(mvalid[bb, hh].sum())
        keys = len(allowed) * t + bm * (-(-nvalid // bm) if bm else 0) + len(slots) * t
        flops += 4 * bq * keys * d
        exps += bq * keys
        for j in range(c + nmb + k):
            exps += bq * (
                (j < len(allowed)) + (0 <= j - c < nmb and nvalid > (j - c) * bm) + (0 <= j - c - nmb < len(slots))
            )
            cf = (allowed + [allowed[-1] if allowed else 0] * c)[min(j, c - 1)]
            sf = (slots + [slots[-1] if slots else 0] * max(k, 1))[min(max(j - c - nmb, 0), max(k - 1, 0))]
            idx = {
                "q": (bb, hh, g, qi),
                "chunk": (bb, hh, cf),
                "mem": (bb, hh, min(max(j - c, 0), nmb - 1)),
                "slot": (bb, hh, sf),
                "out": (bb, hh, g, qi),
            }
            for name, i in idx.items():
                if last.get(name) != i:
                    fetched[name] += 1
                    last[name] = i
    q_bytes = bq * d * itemsize
    dma = (fetched["q"] + fetched["out"]) * q_bytes + fetched["chunk"] * 2 * t * d * itemsize
    dma += fetched["mem"] * 2 * bm * d * itemsize if nmb else 0
    dma += fetched["slot"] * 2 * t * d * itemsize if k else 0
    tables = 4 * (b * qf * h * (c + 1) + b * qf * h * (max(k, 1) + 1) + b * h + 1)  # + the layer index
    return flops, exps, dma + tables


def _full_selection(b, qf, h, c, n, k, m, d, dtype):
    frames = jnp.asarray(np.broadcast_to(np.arange(k, dtype=np.int32)[::-1] % n, (b, qf, h, k)).copy())
    mem = jnp.ones((b, m, h, d), dtype) if m else None
    return Selection(
        frames=frames,
        chunk_mask=jnp.ones((b, qf, h, c), bool),
        mem_k=mem,
        mem_v=mem,
        mem_valid=jnp.ones((b, h, m), bool) if m else None,
    )


@pytest.mark.parametrize("qf, m, block_m, block_q", [(1, 16, 8, 8), (3, 0, 512, None), (3, 24, 512, 8)])
def test_declared_cost_equals_count_for_a_full_selection(qf, m, block_m, block_q):
    from fkv_jax.kernels.pallas_tpu import make_plan, selection_cost
    from fkv_jax.kernels.shapes import attention_dims

    b, c, t, h, d, n, k = 2, 3, 16, 2, 8, 6, 4
    args, _ = random_problem(
        np.random.default_rng(0), b=b, c=c, t=t, h=h, d=d, n=n, k=k, qf=qf, m=m, dtype=jnp.bfloat16
    )
    sel = _full_selection(b, qf, h, c, n, k, m, d, jnp.bfloat16)  # budget K reached by every row
    dims = attention_dims(*args, sel)
    plan = make_plan(dims, block_q, block_m)
    declared = selection_cost(dims, plan, q_bytes=2, chunk_bytes=2, cache_bytes=2, memory_bytes=2)
    flops, exps, nbytes = _count_from_selection(sel, dims, plan, 2)
    assert (declared.flops, declared.transcendentals, declared.bytes_accessed) == (flops, exps, nbytes)


def test_declared_cost_bounds_a_ragged_selection():
    from fkv_jax.kernels.pallas_tpu import make_plan, selection_cost
    from fkv_jax.kernels.shapes import attention_dims

    args, sel = random_problem(np.random.default_rng(3), b=2, c=3, t=16, h=2, d=8, n=6, k=4, qf=3, m=12)
    dims = attention_dims(*args, sel)
    plan = make_plan(dims, 8, 8)
    declared = selection_cost(dims, plan, q_bytes=4, chunk_bytes=4, cache_bytes=4, memory_bytes=4)
    flops, exps, nbytes = _count_from_selection(sel, dims, plan, 4)
    assert 0 < flops < declared.flops and 0 < nbytes < declared.bytes_accessed and exps < declared.transcendentals


@pytest.mark.parametrize("cache_dtype", [jnp.float32, jnp.bfloat16])
def test_interpret_bf16_queries_with_another_cache_dtype(cache_dtype):
    args, sel = random_problem(
        np.random.default_rng(5), b=1, c=3, t=16, h=2, d=32, n=5, k=3, qf=3, m=8, dtype=jnp.bfloat16
    )
    q, kc, vc, kn, vn = args
    kn, vn = kn.astype(cache_dtype), vn.astype(cache_dtype)
    out = jax.jit(lambda *a: pallas_tpu_attention(*a, interpret=INTERPRET))(q, kc, vc, kn, vn, sel)
    assert out.dtype == jnp.bfloat16
    assert relative_error(out, REF(q, kc, vc, kn, vn, sel)) <= 1e-2


def test_interpret_layer_stacked_cache_inside_a_layer_scan():
    """k_cache [L, B, H, N, T, D] + layer=i reads layer i in place; same numbers as the reference on cache[i]."""
    args, sel = random_problem(np.random.default_rng(7), b=1, c=3, t=8, h=2, d=16, n=4, k=3, qf=1, m=5)
    q, kc, vc, kn, vn = args
    ks, vs = jnp.stack([kn, -kn, 2 * kn]), jnp.stack([vn, vn[::-1], -vn])  # [L=3, B, H, N, T, D]

    def body(_, layer):
        return None, pallas_tpu_attention(q, kc, vc, ks, vs, sel, layer=layer, interpret=INTERPRET)

    _, outs = jax.jit(lambda: jax.lax.scan(body, None, jnp.arange(3)))()
    for i in range(3):
        assert relative_error(outs[i], REF(q, kc, vc, ks[i], vs[i], sel)) <= 1e-5


def test_layer_argument_errors():
    args, sel = random_problem(np.random.default_rng(0), b=1, c=1, t=8, h=1, d=8, n=2, k=1, qf=1)
    q, kc, vc, kn, vn = args
    with pytest.raises(ValueError, match="needs layer="):
        pallas_tpu_attention(q, kc, vc, kn[None], vn[None], sel, interpret=INTERPRET)
    with pytest.raises(ValueError, match="layer-stacked"):
        pallas_tpu_attention(q, kc, vc, kn, vn, sel, layer=0, interpret=INTERPRET)
