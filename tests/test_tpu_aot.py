"""Real TPU compiles without a TPU (libtpu, deviceless) and the HLO tools of ``fkv_jax.aot``.

libtpu (the ``tpu`` extra) compiles for a topology description: Mosaic runs on the Pallas kernel and XLA TPU
on everything around it, exactly as for hardware. These tests check what that compiler produced: the
kernel compiles at Wan2.1-1.3B 480x832 shapes in bf16, nothing outside it touches a cache-sized buffer, the
program fits the chip's HBM, and the kernel's declared cost reaches XLA. Nothing here runs on a TPU.
"""

from __future__ import annotations

import functools
import re

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from jax.sharding import SingleDeviceSharding

from fkv_jax.aot import cache_sized_ops, libtpu_available, memory_summary, parse_hlo, program_cost, tpu_devices
from fkv_jax.attention.selection import Selection
from fkv_jax.kernels import pallas_tpu_attention
from fkv_jax.kernels.pallas_tpu import make_plan, selection_cost
from fkv_jax.kernels.shapes import attention_dims
from fkv_jax.kernels.testing import random_problem
from fkv_jax.roofline import CHIPS

pytestmark = [
    pytest.mark.kernels,
    pytest.mark.skipif(not libtpu_available(), reason="libtpu is not importable (pip install -e '.[tpu]')"),
]

TOPOLOGIES = {"tpu-v5e": "v5e:2x2", "tpu-v5p": "v5p:2x2x1", "tpu-v6e": "v6e:2x2"}


@pytest.fixture(autouse=True, scope="module")
def _no_persistent_cache():
    """Deviceless TPU executables cannot be reloaded from JAX's persistent cache (conftest enables it)."""
    old = jax.config.jax_enable_compilation_cache
    jax.config.update("jax_enable_compilation_cache", False)
    yield
    jax.config.update("jax_enable_compilation_cache", old)


WAN_480P = dict(b=1, c=3, t=1560, h=12, d=128, n=21)  # Wan2.1-1.3B at 480x832: 60x104 latents / 2x2 patches


@functools.cache
def _device(topology: str):
    return tpu_devices(topology)[0]


def _abstract(tree, dev):
    """The same tree as ShapeDtypeStructs placed on a (deviceless) TPU device."""
    sh = SingleDeviceSharding(dev)
    return jax.tree.map(lambda x: jax.ShapeDtypeStruct(x.shape, x.dtype, sharding=sh), tree)


@functools.cache
def _wan_problem(qf: int, k: int, m: int):
    """Shapes and dtypes of a random_problem at Wan 480p in bf16 (built once per configuration: the cache
    is 2 x 96 MiB)."""
    args, sel = random_problem(np.random.default_rng(0), **WAN_480P, k=k, qf=qf, m=m, dtype=jnp.bfloat16)
    return jax.tree.map(lambda x: jax.ShapeDtypeStruct(x.shape, x.dtype), (args, sel))


def _declared_cost(hlo: str) -> dict:
    line = next(x for x in hlo.splitlines() if 'custom_call_target="tpu_custom_call"' in x)
    est = re.search(r'"cost_estimate"\s*:\s*\{([^}]*)\}', line).group(1)
    return {k: int(v) for k, v in re.findall(r'"(\w+)"\s*:\s*"?(\d+)', est)}


# ---- the HLO scanner and the loop-aware cost -----------------------------------------------------------------


def test_scanner_reports_a_transposed_cache_and_not_a_slot_read():
    cache = jax.ShapeDtypeStruct((1, 4, 8, 64, 128), jnp.float32)  # [B, H, N, T, D]
    nbytes = 4 * 8 * 64 * 128 * 4
    moved = jax.jit(lambda k: jnp.swapaxes(k, 1, 2) * 2.0).lower(cache).compile().as_text()  # [B, N, H, T, D]
    found = cache_sized_ops(moved, nbytes)
    assert found and max(o.bytes for o in found) == nbytes
    one_slot = jax.jit(lambda k: k[:, :, 3] * 2.0).lower(cache).compile().as_text()
    assert cache_sized_ops(one_slot, nbytes) == []


def test_scanner_finds_the_old_layout_relayout_on_tpu():
    """The bug of issue 11: a [B, N, T, H, D] cache viewed as [B, N, T, H*D] is a relayout copy on TPU."""
    dev = _device(TOPOLOGIES["tpu-v5e"])
    cache = _abstract(jax.ShapeDtypeStruct((1, 4, 256, 12, 128), jnp.bfloat16), dev)
    hlo = jax.jit(lambda k: k.reshape(1, 4, 256, 12 * 128)[:, :, :, :128] + 1).lower(cache).compile().as_text()
    found = cache_sized_ops(hlo, 4 * 256 * 12 * 128 * 2)
    assert found and {o.opcode for o in found} & {"copy", "fusion", "reshape", "transpose"}


