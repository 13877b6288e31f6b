"""Writing toy-world frames for viewing: mp4 (through :mod:`fkv_jax.video`) and PNG (no dependency).

Frames are float ``[T, 3, H, W]`` in ``[-1, 1]``; they are upscaled by nearest neighbour (24x24 -> 192x192
by default) so the pixels stay crisp in a player.
"""

from __future__ import annotations

import os
import struct
import zlib
from pathlib import Path

import numpy as np


def to_uint8(frames: np.ndarray, scale: int = 8) -> np.ndarray:
    """[..., 3, H, W] in [-1, 1] -> uint8 [..., H*scale, W*scale, 3]."""
    x = np.asarray(frames, np.float32)
    x = np.clip((x + 1) * 127.5 + 0.5, 0, 255).astype(np.uint8)
    x = np.moveaxis(x, -3, -1)
    if scale > 1:
        x = x.repeat(scale, axis=-3).repeat(scale, axis=-2)
    return x


def tile(videos: np.ndarray, pad: int = 1) -> np.ndarray:
    """[B, T, 3, H, W] -> [T, 3, H', W'] with the videos side by side, separated by ``pad`` grey columns."""
    videos = np.asarray(videos, np.float32)
    b, t, c, h, w = videos.shape
    out = np.zeros((t, c, h, b * w + (b - 1) * pad), np.float32)
    for i in range(b):
        out[..., i * (w + pad) : i * (w + pad) + w] = videos[i]
    return out


def save_mp4(path: str | Path, frames: np.ndarray, fps: int = 8, scale: int = 8) -> Path:
    """Write ``frames`` [T, 3, H, W] (or [B, T, 3, H, W], tiled side by side) as an H.264 yuv420p mp4.

    The file is written under a temporary name and renamed when complete (no half-written mp4 on failure).
    """
    from fkv_jax.video import write_video

    frames = np.asarray(frames)
    if frames.ndim == 5:
        frames = tile(frames)
    img = to_uint8(frames, scale)  # [T, H, W, 3]
    h, w = img.shape[1:3]
    if h % 2 or w % 2:  # yuv420p needs even sizes
        img = np.pad(img, ((0, 0), (0, h % 2), (0, w % 2), (0, 0)))
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.with_name(f".{path.stem}.partial{path.suffix or '.mp4'}")
    try:
        write_video(tmp, img, fps=fps)
        os.replace(tmp, path)
    finally:
        tmp.unlink(missing_ok=True)
    return path


def save_png(path: str | Path, image: np.ndarray) -> Path:
    """Write an RGB image: uint8 [H, W, 3], or float [3, H, W] in [-1, 1] (upscaled x8)."""
    image = np.asarray(image)
    if image.dtype != np.uint8:
        image = to_uint8(image)
    h, w, _ = image.shape
    raw = b"".join(b"\x00" + image[y].tobytes() for y in range(h))

    def chunk(kind: bytes, data: bytes) -> bytes:
        return struct.pack(">I", len(data)) + kind + data + struct.pack(">I", zlib.crc32(kind + data) & 0xFFFFFFFF)

    png = (
        b"\x89PNG\r\n\x1a\n"
        + chunk(b"IHDR", struct.pack(">IIBBBBB", w, h, 8, 2, 0, 0, 0))
        + chunk(b"IDAT", zlib.compress(raw, 6))
        + chunk(b"IEND", b"")
    )
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_bytes(png)
    return path


def filmstrip(videos: np.ndarray, every: int = 1, pad: int = 1) -> np.ndarray:
    """[B, T, 3, H, W] -> one float image [3, B*(H+pad), n*(W+pad)]: rows = videos, columns = frames."""
    videos = np.asarray(videos, np.float32)[:, ::every]
    b, t, c, h, w = videos.shape
    out = np.zeros((c, b * (h + pad) - pad, t * (w + pad) - pad), np.float32)  # pad = black (value 0 -> grey)
    for i in range(b):
        for j in range(t):
            out[:, i * (h + pad) : i * (h + pad) + h, j * (w + pad) : j * (w + pad) + w] = videos[i, j]
    return out
