"""triton: the kernel in Triton's interpreter on CPU against the XLA reference (eagerly and as a
``jax.pure_callback`` inside jit), and its lowering through jax-triton for CUDA.

The interpreter wraps the kernel's Python function itself (no TRITON_INTERPRET needed), so these run in the
test process. The ahead-of-time compile for sm_90a (ptxas, spills, shared memory) is tests/test_triton_cubin.py.

The jax-triton lowering test needs ``import jax_triton``, which with jax-triton 0.3.1 needs the CUDA jaxlib
plugin's Python module (``pip install --no-deps jax-triton==0.3.1 jax-cuda12-plugin==0.10.2``: no GPU or
driver needed); it is skipped where that is not installed (the project's test extra does not install the
plugin, see docs/kernels.md). Nothing here runs on a GPU.
"""

import json
import os
import subprocess
import sys
from pathlib import Path

import jax
import jax.numpy as jnp
import numpy as np
import pytest

pytest.importorskip("triton")
pytest.importorskip("torch")

from fkv_jax.attention import attend, resolve_backend  # noqa: E402
from fkv_jax.attention.reference import selection_attention  # noqa: E402
from fkv_jax.kernels.testing import random_problem, relative_error  # noqa: E402
from fkv_jax.kernels.triton_interpret import triton_interpret_attention  # noqa: E402
from fkv_jax.kernels.triton_interpret import interpret_attention  # noqa: E402

pytestmark = pytest.mark.kernels

ROOT = Path(__file__).resolve().parents[1]
REF = jax.jit(selection_attention)

CASES = {  # name: (problem sizes, cache dtype, kernel kwargs, tolerance)
    "f32 per-frame groups, memory, chunk mask, frames smaller than a tile": (
        dict(b=1, c=3, t=12, h=2, d=16, n=5, k=3, qf=3, m=7, dtype=jnp.float32),
        None,
        dict(block_q=16, block_k=16),
        1e-5,
    ),
    "f32 one group, no memory, shifted last tiles, 5 query tiles, batch 2": (
        dict(b=2, c=3, t=24, h=2, d=32, n=6, k=4, qf=1, chunk_mask=False, dtype=jnp.float32),
        None,
        dict(block_q=16, block_k=16),
        1e-5,
    ),
    "bf16 per-frame groups, memory": (
        dict(b=1, c=3, t=20, h=2, d=32, n=4, k=3, qf=3, m=9, dtype=jnp.bfloat16),
        None,
        dict(block_q=16, block_k=16),
        1e-2,
    ),
    "bf16 queries, float32 cache (cast per tile)": (
        dict(b=1, c=2, t=20, h=3, d=32, n=5, k=3, qf=2, m=5, dtype=jnp.bfloat16),
        jnp.float32,
        dict(block_q=16, block_k=16),
        1e-2,
    ),
    "f16, 32-row tiles": (
        dict(b=1, c=2, t=40, h=2, d=16, n=3, k=2, qf=1, dtype=jnp.float16),
        None,
        dict(block_q=32, block_k=32),
        5e-3,
    ),
}


def _problem(name):
    sizes, cache_dtype, _, _ = CASES[name]
    (q, kc, vc, kn, vn), sel = random_problem(np.random.default_rng(len(name)), **sizes)
    if cache_dtype is not None:  # the cache in another dtype: values of q's dtype, stored wider
        kn, vn = kn.astype(cache_dtype), vn.astype(cache_dtype)
    return (q, kc, vc, kn, vn), sel


@pytest.mark.kernels
@pytest.mark.parametrize("name", list(CASES))
def test_interpreter_matches_reference(name):
    args, sel = _problem(name)
    out = interpret_attention(*args, sel, **CASES[name][2])
    assert out.dtype == np.dtype(args[0].dtype) and out.shape == args[0].shape
    assert relative_error(out, REF(*args, sel)) <= CASES[name][3]  # NaN (an unwritten element) fails too


@pytest.mark.kernels
def test_interpreter_inside_jit_and_through_attend(monkeypatch):
    name = "bf16 queries, float32 cache (cast per tile)"
    args, sel = _problem(name)
    out = jax.jit(triton_interpret_attention)(*args, sel)
    assert out.dtype == jnp.bfloat16 and relative_error(out, REF(*args, sel)) <= 1e-2
    monkeypatch.setenv("FKV_INTERPRET", "1")  # what `--attention-backend triton` on a CPU needs
    assert (
        resolve_backend("triton", **dict(dtype=jnp.bfloat16, head_dim=32, tokens_per_frame=20))[1]
        is triton_interpret_attention
    )
    via_attend = jax.jit(lambda *a: attend(*a, backend="triton"))(*args, sel)
    np.testing.assert_array_equal(np.asarray(via_attend, np.float32), np.asarray(out, np.float32))


