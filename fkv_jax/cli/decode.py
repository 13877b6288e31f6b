"""``fkv decode`` (alias ``python -m fkv_jax.decode``): saved latents -> mp4 (or a float32 .npy video) with the
Wan2.1 VAE.

    fkv decode --vae DIR/vae --latents out.npy --output out.mp4
    fkv decode --vae DIR/vae --latents out.npy --output video.npy

``--latents`` is what ``fkv generate --save-latents`` writes: ``[B, F, 16, h, w]`` float32 in model space
(before the VAE's de-normalisation). An ``.mp4`` output is H.264 / yuv420p at ``--fps`` (16), one file per
video (``OUT_0.mp4``, ``OUT_1.mp4``, ... when B > 1), written latent frame by latent frame; a ``.npy`` output
is the decoded video ``[B, 3, T, 8h, 8w]`` float32 in [-1, 1] (after the clamp), T = 1 + 4 (F - 1).
"""

from __future__ import annotations

import argparse
import sys
from pathlib import Path

import numpy as np

from fkv_jax.cli import Parser, UsageError, run_cli
from fkv_jax.cli import args as A
from fkv_jax.cli import common as C


def build_parser(prog: str = "fkv decode") -> Parser:
    p = Parser(
        prog=prog,
        description=__doc__.split("\n\n")[0],
        epilog=__doc__.split("\n\n", 2)[2],
        formatter_class=argparse.RawDescriptionHelpFormatter,
    )
    p.add_argument("--vae", type=Path, required=True, help="converted VAE directory (`fkv convert`)")
    p.add_argument("--latents", type=Path, required=True, help=".npy [B, F, 16, h, w] float32, model space")
    p.add_argument("--output", type=Path, required=True, help="OUT.mp4 (video) or OUT.npy (float32 [B, 3, T, H, W])")
    p.add_argument("--fps", type=float, default=16, help="mp4 frame rate (default 16)")
    p.add_argument("--chunk", type=int, default=3, help="latent frames decoded per step (default 3)")
    A.add_output_args(p, only={"no_progress"})
    return p


def _check(args):
    from fkv_jax.checkpoint import CheckpointError
    from fkv_jax.vae import read_vae_config

    C.check_output_file(args.output, "--output", (".mp4", ".npy"))
    if not args.fps > 0:
        raise UsageError(f"--fps must be positive, got {args.fps:g}")
    C.check_at_least("--chunk", args.chunk, 1)
    if not args.vae.is_dir():
        raise UsageError(
            f"--vae directory not found: {args.vae} (make one with `fkv convert --input Wan2.1_VAE.pth --output DIR`)"
        )
    try:
        cfg = read_vae_config(args.vae)
    except (CheckpointError, OSError, ValueError) as e:
        raise UsageError(f"--vae: {e}") from None
    C.check_input_file(args.latents, "--latents", "fkv generate ... --save-latents out.npy")
    try:
        lat = np.load(args.latents, mmap_mode="r", allow_pickle=False)
    except Exception as e:  # noqa: BLE001 - any unreadable file is bad input
        raise UsageError(f"cannot read --latents {args.latents}: {type(e).__name__}: {e}") from None
    if lat.ndim != 5 or lat.shape[2] != cfg.z_dim or lat.shape[1] < 1:
        raise UsageError(
            f"--latents {args.latents} has shape {list(lat.shape)}; expected [B, F, {cfg.z_dim}, h, w] "
            "(as written by `fkv generate --save-latents`)"
        )
    return cfg, lat


def run(args) -> list[Path]:
    cfg, lat = _check(args)
    from tqdm.auto import tqdm

    from fkv_jax.vae import VAE
    from fkv_jax.video import VideoWriter, save_npy_atomic

    progress = not args.no_progress
    with tqdm(total=1, desc="loading VAE", disable=None if progress else True, leave=False) as bar:
        vae = VAE.load(args.vae)
        bar.update(1)
    b, f = lat.shape[:2]
    dec = vae.stream()
    to_mp4 = args.output.suffix.lower() == ".mp4"
    C.make_dir(args.output.parent, "--output folder")
    if to_mp4:
        paths = [args.output] if b == 1 else [args.output.with_name(f"{args.output.stem}_{i}.mp4") for i in range(b)]
        writers = [VideoWriter(p, fps=args.fps) for p in paths]
    parts = []
    try:
        for s in tqdm(range(0, f, args.chunk), desc="decoding", unit="chunk", disable=None if progress else True):
            video = dec(np.asarray(lat[:, s : s + args.chunk], np.float32))  # [B, T', H, W, 3] in [-1, 1]
            if to_mp4:
                for w, v in zip(writers, video):
                    w.write(v)
            else:
                parts.append(video)
    finally:
        if to_mp4:
            for w in writers:
                w.close()
    if to_mp4:
        for p, w in zip(paths, writers):
            print(
                f"wrote {p} ({w.frames_written} frames at {args.fps:g} fps, {w.size[0]}x{w.size[1]})", file=sys.stderr
            )
        return paths
    video = np.concatenate(parts, axis=1).transpose(0, 4, 1, 2, 3)  # [B, 3, T, H, W]
    save_npy_atomic(args.output, np.ascontiguousarray(video, np.float32))
    print(f"wrote {args.output} {list(video.shape)} float32 in [-1, 1]", file=sys.stderr)
    return [args.output]


def main(argv=None, prog: str = "fkv decode") -> int:
    from fkv_jax.video import VideoError

    return run_cli(lambda: build_parser(prog), run, argv, errors=(VideoError,))
