"""python -m fkv_jax.toyworld PROMPT [PROMPT ...] --frames 24 --seed 0 --out toy.mp4

Generates one video per prompt with the shipped toy model and the KV-cache AR sampler and writes them side
by side to an mp4 (H.264, 32x32 frames upscaled to 256x256), plus the raw frames as .npy.
"""

from __future__ import annotations

import argparse
import sys
from pathlib import Path

import numpy as np


def main(argv=None) -> int:
    p = argparse.ArgumentParser(prog="python -m fkv_jax.toyworld", description=__doc__,
                                formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("prompts", nargs="*", default=["a red circle and a blue square"],
                   help='e.g. "a red circle and a blue square with a pillar"')
    p.add_argument("--frames", type=int, default=24, help="frames to generate (a multiple of 3)")
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--sampler", default="toy", help="toy (default) or a fkv_jax sampler preset (self_forcing, ...)")
    p.add_argument("--local-attn-size", type=int, help="override the cache window (-1 = global)")
    p.add_argument("--out", type=Path, default=Path("outputs/toyworld.mp4"))
    p.add_argument("--fps", type=int, default=8)
    a = p.parse_args(argv)
    from fkv_jax.config import sampler_preset
    from fkv_jax.toyworld.model import generate_video, save_video, toy_sampler_config

    sc = toy_sampler_config() if a.sampler == "toy" else sampler_preset(a.sampler)
    if a.local_attn_size is not None:
        import dataclasses

        sc = dataclasses.replace(sc, local_attn_size=a.local_attn_size)
    try:
        frames = generate_video(a.prompts, a.frames, a.seed, sc, progress=True)
    except ValueError as e:
        print(f"error: {e}", file=sys.stderr)
        return 2
    path = save_video(a.out, frames, fps=a.fps)
    np.save(a.out.with_suffix(".npy"), frames)
    print(f"wrote {path} ({frames.shape[0]} video(s) of {frames.shape[1]} frames) and {a.out.with_suffix('.npy')}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
