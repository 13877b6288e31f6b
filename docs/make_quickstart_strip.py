"""Make docs/quickstart_strip.png and measure what the quickstart draws.

    python docs/make_quickstart_strip.py [OUT_DIR]

Runs the quickstart's command (`fkv generate`: the shipped toy model, the default prompt "a red circle and a
blue square", 48 frames) for seeds 0-3, prints per seed the share of frames showing each prompted colour and
both together (fkv_jax.toyworld.analysis.colour_pixels, >= 4 pixels), and writes every 4th frame of seed 0,
4x enlarged, as one PNG strip (through the ffmpeg binary of imageio-ffmpeg: no image library needed).
"""

from __future__ import annotations

import subprocess
import sys
import tempfile
from pathlib import Path

import numpy as np

ROOT = Path(__file__).resolve().parents[1]
PROMPT = "a red circle and a blue square"
SEEDS = (0, 1, 2, 3)


def strip(frames: np.ndarray, every: int = 4, scale: int = 4, gap: int = 2) -> np.ndarray:
    """[T, 3, H, W] in [-1, 1] -> one uint8 RGB image [H*scale, n*(W*scale+gap)-gap, 3] on a white background."""
    from fkv_jax.video import to_uint8

    picked = to_uint8(np.clip(frames[::every], -1, 1).transpose(0, 2, 3, 1))  # [n, H, W, 3]
    big = picked.repeat(scale, 1).repeat(scale, 2)
    n, h, w, _ = big.shape
    out = np.full((h, n * (w + gap) - gap, 3), 255, np.uint8)
    for i, f in enumerate(big):
        out[:, i * (w + gap) : i * (w + gap) + w] = f
    return out


def write_png(path: Path, image: np.ndarray) -> None:
    import imageio_ffmpeg

    h, w = image.shape[:2]
    subprocess.run(
        [
            imageio_ffmpeg.get_ffmpeg_exe(),
            "-y",
            "-loglevel",
            "error",
            "-f",
            "rawvideo",
            "-pix_fmt",
            "rgb24",
            "-s",
            f"{w}x{h}",
            "-i",
            "-",
            "-frames:v",
            "1",
            str(path),
        ],
        input=image.tobytes(),
        check=True,
    )


def main() -> int:
    from fkv_jax.cli.generate import main as generate
    from fkv_jax.toyworld.analysis import COLOUR_NAMES, colour_pixels

    out = Path(sys.argv[1]) if len(sys.argv) > 1 else Path(tempfile.mkdtemp(prefix="fkv_strip_"))
    lat = out / "latents.npy"
    assert (
        generate(
            [
                "--seeds",
                ",".join(map(str, SEEDS)),
                "--output-dir",
                str(out),
                "--save-latents",
                str(lat),
                "--no-progress",
            ]
        )
        == 0
    )
    videos = np.load(lat)  # [S, 48, 3, 32, 32]
    red, blue = COLOUR_NAMES.index("red"), COLOUR_NAMES.index("blue")
    print("| seed | frames | red shown | blue shown | both together |")
    print("|---|---|---|---|---|")
    for seed, v in zip(SEEDS, videos):
        c = colour_pixels(np.clip(v, -1, 1)) >= 4  # [T, K]
        print(
            f"| {seed} | {len(v)} | {c[:, red].mean():.2f} | {c[:, blue].mean():.2f} | "
            f"{(c[:, red] & c[:, blue]).mean():.2f} ({int((c[:, red] & c[:, blue]).sum())} of {len(v)}) |"
        )
    png = ROOT / "docs" / "quickstart_strip.png"
    write_png(png, strip(videos[0]))
    print(f"wrote {png} (seed 0, frames 0, 4, ..., 44, 4x enlarged)")
    return 0


if __name__ == "__main__":
    sys.exit(main())
