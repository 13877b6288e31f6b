"""Selection-attention benchmark: kernel vs the XLA reference vs dense attention over the same keys.

    python -m fkv_jax.bench.attention                  # on a GPU (H100/H200) or TPU; needs an accelerator
    python -m fkv_jax.bench.attention --cpu-smoke      # tiny sizes, xla + dense on CPU: proves the script runs
    python -m fkv_jax.bench.attention --cpu-roofline   # xla backend's FLOP/s vs this CPU's matmul FLOP/s

Accelerator mode uses the 480x832 geometry (T = 1560 tokens per latent frame, H = 12, D = 128, C = 3 frames
per chunk, bfloat16, a cache of N = 21 frames) for a few budgets K (selected frames per head), with one
selection per chunk (Qf = 1) and per query frame (Qf = C). For every backend it prints the median time, the
achieved TFLOP/s (4 * queries * keys * D per head) and the achieved bandwidth (q, out and every selected K/V
frame read once per query group: a lower bound on traffic), as a fraction of the chip's peak bf16 dense
TFLOP/s and HBM bandwidth when the device is in the table below, plus the relative error against ``xla``.
The dense baseline is ``jax.nn.dot_product_attention`` (cuDNN flash attention on NVIDIA when available)
over the same keys gathered into a contiguous array beforehand (gathering not timed): what the selected
keys would cost if they were dense.

Nothing in this repository was measured on an accelerator; the numbers are for users who have one.
"""

from __future__ import annotations

import argparse
import time

import jax
import jax.numpy as jnp
import numpy as np

from fkv_jax.attention import BACKENDS
from fkv_jax.attention.selection import Selection
from fkv_jax.bench.common import median

# device_kind substring -> (peak dense bf16 TFLOP/s, HBM TB/s), vendor datasheets; most specific first.
CHIPS = [
    ("H100 PCIe", 756.0, 2.0), ("H100 NVL", 835.0, 3.9), ("H100", 989.4, 3.35), ("H800", 989.4, 3.35),
    ("GH200", 989.4, 4.0), ("H200", 989.4, 4.8), ("H20", 148.0, 4.0),
    ("TPU v6 lite", 918.0, 1.64), ("TPU v6e", 918.0, 1.64), ("TPU v5 lite", 197.0, 0.819),
    ("TPU v5e", 197.0, 0.819), ("TPU v5p", 459.0, 2.765), ("TPU v5", 459.0, 2.765), ("TPU v4", 275.0, 1.2),
]


def chip_limits(device_kind: str) -> tuple[float, float] | None:
    """(peak TFLOP/s, HBM TB/s) of a device, or None if it is not in :data:`CHIPS`."""
    for name, tflops, tbs in CHIPS:
        if name.lower() in device_kind.lower():
            return tflops, tbs
    return None


def make_inputs(rng, *, b, c, t, h, d, n, k, qf, dtype):
    """Random q/k/v, a cache of n frames and k distinct random slots per (b, group, head)."""
    def rand(*shape):
        return jnp.asarray(rng.standard_normal(shape, np.float32), dtype)

    q, kc, vc = rand(b, c * t, h, d), rand(b, c * t, h, d), rand(b, c * t, h, d)
    kn, vn = rand(b, n, t, h, d), rand(b, n, t, h, d)
    frames = np.stack([rng.permutation(n)[:k] for _ in range(b * qf * h)]).reshape(b, qf, h, k)
    return (q, kc, vc, kn, vn), Selection(frames=jnp.asarray(frames, jnp.int32))


