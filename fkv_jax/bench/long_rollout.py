"""Unbounded-length rollout: a rolling window with window-relative RoPE over thousands of latent frames.

    python -m fkv_jax.bench.long_rollout --frames 3000

Runs the tiny model (sink 3 + window 12, LongLive's geometry) chunk by chunk and prints resident KV bytes
and process RSS at the start (after chunk 5) and at the end, plus per-chunk time early vs late: with a
fixed-shape cache both must stay flat however long the video is.
"""

from __future__ import annotations

import argparse
import time

import jax
import numpy as np
from flax import nnx

from fkv_jax.bench.common import median, rss_mib
from fkv_jax.config import model_preset, sampler_preset
from fkv_jax.model.build import init_model
from fkv_jax.sampling.rollout import Sampler


def main(argv=None) -> int:
    p = argparse.ArgumentParser(
        prog="python -m fkv_jax.bench.long_rollout",
        description=__doc__,
        formatter_class=argparse.RawDescriptionHelpFormatter,
    )
    p.add_argument("--model", default="tiny")
    p.add_argument("--frames", type=int, default=3000)
    args = p.parse_args(argv)
    cfg = model_preset(args.model)
    graphdef, params = nnx.split(init_model(cfg, seed=0), nnx.Param)
    sc = sampler_preset("longlive")
    s = Sampler(graphdef, cfg, sc, batch=1, latent_hw=cfg.latent_hw, rope_mode="window_relative")
    c, n = sc.frames_per_block, s.schedule.num_steps
    s.check_length(args.frames)
    rng = np.random.default_rng(0)
    ctx_kv = s.context_kv(params, rng.standard_normal((1, cfg.text_len, cfg.text_dim), np.float32))
    cache, state = s.init_cache(), s.init_state()
    shape = (1, c, cfg.in_dim, *cfg.latent_hw)
    times, t0 = [], time.perf_counter()
    kv = lambda cc: int(cc["k"].nbytes + cc["v"].nbytes)  # noqa: E731
    for blk in range(args.frames // c):
        x = rng.standard_normal(shape, np.float32)
        eps = rng.standard_normal((n - 1, *shape), np.float32)
        t1 = time.perf_counter()
        out, cache, state = s.chunk_step(params, cache, state, ctx_kv, x, eps, np.int32(blk * c))
        jax.block_until_ready(out.x0)
        times.append(time.perf_counter() - t1)
        if blk == 4:
            rss0, kv0 = rss_mib(), kv(cache)
    finite = bool(np.isfinite(np.asarray(out.x0)).all())
    print(
        f"{args.frames} latent frames ({args.frames // c} chunks) of the {cfg.name} model, sink {s.geom.sink} + "
        f"ring {s.geom.ring}, window-relative RoPE, {time.perf_counter() - t0:.1f} s in total; last chunk finite: "
        f"{finite}; compiled {s.trace_count}x"
    )
    print(f"resident KV: {kv0 / 2**20:.3f} MiB after chunk 5, {kv(cache) / 2**20:.3f} MiB at the end")
    print(f"RSS: {rss0:.0f} MiB after chunk 5, {rss_mib():.0f} MiB at the end")
    print(
        f"per-chunk ms: chunks 3-7 median {median(times[2:7]) * 1e3:.1f}, last 5 median {median(times[-5:]) * 1e3:.1f}"
    )
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
