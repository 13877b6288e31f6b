"""The XLA-side pieces the kernels share (packing, tile tables), backend registration and ``auto``."""

import jax
import jax.numpy as jnp
import numpy as np
import pytest

import fkv_jax.kernels  # noqa: F401  (registers the backends)
from fkv_jax.attention import BACKENDS, attend
from fkv_jax.attention.reference import selection_attention
from fkv_jax.attention.selection import Selection
from fkv_jax.kernels import choose_backend
from fkv_jax.kernels.packing import chunk_frames, pack_indices, pack_memory
from fkv_jax.kernels.testing import random_problem, relative_error
from fkv_jax.kernels.tiles import SRC_CACHE, SRC_CHUNK, SRC_MEMORY, tile_table

REF = jax.jit(selection_attention)


def test_pack_indices_repeats_last_valid_entry():
    idx = jnp.array([[3, -1, 5, -1], [-1, -1, -1, -1], [0, 1, 2, 4]], jnp.int32)
    fetch, count = pack_indices(idx)
    np.testing.assert_array_equal(fetch, [[3, 5, 5, 5], [0, 0, 0, 0], [0, 1, 2, 4]])
    np.testing.assert_array_equal(count, [2, 0, 4])


def test_pack_memory_puts_valid_tokens_first_per_head():
    _, sel = random_problem(np.random.default_rng(0), b=2, c=1, t=4, h=3, d=4, n=2, k=1, qf=1, m=7)
    mk, _, count = pack_memory(sel, rows=9)
    assert mk.shape == (2, 9, 3, 4)
    for b in range(2):
        for h in range(3):
            want = np.asarray(sel.mem_k)[b, np.asarray(sel.mem_valid)[b, h], h]
            np.testing.assert_array_equal(np.asarray(mk)[b, : int(count[b, h]), h], want)


@pytest.mark.parametrize("t,block_k", [(12, 16), (80, 64), (64, 64), (40, 16)])
def test_tile_table_covers_each_selected_token_once(t, block_k):
    c, n, m = 3, 5, 11
    _, sel = random_problem(np.random.default_rng(t), b=2, c=c, t=t, h=2, d=4, n=n, k=3, qf=c, m=m)

    @jax.jit
    def tables(sel):
        cf, cc = chunk_frames(sel, 2, c, 2, c)
        sf, sc = pack_indices(sel.frames)
        _, _, mc = pack_memory(sel, rows=max(m, block_k))
        return tile_table(
            chunk_fetch=cf,
            chunk_count=cc,
            slot_fetch=sf,
            slot_count=sc,
            mem_count=mc,
            mem_rows=max(m, block_k),
            frame_tokens=t,
            block_k=block_k,
        )

    table, count = (np.asarray(x) for x in tables(sel))
    frames, cmask, mvalid = (np.asarray(x) for x in (sel.frames, sel.chunk_mask, sel.mem_valid))
    for b, g, h in np.ndindex(2, c, 2):
        got = []
        for src, start, lo, hi in table[b, g, h, : count[b, g, h]]:
            assert 0 <= lo < hi <= block_k
            if t >= block_k and src != SRC_MEMORY:  # a tile never leaves its frame
                assert start // t == (start + block_k - 1) // t
            got += [(src, start + r) for r in range(lo, hi)]
        want = [(SRC_CHUNK, f * t + r) for f in range(c) if cmask[b, g, h, f] for r in range(t)]
        want += [(SRC_MEMORY, r) for r in range(int(mvalid[b, h].sum()))]
        want += [(SRC_CACHE, s * t + r) for s in frames[b, g, h] if s >= 0 for r in range(t)]
        assert sorted(got) == sorted(want)


def test_backends_registered():
    assert {"xla", "pallas_tpu", "mosaic_gpu", "triton", "auto"} <= set(BACKENDS)


def test_auto_on_cpu_takes_cpu_ffi_or_the_reference():
    from fkv_jax.kernels.cpu_ffi import unavailable_reason

    args, sel = random_problem(np.random.default_rng(1), b=1, c=2, t=4, h=2, d=8, n=3, k=2, qf=2, m=3)
    assert choose_backend(args[0], args[3], sel) == ("xla" if unavailable_reason() else "cpu_ffi")
    out = jax.jit(lambda *a: attend(*a, backend="auto"))(*args, sel)
    assert relative_error(out, REF(*args, sel)) <= 1e-5


def test_auto_on_tpu_takes_the_kernel_when_the_layout_allows():
    q = jax.ShapeDtypeStruct((1, 3 * 1560, 12, 128), jnp.bfloat16)
    cache = jax.ShapeDtypeStruct((1, 12, 21, 1560, 128), jnp.bfloat16)
    sel = Selection(frames=jnp.zeros((1, 3, 12, 4), jnp.int32))
    assert choose_backend(q, cache, sel, platform="tpu") == "pallas_tpu"
    q64 = jax.ShapeDtypeStruct((1, 3 * 1560, 12, 64), jnp.bfloat16)
    assert choose_backend(q64, cache, sel, platform="tpu") == "xla"


def test_cache_sized_ops_are_found_outside_kernels_only():
    from fkv_jax.kernels.hlo_check import large_hlo_ops_outside_kernels, large_ops_outside_kernels

    half = 12 * 21 * 1560 * 128 // 2
    stablehlo = """
    %0 = stablehlo.reshape %arg3 : (tensor<1x12x21x1560x128xbf16>) -> tensor<1x12x32760x128xbf16>
    %1 = stablehlo.custom_call @kernel(%arg3) : (tensor<1x12x21x1560x128xbf16>) -> tensor<1x4680x12x128xbf16>
    %2 = stablehlo.add %1, %1 : tensor<1x4680x12x128xbf16>"""
    assert [x.split(" = ")[0] for x in large_ops_outside_kernels(stablehlo, half)] == ["%0"]
    hlo = """
%dynamic-slice-fusion (p0: bf16[30,1,12,21,1560,128], p1: s32[]) -> bf16[1,4680,12,128] {
  %dynamic_slice.4 = bf16[1,1,12,21,1560,128]{5,4,3,2,1,0} dynamic-slice(%p0, %p1, %c, %c, %c, %c, %c)
  %bitcast.7 = bf16[1,12,21,1560,128]{4,3,2,1,0} bitcast(%dynamic_slice.4)
  ROOT %k = bf16[1,4680,12,128]{3,2,1,0} custom-call(%bitcast.7), custom_call_target="mosaic_gpu_v2"
}

ENTRY %main (k_cache.1: bf16[1,12,21,1560,128]) -> bf16[1,4680,12,128] {
  %k_cache.1 = bf16[1,12,21,1560,128]{4,3,2,1,0} parameter(3)
  %copy.3 = bf16[1,12,21,1560,128]{4,3,2,1,0} copy(%k_cache.1), metadata={}
  %bitcast.2 = bf16[1,12,32760,128]{3,2,1,0} bitcast(%k_cache.1)
  %small = f32[4,4]{1,0} add(%a, %b)
  ROOT %out = bf16[1,4680,12,128]{3,2,1,0} custom-call(%q, %k_cache.1), custom_call_target="mosaic_gpu_v2"
}
"""
    # the slice inside the kernel's dynamic-slice fusion computes an address; the copy in ENTRY is a copy
    assert [x.split(" = ")[0] for x in large_hlo_ops_outside_kernels(hlo, half)] == ["%copy.3"]