def dense_inputs(args, sel: Selection):
    """The same keys as a dense problem: q [B*Qf, Tq, H, D], k/v [B*Qf, (C + K) * T, H, D]."""
    q, kc, vc, kn, vn = args
    b, s, h, d = q.shape
    qf = sel.frames.shape[1]

    def keys(chunk, cache):
        picked = jnp.take_along_axis(cache[:, None], sel.frames.transpose(0, 1, 3, 2)[:, :, :, None, :, None],
                                     axis=2)  # [B, Qf, K, T, H, D]
        picked = picked.reshape(b, qf, -1, h, d)
        own = jnp.broadcast_to(chunk[:, None], (b, qf, s, h, d))
        return jnp.concatenate([own, picked], axis=2).reshape(b * qf, -1, h, d)

    return q.reshape(b * qf, s // qf, h, d), keys(kc, kn), keys(vc, vn)


def work(args, sel: Selection) -> tuple[float, float]:
    """(FLOPs, minimum bytes) of one call: every chunk frame allowed, K slots per (b, group, head)."""
    q, _, _, kn, _ = args
    b, s, h, d = q.shape
    t = kn.shape[2]
    qf, k = sel.frames.shape[1], sel.frames.shape[3]
    keys = s + k * t  # per (b, group, head)
    flops = 4.0 * b * h * s * keys * d
    item = q.dtype.itemsize
    nbytes = (2 * b * s * h * d + 2 * b * qf * keys * h * d) * item
    return flops, nbytes


def time_fn(fn, *args, iters: int) -> float:
    """Median seconds of ``fn(*args)`` after one warm-up (compile) call."""
    jax.block_until_ready(fn(*args))
    times = []
    for _ in range(iters):
        t0 = time.perf_counter()
        jax.block_until_ready(fn(*args))
        times.append(time.perf_counter() - t0)
    return median(times)


def rel_err(out, ref) -> float:
    out, ref = np.asarray(out, np.float64), np.asarray(ref, np.float64)
    return float(np.linalg.norm(out - ref) / np.linalg.norm(ref))


def run(*, backends, geometry, budgets, dtype, iters, limits, seed=0) -> list[dict]:
    """Time every backend and the dense baseline for each (Qf, K); print one row per measurement."""
    import fkv_jax.kernels  # noqa: F401  (registers the kernel backends)

    rng = np.random.default_rng(seed)
    fns = {name: jax.jit(BACKENDS[name]) for name in dict.fromkeys([*backends, "xla"])}
    dense = jax.jit(jax.nn.dot_product_attention)
    rows = []
    print(f"{'Qf':>3} {'K':>3} {'backend':<11} {'ms':>9} {'TFLOP/s':>8} {'GB/s':>8} {'%peak':>6} {'%HBM':>6} "
          f"{'rel err':>8}")
    for qf in (1, geometry["c"]):
        for k in budgets:
            args, sel = make_inputs(rng, k=k, qf=qf, dtype=dtype, **geometry)
            flops, nbytes = work(args, sel)
            ref = fns["xla"](*args, sel)
            cases = [(name, fns[name], (*args, sel)) for name in backends]
            cases.append(("dense", dense, jax.jit(dense_inputs)(args, sel)))
            for name, fn, call_args in cases:
                try:
                    sec = time_fn(fn, *call_args, iters=iters)
                    out = fn(*call_args)
                except Exception as e:  # a kernel that fails on this chip is reported, not fatal
                    print(f"{qf:>3} {k:>3} {name:<11} failed: {type(e).__name__}: {str(e).splitlines()[0][:120]}")
                    continue
                err = rel_err(out.reshape(ref.shape), ref)
                row = dict(qf=qf, k=k, backend=name, ms=sec * 1e3, tflops=flops / sec / 1e12,
                           gbs=nbytes / sec / 1e9, err=err)
                peak = f"{100 * row['tflops'] / limits[0]:6.1f} {100 * row['gbs'] / 1e3 / limits[1]:6.1f}" \
                    if limits else f"{'n/a':>6} {'n/a':>6}"
                print(f"{qf:>3} {k:>3} {name:<11} {row['ms']:9.3f} {row['tflops']:8.2f} {row['gbs']:8.1f} {peak} "
                      f"{err:8.1e}")
                rows.append(row)
    return rows


def matmul_flops(n: int = 2048, iters: int = 10) -> float:
    """Measured float32 FLOP/s of an n x n matmul on the default device."""
    rng = np.random.default_rng(0)
    a = jnp.asarray(rng.standard_normal((n, n), np.float32))
    b = jnp.asarray(rng.standard_normal((n, n), np.float32))
    fn = jax.jit(jnp.dot)
    return 2.0 * n ** 3 / time_fn(fn, a, b, iters=iters)


def cpu_roofline(iters: int) -> int:
    """The xla backend (and the dense baseline) at a mid-size geometry against this CPU's matmul FLOP/s."""
    peak = matmul_flops()
    geometry = dict(b=1, c=3, t=384, h=4, d=128, n=12)
    print(f"CPU roofline: {jax.devices()[0].device_kind}, jax {jax.__version__}, float32; "
          f"measured 2048^3 matmul: {peak / 1e9:.1f} GFLOP/s")
    print(f"geometry: T={geometry['t']}, H={geometry['h']}, D={geometry['d']}, C={geometry['c']}, "
          f"N={geometry['n']} frames")
    rows = run(backends=["xla"], geometry=geometry, budgets=[3, 6], dtype=jnp.float32, iters=iters, limits=None)
    after = matmul_flops()
    print(f"matmul again after the attention runs: {after / 1e9:.1f} GFLOP/s (a large change means the machine was "
          f"busy; ratios below use the first measurement)")
    for r in rows:
        print(f"  Qf={r['qf']} K={r['k']} {r['backend']:<6} {r['tflops'] * 1e3:7.1f} GFLOP/s = "
              f"{100 * r['tflops'] * 1e12 / peak:5.1f} % of matmul")
    return 0


def main(argv=None) -> int:
    p = argparse.ArgumentParser(prog="python -m fkv_jax.bench.attention", description=__doc__,
                                formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--backends", default=None,
                   help="comma-separated kernel backends besides xla (default: auto's choice, plus triton on GPU "
                        "when jax-triton imports)")
    p.add_argument("--budgets", default="3,6,12,21", help="selected frames per head (default 3,6,12,21)")
    p.add_argument("--iters", type=int, default=20)
    p.add_argument("--cpu-smoke", action="store_true", help="tiny sizes, xla and dense only, on CPU")
    p.add_argument("--cpu-roofline", action="store_true", help="xla FLOP/s vs this CPU's matmul FLOP/s")
    args = p.parse_args(argv)
    device = jax.devices()[0]

    if args.cpu_roofline:
        return cpu_roofline(max(args.iters // 4, 3))
    if args.cpu_smoke:
        print(f"CPU smoke run (tiny sizes, not a benchmark): {device.device_kind}, jax {jax.__version__}")
        run(backends=["xla"], geometry=dict(b=1, c=3, t=16, h=2, d=32, n=6), budgets=[3], dtype=jnp.float32,
            iters=2, limits=None)
        return 0
    if device.platform not in ("gpu", "tpu"):
        print(f"python -m fkv_jax.bench.attention needs an accelerator (a GPU, e.g. H100/H200, or a TPU); "
              f"this process sees {device.platform} ({device.device_kind}). Nothing was measured. "
              f"Use --cpu-smoke to check the script or --cpu-roofline for the CPU reference measurement.")
        return 0

    from fkv_jax.kernels import choose_backend
    from fkv_jax.kernels.auto import jax_triton_available

    geometry = dict(b=1, c=3, t=1560, h=12, d=128, n=21)
    budgets = [int(x) for x in args.budgets.split(",")]
    if max(budgets) > geometry["n"]:
        p.error(f"budgets must be <= the cache's {geometry['n']} frames")
    if args.backends:
        backends = args.backends.split(",")
    else:
        probe_q = jnp.zeros((1, 3 * 1560, 12, 128), jnp.bfloat16)
        probe_k = jnp.zeros((1, 1, 1560, 12, 128), jnp.bfloat16)
        backends = [choose_backend(probe_q, probe_k, Selection(frames=jnp.zeros((1, 3, 12, 1), jnp.int32)))]
        if device.platform == "gpu" and "triton" not in backends and jax_triton_available():
            backends.append("triton")
    backends = list(dict.fromkeys(backends + ["xla"]))
    limits = chip_limits(device.device_kind)
    print(f"{device.device_kind} ({device.platform}), jax {jax.__version__}; peak "
          f"{f'{limits[0]:.0f} TFLOP/s bf16, {limits[1]:.2f} TB/s' if limits else 'unknown (not in CHIPS)'}")
    print(f"geometry 480x832: T={geometry['t']}, H={geometry['h']}, D={geometry['d']}, C={geometry['c']}, "
          f"N={geometry['n']} cache frames, bfloat16; backends: {', '.join(backends)} + dense")
    run(backends=backends, geometry=geometry, budgets=budgets, dtype=jnp.bfloat16, iters=args.iters, limits=limits)
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
