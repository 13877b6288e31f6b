"""The Triton kernel compiled for an H200 (sm_90a) without a GPU: Triton's compiler to PTX and cubin, then
the ptxas Triton bundles (``-v``) for registers and spills, at Wan2.1-1.3B 480x832 shapes in bf16.

Needs only triton (in the test extra): no GPU, no CUDA driver, no jax-triton. About 5 s per compile here.
Nothing is run; limits are Hopper's (255 registers per thread, 227 KB shared memory per block).
"""

import pytest

from fkv_jax.kernels.triton_aot import (
    SM90_MAX_REGISTERS,
    SM90_MAX_SHARED,
    check_sm90_limits,
    compile_for_sm90,
    parse_ptxas,
)
from fkv_jax.kernels.triton_kernel import TritonBlocks

pytestmark = pytest.mark.kernels

WAN_1_3B = dict(batch=1, heads=12, head_dim=128, frame_tokens=1560, chunk_frames=3, slots=21)


@pytest.fixture(autouse=True)
def _triton_cache(tmp_path, monkeypatch):
    monkeypatch.setenv("TRITON_CACHE_DIR", str(tmp_path / "triton_cache"))  # compile for real, write only here


@pytest.mark.kernels
@pytest.mark.parametrize("groups,memory", [(1, 0), (3, 64)], ids=["one-group", "per-frame-groups+memory"])
def test_bf16_compiles_for_sm90_without_spills(tmp_path, groups, memory):
    blocks = TritonBlocks()  # the wrapper's defaults: 64 x 64 tiles, 4 warps, 2 stages
    report = compile_for_sm90(
        dtype="bfloat16", blocks=blocks, groups=groups, memory=memory, workdir=tmp_path, **WAN_1_3B
    )
    assert report["ptx_target"] == "sm_90a" and report["cubin_bytes"] > 0
    assert report["wgmma"] > 0  # Hopper tensor-core MMAs for both bf16 products
    assert report["constexprs"]["ROWS_N"] == 21 * 1560 and report["constexprs"]["D"] == 128
    assert report["spill_stores"] == 0 and report["spill_loads"] == 0, report["ptxas_log"]
    assert 0 < report["registers"] <= SM90_MAX_REGISTERS
    assert 0 < report["shared"] <= SM90_MAX_SHARED
    assert check_sm90_limits(report) == []
    assert (tmp_path / "selection_attention_bfloat16_bfloat16.ptx").exists()


@pytest.mark.kernels
def test_bf16_queries_with_a_float32_cache_compile():
    """A float32 cache under bf16 queries (the tile is cast after its load) used to fail with
    "Mismatched type ... pointer<bf16> ... pointer<fp32>"."""
    report = compile_for_sm90(dtype="bfloat16", cache_dtype="float32", **WAN_1_3B)
    assert report["cache_dtype"] == "float32" and report["wgmma"] > 0
    assert check_sm90_limits(report) == [], report["ptxas_log"]


def test_ptxas_report_parsing_and_limits():
    log = (
        "ptxas info    : Compiling entry function 'k' for 'sm_90a'\n"
        "    8 bytes stack frame, 12 bytes spill stores, 16 bytes spill loads\n"
        "ptxas info    : Used 255 registers, used 1 barriers, 8 bytes cumulative stack size\n"
    )
    stats = parse_ptxas(log)
    assert stats == dict(registers=255, spill_stores=12, spill_loads=16, static_smem=0)
    problems = check_sm90_limits(dict(shared=SM90_MAX_SHARED + 1, **stats))
    assert len(problems) == 2 and "spills" in problems[1] and "shared" in problems[0]
    with pytest.raises(RuntimeError, match="cannot read"):
        parse_ptxas("nothing here")
    with pytest.raises(ValueError, match="cache_dtype='int8'"):
        compile_for_sm90(cache_dtype="int8", ptxas=False)


@pytest.mark.kernels
def test_compiles_after_the_interpreter_ran_in_this_process():
    """The CPU interpreter (used by other tests and by ``FKV_INTERPRET=1``) leaves triton.language unpatched."""
    import jax.numpy as jnp
    import numpy as np

    from fkv_jax.kernels.testing import random_problem
    from fkv_jax.kernels.triton_interpret import interpret_attention

    args, sel = random_problem(np.random.default_rng(0), b=1, c=1, t=16, h=1, d=16, n=2, k=1, qf=1, dtype=jnp.bfloat16)
    assert np.isfinite(np.asarray(interpret_attention(*args, sel), np.float32)).all()
    report = compile_for_sm90(
        dtype="bfloat16", ptxas=False, heads=1, head_dim=16, frame_tokens=16, chunk_frames=1, slots=2
    )
    assert report["cubin_bytes"] > 0
