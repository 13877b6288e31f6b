"""Backend choice and checks (fkv_jax.attention.backends): every branch of resolve_backend and auto, with
the platform, device kind and the optional dependencies faked."""

import functools
import subprocess
import sys

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from fkv_jax.attention import BACKENDS, attend, backends
from fkv_jax.attention.backends import BackendError, resolve_backend, target
from fkv_jax.attention.reference import selection_attention
from fkv_jax.kernels.testing import random_problem

WAN = dict(head_dim=128, tokens_per_frame=1560, query_tokens_per_group=3 * 1560)
H200 = dict(platform="gpu", device_kind="NVIDIA H200", compute_capability="9.0")
A100 = dict(platform="gpu", device_kind="NVIDIA A100-SXM4-80GB", compute_capability="8.0")
TPU = dict(platform="tpu", device_kind="TPU v5 lite")
CPU = dict(platform="cpu", device_kind="cpu")


@pytest.fixture(autouse=True)
def deps(monkeypatch):
    """Both GPU dependencies present unless a test says otherwise; no interpretation from the environment."""
    monkeypatch.setattr(backends, "jax_triton_available", lambda: True)
    monkeypatch.setattr(backends, "mosaic_gpu_available", lambda: True)
    monkeypatch.delenv("FKV_INTERPRET", raising=False)
    return monkeypatch


def name_of(name, **kw):
    return resolve_backend(name, **{"dtype": jnp.bfloat16, **WAN, **kw})[0]


def error_of(name, **kw) -> str:
    with pytest.raises(BackendError) as e:
        resolve_backend(name, **{"dtype": jnp.bfloat16, **WAN, **kw})
    msg = str(e.value)
    assert "\n" not in msg and isinstance(e.value, ValueError) and repr(name) in msg
    return msg


def test_unknown_name_lists_the_valid_ones():
    msg = error_of("cuda", **CPU)
    assert "unknown attention backend 'cuda'" in msg and "xla, pallas_tpu, mosaic_gpu, triton, auto" in msg


@pytest.mark.parametrize("where", [CPU, TPU, H200, A100])
def test_xla_runs_everywhere(where):
    name, fn = resolve_backend("xla", dtype=jnp.float32, **WAN, **where)
    assert name == "xla" and fn is selection_attention


def test_xla_rejects_a_non_float_dtype():
    assert "dtype int32" in error_of("xla", dtype=jnp.int32, **CPU)


def test_pallas_tpu_on_tpu_and_its_layout_rules():
    from fkv_jax.kernels.pallas_tpu import pallas_tpu_attention

    name, fn = resolve_backend("pallas_tpu", dtype=jnp.bfloat16, cache_dtype=jnp.float32, **WAN, **TPU)
    assert name == "pallas_tpu" and fn is pallas_tpu_attention
    assert "head_dim % 128 == 0" in error_of("pallas_tpu", **{**WAN, "head_dim": 64}, **TPU)
    assert "tokens_per_frame % 8" in error_of("pallas_tpu", **{**WAN, "tokens_per_frame": 1563}, **TPU)
    assert "dtype float16" in error_of("pallas_tpu", dtype=jnp.float16, **TPU)


@pytest.mark.parametrize("where", [CPU, H200])
def test_pallas_tpu_elsewhere_is_refused(where):
    msg = error_of("pallas_tpu", **where)
    assert "needs a TPU" in msg and "FKV_INTERPRET=1" in msg


def test_pallas_tpu_interpreted_on_cpu(deps):
    from jax.experimental.pallas import tpu as pltpu

    _, fn = resolve_backend("pallas_tpu", dtype=jnp.float32, head_dim=8, tokens_per_frame=4, interpret=True, **CPU)
    assert isinstance(fn, functools.partial) and isinstance(fn.keywords["interpret"], pltpu.InterpretParams)
    deps.setenv("FKV_INTERPRET", "1")  # the environment variable does the same
    assert name_of("pallas_tpu", head_dim=8, tokens_per_frame=4, **CPU) == "pallas_tpu"


