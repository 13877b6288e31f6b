"""triton: the Triton interpreter on CPU against the XLA reference, and compilation to PTX through jax-triton.

Triton chooses interpreter or compiler when it is imported (TRITON_INTERPRET), so each runs in its own
subprocess. The interpreter run fills the output with NaN first. The jax-triton run compiles the kernel to
PTX for sm_90 without a GPU (``compute_capability=90``) and exports the jitted call for CUDA; it needs
``import jax_triton`` to work, which with jax-triton 0.3.1 needs the CUDA jaxlib plugin's Python module
(``pip install --no-deps jax-cuda12-plugin==0.10.2``, no driver needed) and is skipped otherwise. Nothing
here runs on a GPU.
"""

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest

pytest.importorskip("triton")
pytest.importorskip("torch")

ROOT = Path(__file__).resolve().parents[1]

CASES = {  # name: (problem sizes, kernel kwargs, tolerance)
    "f32 per-frame groups, memory, chunk mask, frames smaller than a tile": (
        dict(b=1, c=3, t=12, h=2, d=16, n=5, k=3, qf=3, m=7, dtype="float32"), dict(block_q=16, block_k=16), 1e-5),
    "f32 one group, no memory, shifted last tiles, 5 query tiles": (
        dict(b=1, c=3, t=24, h=2, d=32, n=6, k=4, qf=1, chunk_mask=False, dtype="float32"),
        dict(block_q=16, block_k=16), 1e-5),
    "bf16 per-frame groups, memory": (
        dict(b=1, c=3, t=20, h=2, d=32, n=4, k=3, qf=3, m=9, dtype="bfloat16"), dict(block_q=16, block_k=16), 1e-2),
}

INTERPRET_SCRIPT = """
import json, sys
import jax, jax.numpy as jnp, numpy as np
from fkv_jax.attention.reference import selection_attention
from fkv_jax.kernels.testing import random_problem, relative_error
from fkv_jax.kernels.triton_kernel import interpret_attention
results = {}
for name, (sizes, kwargs, _) in json.loads(sys.argv[1]).items():
    sizes["dtype"] = getattr(jnp, sizes["dtype"])
    args, sel = random_problem(np.random.default_rng(len(name)), **sizes)
    out = interpret_attention(*args, sel, **kwargs)
    results[name] = [relative_error(out, jax.jit(selection_attention)(*args, sel)), str(out.dtype), list(out.shape),
                     list(args[0].shape)]
print(json.dumps(results))
"""

LOWER_SCRIPT = """
import json, sys
try:
    import jax_triton  # noqa: F401
except ImportError as e:
    print(json.dumps({"skip": str(e).splitlines()[0]}))
    sys.exit(0)
import jax, jax.numpy as jnp
from fkv_jax.attention.selection import Selection
from fkv_jax.kernels.triton_jax import triton_attention
s, dt = jax.ShapeDtypeStruct, jnp.bfloat16
b, c, t, h, d, n, k, m = 1, 3, 1560, 12, 128, 21, 8, 64
results = {}
for qf in (1, c):
    args = [s((b, c * t, h, d), dt)] * 3 + [s((b, n, t, h, d), dt)] * 2
    sel = Selection(frames=s((b, qf, h, k), jnp.int32), chunk_mask=s((b, qf, h, c), bool),
                    mem_k=s((b, m, h, d), dt), mem_v=s((b, m, h, d), dt), mem_valid=s((b, h, m), bool))
    fn = jax.jit(lambda *a: triton_attention(*a, compute_capability=90))
    exported = jax.export.export(fn, platforms=["cuda"], disabled_checks=[
        jax.export.DisabledSafetyCheck.custom_call("triton_kernel_call")])(*args, sel)
    results[qf] = exported.mlir_module().count("stablehlo.custom_call @triton_kernel_call")
print(json.dumps(results))
"""


def _run(script, *args, **env):
    full_env = {k: v for k, v in os.environ.items() if k != "TRITON_INTERPRET"}
    full_env.update(JAX_PLATFORMS="cpu", PYTHONPATH=str(ROOT) + os.pathsep + os.environ.get("PYTHONPATH", ""), **env)
    r = subprocess.run([sys.executable, "-c", script, *args], capture_output=True, text=True, env=full_env,
                       timeout=600)
    assert r.returncode == 0, r.stderr[-3000:]
    return json.loads(r.stdout.strip().splitlines()[-1])


@pytest.fixture(scope="module")
def interpreted():
    return _run(INTERPRET_SCRIPT, json.dumps(CASES), TRITON_INTERPRET="1")


@pytest.mark.parametrize("name", list(CASES))
def test_interpreter_matches_reference(interpreted, name):
    err, dtype, shape, want_shape = interpreted[name]
    assert dtype == CASES[name][0]["dtype"] and shape == want_shape
    assert err <= CASES[name][2]  # NaN (an unwritten element) fails too


def test_compiles_to_ptx_for_sm90_through_jax_triton(tmp_path):
    res = _run(LOWER_SCRIPT, JAX_TRITON_DUMP_DIR=str(tmp_path))
    if "skip" in res:
        pytest.skip(f"jax_triton does not import here ({res['skip']}); pip install --no-deps "
                    f"jax-cuda12-plugin==0.10.2 provides what it needs without a GPU")
    assert res == {"1": 1, "3": 1}
    ptx = [p.read_text() for p in tmp_path.rglob("*.ptx")]
    assert ptx and all(".target sm_90a" in p and ".entry selection_attention_kernel" in p for p in ptx)
    assert all("wgmma" in p for p in ptx)  # Hopper tensor-core MMAs for the bf16 dots
