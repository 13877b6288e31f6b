"""The ``cpu_ffi`` backend: the C++ flash-attention kernel called through ``jax.ffi`` (fkv_jax/kernels/cpu_ffi.py).

Parity against the ``xla`` reference and against a float64 softmax on random problems (odd sizes, ragged and
empty selections, masked chunk frames, memory tokens, one or several query-frame groups, batch > 1), the
backend rules, and a tiny model generating with ``attention_backend="cpu_ffi"`` against ``xla``.
"""

import dataclasses

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from helpers import rel_err
from fkv_jax.attention import attend, backends
from fkv_jax.attention.backends import BackendError, resolve_backend
from fkv_jax.attention.reference import selection_attention
from fkv_jax.attention.selection import Selection
from fkv_jax.kernels import cpu_ffi
from fkv_jax.kernels.testing import random_problem

WHY = cpu_ffi.unavailable_reason()
needs_kernel = pytest.mark.skipif(WHY is not None, reason=f"cpu_ffi kernel unavailable: {WHY}")
REF = jax.jit(selection_attention)
FFI = jax.jit(cpu_ffi.cpu_ffi_attention, static_argnames=("q_tile", "k_tile", "threads"))


def reference64(args, sel: Selection) -> np.ndarray:
    """The Selection's softmax in float64 (numpy), row group by row group; a group with no key gives zeros."""
    q, kc, vc, kn, vn = (np.asarray(x, np.float64) for x in args)
    b, sq, h, d = q.shape
    frames = np.asarray(sel.frames)
    qf = frames.shape[1]
    gs = sq // qf
    cmask = None if sel.chunk_mask is None else np.asarray(sel.chunk_mask)
    out = np.zeros_like(q)
    for bi, g, hi in np.ndindex(b, qf, h):
        ks, vs = [], []
        c = 1 if cmask is None else cmask.shape[-1]
        ft = sq // c
        for f in range(c):
            if cmask is None or cmask[bi, g, hi, f]:
                ks.append(kc[bi, f * ft : (f + 1) * ft, hi])
                vs.append(vc[bi, f * ft : (f + 1) * ft, hi])
        if sel.mem_k is not None:
            valid = np.asarray(sel.mem_valid)[bi, hi]
            ks.append(np.asarray(sel.mem_k, np.float64)[bi, valid, hi])
            vs.append(np.asarray(sel.mem_v, np.float64)[bi, valid, hi])
        for s in frames[bi, g, hi]:
            if s >= 0:
                ks.append(kn[bi, hi, s])
                vs.append(vn[bi, hi, s])
        k = np.concatenate(ks) if ks else np.zeros((0, d))
        if not len(k):
            continue
        v = np.concatenate(vs)
        qg = q[bi, g * gs : (g + 1) * gs, hi]
        s_ = qg @ k.T / np.sqrt(d)
        p = np.exp(s_ - s_.max(-1, keepdims=True))
        out[bi, g * gs : (g + 1) * gs, hi] = (p / p.sum(-1, keepdims=True)) @ v
    return out


CASES = [  # (b, c, t, h, d, n, k, qf, m, chunk_mask)
    (1, 3, 7, 2, 8, 5, 3, 1, 0, False),  # tiny, odd tokens, one group, whole chunk readable
    (2, 3, 13, 3, 24, 6, 4, 3, 0, True),  # B > 1, per-frame groups, masked chunk frames, D % 16 == 8
    (2, 2, 33, 2, 64, 7, 5, 2, 5, True),  # memory tokens (one head with none valid), a partial query tile
    (1, 3, 40, 2, 40, 4, 4, 1, 0, True),  # D = 40
    (1, 1, 150, 1, 128, 3, 3, 1, 0, False),  # several query and key tiles, D = 128
    (1, 3, 200, 2, 32, 5, 4, 3, 0, True),  # 6 (group, head) units: with 2+ workers, split to 112 + 88 rows
]


@needs_kernel
@pytest.mark.parametrize("case", CASES, ids=lambda c: "b{}c{}t{}h{}d{}n{}k{}qf{}m{}cm{:d}".format(*c))
def test_parity_with_xla_and_float64(case):
    b, c, t, h, d, n, k, qf, m, cm = case
    args, sel = random_problem(
        np.random.default_rng(sum(case)), b=b, c=c, t=t, h=h, d=d, n=n, k=k, qf=qf, m=m, chunk_mask=cm
    )
    out = np.asarray(FFI(*args, sel))
    want = reference64(args, sel)
    ref = np.asarray(REF(*args, sel))
    assert out.shape == ref.shape and out.dtype == np.float32
    assert np.isfinite(out).all()
    assert rel_err(out, want) <= 2e-6, rel_err(out, want)  # float32; the brief's bound is 1e-5
    assert rel_err(out, ref) <= 2e-6, rel_err(out, ref)
    np.testing.assert_allclose(out, want, atol=2e-5, rtol=0)


