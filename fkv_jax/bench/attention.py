"""Selection-attention benchmark: kernel vs the XLA reference vs dense attention over the same keys.

    python -m fkv_jax.bench.attention                  # on a GPU (H100/H200) or TPU; needs an accelerator
    python -m fkv_jax.bench.attention --cpu-smoke      # tiny sizes, xla + dense on CPU: proves the script runs
    python -m fkv_jax.bench.attention --cpu-roofline   # CPU: xla attention vs matmul FLOP/s and torch SDPA

Accelerator mode uses the 480x832 geometry (T = 1560 tokens per latent frame, H = 12, D = 128, C = 3 frames
per chunk, bfloat16, a cache of N = 21 frames) for a few budgets K (selected frames per head), with one
selection per chunk (Qf = 1) and per query frame (Qf = C). For every backend it prints the median time, the
achieved TFLOP/s (4 * queries * keys * D per head) and the achieved bandwidth (q, out and every selected K/V
frame read once per query group: a lower bound on traffic), as a fraction of the chip's peak bf16 dense
TFLOP/s and HBM bandwidth when the device is in the table below, plus the relative error against ``xla``.
The dense baseline is ``jax.nn.dot_product_attention`` (cuDNN flash attention on NVIDIA when available)
over the same keys gathered into a contiguous array beforehand (gathering not timed): what the selected
keys would cost if they were dense.

``--cpu-roofline`` times the xla backend at the "mini" shapes of the upstream comparison (1,170 queries = 3
frames x 390 tokens, 8 heads x 64, float32; 0 / 9 / 18 cached frames = 1,170 / 4,680 / 8,190 keys) through
both entry points (``chunk_attention`` with a slot mask; ``selection_attention``, i.e. ``attend(xla)``, with a
Selection of one group or of one group per query frame), and the ``cpu_ffi`` C++ kernel (when it is built)
with the same two Selections, next to torch's fused CPU SDPA over the same keys when torch imports and a
float32 matmul (the mini model's 4680x512x2048 MLP matmul), all interleaved in one process (median of
``--iters`` rounds, wall and process CPU time), and reports each backend's FLOP/s (4 * queries * keys * D
per head) against that matmul's.

Nothing in this repository was measured on an accelerator; the numbers are for users who have one.
"""

from __future__ import annotations

import argparse
import os
import time

import jax
import jax.numpy as jnp
import numpy as np

from fkv_jax.attention import chunk_attention, from_slot_mask, get_backend, selection_attention
from fkv_jax.attention.selection import Selection
from fkv_jax.bench.common import median

# device_kind substring -> (peak dense bf16 TFLOP/s, HBM TB/s), vendor datasheets; most specific first.
CHIPS = [
    ("H100 PCIe", 756.0, 2.0),
    ("H100 NVL", 835.0, 3.9),
    ("H100", 989.4, 3.35),
    ("H800", 989.4, 3.35),
    ("GH200", 989.4, 4.0),
    ("H200", 989.4, 4.8),
    ("H20", 148.0, 4.0),
    ("TPU v6 lite", 918.0, 1.64),
    ("TPU v6e", 918.0, 1.64),
    ("TPU v5 lite", 197.0, 0.819),
    ("TPU v5e", 197.0, 0.819),
    ("TPU v5p", 459.0, 2.765),
    ("TPU v5", 459.0, 2.765),
    ("TPU v4", 275.0, 1.2),
]


def chip_limits(device_kind: str) -> tuple[float, float] | None:
    """(peak TFLOP/s, HBM TB/s) of a device, or None if it is not in :data:`CHIPS`."""
    for name, tflops, tbs in CHIPS:
        if name.lower() in device_kind.lower():
            return tflops, tbs
    return None


def make_inputs(rng, *, b, c, t, h, d, n, k, qf, dtype):
    """Random q/k/v [B, C*T, H, D], a cache [B, H, N, T, D] and k distinct random slots per (b, group, head)."""

    def rand(*shape):
        return jnp.asarray(rng.standard_normal(shape, np.float32), dtype)

    q, kc, vc = rand(b, c * t, h, d), rand(b, c * t, h, d), rand(b, c * t, h, d)
    kn, vn = rand(b, h, n, t, d), rand(b, h, n, t, d)
    frames = np.stack([rng.permutation(n)[:k] for _ in range(b * qf * h)]).reshape(b, qf, h, k)
    return (q, kc, vc, kn, vn), Selection(frames=jnp.asarray(frames, jnp.int32))