@pytest.mark.parametrize(
    "kind",
    [
        dict(device_kind="NVIDIA H100 80GB HBM3", compute_capability=""),
        dict(device_kind="NVIDIA H800", compute_capability=""),
        dict(device_kind="NVIDIA GH200 480GB", compute_capability=""),
        dict(device_kind="", compute_capability="9.0"),
    ],
    ids=["H100", "H800", "GH200", "cc9.0"],
)
def test_mosaic_gpu_on_hopper(kind):
    from fkv_jax.kernels.mosaic_gpu import mosaic_gpu_attention

    name, fn = resolve_backend("mosaic_gpu", dtype=jnp.bfloat16, **WAN, platform="cuda", **kind)
    assert name == "mosaic_gpu" and fn is mosaic_gpu_attention


def test_mosaic_gpu_refusals(deps):
    assert "needs an NVIDIA Hopper GPU" in error_of("mosaic_gpu", **A100)
    assert "needs an NVIDIA Hopper GPU" in error_of("mosaic_gpu", **TPU)
    assert "FKV_INTERPRET=1" in error_of("mosaic_gpu", **CPU)
    assert "dtype float32" in error_of("mosaic_gpu", dtype=jnp.float32, **H200)
    assert "cache float32" in error_of("mosaic_gpu", cache_dtype=jnp.float32, **H200)
    assert "head_dim=96" in error_of("mosaic_gpu", **{**WAN, "head_dim": 96}, **H200)
    assert "tokens_per_frame=32" in error_of("mosaic_gpu", **{**WAN, "tokens_per_frame": 32}, **H200)
    assert "query_tokens_per_group=32" in error_of("mosaic_gpu", **{**WAN, "query_tokens_per_group": 32}, **H200)
    deps.setattr(backends, "mosaic_gpu_available", lambda: False)
    assert "needs Mosaic GPU support" in error_of("mosaic_gpu", **H200)


def test_mosaic_gpu_interpreted_on_cpu():
    _, fn = resolve_backend("mosaic_gpu", dtype=jnp.bfloat16, head_dim=64, tokens_per_frame=80, interpret=True, **CPU)
    assert isinstance(fn, functools.partial) and fn.keywords["interpret"] is not None


@pytest.mark.parametrize("where", [H200, A100, dict(platform="rocm", device_kind="AMD Instinct MI300X")])
def test_triton_on_gpus(where):
    from fkv_jax.kernels.triton_jax import triton_attention

    name, fn = resolve_backend("triton", dtype=jnp.bfloat16, cache_dtype=jnp.float32, **WAN, **where)
    assert name == "triton" and fn is triton_attention


def test_triton_refusals(deps):
    assert "needs a CUDA or ROCm GPU" in error_of("triton", **TPU)
    assert "FKV_INTERPRET=1" in error_of("triton", **CPU)
    assert "head_dim=96" in error_of("triton", **{**WAN, "head_dim": 96}, **A100)
    assert "dtype int8" in error_of("triton", dtype=jnp.int8, **A100)
    deps.setattr(backends, "jax_triton_available", lambda: False)
    assert "needs jax_triton" in error_of("triton", **A100)


def test_triton_interpreted_on_cpu(deps):
    from fkv_jax.kernels.triton_interpret import triton_interpret_attention

    deps.setattr(backends, "jax_triton_available", lambda: False)  # not needed by the interpreter
    assert (
        resolve_backend("triton", dtype=jnp.float32, head_dim=16, tokens_per_frame=4, interpret=True, **CPU)[1]
        is triton_interpret_attention
    )
    deps.setattr(backends, "_triton_interpreter_available", lambda: False)
    assert "needs triton and torch" in error_of("triton", interpret=True, **CPU)