@needs_kernel
def test_rows_with_no_key_are_zero_and_tiles_do_not_change_the_result():
    """A (b, group, head) with no selected slot and no readable chunk frame gets zeros, like xla; the tile
    sizes and the number of workers change the summation order only."""
    args, sel = random_problem(np.random.default_rng(7), b=1, c=2, t=20, h=2, d=16, n=4, k=3, qf=2)
    cmask = np.asarray(sel.chunk_mask).copy()
    cmask[0, 0, 0] = False
    frames = np.asarray(sel.frames).copy()
    frames[0, 0, 0] = -1
    sel = dataclasses.replace(sel, chunk_mask=jnp.asarray(cmask), frames=jnp.asarray(frames))
    out = np.asarray(FFI(*args, sel))
    assert not out[0, :20, 0].any()
    np.testing.assert_array_equal(out[0, :20, 0], np.asarray(REF(*args, sel))[0, :20, 0])
    want = reference64(args, sel)
    for q_tile, k_tile, threads in ((16, 1, 1), (16, 7, 2), (32, 64, 1), (256, 256, 3)):
        other = np.asarray(FFI(*args, sel, q_tile=q_tile, k_tile=k_tile, threads=threads))
        assert rel_err(other, want) <= 1e-5, (q_tile, k_tile, threads)


@needs_kernel
def test_layer_stacked_cache_is_read_at_the_layer():
    """The sampler's call: the whole [L, B, H, N, T, D] cache plus a (traced) layer index, no slice copied."""
    args, sel = random_problem(np.random.default_rng(5), b=2, c=2, t=9, h=2, d=16, n=4, k=3, qf=2)
    q, kc, vc, kn, vn = args
    ks, vs = jnp.stack([kn * 0.5, kn, -kn]), jnp.stack([vn * 2.0, vn, vn + 1.0])
    want = np.asarray(FFI(*args, sel))
    got = jax.jit(lambda l: cpu_ffi.cpu_ffi_attention(q, kc, vc, ks, vs, sel, layer=l))(jnp.int32(1))
    np.testing.assert_array_equal(np.asarray(got), want)
    assert cpu_ffi.cpu_ffi_attention.reads_stacked_cache
    # compiled for CPU: no op outside the custom call touches a layer-sized array (no slice, no copy)
    from fkv_jax.kernels.hlo_check import large_hlo_ops_outside_kernels

    hlo = (
        jax.jit(lambda ks, vs, l: cpu_ffi.cpu_ffi_attention(q, kc, vc, ks, vs, sel, layer=l))
        .lower(ks, vs, jnp.int32(2))
        .compile()
        .as_text()
    )
    assert "fkv_cpu_attention" in hlo
    assert large_hlo_ops_outside_kernels(hlo, kn.size) == []


@needs_kernel
def test_mini_shape_against_float64():
    """The upstream comparison's shape (390 tokens per frame, 8 heads of 64), up to 7 slots read (3,120 keys),
    Qf = 1 and 3: as accurate as xla (a long key list must not accumulate rounding: ~4e-7 at 8,190 keys)."""
    rng = np.random.default_rng(3)
    for qf in (1, 3):
        args, sel = random_problem(rng, b=1, c=3, t=390, h=8, d=64, n=7, k=7, qf=qf, chunk_mask=False)
        out, ref = FFI(*args, sel), REF(*args, sel)
        want = reference64(args, sel)
        assert rel_err(out, want) <= max(1e-6, 2 * rel_err(ref, want)), (rel_err(out, want), rel_err(ref, want))


