"""KV selection policies vs ``full``: per-chunk time at growing video length, measured next to predicted.

    python -m fkv_jax.bench.policies                       # mid preset, lengths 30 60 120, CPU
    python -m fkv_jax.bench.policies --lengths 60 120 --policies sink_window forcing_kv
    python -m fkv_jax.bench.policies --lengths 60 --timed 10 --repeats 5    # a noisy machine: interleaved rounds

For each video length and policy it runs a rollout of that many latent frames and times the last chunks
(median of the last ``--timed`` chunks, each after ``block_until_ready``), so the number is the per-chunk
cost at that length. The *predicted* speedup over ``full`` comes from FLOPs: the model's linear layers
(same for every policy) plus self-attention over the keys each (query frame, head) actually reads, counted
from the policies' own selections in the same run. Resident KV bytes = cache + policy memory tokens.

Random weights on the ``mid`` preset; Forcing-KV gets a seeded random head table (half dynamic) and
Focused Forcing seeded random head importance, since no profiled table exists for this model.
"""

from __future__ import annotations

import argparse
import time

import jax
import numpy as np
from flax import nnx

from fkv_jax.bench.common import median
from fkv_jax.config import ModelConfig, model_preset, sampler_preset
from fkv_jax.model.build import init_model
from fkv_jax.policies import POLICIES, HeadTable, make_policy
from fkv_jax.policies.meter import KeyMeter
from fkv_jax.sampling.rollout import Sampler


def linear_flops_per_token(cfg: ModelConfig, text_len: int) -> float:
    """FLOPs per query token of everything but self-attention's score/value products (one model call)."""
    d, f = cfg.dim, cfg.ffn_dim
    per_layer = 2 * (4 * d * d + 2 * d * d + 2 * d * f) + 4 * text_len * d  # projections, FFN, cross-attention
    return cfg.num_layers * per_layer + 2 * (cfg.patch_dim + cfg.out_patch_dim) * d


def bench_policy(graphdef, params, cfg, policy, frames, timed, seed=0, backend="auto"):
    sc = sampler_preset("self_forcing")
    s = Sampler(
        graphdef,
        cfg,
        sc,
        batch=1,
        latent_hw=cfg.latent_hw,
        num_frames=frames,
        policy=KeyMeter(inner=policy),
        attention_backend=backend,
    )
    rng = np.random.default_rng(seed)
    ctx_kv = s.context_kv(params, rng.standard_normal((1, cfg.text_len, cfg.text_dim), np.float32))
    cache, state = s.init_cache(), s.init_state()
    c, n = sc.frames_per_block, s.schedule.num_steps
    shape = (1, c, cfg.in_dim, *cfg.latent_hw)
    times, keys = [], []
    for blk in range(frames // c):
        x = rng.standard_normal(shape, np.float32)
        eps = rng.standard_normal((n - 1, *shape), np.float32)
        t0 = time.perf_counter()
        out, cache, state = s.chunk_step(params, cache, state, ctx_kv, x, eps, np.int32(blk * c))
        jax.block_until_ready((out.x0, cache["k"]))
        times.append(time.perf_counter() - t0)
        keys.append(float(np.mean(np.asarray(out.select_aux[1]))))  # mean keys per query over calls, layers, heads
    mem = sum(int(x.nbytes) for x in jax.tree.leaves(state.get("layers", {})) if x.ndim >= 4)
    kv_bytes = int(cache["k"].nbytes + cache["v"].nbytes) + mem
    return {
        "time": median(times[-timed:]),
        "keys": float(np.mean(keys[-timed:])),
        "kv_bytes": kv_bytes,
        "traces": s.trace_count,
    }


def build_policies(names, cfg, seed=0):
    rng = np.random.default_rng(seed)
    out = {}
    for name in names:
        if name == "forcing_kv":
            table = HeadTable(rng.random((cfg.num_layers, cfg.num_heads)) < 0.5, profile="random_half")
            out[name] = make_policy(name, head_table=table)
        elif name == "focused_forcing":
            out[name] = make_policy(name, head_importance=rng.random((cfg.num_layers, cfg.num_heads)))
        else:
            out[name] = make_policy(name)
    return out


def main(argv=None) -> int:
    p = argparse.ArgumentParser(
        prog="python -m fkv_jax.bench.policies",
        description=__doc__,
        formatter_class=argparse.RawDescriptionHelpFormatter,
    )
    p.add_argument("--model", default="mid", help="model preset (default mid: attention dominates long videos)")
    p.add_argument("--lengths", type=int, nargs="+", default=[30, 60, 120], help="video lengths in latent frames")
    p.add_argument(
        "--policies",
        nargs="+",
        default=["sink_window", "forcing_kv", "focused_forcing"],
        help=f"policies to compare with full (registered: {', '.join(sorted(POLICIES))})",
    )
    p.add_argument("--timed", type=int, default=3, help="last chunks timed at each length (median)")
    p.add_argument(
        "--repeats",
        type=int,
        default=1,
        help="rounds over every policy, interleaved; a policy's time is the median over rounds (default 1)",
    )
    p.add_argument(
        "--attention-backend",
        default="auto",
        metavar="NAME",
        help="attention backend of every rollout (default auto: cpu_ffi on a CPU when built, else xla)",
    )
    args = p.parse_args(argv)
    if args.repeats < 1 or args.timed < 1:
        p.error(f"--repeats and --timed must be >= 1, got {args.repeats} and {args.timed}")
    cfg = model_preset(args.model)
    graphdef, params = nnx.split(init_model(cfg, seed=0), nnx.Param)
    policies = {"full": make_policy("full"), **build_policies(args.policies, cfg)}
    t = cfg.tokens_per_frame()
    sq = 3 * t
    lin = linear_flops_per_token(cfg, cfg.text_len)
    print(
        f"model {cfg.name}: {cfg.num_layers} layers, width {cfg.dim}, {cfg.num_heads} heads x {cfg.head_dim}, "
        f"{t} tokens/frame; jax {jax.__version__} on {jax.devices()[0].platform}, attention backend "
        f"{args.attention_backend}; per-chunk time = median of the last {args.timed} chunks"
        + (f", then the median over {args.repeats} interleaved rounds" if args.repeats > 1 else "")
    )
    header = (
        f"{'frames':>6} {'policy':>16} {'ms/chunk':>9} {'keys/query':>10} {'KV MiB':>8} "
        f"{'speedup':>8} {'predicted':>9} {'meas/pred':>9}"
    )
    print(header)
    for frames in args.lengths:
        rounds = [
            {
                name: bench_policy(graphdef, params, cfg, pol, frames, args.timed, backend=args.attention_backend)
                for name, pol in policies.items()
            }
            for _ in range(args.repeats)
        ]
        res = {name: dict(rounds[0][name], time=median([r[name]["time"] for r in rounds])) for name in policies}
        full = res["full"]

        def flops(r):  # per model call: linear + self-attention (QK and PV) over the keys read
            return sq * lin + 4 * sq * r["keys"] * cfg.head_dim * cfg.num_heads * cfg.num_layers

        for name, r in res.items():
            speed = full["time"] / r["time"]
            pred = flops(full) / flops(r)
            print(
                f"{frames:>6} {name:>16} {r['time'] * 1e3:>9.1f} {r['keys']:>10.0f} {r['kv_bytes'] / 2**20:>8.2f} "
                f"{speed:>8.2f} {pred:>9.2f} {speed / pred:>9.2f}"
            )
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
