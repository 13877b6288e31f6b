"""mosaic_gpu: jax's Mosaic GPU interpreter on CPU against the XLA reference, and lowering for CUDA.

No GPU is available: the interpreter simulates TMA copies, barriers and WGMMA (its fresh buffers, the
output included, are NaN, so an unwritten element fails); lowering checks that Pallas accepts the kernel
for Mosaic GPU. The PTX/SASS compile happens only on a GPU: neither is a hardware test.
"""

from pathlib import Path

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
from fkv_jax.kernels.hlo_check import large_ops_outside_kernels

pytestmark = pytest.mark.kernels

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


def test_interpret_reads_a_layer_of_the_stacked_cache():
    """The sampler's call: the whole [L, B, H, N, T, D] cache and a traced layer index, read in place."""
    (q, kc, vc, kn, vn), sel = random_problem(
        np.random.default_rng(7), dtype=jnp.bfloat16, **CASES["one group, two heads, no memory, D=128"]
    )
    ks, vs = jnp.stack([-kn, kn]), jnp.stack([vn * 0.5, vn])  # [L=2, B, H, N, T, D]
    params = interpret_params(uninitialized_memory="nan")
    fn = jax.jit(lambda layer, *a: mosaic_gpu_attention(*a, interpret=params, layer=layer))
    out = fn(jnp.int32(1), q, kc, vc, ks, vs, sel)
    assert relative_error(out, REF(q, kc, vc, kn, vn, sel)) <= 1e-2
    assert relative_error(fn(jnp.int32(0), q, kc, vc, ks, vs, sel), REF(q, kc, vc, -kn, vn * 0.5, sel)) <= 1e-2
    assert getattr(mosaic_gpu_attention, "reads_stacked_cache", False)


def test_rejects_float32_and_small_frames():
    args, sel = random_problem(np.random.default_rng(0), b=1, c=2, t=64, h=1, d=64, n=2, k=1, qf=1)
    with pytest.raises(ValueError, match="bfloat16 or float16"):
        mosaic_gpu_attention(*args, sel)
    args, sel = random_problem(np.random.default_rng(0), b=1, c=2, t=32, h=1, d=64, n=2, k=1, qf=1, dtype=jnp.bfloat16)
    with pytest.raises(ValueError, match="T=32 >= block_k=64"):
        mosaic_gpu_attention(*args, sel)


def test_registered_backend():
    assert BACKENDS["mosaic_gpu"] is mosaic_gpu_attention


