"""Per-chunk time of the jitted chunk step over a long rollout: global vs rolling cache.

    python -m fkv_jax.bench.rollout --model tiny --chunks 100
    python -m fkv_jax.bench.rollout --model mid --chunks 100

For each cache mode it runs ``--chunks`` chunks (every denoising step + the clean pass per chunk, one
compiled call each). Every ``--every`` chunks (and at chunk 5 and the last chunk) the step is timed
``--repeats`` times from the same state on copies of the cache, keeping the minimum (robust to other load
on the machine). It prints the series, the ratio of the last chunk to chunk 5, the resident KV bytes at the
start and at the end, and the process RSS. A rolling window must stay flat; a global cache grows.
"""

from __future__ import annotations

import argparse
import dataclasses
import jax
import numpy as np
from flax import nnx

from fkv_jax.bench.common import rss_mib, time_step
from fkv_jax.config import model_preset, sampler_preset
from fkv_jax.model.build import init_model
from fkv_jax.sampling.rollout import Sampler


def cache_bytes(cache) -> int:
    return int(cache["k"].nbytes + cache["v"].nbytes)


def time_rollout(
    graphdef, params, cfg, sampler_cfg, chunks: int, seed: int = 0, every: int = 5, repeats: int = 3
) -> dict:
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
    times = {}
    for blk in range(chunks):
        x = rng.standard_normal(shape, np.float32)
        eps = rng.standard_normal((n - 1, *shape), np.float32)
        args = (params, cache, state, ctx_kv, x, eps, np.int32(blk * c))
        if blk == 0 or blk == 4 or blk == chunks - 1 or (blk + 1) % every == 0:
            times[blk + 1] = time_step(s.chunk_step, args, repeats=repeats)
        out, cache, state = s.chunk_step(*args)
        jax.block_until_ready((out.x0, cache["k"]))
        if blk == 4:
            rss0 = rss_mib()
    return {
        "times": times,
        "kv_start": kv0,
        "kv_end": cache_bytes(cache),
        "rss_start": rss0,
        "rss_end": rss_mib(),
        "traces": s.trace_count,
        "geom": s.geom,
    }


def main(argv=None) -> int:
    p = argparse.ArgumentParser(
        prog="python -m fkv_jax.bench.rollout",
        description=__doc__,
        formatter_class=argparse.RawDescriptionHelpFormatter,
    )
    p.add_argument("--model", default="tiny", help="model preset (tiny, mid, ...)")
    p.add_argument("--chunks", type=int, default=100)
    p.add_argument("--window", type=int, default=12, help="rolling local_attn_size (default 12, LongLive)")
    p.add_argument("--sink", type=int, default=3, help="rolling sink_size (default 3)")
    p.add_argument("--every", type=int, default=10, help="time every N-th chunk (default 10)")
    p.add_argument("--repeats", type=int, default=3, help="timed repeats per sampled chunk, min kept (default 3)")
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
    print(
        f"model {cfg.name}: {cfg.num_layers} layers, width {cfg.dim}, {cfg.num_heads} heads, "
        f"{cfg.tokens_per_frame()} tokens/frame; {args.chunks} chunks of {base.frames_per_block} frames; "
        f"jax {jax.__version__} on {jax.devices()[0].platform}"
    )
    results = {}
    for name, sc in modes.items():
        r = time_rollout(graphdef, params, cfg, sc, args.chunks, every=args.every, repeats=args.repeats)
        results[name] = r
        t = {k: v * 1e3 for k, v in r["times"].items()}
        early, late = t[5], t[args.chunks]
        g = r["geom"]
        print(f"\n[{name}] slots: sink {g.sink} + ring {g.ring}; compiled {r['traces']}x")
        print("  per-chunk ms (chunk: min of repeats): " + " ".join(f"{k}:{v:.1f}" for k, v in sorted(t.items())))
        print(f"  chunk 5: {early:.1f} ms   chunk {args.chunks}: {late:.1f} ms   late/early = {late / early:.3f}")
        print(
            f"  resident KV: {r['kv_start'] / 2**20:.2f} MiB at start, {r['kv_end'] / 2**20:.2f} MiB at end; "
            f"RSS {r['rss_start']:.0f} MiB after chunk 5 -> {r['rss_end']:.0f} MiB at the end"
        )
    tr, tg = results["rolling"]["times"], results["global"]["times"]
    print(
        f"\nglobal / rolling time at chunk {args.chunks}: {tg[args.chunks] / tr[args.chunks]:.2f}x; "
        f"KV bytes global / rolling: {results['global']['kv_end'] / results['rolling']['kv_end']:.1f}x"
    )
    flat = tr[args.chunks] / tr[5]
    print(
        f"rolling flatness (chunk {args.chunks} vs chunk 5): {flat:.3f} -> "
        f"{'PASS' if abs(flat - 1) <= 0.10 else 'FAIL'} (target within 10 %)"
    )
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