@pytest.mark.kernels
def test_interpreter_reads_a_layer_of_the_stacked_cache():
    """The sampler hands the whole [L, B, H, N, T, D] cache and a (traced) layer index: the kernel reads that
    layer in place and gives what it gives on the layer's own cache."""
    name = "bf16 queries, float32 cache (cast per tile)"
    (q, kc, vc, kn, vn), sel = _problem(name)
    ks, vs = jnp.stack([kn * 0.5, kn, kn * 2.0]), jnp.stack([vn * 2.0, vn, vn * 0.5])  # [L=3, B, H, N, T, D]
    fn = jax.jit(lambda layer, *a: triton_interpret_attention(*a, layer=layer))
    for layer in (1, 2):
        got = fn(jnp.int32(layer), q, kc, vc, ks, vs, sel)
        want = REF(q, kc, vc, ks[layer], vs[layer], sel)
        assert relative_error(got, want) <= 1e-2
    assert relative_error(fn(jnp.int32(2), q, kc, vc, ks, vs, sel), REF(q, kc, vc, kn, vn, sel)) > 0.05
    assert getattr(triton_interpret_attention, "reads_stacked_cache", False)
    with pytest.raises(ValueError, match="needs layer="):
        triton_interpret_attention(q, kc, vc, ks, vs, sel)


LOWER_SCRIPT = """
import json, sys
try:
    import jax_triton  # noqa: F401
except ImportError as e:
    print(json.dumps({"skip": str(e).splitlines()[0]}))
    sys.exit(0)
import jax, jax.numpy as jnp
from fkv_jax.attention.selection import Selection
from fkv_jax.kernels.hlo_check import large_ops_outside_kernels
from fkv_jax.kernels.triton_jax import triton_attention
s = jax.ShapeDtypeStruct
b, c, t, h, d, n, k, m = 1, 3, 1560, 12, 128, 21, 8, 64
results = {}
for qf, cache_dtype in ((1, jnp.bfloat16), (c, jnp.bfloat16), (1, jnp.float32)):
    args = [s((b, c * t, h, d), jnp.bfloat16)] * 3 + [s((b, h, n, t, d), cache_dtype)] * 2
    sel = Selection(frames=s((b, qf, h, k), jnp.int32), chunk_mask=s((b, qf, h, c), bool),
                    mem_k=s((b, m, h, d), jnp.bfloat16), mem_v=s((b, m, h, d), jnp.bfloat16),
                    mem_valid=s((b, h, m), bool))
    fn = jax.jit(lambda *a: triton_attention(*a, compute_capability=90))
    exported = jax.export.export(fn, platforms=["cuda"], disabled_checks=[
        jax.export.DisabledSafetyCheck.custom_call("triton_kernel_call")])(*args, sel)
    module = exported.mlir_module()
    results[f"{qf}-{jnp.dtype(cache_dtype).name}"] = [
        module.count("stablehlo.custom_call @triton_kernel_call"),
        len(large_ops_outside_kernels(module, b * h * n * t * d // 2))]
print(json.dumps(results))
"""


@pytest.mark.kernels
def test_lowers_for_cuda_through_jax_triton(tmp_path):
    env = {k: v for k, v in os.environ.items() if k != "TRITON_INTERPRET"}
    env.update(
        JAX_PLATFORMS="cpu",
        JAX_TRITON_DUMP_DIR=str(tmp_path),
        TRITON_CACHE_DIR=str(tmp_path / "cache"),
        PYTHONPATH=str(ROOT) + os.pathsep + os.environ.get("PYTHONPATH", ""),
    )
    r = subprocess.run([sys.executable, "-c", LOWER_SCRIPT], capture_output=True, text=True, env=env, timeout=600)
    assert r.returncode == 0, r.stderr[-3000:]
    res = json.loads(r.stdout.strip().splitlines()[-1])
    if "skip" in res:
        pytest.skip(
            f"jax_triton does not import here ({res['skip']}); pip install --no-deps jax-triton==0.3.1 "
            f"jax-cuda12-plugin==0.10.2 provides what it needs without a GPU"
        )
    # one kernel call each, and the cache (bf16 or f32) reaches it with no cache-sized op around it
    assert res == {"1-bfloat16": [1, 0], "3-bfloat16": [1, 0], "1-float32": [1, 0]}
    ptx = [p.read_text() for p in tmp_path.rglob("*.ptx")]
    assert len(ptx) == 3 and all(".target sm_90a" in p and ".entry selection_attention_kernel" in p for p in ptx)
    assert all("wgmma" in p for p in ptx)  # Hopper tensor-core MMAs for the bf16 dots