@pytest.mark.parametrize("qf", [1, 3])
@pytest.mark.parametrize("d", [64, 128])
def test_lowers_for_cuda_at_480x832(qf, d):
    b, c, t, h, n, k, m = 1, 3, 1560, 12, 21, 8, 64
    s, dt = jax.ShapeDtypeStruct, jnp.bfloat16
    args = [s((b, c * t, h, d), dt)] * 3 + [s((b, h, n, t, d), dt)] * 2
    sel = Selection(
        frames=s((b, qf, h, k), jnp.int32),
        chunk_mask=s((b, qf, h, c), bool),
        mem_k=s((b, m, h, d), dt),
        mem_v=s((b, m, h, d), dt),
        mem_valid=s((b, h, m), bool),
    )
    exported = jax.export.export(jax.jit(mosaic_gpu_attention), platforms=["cuda"])(*args, sel)
    module = exported.mlir_module()
    assert "mosaic_gpu" in module
    # the cache goes to the kernel as it is: no op outside the kernel produces a cache-sized array
    assert large_ops_outside_kernels(module, b * h * n * t * d // 2) == []


def _wan_problem(qf, dt=jnp.bfloat16, d=128):
    b, c, t, h, n, k, m = 1, 3, 1560, 12, 21, 8, 64
    s = jax.ShapeDtypeStruct
    args = [s((b, c * t, h, d), dt)] * 3 + [s((b, h, n, t, d), dt)] * 2
    sel = Selection(
        frames=s((b, qf, h, k), jnp.int32),
        chunk_mask=s((b, qf, h, c), bool),
        mem_k=s((b, m, h, d), dt),
        mem_v=s((b, m, h, d), dt),
        mem_valid=s((b, h, m), bool),
    )
    return args, sel


@pytest.mark.kernels
def test_lowers_to_mosaic_gpu_mlir_with_tma_and_wgmma_at_1_3b_bf16():
    """The deepest level reachable without jaxlib's CUDA plugin: the kernel's Mosaic GPU MLIR module (verified),
    with its TMA copies, mbarriers and Hopper WGMMA instructions."""
    from fkv_jax.kernels.gpu_aot import mosaic_gpu_mlir

    args, sel = _wan_problem(qf=1)
    (module,) = mosaic_gpu_mlir(mosaic_gpu_attention, *args, sel)
    assert module.count("gpu.launch") == 1
    assert module.count("wgmma.mma_async.sync.aligned") == 12  # QK^T and PV: 128 / 16 = 8 + 64 / 16 = 4 k-steps
    assert module.count("nvvm.cp.async.bulk.tensor.shared.cluster.global") >= 4  # TMA loads: Q, K, V (per source)
    assert "nvvm.mbarrier.try_wait.parity" in module


@pytest.mark.kernels
@pytest.mark.parametrize("qf", [1, 3])
def test_compiles_to_cubin_for_h200_without_a_gpu(qf, tmp_path):
    """The real XLA:GPU compile for a deviceless H200 (jaxlib's CUDA PJRT plugin, a target config, no GPU),
    which runs the Mosaic GPU pipeline down to PTX and ptxas. Needs jax-cuda12-plugin and jax-cuda12-pjrt
    (not in the test extra, see docs/kernels.md); runs in a subprocess so the CUDA plugin stays out of this one."""
    import json
    import os
    import subprocess
    import sys

    from fkv_jax.kernels.gpu_aot import INSTALL_HINT, cuda_pjrt_available

    if not cuda_pjrt_available():
        pytest.skip(f"jaxlib's CUDA PJRT plugin is not installed ({INSTALL_HINT})")
    script = f"""
import json, sys
sys.path.insert(0, {str(Path(__file__).parent)!r})
from test_kernels_mosaic_gpu import _wan_problem
from fkv_jax.kernels.gpu_aot import compile_for_h200
from fkv_jax.kernels.mosaic_gpu import mosaic_gpu_attention
args, sel = _wan_problem({qf})
print(json.dumps(compile_for_h200(mosaic_gpu_attention, *args, sel, dump_dir={str(tmp_path)!r},
                                  min_elements=12 * 21 * 1560 * 128 // 2)))
"""
    env = dict(os.environ, JAX_PLATFORMS="cpu")
    r = subprocess.run([sys.executable, "-c", script], capture_output=True, text=True, env=env, timeout=600)
    assert r.returncode == 0, r.stderr[-3000:]
    report = json.loads(r.stdout.strip().splitlines()[-1])
    assert report["device_kind"] == "NVIDIA H200" and report["custom_calls"] == ["mosaic_gpu_v2"]
    assert report["large_ops"] == []  # the cache reaches the kernel as it is
    (kernel,) = report["mosaic_kernels"]
    assert kernel["ptx_target"] == "sm_90a" and kernel["wgmma"] > 0 and kernel["tma"] > 0
    assert kernel["spill_stores"] == 0 and kernel["spill_loads"] == 0 and 0 < kernel["registers"] <= 255
    assert 0 < kernel["shared"] <= 232448


STACKED_SCRIPT = """
import json, sys
import jax, jax.numpy as jnp
from fkv_jax.attention.selection import Selection
from fkv_jax.kernels.gpu_aot import GPU_COMPILER_OPTIONS, compile_for_h200
from fkv_jax.kernels.mosaic_gpu import mosaic_gpu_attention
s, dt = jax.ShapeDtypeStruct, jnp.bfloat16
L, b, c, t, h, d, n, k = 2, 1, 3, 1560, 12, 128, 21, 8

def layers(q, kc, vc, K, V, frames):  # a loop over layers slicing the stacked cache [L, B, H, N, T, D]
    def body(x, kv):
        return mosaic_gpu_attention(x, kc, vc, kv[0], kv[1], Selection(frames=frames)), None
    return jax.lax.scan(body, q, (K, V))[0]

def stacked(q, kc, vc, K, V, frames):  # what the sampler does: the whole cache and the layer index
    def body(x, layer):
        return mosaic_gpu_attention(x, kc, vc, K, V, Selection(frames=frames), layer=layer), None
    return jax.lax.scan(body, q, jnp.arange(L, dtype=jnp.int32))[0]

args = [s((b, c * t, h, d), dt)] * 3 + [s((L, b, h, n, t, d), dt)] * 2 + [s((b, 1, h, k), jnp.int32)]
out = {}
for name, fn, opts in (("sliced", layers, None), ("sliced_dynamic_slice_fusion", layers, GPU_COMPILER_OPTIONS),
                       ("stacked", stacked, None)):
    r = compile_for_h200(fn, *args, min_elements=b * h * n * t * d // 2, compiler_options=opts)
    out[name] = [len(r["large_ops"]), r["memory"]["temp_size_in_bytes"]]
print(json.dumps(out))
"""


@pytest.mark.kernels
def test_a_layer_of_a_stacked_cache_reaches_the_kernel_in_place():
    """The sampler hands the kernel the whole stacked cache and the layer index: no cache-sized op or temporary
    with XLA:GPU's default options. (A loop that slices cache[l] itself gets a copy per layer unless
    dynamic-slice fusion is on: the reason for the stacked call.)"""
    import json
    import os
    import subprocess
    import sys

    from fkv_jax.kernels.gpu_aot import INSTALL_HINT, cuda_pjrt_available

    if not cuda_pjrt_available():
        pytest.skip(f"jaxlib's CUDA PJRT plugin is not installed ({INSTALL_HINT})")
    r = subprocess.run(
        [sys.executable, "-c", STACKED_SCRIPT],
        capture_output=True,
        text=True,
        env=dict(os.environ, JAX_PLATFORMS="cpu"),
        timeout=600,
    )
    assert r.returncode == 0, r.stderr[-3000:]
    res = json.loads(r.stdout.strip().splitlines()[-1])
    layer_bytes = 12 * 21 * 1560 * 128 * 2
    assert res["sliced"][0] > 0 and res["sliced"][1] >= layer_bytes  # per-layer slices are copied
    assert res["sliced_dynamic_slice_fusion"][0] == 0 and res["sliced_dynamic_slice_fusion"][1] < layer_bytes // 4
    assert res["stacked"][0] == 0 and res["stacked"][1] < layer_bytes // 4  # in place, default options
