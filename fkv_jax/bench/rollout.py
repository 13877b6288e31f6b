"""Per-chunk time of the jitted chunk step over a long rollout: global vs rolling cache.

    python -m fkv_jax.bench.rollout --model tiny --chunks 100
    python -m fkv_jax.bench.rollout --model mid --chunks 100

For each cache mode it runs ``--chunks`` chunks (every denoising step + the clean pass per chunk, one
compiled call each), times every chunk after ``block_until_ready``, and prints the series, the ratio of
late to early chunk time (median of the last 5 over the median of chunks 3-7, i.e. "chunk 100 vs chunk 5"),
the resident KV bytes at the start and at the end, and the process RSS. A rolling window must stay flat;
a global cache grows with the video.
"""

from __future__ import annotations

import argparse
import dataclasses
import time

import jax
import numpy as np
from flax import nnx

from fkv_jax.bench.common import median, rss_mib
from fkv_jax.config import model_preset, sampler_preset
from fkv_jax.model.build import init_model
from fkv_jax.sampling.rollout import Sampler


def cache_bytes(cache) -> int:
    return int(cache["k"].nbytes + cache["v"].nbytes)


def time_rollout(graphdef, params, cfg, sampler_cfg, chunks: int, seed: int = 0) -> dict:
    c = sampler_cfg.frames_per_block
    frames = chunks * c
    s = Sampler(graphdef, cfg, sampler_cfg, batch=1, latent_hw=cfg.latent_hw, num_frames=frames)
    s.check_length(frames)
    rng = np.random.default_rng(seed)
    ctx_kv = s.context_kv(params, rng.standard_normal((1, cfg.text_len, cfg.text_dim), np.float32))
    cache, state = s.init_cache(), s.init_state()
    kv0, rss0 = cache_bytes(cache), float("nan")
    n = s.schedule.num_steps
    shape = (1, c, cfg.in_dim, *cfg.latent_hw)
    times = []
    for blk in range(chunks):
        x = rng.standard_normal(shape, np.float32)
        eps = rng.standard_normal((n - 1, *shape), np.float32)
        t0 = time.perf_counter()
        out, cache, state = s.chunk_step(params, cache, state, ctx_kv, x, eps, np.int32(blk * c))
        jax.block_until_ready((out.x0, cache["k"]))
        times.append(time.perf_counter() - t0)
        if blk == 4:
            rss0 = rss_mib()
    return {"times": times, "kv_start": kv0, "kv_end": cache_bytes(cache), "rss_start": rss0, "rss_end": rss_mib(),
            "traces": s.trace_count, "geom": s.geom}


def main(argv=None) -> int:
    p = argparse.ArgumentParser(prog="python -m fkv_jax.bench.rollout", description=__doc__,
                                formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--model", default="tiny", help="model preset (tiny, mid, ...)")
    p.add_argument("--chunks", type=int, default=100)
    p.add_argument("--window", type=int, default=12, help="rolling local_attn_size (default 12, LongLive)")
    p.add_argument("--sink", type=int, default=3, help="rolling sink_size (default 3)")
    args = p.parse_args(argv)
    if args.chunks < 10:
        p.error("--chunks must be >= 10 (early and late medians use 5 chunks each)")

    cfg = model_preset(args.model)
    graphdef, params = nnx.split(init_model(cfg, seed=0), nnx.Param)
    base = sampler_preset("self_forcing")
    modes = {
        "rolling": dataclasses.replace(base, local_attn_size=args.window, sink_size=args.sink),
        "global": base,
    }
    print(f"model {cfg.name}: {cfg.num_layers} layers, width {cfg.dim}, {cfg.num_heads} heads, "
          f"{cfg.tokens_per_frame()} tokens/frame; {args.chunks} chunks of {base.frames_per_block} frames; "
          f"jax {jax.__version__} on {jax.devices()[0].platform}")
    results = {}
    for name, sc in modes.items():
        r = time_rollout(graphdef, params, cfg, sc, args.chunks)
        results[name] = r
        t = np.asarray(r["times"]) * 1e3
        early, late = median(t[2:7]), median(t[-5:])
        g = r["geom"]
        print(f"\n[{name}] slots: sink {g.sink} + ring {g.ring}; compiled {r['traces']}x")
        print("  per-chunk ms (every 5th, from chunk 5): " + " ".join(f"{x:.0f}" for x in t[4::5]))
        print(f"  chunk 5 (median 3-7): {early:.1f} ms   chunk {args.chunks} (median of last 5): {late:.1f} ms   "
              f"late/early = {late / early:.3f}")
        print(f"  resident KV: {r['kv_start'] / 2**20:.2f} MiB at start, {r['kv_end'] / 2**20:.2f} MiB at end; "
              f"RSS {r['rss_start']:.0f} MiB after chunk 5 -> {r['rss_end']:.0f} MiB at the end")
    tr, tg = np.asarray(results["rolling"]["times"]), np.asarray(results["global"]["times"])
    print(f"\nglobal / rolling time at the last chunks: {median(tg[-5:]) / median(tr[-5:]):.2f}x; "
          f"KV bytes global / rolling: {results['global']['kv_end'] / results['rolling']['kv_end']:.1f}x")
    flat = median(tr[-5:]) / median(tr[2:7])
    print(f"rolling flatness (chunk {args.chunks} vs chunk 5): {flat:.3f} -> "
          f"{'PASS' if abs(flat - 1) <= 0.10 else 'FAIL'} (target within 10 %)")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