def test_scanner_skips_an_in_place_cache_write():
    dev = _device(TOPOLOGIES["tpu-v5e"])
    cache = _abstract(jax.ShapeDtypeStruct((2, 1, 4, 12, 256, 128), jnp.bfloat16), dev)  # [L, B, H, N, T, D]
    new = _abstract(jax.ShapeDtypeStruct((2, 1, 4, 1, 256, 128), jnp.bfloat16), dev)
    write = jax.jit(lambda c, x, i: jax.lax.dynamic_update_slice_in_dim(c, x, i, axis=3), donate_argnums=0)
    hlo = write.lower(cache, new, _abstract(jax.ShapeDtypeStruct((), jnp.int32), dev)).compile().as_text()
    assert cache_sized_ops(hlo, 4 * 12 * 256 * 128 * 2) == []


def test_program_cost_counts_every_loop_iteration():
    """XLA's cost_analysis counts a while body once; program_cost multiplies it by the trip count."""
    dev = _device(TOPOLOGIES["tpu-v5e"])

    def f(x, w):
        return jax.lax.scan(lambda c, wi: (c @ wi, None), x, w)[0]

    x = _abstract(jax.ShapeDtypeStruct((512, 1024), jnp.bfloat16), dev)
    w = _abstract(jax.ShapeDtypeStruct((6, 1024, 1024), jnp.bfloat16), dev)
    compiled = jax.jit(f).lower(x, w).compile()
    one = 2 * 512 * 1024 * 1024
    cost = program_cost(compiled.as_text())
    assert cost.trip_counts_known and cost.flops == 6 * one
    assert compiled.cost_analysis()["flops"] < 2 * one  # the reason program_cost exists
    assert cost.bytes >= 6 * 1024 * 1024 * 2  # every layer's weights read once


def test_parse_hlo_finds_the_entry_and_its_operands():
    hlo = jax.jit(lambda a, b: jnp.tanh(a) @ b).lower(jnp.ones((8, 16)), jnp.ones((16, 4))).compile().as_text()
    comps = parse_hlo(hlo)
    entry = next(c for c in comps.values() if c.entry)
    assert entry.root.arrays[0] == ("f32", (8, 4))
    assert sum(i.opcode == "parameter" for i in entry.instrs) == 2


# ---- the kernel at Wan2.1-1.3B 480x832, bf16, for real TPU targets ---------------------------------------------

KERNEL_CASES = {  # name: (Qf, K, M): a chunk-wide selection with memory (Forcing-KV) and per-frame groups
    "qf1-k21-m1560": (1, 21, 1560),
    "qf3-k12": (3, 12, 0),
}


# every case on v5e, one on each other target (compile time)
@pytest.mark.parametrize(
    "target, case",
    [("tpu-v5e", c) for c in KERNEL_CASES] + [(t, "qf1-k21-m1560") for t in TOPOLOGIES if t != "tpu-v5e"],
)
def test_kernel_compiles_in_place_at_wan_480p(target, case):
    dev = _device(TOPOLOGIES[target])
    args, sel = _abstract(_wan_problem(*KERNEL_CASES[case]), dev)
    compiled = jax.jit(pallas_tpu_attention).lower(*args, sel).compile()
    hlo = compiled.as_text()
    cache_bytes = 12 * 21 * 1560 * 128 * 2  # one of k_cache / v_cache, bf16
    assert "tpu_custom_call" in hlo
    assert cache_sized_ops(hlo, cache_bytes) == []  # no relayout, reshape copy, gather or cast of the cache
    mem = memory_summary(compiled)
    assert mem["arguments"] >= 2 * cache_bytes and mem["temporaries"] < cache_bytes // 2
    assert mem["total"] <= CHIPS[target].hbm_bytes
    # the kernel's declared cost reaches the compiled program as selection_cost computed it
    dims = attention_dims(*args, sel)
    want = selection_cost(
        dims, make_plan(dims), q_bytes=2, chunk_bytes=2, cache_bytes=2, memory_bytes=2 if sel.mem_k is not None else 0
    )
    got = _declared_cost(hlo)
    assert (got["flops"], got["transcendentals"], got["bytes_accessed"]) == (
        want.flops,
        want.transcendentals,
        want.bytes_accessed,
    )
    assert program_cost(hlo).kernel_flops == want.flops


def test_kernel_casts_a_float32_cache_per_tile_on_tpu():
    """bf16 queries against a float32 cache: the cast happens inside the kernel, never on the whole cache."""
    dev = _device(TOPOLOGIES["tpu-v5e"])
    args, sel = _wan_problem(1, 8, 0)
    args = list(args)
    args[3] = args[4] = jax.ShapeDtypeStruct(args[3].shape, jnp.float32)
    args, sel = _abstract((args, sel), dev)
    hlo = jax.jit(pallas_tpu_attention).lower(*args, sel).compile().as_text()
    assert cache_sized_ops(hlo, 12 * 21 * 1560 * 128 * 4, fraction=0.25) == []  # not even a bf16 copy (1/2)