@needs_kernel
def test_attend_and_backend_rules():
    args, sel = random_problem(np.random.default_rng(4), b=1, c=2, t=8, h=2, d=16, n=3, k=2, qf=2)
    out = jax.jit(lambda *a: attend(*a, backend="cpu_ffi"))(*args, sel)
    assert rel_err(out, REF(*args, sel)) <= 1e-5
    auto = jax.jit(lambda *a: attend(*a, backend="auto"))(*args, sel)  # auto on a CPU: cpu_ffi for float32
    np.testing.assert_array_equal(auto, out)
    assert resolve_backend("auto", dtype=jnp.bfloat16, head_dim=64, tokens_per_frame=390)[0] == "xla"
    with pytest.raises(BackendError, match="'cpu_ffi' cannot run: dtype bfloat16"):
        resolve_backend("cpu_ffi", dtype=jnp.bfloat16, head_dim=64, tokens_per_frame=390)
    with pytest.raises(BackendError, match="head_dim=12"):
        resolve_backend("cpu_ffi", dtype=jnp.float32, head_dim=12, tokens_per_frame=390)
    with pytest.raises(BackendError, match="needs a CPU"):
        resolve_backend("cpu_ffi", platform="tpu", dtype=jnp.float32, head_dim=64, tokens_per_frame=390)


def test_a_missing_library_is_one_backend_error(monkeypatch):
    """Without the compiled kernel, resolving cpu_ffi is one BackendError line; xla is unaffected."""
    why = "the compiled kernel fkv_jax/kernels/_cpu_attention*.so is missing"
    monkeypatch.setattr(backends, "cpu_ffi_unavailable", lambda: why)
    with pytest.raises(BackendError) as e:
        resolve_backend("cpu_ffi", dtype=jnp.float32, head_dim=64, tokens_per_frame=390)
    assert str(e.value) == f"attention backend 'cpu_ffi' cannot run: {why}" and "\n" not in str(e.value)
    assert resolve_backend("xla", dtype=jnp.float32, head_dim=64, tokens_per_frame=390)[0] == "xla"
    # auto on a CPU then falls back to xla
    assert resolve_backend("auto", platform="cpu", dtype=jnp.float32, head_dim=64, tokens_per_frame=390)[0] == "xla"


def test_the_loader_explains_a_missing_library(monkeypatch):
    """No compiled library next to the module: the reason names the file and the fix; nothing crashes."""
    monkeypatch.setattr(cpu_ffi, "library_path", lambda: None)
    cpu_ffi._load.cache_clear()
    try:
        why = cpu_ffi.unavailable_reason()
        assert why is not None and "_cpu_attention" in why and "pip install -e ." in why
        with pytest.raises(BackendError, match="'cpu_ffi' cannot run: .*missing"):
            resolve_backend("cpu_ffi", platform="cpu", dtype=jnp.float32, head_dim=64, tokens_per_frame=390)
    finally:
        monkeypatch.undo()
        cpu_ffi._load.cache_clear()


def _generate(backend, policy=None, frames=6, seed=0):
    import fkv_jax
    from flax import nnx

    from fkv_jax.config import sampler_preset
    from fkv_jax.sampling.rollout import Sampler

    cfg = fkv_jax.model_preset("tiny")
    graphdef, params = nnx.split(fkv_jax.init_model(cfg, seed=2), nnx.Param)
    rng = np.random.default_rng(seed)
    ctx = rng.standard_normal((1, 5, 64), np.float32)
    noise = rng.standard_normal((1, frames, 16, 8, 12), np.float32)
    kw = {} if policy is None else dict(policy=policy)
    s = Sampler(
        graphdef,
        cfg,
        sampler_preset("self_forcing"),
        batch=1,
        latent_hw=(8, 12),
        num_frames=frames,
        attention_backend=backend,
        **kw,
    )
    assert s.dtype == "float32"
    lat = s.generate(params, ctx, noise, seed=0, progress=False)
    assert s.trace_count == 1
    return np.asarray(lat)


@needs_kernel
def test_tiny_model_generates_the_same_with_cpu_ffi():
    """The jitted chunk step of a tiny float32 model with attention_backend="cpu_ffi" matches xla; ``auto``
    on a CPU takes cpu_ffi for a float32 model (the same numbers, the stacked cache read in place)."""
    a, b = _generate("xla"), _generate("cpu_ffi")
    assert np.isfinite(b).all()
    assert 0 < rel_err(b, a) <= 1e-5, rel_err(b, a)  # 0 would mean cpu_ffi never ran
    np.testing.assert_array_equal(_generate("auto"), b)


@needs_kernel
@pytest.mark.slow
def test_focused_forcing_per_frame_selections_match_xla():
    """Focused Forcing (LongLive variant): per-query-frame selections (Qf = C) with per-head budgets."""
    from fkv_jax.policies import FocusedForcingLongLive

    pol = FocusedForcingLongLive(importance=np.array([[0.0, 1.0], [0.3, 0.6]]), pooled_tokens=4)
    a, b = _generate("xla", pol, frames=21), _generate("cpu_ffi", pol, frames=21)
    assert rel_err(b, a) <= 1e-5, rel_err(b, a)
