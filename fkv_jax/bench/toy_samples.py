"""Toy-world sample statistics: videos drawn from text alone vs real episodes of the same prompts.

    python -m fkv_jax.bench.toy_samples                         # the shipped weights, the samplers of docs/toyworld.md
    python -m fkv_jax.bench.toy_samples --weights DIR --samplers default

For held-out episodes (seeds 70000 + i) it prints, per sampler and for the simulator's own frames, the means of
``toyworld.analysis.colour_report`` (fraction of frames in which each prompted colour covers >= 4 pixels,
prompted and other-colour pixels per frame), ``motion_report`` (smooth, persist) and
``eval.metrics.shape_agreement`` (shape: the share of sprite blobs clear of the edges, >= 12 pixels, that a
template classifier reads as the prompted shape; on the real episodes it is the classifier's own agreement
with the simulator).
"""

from __future__ import annotations

import argparse

import numpy as np

# name -> SamplerConfig overrides of the toy sampler (None: the toy sampler as shipped)
SAMPLERS = {
    "default": {},
    "euler24": {"denoising_steps": 24},
    "shift5": {"shift": 5.0},
    "renoise16": {"solver": "renoise"},
    "renoise8": {"solver": "renoise", "denoising_steps": 8},
}


def _overrides(spec: dict) -> dict:
    out = dict(spec)
    if "denoising_steps" in out:  # n steps uniform in the nominal timesteps, as the toy sampler's 16
        n = out["denoising_steps"]
        out["denoising_steps"] = tuple(float(round(x)) for x in np.linspace(1000, 0, n, endpoint=False))
    return out


def summarize(videos, prompts) -> dict:
    from fkv_jax.eval.metrics import shape_agreement
    from fkv_jax.toyworld.analysis import colour_report, motion_report

    rows, agree, judged = [], 0, 0
    for prompt, video in zip(prompts, videos):
        a, j = shape_agreement(video, prompt)
        agree, judged = agree + a, judged + j
        cr, mr = colour_report(video, prompt), motion_report(video)
        rows.append(
            (
                np.mean(list(cr["shown"].values())),
                cr["prompted_pixels_per_frame"],
                cr["other_pixels_per_frame"],
                mr["smooth"],
                mr["persist"],
            )
        )
    r = np.asarray(rows, np.float64)
    out = dict(zip(("shown", "prompted_px", "other_px", "smooth", "persist"), np.nanmean(r, axis=0)))
    out["shape"] = agree / judged if judged else float("nan")
    out["shape_judged"] = judged
    return out


def main(argv=None) -> int:
    p = argparse.ArgumentParser(
        prog="python -m fkv_jax.bench.toy_samples",
        description=__doc__,
        formatter_class=argparse.RawDescriptionHelpFormatter,
    )
    p.add_argument("--weights", help="exported toy weights directory (default: the shipped ones)")
    p.add_argument("--episodes", type=int, default=16)
    p.add_argument("--frames", type=int, default=24)
    p.add_argument("--seed", type=int, default=0, help="noise seed of the generated videos")
    p.add_argument("--samplers", nargs="+", default=list(SAMPLERS), choices=list(SAMPLERS))
    a = p.parse_args(argv)
    from fkv_jax.toyworld.model import generate_video, toy_sampler_config
    from fkv_jax.toyworld.weights import load_config
    from fkv_jax.toyworld.world import make_episode, world_for

    world = world_for(load_config(a.weights).latent_hw)  # the world the weights draw (their frame size)
    eps = [make_episode(70_000 + i, a.frames, world) for i in range(a.episodes)]
    prompts = [e.prompt for e in eps]
    print(f"{a.episodes} held-out prompts x {a.frames} frames, noise seed {a.seed}")
    print("| videos | shown | prompted px / frame | other colours px / frame | smooth | persist | shape (blobs) |")
    print("|---|---|---|---|---|---|---|")

    def row(name, s):
        print(
            f"| {name} | {s['shown']:.2f} | {s['prompted_px']:.1f} | {s['other_px']:.2f} | {s['smooth']:.2f} | "
            f"{s['persist']:.2f} | {s['shape']:.2f} ({s['shape_judged']}) |",
            flush=True,
        )

    row("real episodes", summarize([e.frames for e in eps], prompts))
    for name in a.samplers:
        sc = toy_sampler_config(a.weights, **_overrides(SAMPLERS[name]))
        videos = np.concatenate(
            [
                generate_video(prompts[i : i + 8], a.frames, seed=a.seed, sampler_cfg=sc, weights=a.weights)
                for i in range(0, len(prompts), 8)
            ]
        )
        row(f"model, sampler {name}", summarize(videos, prompts))
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