def test_empty_selection_table_compiles():
    dev = _device(TOPOLOGIES["tpu-v5e"])
    args, _ = _wan_problem(1, 8, 0)
    b, h, c = 1, 12, 3
    sel = Selection(
        frames=jax.ShapeDtypeStruct((b, 1, h, 0), jnp.int32), chunk_mask=jax.ShapeDtypeStruct((b, 1, h, c), bool)
    )
    args, sel = _abstract((args, sel), dev)
    compiled = jax.jit(pallas_tpu_attention).lower(*args, sel).compile()
    assert _declared_cost(compiled.as_text())["flops"] == 4 * 4680 * 4680 * 128 * 12


# ---- a layer loop: slicing the stacked cache copies it, the layer index does not ------------------------------


def _layer_loop_hlo(stacked: bool) -> tuple[str, int]:
    dev = _device(TOPOLOGIES["tpu-v5e"])
    b, c, t, h, d, n, k, layers = 1, 3, 256, 4, 128, 12, 6, 3
    s = jax.ShapeDtypeStruct
    q = s((b, c * t, h, d), jnp.bfloat16)
    cache = s((layers, b, h, n, t, d), jnp.bfloat16)
    sel = Selection(frames=s((b, 1, h, k), jnp.int32), chunk_mask=s((b, 1, h, c), bool))
    q, cache, sel = _abstract((q, cache, sel), dev)

    def step(q, kcache, vcache, sel):
        def body(x, i):
            if stacked:  # the whole cache and the layer index: read in place
                out = pallas_tpu_attention(x, x, x, kcache, vcache, sel, layer=i)
            else:  # what a scan over the cache as xs does: a [B, H, N, T, D] slice per layer
                kl = jax.lax.dynamic_index_in_dim(kcache, i, keepdims=False)
                vl = jax.lax.dynamic_index_in_dim(vcache, i, keepdims=False)
                out = pallas_tpu_attention(x, x, x, kl, vl, sel)
            return out, None

        return jax.lax.scan(body, q, jnp.arange(layers))[0]

    hlo = jax.jit(step).lower(q, cache, cache, sel).compile().as_text()
    return hlo, b * h * n * t * d * 2


def test_layer_loop_reads_a_stacked_cache_in_place():
    hlo, layer_bytes = _layer_loop_hlo(stacked=True)
    assert cache_sized_ops(hlo, layer_bytes) == []
    assert program_cost(hlo).kernels == 3


def test_layer_loop_over_cache_slices_copies_each_layer():
    """Documents why the stacked form exists: XLA materialises cache[l] for the custom call, every layer."""
    hlo, layer_bytes = _layer_loop_hlo(stacked=False)
    found = cache_sized_ops(hlo, layer_bytes)
    assert found and all(o.runs == 3 for o in found)


# ---- the chunk step of a small model (model + policy + pallas_tpu + cache), as python -m fkv_jax.aot does --------


def _chunk_step_report(*flags):
    from fkv_jax.aot import build_parser, compile_chunk_step

    # "mid": 2 layers, 2 heads of 128, 12x16 = 192 tokens per frame (Mosaic's block rules hold)
    return compile_chunk_step(
        build_parser().parse_args(
            [
                "--model-preset",
                "mid",
                "--frames",
                "12",
                "--dtype",
                "bfloat16",
                "--attention-backend",
                "pallas_tpu",
                *flags,
            ]
        )
    )


@pytest.mark.parametrize(
    "target, policy", [("tpu-v5e", None), ("tpu-v5e", "forcing_kv"), ("tpu-v5p", None), ("tpu-v6e", None)]
)
def test_small_model_chunk_step_compiles_and_fits(target, policy):
    r = _chunk_step_report("--target", target, *(["--policy", policy] if policy else []))
    assert r["fits"] and r["hbm"]["total"] <= CHIPS[target].hbm_bytes
    assert r["kernel_calls_per_chunk"] == 2 * 5  # every layer of the 4 denoising passes and the clean pass
    assert r["flops_per_chunk"] > r["kernel_flops_per_chunk"] > 0
    assert r["hbm"]["cache"] == 2 * 2 * 2 * r["cache_slots"] * 192 * 128 * 2  # k, v x [L=2, B=1, H=2, N, T, D] bf16


def test_small_model_chunk_step_has_no_cache_copies():
    r = _chunk_step_report("--target", "tpu-v5e")
    assert r["cache_copies"] == 0, r["cache_copy_ops"]