def dense_inputs(args, sel: Selection):
    """The same keys as a dense problem: q [B*Qf, Tq, H, D], k/v [B*Qf, (C + K) * T, H, D]."""
    q, kc, vc, kn, vn = args
    b, s, h, d = q.shape
    qf = sel.frames.shape[1]

    bi = jnp.arange(b)[:, None, None, None]
    hi = jnp.arange(h)[None, None, :, None]

    def keys(chunk, cache):
        picked = cache[bi, hi, sel.frames]  # [B, Qf, H, K, T, D] from the heads-first cache [B, H, N, T, D]
        picked = jnp.moveaxis(picked, 2, 4).reshape(b, qf, -1, h, d)  # [B, Qf, K*T, H, D]
        own = jnp.broadcast_to(chunk[:, None], (b, qf, s, h, d))
        return jnp.concatenate([own, picked], axis=2).reshape(b * qf, -1, h, d)

    return q.reshape(b * qf, s // qf, h, d), keys(kc, kn), keys(vc, vn)


def work(args, sel: Selection) -> tuple[float, float]:
    """(FLOPs, minimum bytes) of one call: every chunk frame allowed, K slots per (b, group, head)."""
    q, _, _, kn, _ = args
    b, s, h, d = q.shape
    t = kn.shape[3]
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
    fns = {name: jax.jit(get_backend(name)) for name in dict.fromkeys([*backends, "xla"])}
    dense = jax.jit(jax.nn.dot_product_attention)
    rows = []
    print(
        f"{'Qf':>3} {'K':>3} {'backend':<11} {'ms':>9} {'TFLOP/s':>8} {'GB/s':>8} {'%peak':>6} {'%HBM':>6} "
        f"{'rel err':>8}"
    )
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
                row = dict(
                    qf=qf, k=k, backend=name, ms=sec * 1e3, tflops=flops / sec / 1e12, gbs=nbytes / sec / 1e9, err=err
                )
                peak = (
                    f"{100 * row['tflops'] / limits[0]:6.1f} {100 * row['gbs'] / 1e3 / limits[1]:6.1f}"
                    if limits
                    else f"{'n/a':>6} {'n/a':>6}"
                )
                print(
                    f"{qf:>3} {k:>3} {name:<11} {row['ms']:9.3f} {row['tflops']:8.2f} {row['gbs']:8.1f} {peak} "
                    f"{err:8.1e}"
                )
                rows.append(row)
    return rows


def interleaved(cases: dict, rounds: int) -> dict[str, tuple[float, float]]:
    """Median (wall seconds, process CPU seconds) of each zero-argument callable, timed in turn round after
    round (one warm-up call each first), so that a change of machine load hits every case alike. CPU time
    (every thread of this process) is the load-robust measure of work: other processes on a shared machine
    stretch the wall time of multi-threaded calls far more than their CPU time."""
    for fn in cases.values():
        fn()
    walls = {name: [] for name in cases}
    cpus = {name: [] for name in cases}
    for _ in range(rounds):
        for name, fn in cases.items():
            c0, t0 = time.process_time(), time.perf_counter()
            fn()
            walls[name].append(time.perf_counter() - t0)
            cpus[name].append(time.process_time() - c0)
    return {name: (median(walls[name]), median(cpus[name])) for name in cases}


def _torch_sdpa():
    """torch's scaled_dot_product_attention on this CPU's cores, or None when torch does not import."""
    try:
        import torch
    except ImportError:
        return None
    torch.set_num_threads(os.cpu_count() or 1)
    return torch


MINI = dict(c=3, t=390, h=8, d=64)  # the upstream comparison's geometry (shared/bench/upstream_compare)
MINI_CACHES = ((0, 9), (9, 9), (18, 21))  # (cached frames read, cache slots)


def cpu_roofline(rounds: int, geometry: dict = MINI, caches=MINI_CACHES) -> list[dict]:
    """xla attention at the mini shapes vs the matmul FLOP/s of this CPU and vs torch SDPA, one process.

    ``geometry`` (c, t, h, d) and ``caches`` ((frames read, slots), ...) default to the mini comparison's;
    returns one dict per cache size (times in ms, FLOP/s, fraction of the matmul rate, errors)."""
    c, t, h, d = geometry["c"], geometry["t"], geometry["h"], geometry["d"]
    sq = c * t
    torch = _torch_sdpa()
    mm_shape = (4 * sq, 512, 2048)  # the mini model's MLP matmul over 4 chunks' tokens, as in the issue
    mm_a = jnp.asarray(np.random.default_rng(1).standard_normal(mm_shape[:2], np.float32))
    mm_b = jnp.asarray(np.random.default_rng(2).standard_normal(mm_shape[1:], np.float32))
    mm_fn = jax.jit(jnp.dot)
    mm_flops = 2.0 * np.prod(mm_shape)
    print(
        f"CPU roofline: {jax.devices()[0].device_kind}, {os.cpu_count()} cores, jax {jax.__version__}, float32, "
        f"median of {rounds} interleaved rounds; load average {os.getloadavg()[0]:.1f}"
    )
    print(
        f"geometry: {sq} queries ({c} frames x {t} tokens), {h} heads x {d}; torch "
        f"{torch.__version__ + f' ({torch.get_num_threads()} threads)' if torch else 'not importable: no SDPA column'}"
    )
    ffi_why = _cpu_ffi_problem(d, t)
    if ffi_why:
        print(f"cpu_ffi: not measured ({ffi_why})")
    else:
        from fkv_jax.kernels import cpu_ffi

        print(f"cpu_ffi: {cpu_ffi.library_path().name} ({cpu_ffi.compiled_isa()})")
    rng = np.random.default_rng(0)
    rows = []
    names = {
        "torch": "torch SDPA",
        "chunk": "chunk_attention",
        "sel1": "attend Qf=1",
        "sel3": "attend Qf=3",
        "ffi1": "cpu_ffi Qf=1",
        "ffi3": "cpu_ffi Qf=3",
        "matmul": "matmul",
    }
    head = " | ".join(f"{v:>15}" for v in names.values())
    print(f"wall ms / CPU ms (median):\n{'keys':>5} | {head}")
    for used, n in caches:

        def rand(*shape):
            return jnp.asarray(rng.standard_normal(shape, np.float32))

        q, kc, vc = rand(1, sq, h, d), rand(1, sq, h, d), rand(1, sq, h, d)
        kn, vn = rand(1, h, n, t, d), rand(1, h, n, t, d)
        mask = jnp.arange(n) < used  # the global cache's filled prefix
        slot_mask = mask[None, None, None]
        sel1 = from_slot_mask(slot_mask, 1, h)
        sel3 = from_slot_mask(jnp.broadcast_to(slot_mask, (1, c, 1, n)), 1, h)  # one selection per query frame
        f_chunk = jax.jit(chunk_attention)
        f_sel = jax.jit(selection_attention)
        cases = {
            "matmul": lambda: jax.block_until_ready(mm_fn(mm_a, mm_b)),
            "chunk": lambda: jax.block_until_ready(f_chunk(q, kc, vc, kn, vn, slot_mask)),
            "sel1": lambda: jax.block_until_ready(f_sel(q, kc, vc, kn, vn, sel1)),
            "sel3": lambda: jax.block_until_ready(f_sel(q, kc, vc, kn, vn, sel3)),
        }
        outs = {
            "chunk": f_chunk(q, kc, vc, kn, vn, slot_mask),
            "sel1": f_sel(q, kc, vc, kn, vn, sel1),
            "sel3": f_sel(q, kc, vc, kn, vn, sel3),
        }
        if not ffi_why:
            f_ffi = jax.jit(get_backend("cpu_ffi"))
            cases["ffi1"] = lambda: jax.block_until_ready(f_ffi(q, kc, vc, kn, vn, sel1))
            cases["ffi3"] = lambda: jax.block_until_ready(f_ffi(q, kc, vc, kn, vn, sel3))
            outs["ffi1"] = f_ffi(q, kc, vc, kn, vn, sel1)
            outs["ffi3"] = f_ffi(q, kc, vc, kn, vn, sel3)
        ref = np.asarray(dense_attention_np(q, kc, vc, kn, vn, used))
        errs = {name: rel_err(out, ref) for name, out in outs.items()}
        if torch is not None:
            tq = torch.from_numpy(np.array(q)).transpose(1, 2).contiguous()
            tk = torch.from_numpy(
                np.concatenate(
                    [np.asarray(kn)[:, :, :used].reshape(1, h, -1, d), np.asarray(kc).transpose(0, 2, 1, 3)], 2
                )
            ).contiguous()
            tv = torch.from_numpy(
                np.concatenate(
                    [np.asarray(vn)[:, :, :used].reshape(1, h, -1, d), np.asarray(vc).transpose(0, 2, 1, 3)], 2
                )
            ).contiguous()
            sdpa = torch.nn.functional.scaled_dot_product_attention
            cases["torch"] = lambda: sdpa(tq, tk, tv)
            errs["torch"] = rel_err(sdpa(tq, tk, tv).transpose(1, 2).numpy(), ref)
        res = interleaved(cases, rounds)
        sec = {k: w for k, (w, _) in res.items()}
        cpu = {k: c_ for k, (_, c_) in res.items()}
        keys = (used + c) * t
        flops = 4.0 * sq * keys * d * h
        peak = mm_flops / sec["matmul"]
        peak_cpu = mm_flops / cpu["matmul"]
        row = dict(
            keys=keys,
            **{f"{k}_ms": v * 1e3 for k, v in sec.items()},
            **{f"{k}_cpu_ms": v * 1e3 for k, v in cpu.items()},
            matmul_gflops=peak / 1e9,
            errs=errs,
        )
        groups = {"xla": ("chunk", "sel1", "sel3"), "cpu_ffi": ("ffi1", "ffi3")}
        for label, group in groups.items():
            group = [k for k in group if k in sec]
            if not group:
                continue
            best = min(group, key=lambda k: sec[k])
            best_cpu = min(group, key=lambda k: cpu[k])
            row[label] = dict(
                gflops=flops / sec[best] / 1e9,
                frac_matmul=flops / sec[best] / peak,
                frac_matmul_cpu=(flops / cpu[best_cpu]) / peak_cpu,
                vs_torch=sec[best] / sec["torch"] if "torch" in sec else None,
                vs_torch_cpu=cpu[best_cpu] / cpu["torch"] if "torch" in cpu else None,
            )
        # the fields of earlier versions: the best xla entry point
        row.update({k: row["xla"][k] for k in ("frac_matmul", "frac_matmul_cpu", "vs_torch", "vs_torch_cpu")})
        row["best_gflops"] = row["xla"]["gflops"]
        rows.append(row)
        cells = " | ".join(f"{sec[k] * 1e3:6.1f} / {cpu[k] * 1e3:6.1f}" if k in sec else f"{'n/a':>15}" for k in names)
        print(f"{keys:>5} | {cells}")
    print(
        "per backend, its best entry point (FLOP/s vs the matmul's in the same rounds; time vs torch SDPA's):\n"
        f"{'keys':>5} | {'backend':<8} | {'best GFLOP/s':>12} | {'matmul GFLOP/s':>14} | {'% matmul wall/CPU':>17} | "
        f"{'best/SDPA wall/CPU':>18}"
    )
    for r in rows:
        for label in ("xla", "cpu_ffi"):
            if label not in r:
                continue
            x = r[label]
            vs = f"{x['vs_torch']:5.2f} / {x['vs_torch_cpu']:4.2f}" if x["vs_torch"] is not None else "n/a"
            print(
                f"{r['keys']:>5} | {label:<8} | {x['gflops']:12.1f} | {r['matmul_gflops']:14.1f} | "
                f"{100 * x['frac_matmul']:5.1f}% / {100 * x['frac_matmul_cpu']:5.1f}% | {vs:>18}"
            )
    print(
        "relative errors vs a float64 softmax: "
        + "; ".join(f"{r['keys']} keys: " + ", ".join(f"{k} {v:.1e}" for k, v in r["errs"].items()) for r in rows)
    )
    print(
        f"matmul = [{mm_shape[0]} x {mm_shape[1]}] x [{mm_shape[1]} x {mm_shape[2]}] float32, timed in the same "
        f"rounds. Times are wall medians; '/ CPU' columns use process CPU seconds instead (FLOPs per CPU-second "
        f"vs the matmul's; CPU time vs SDPA's), which a loaded machine distorts far less. Load average at the "
        f"end {os.getloadavg()[0]:.1f}"
    )
    return rows


def _cpu_ffi_problem(head_dim: int, tokens_per_frame: int) -> str | None:
    """Why the cpu_ffi backend cannot be measured here (None when it can)."""
    from fkv_jax.attention.backends import BackendError, resolve_backend

    try:
        resolve_backend(
            "cpu_ffi", platform="cpu", dtype=jnp.float32, head_dim=head_dim, tokens_per_frame=tokens_per_frame
        )
    except BackendError as e:
        return str(e)
    return None


def dense_attention_np(q, kc, vc, kn, vn, used: int) -> np.ndarray:
    """float64 softmax of the chunk's queries over the first ``used`` cache slots and the chunk (numpy)."""
    q, kc, vc, kn, vn = (np.asarray(x, np.float64) for x in (q, kc, vc, kn, vn))
    b, sq, h, d = q.shape
    k = np.concatenate([kn[:, :, :used].reshape(b, h, -1, d), kc.transpose(0, 2, 1, 3)], 2)  # [B, H, S, D]
    v = np.concatenate([vn[:, :, :used].reshape(b, h, -1, d), vc.transpose(0, 2, 1, 3)], 2)
    s = np.einsum("bqhd,bhkd->bhqk", q, k) / np.sqrt(d)
    p = np.exp(s - s.max(-1, keepdims=True))
    p /= p.sum(-1, keepdims=True)
    return np.einsum("bhqk,bhkd->bqhd", p, v)


def main(argv=None) -> int:
    p = argparse.ArgumentParser(
        prog="python -m fkv_jax.bench.attention",
        description=__doc__,
        formatter_class=argparse.RawDescriptionHelpFormatter,
    )
    p.add_argument(
        "--backends",
        default=None,
        help="comma-separated kernel backends besides xla (default: auto's choice, plus triton on GPU "
        "when jax-triton imports)",
    )
    p.add_argument("--budgets", default="3,6,12,21", help="selected frames per head (default 3,6,12,21)")
    p.add_argument("--iters", type=int, default=20)
    p.add_argument("--cpu-smoke", action="store_true", help="tiny sizes, xla and dense only, on CPU")
    p.add_argument("--cpu-roofline", action="store_true", help="xla FLOP/s vs this CPU's matmul FLOP/s")
    args = p.parse_args(argv)
    device = jax.devices()[0]

    if args.cpu_roofline:
        cpu_roofline(max(args.iters, 3))
        return 0
    if args.cpu_smoke:
        print(f"CPU smoke run (tiny sizes, not a benchmark): {device.device_kind}, jax {jax.__version__}")
        run(
            backends=["xla"],
            geometry=dict(b=1, c=3, t=16, h=2, d=32, n=6),
            budgets=[3],
            dtype=jnp.float32,
            iters=2,
            limits=None,
        )
        return 0
    if device.platform not in ("gpu", "tpu"):
        print(
            f"python -m fkv_jax.bench.attention needs an accelerator (a GPU, e.g. H100/H200, or a TPU); "
            f"this process sees {device.platform} ({device.device_kind}). Nothing was measured. "
            f"Use --cpu-smoke to check the script or --cpu-roofline for the CPU reference measurement."
        )
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
    print(
        f"{device.device_kind} ({device.platform}), jax {jax.__version__}; peak "
        f"{f'{limits[0]:.0f} TFLOP/s bf16, {limits[1]:.2f} TB/s' if limits else 'unknown (not in CHIPS)'}"
    )
    print(
        f"geometry 480x832: T={geometry['t']}, H={geometry['h']}, D={geometry['d']}, C={geometry['c']}, "
        f"N={geometry['n']} cache frames, bfloat16; backends: {', '.join(backends)} + dense"
    )
    run(backends=backends, geometry=geometry, budgets=budgets, dtype=jnp.bfloat16, iters=args.iters, limits=limits)
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