STACKED_SCRIPT = """
import json, sys
try:
    import jax_triton  # noqa: F401
    from fkv_jax.kernels.gpu_aot import cuda_pjrt_available
    assert cuda_pjrt_available(), "jaxlib's CUDA PJRT plugin is not installed"
except (ImportError, AssertionError) as e:
    print(json.dumps({"skip": str(e).splitlines()[0]}))
    sys.exit(0)
import jax, jax.numpy as jnp
from fkv_jax.attention.selection import Selection
from fkv_jax.kernels.gpu_aot import compile_for_h200
from fkv_jax.kernels.triton_jax import triton_attention
s, dt = jax.ShapeDtypeStruct, jnp.bfloat16
L, b, c, t, h, d, n, k = 2, 1, 3, 1560, 12, 128, 21, 8

def sliced(q, kc, vc, K, V, frames):
    def body(x, kv):
        return triton_attention(x, kc, vc, kv[0], kv[1], Selection(frames=frames), compute_capability=90), None
    return jax.lax.scan(body, q, (K, V))[0]

def stacked(q, kc, vc, K, V, frames):
    def body(x, layer):
        return triton_attention(x, kc, vc, K, V, Selection(frames=frames), layer=layer, compute_capability=90), None
    return jax.lax.scan(body, q, jnp.arange(L, dtype=jnp.int32))[0]

args = [s((b, c * t, h, d), dt)] * 3 + [s((L, b, h, n, t, d), dt)] * 2 + [s((b, 1, h, k), jnp.int32)]
out = {}
for name, fn in (("sliced", sliced), ("stacked", stacked)):
    r = compile_for_h200(fn, *args, min_elements=b * h * n * t * d // 2)
    out[name] = [len(r["large_ops"]), r["memory"]["temp_size_in_bytes"], r["custom_calls"]]
print(json.dumps(out))
"""


@pytest.mark.kernels
def test_a_layer_of_the_stacked_cache_reaches_the_kernel_in_place_on_h200():
    """Compiled for a deviceless H200 (jaxlib's CUDA plugin): a layer loop that slices cache[l] for the kernel
    gets cache-sized copies; the sampler's call (whole stacked cache + layer index) gets none."""
    env = {k: v for k, v in os.environ.items() if k != "TRITON_INTERPRET"}
    env.update(JAX_PLATFORMS="cpu", PYTHONPATH=str(ROOT) + os.pathsep + os.environ.get("PYTHONPATH", ""))
    r = subprocess.run([sys.executable, "-c", STACKED_SCRIPT], capture_output=True, text=True, env=env, timeout=600)
    assert r.returncode == 0, r.stderr[-3000:]
    res = json.loads(r.stdout.strip().splitlines()[-1])
    if "skip" in res:
        pytest.skip(
            f"{res['skip']}; pip install --no-deps jax-triton==0.3.1 jax-cuda12-plugin==0.10.2 jax-cuda12-pjrt==0.10.2"
        )
    layer_bytes = 12 * 21 * 1560 * 128 * 2
    assert res["sliced"][0] > 0 and res["sliced"][1] >= layer_bytes
    assert res["stacked"][0] == 0 and res["stacked"][1] < layer_bytes // 4
    assert res["stacked"][2] == ["triton_kernel_call"]


@pytest.mark.kernels
def test_bf16_model_with_triton_in_the_interpreter_matches_xla(tiny_model, tiny_cfg, ref, monkeypatch):
    """A bf16 model (bf16 cache, the default) generating with ``attention_backend="triton"`` on CPU
    (FKV_INTERPRET=1: Triton's interpreter inside the jitted chunk step) matches the same model on ``xla``."""
    import dataclasses

    from flax import nnx

    from helpers import rel_err
    from fkv_jax.config import sampler_preset
    from fkv_jax.model.build import cast_model
    from fkv_jax.sampling.rollout import Sampler

    graphdef, params = tiny_model
    gdef16, params16 = nnx.split(cast_model(tiny_cfg, nnx.merge(graphdef, params), jnp.bfloat16), nnx.Param)
    sc = dataclasses.replace(sampler_preset("self_forcing"), local_attn_size=6, sink_size=3)
    noise = ref["rolling/noise"][:, :6]
    monkeypatch.setenv("FKV_INTERPRET", "1")
    lats = {}
    for backend in ("xla", "triton"):
        s = Sampler(
            gdef16, tiny_cfg, sc, batch=1, latent_hw=(8, 12), num_frames=noise.shape[1], attention_backend=backend
        )
        assert s.dtype == "bfloat16" and s.geom.dtype == "bfloat16"  # bf16 compute, bf16 cache
        lats[backend] = s.generate(params16, ref["context"], noise, seed=0, progress=False)
    err = rel_err(lats["triton"], lats["xla"])
    print(f"triton (interpreted) vs xla, bf16 model: relative error {err:.2e}")
    assert np.isfinite(lats["triton"]).all() and 0 < err <= 2e-2, err  # 0 would mean triton never ran
