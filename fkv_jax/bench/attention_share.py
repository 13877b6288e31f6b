"""How much of a chunk step is attention: the backend's own time inside the compiled step, block by block.

    python -m fkv_jax.bench.attention_share                              # mid preset, 21 frames, auto backend
    python -m fkv_jax.bench.attention_share --checkpoint DIR --frames 21 --attention-backend xla

Every attention call of the step is wrapped in two ordered ``io_callback`` stamps (one before the backend
runs, one after its output exists), so the sum of the stamped intervals is the time the backend took inside
the real compiled step, with XLA's own fusions and layouts around it. The rest of the block is everything
else (projections, FFN, norms, RoPE, the cache write, the sampler). Attention GFLOP/s counts 4 x queries x
keys x head_dim per head, with the keys each query actually read (the policy's selection, here the plain
cache). Random weights for a preset; a converted checkpoint with ``--checkpoint``. The stamps cost a little
(two host round trips per call), so use the totals of ``bench.rollout`` for absolute speed and this for the
split.
"""

from __future__ import annotations

import argparse
import dataclasses
import time

import jax
import jax.numpy as jnp
import numpy as np
from flax import nnx
from jax.experimental import io_callback

from fkv_jax.bench.common import median


def stamped(fn, stamps: list):
    """``fn`` (an attention function) with a wall-clock stamp before and after each call, in ``stamps``."""

    def stamp(x):  # a host callback; its zero result ties the stamp into the data flow
        stamps.append(time.perf_counter())
        return np.zeros((), np.float32)

    def tied(x):
        return io_callback(stamp, jax.ShapeDtypeStruct((), jnp.float32), x[0, 0, 0, 0], ordered=True).astype(x.dtype)

    def attention(q, k_chunk, v_chunk, k_cache, v_cache, sel, **kw):
        out = fn(q + tied(q), k_chunk, v_chunk, k_cache, v_cache, sel, **kw)
        return out + tied(out)

    attention.reads_stacked_cache = getattr(fn, "reads_stacked_cache", False)
    return attention


def main(argv=None) -> int:
    p = argparse.ArgumentParser(
        prog="python -m fkv_jax.bench.attention_share",
        description=__doc__,
        formatter_class=argparse.RawDescriptionHelpFormatter,
    )
    p.add_argument("--model", default="mid", help="model preset with random weights (default mid)")
    p.add_argument("--checkpoint", help="a converted checkpoint directory instead of --model")
    p.add_argument("--frames", type=int, default=21, help="latent frames (default 21, a global cache)")
    p.add_argument("--latent-hw", type=int, nargs=2, metavar=("H", "W"), help="latent size (default: the config's)")
    p.add_argument("--window", type=int, default=-1, help="rolling window in frames (default -1: global)")
    p.add_argument("--attention-backend", default="auto", metavar="NAME", help="backend to time (default auto)")
    p.add_argument("--rounds", type=int, default=3, help="rollouts; each block's times are medians (default 3)")
    args = p.parse_args(argv)
    if args.rounds < 1 or args.frames < 3:
        p.error(f"--rounds must be >= 1 and --frames >= 3, got {args.rounds} and {args.frames}")

    from fkv_jax.attention.backends import resolve_backend
    from fkv_jax.config import model_preset, sampler_preset
    from fkv_jax.policies import make_policy
    from fkv_jax.policies.meter import KeyMeter
    from fkv_jax.sampling.rollout import Sampler

    if args.checkpoint:
        from fkv_jax import load_transformer

        cfg, model = load_transformer(args.checkpoint)
    else:
        from fkv_jax.model.build import init_model

        cfg = model_preset(args.model)
        model = init_model(cfg, seed=0)
    graphdef, params = nnx.split(model, nnx.Param)
    sc = dataclasses.replace(sampler_preset("self_forcing"), local_attn_size=args.window)
    c = sc.frames_per_block
    frames = args.frames // c * c
    latent_hw = tuple(args.latent_hw or cfg.latent_hw)
    gh, gw = cfg.grid_hw(latent_hw)
    name, fn = resolve_backend(
        args.attention_backend, dtype=jnp.float32, head_dim=cfg.head_dim, tokens_per_frame=gh * gw
    )
    stamps: list[float] = []
    s = Sampler(
        graphdef,
        cfg,
        sc,
        batch=1,
        latent_hw=latent_hw,
        num_frames=frames,
        policy=KeyMeter(inner=make_policy("full")),
        attention=stamped(fn, stamps),
    )
    rng = np.random.default_rng(0)
    ctx_kv = s.context_kv(params, rng.standard_normal((1, cfg.text_len, cfg.text_dim), np.float32))
    n = s.schedule.num_steps
    shape = (1, c, cfg.in_dim, *latent_hw)
    sq = c * gh * gw
    blocks = frames // c
    total = [[] for _ in range(blocks)]
    attn = [[] for _ in range(blocks)]
    keys = [0.0] * blocks
    calls = 0
    x0 = np.zeros(shape, np.float32)
    warm = s.chunk_step(params, s.init_cache(), s.init_state(), ctx_kv, x0, np.zeros((n - 1, *shape)), np.int32(0))
    jax.block_until_ready(warm[0].x0)  # compiled before anything is timed
    for _ in range(args.rounds):
        cache, state = s.init_cache(), s.init_state()
        for blk in range(blocks):
            x = rng.standard_normal(shape, np.float32)
            eps = rng.standard_normal((n - 1, *shape), np.float32)
            stamps.clear()
            t0 = time.perf_counter()
            out, cache, state = s.chunk_step(params, cache, state, ctx_kv, x, eps, np.int32(blk * c))
            jax.block_until_ready(out.x0)
            total[blk].append(time.perf_counter() - t0)
            attn[blk].append(sum(b - a for a, b in zip(stamps[0::2], stamps[1::2])))
            keys[blk] = float(np.mean(np.asarray(out.select_aux[1])))
            calls = len(stamps) // 2
    print(
        f"model {cfg.name}: {cfg.num_layers} layers, {cfg.num_heads} heads x {cfg.head_dim}, {sq} queries per "
        f"chunk; backend {args.attention_backend} -> {name}; {calls} attention calls per block; medians of "
        f"{args.rounds} rollout(s); jax {jax.__version__} on {jax.devices()[0].platform}"
    )
    print(
        f"{'block':>5} {'keys/query':>10} {'total s':>8} {'attn s':>8} {'share':>6} {'attn GFLOP/s':>12} {'rest s':>7}"
    )
    for blk in range(blocks):
        t, a = median(total[blk]), median(attn[blk])
        flops = 4 * sq * keys[blk] * cfg.head_dim * cfg.num_heads * calls
        print(
            f"{blk + 1:>5} {keys[blk]:>10.0f} {t:>8.3f} {a:>8.3f} {a / t:>6.0%} {flops / max(a, 1e-9) / 1e9:>12.1f} "
            f"{t - a:>7.3f}"
        )
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