@pytest.mark.parametrize(
    "where,kw,want",
    [
        (TPU, {}, "pallas_tpu"),
        (TPU, dict(head_dim=64), "xla"),  # pallas_tpu's block rules -> xla
        (H200, {}, "mosaic_gpu"),
        (H200, dict(dtype=jnp.float32), "triton"),  # mosaic_gpu is bf16/f16 only
        (H200, dict(cache_dtype=jnp.float32), "triton"),  # mosaic_gpu needs the cache in q's dtype
        (H200, dict(query_tokens_per_group=32), "triton"),
        (A100, {}, "triton"),
        (A100, dict(head_dim=96), "xla"),  # no kernel takes D = 96
        (dict(platform="rocm"), {}, "triton"),
        (CPU, {}, "xla"),
        (CPU, dict(interpret=True), "xla"),  # auto never picks an interpreter
    ],
)
def test_auto(where, kw, want):
    assert name_of("auto", **where, **kw) == want


def test_auto_without_the_gpu_dependencies(deps):
    deps.setattr(backends, "mosaic_gpu_available", lambda: False)
    assert name_of("auto", **H200) == "triton"
    deps.setattr(backends, "jax_triton_available", lambda: False)
    assert name_of("auto", **H200) == "xla"
    assert name_of("auto", **A100) == "xla"


def test_target_defaults_and_override():
    assert backends.current_target().platform == "cpu"  # jax.devices()[0] in the tests
    assert name_of("auto") == "xla"
    with target("tpu", "TPU v5 lite"):
        assert name_of("auto") == "pallas_tpu"
        with target("gpu", "NVIDIA H200"):
            assert backends.current_target().platform == "cuda" and name_of("auto") == "mosaic_gpu"
        assert name_of("auto", platform="cpu") == "xla"  # an explicit argument wins
    assert backends.current_target().platform == "cpu"


def test_backends_table_is_read_only():
    """Nothing registers backends at run time (custom attention is a value: Sampler(attention=fn))."""
    with pytest.raises(TypeError):
        BACKENDS["anything"] = lambda *a: a[0]
    with pytest.raises(KeyError):
        BACKENDS["nope"]
    assert set(BACKENDS) == {"xla", "pallas_tpu", "mosaic_gpu", "triton", "auto", "cpu_ffi"}


def test_attend_checks_at_trace_time():
    args, sel = random_problem(np.random.default_rng(0), b=1, c=2, t=4, h=2, d=8, n=3, k=2, qf=2)
    with pytest.raises(BackendError, match="'pallas_tpu' cannot run: needs a TPU"):
        attend(*args, sel, backend="pallas_tpu")
    out = jax.jit(lambda *a: attend(*a, backend="auto"))(*args, sel)  # cpu_ffi on a CPU when it is built
    np.testing.assert_allclose(out, jax.jit(selection_attention)(*args, sel), rtol=1e-5, atol=1e-6)


@pytest.mark.slow
def test_no_import_cycle_and_no_kernel_imported_by_attention():
    code = (
        "import sys, fkv_jax.attention as a; assert 'fkv_jax.kernels' not in sys.modules; "
        "names = list(a.BACKENDS); import fkv_jax.kernels; assert list(a.BACKENDS) == names; "
        "import fkv_jax.kernels.pallas_tpu, fkv_jax.kernels.triton_jax, fkv_jax.kernels.mosaic_gpu; print(names)"
    )
    r = subprocess.run(
        [sys.executable, "-c", code],
        capture_output=True,
        text=True,
        timeout=300,
        env={"JAX_PLATFORMS": "cpu", "PATH": "/usr/bin:/bin"},
    )
    assert r.returncode == 0, r.stderr[-2000:]
    assert "['xla', 'pallas_tpu', 'mosaic_gpu', 'triton', 'auto', 'cpu_ffi']" in r.stdout


def test_a_dtype_that_is_not_one():
    with pytest.raises(BackendError, match="dtype 'bf17' is not a dtype"):
        resolve_backend("xla", dtype="bf17", head_dim=64, tokens_per_frame=16, platform="cpu")
    assert name_of("auto", dtype="bfloat16", cache_dtype="float32", **H200) == "triton"  # names work too


def test_target_compute_capability_for_ahead_of_time_compiles():
    assert backends.target_compute_capability() is None  # outside a target block: the device decides
    with target("gpu", "NVIDIA H200", "9.0"):
        assert backends.target_compute_capability() == 90
    with target("gpu", "NVIDIA H100"):
        assert backends.target_compute_capability() is None
