"""Reading generated toy-world frames back: which palette colour each pixel is, per-colour counts and centroids.

These checks need no model: a pixel is assigned to the nearest palette entry (background, pillar, or one
of the sprite colours) if it is within ``max_dist`` (RGB in [0, 1]); anti-aliased edges and artefacts stay
unassigned (-1). They are what the tests use to check that a generated video shows the prompted sprites.
"""

from __future__ import annotations

import numpy as np

from fkv_jax.toyworld.world import BACKGROUND, COLOUR_NAMES, COLOURS, PILLAR_COLOUR

PALETTE_NAMES: tuple[str, ...] = ("background", "pillar", *COLOUR_NAMES)
PALETTE = np.asarray([BACKGROUND, PILLAR_COLOUR, *(COLOURS[c] for c in COLOUR_NAMES)], np.float32)  # [K, 3]


def palette_labels(frames: np.ndarray, max_dist: float = 0.3) -> np.ndarray:
    """frames [..., 3, H, W] in [-1, 1] -> int labels [..., H, W]: index into PALETTE_NAMES, -1 = none."""
    rgb = (np.moveaxis(np.asarray(frames, np.float32), -3, -1) + 1) / 2  # [..., H, W, 3] in [0, 1]
    d = np.linalg.norm(rgb[..., None, :] - PALETTE, axis=-1)  # [..., H, W, K]
    lab = d.argmin(-1)
    return np.where(d.min(-1) <= max_dist, lab, -1)


def colour_pixels(frames: np.ndarray, max_dist: float = 0.3) -> np.ndarray:
    """Pixels of each sprite colour: [..., len(COLOUR_NAMES)] (per frame)."""
    lab = palette_labels(frames, max_dist)
    return np.stack([(lab == 2 + i).sum((-2, -1)) for i in range(len(COLOUR_NAMES))], -1)


def colour_centroids(frames: np.ndarray, min_pixels: int = 4, max_dist: float = 0.3) -> np.ndarray:
    """(x, y) centroid of each sprite colour per frame, NaN where fewer than ``min_pixels`` pixels:
    [..., len(COLOUR_NAMES), 2] (pixel centres at integer + 0.5, as the world's positions)."""
    lab = palette_labels(frames, max_dist)
    h, w = lab.shape[-2:]
    yy, xx = np.mgrid[0:h, 0:w] + 0.5
    out = np.full(lab.shape[:-2] + (len(COLOUR_NAMES), 2), np.nan, np.float32)
    for i in range(len(COLOUR_NAMES)):
        m = lab == 2 + i
        n = m.sum((-2, -1))
        with np.errstate(invalid="ignore", divide="ignore"):
            cx = (m * xx).sum((-2, -1)) / n
            cy = (m * yy).sum((-2, -1)) / n
        ok = n >= min_pixels
        out[..., i, 0] = np.where(ok, cx, np.nan)
        out[..., i, 1] = np.where(ok, cy, np.nan)
    return out


def prompt_colours(prompt: str) -> list[str]:
    """Colour words of a prompt, in order."""
    from fkv_jax.toyworld.text import words

    return [w for w in words(prompt) if w in COLOURS]


def colour_report(frames: np.ndarray, prompt: str, min_pixels: int = 4) -> dict:
    """For one video [T, 3, H, W]: fraction of frames where each prompted colour shows (>= min_pixels), and the
    mean pixels per frame of colours the prompt does not name."""
    counts = colour_pixels(frames)  # [T, K]
    want = prompt_colours(prompt)
    shown = {c: float((counts[:, COLOUR_NAMES.index(c)] >= min_pixels).mean()) for c in want}
    others = [i for i, c in enumerate(COLOUR_NAMES) if c not in want]
    return {
        "shown": shown,
        "other_pixels_per_frame": float(counts[:, others].sum(-1).mean()),
        "prompted_pixels_per_frame": float(counts[:, [COLOUR_NAMES.index(c) for c in want]].sum(-1).mean()),
    }


def motion_report(frames: np.ndarray, max_step: float | None = None, min_pixels: int = 4) -> dict:
    """Temporal coherence of one video [T, 3, H, W] from colour centroids.

    ``smooth``: fraction of (colour, consecutive frame pair) with the colour shown in both frames whose
    centroid moved at most ``max_step`` pixels (real toy-world videos: ~1, apart from a sprite wrapping or
    being half hidden). ``persist``: fraction of (colour, t) shown at t that is still shown at t + 1.
    ``max_step`` defaults to 3 pixels at 32x32 frames, scaled by the frame width.
    """
    if max_step is None:
        max_step = 3.0 * frames.shape[-1] / 32
    c = colour_centroids(frames, min_pixels)  # [T, K, 2]
    shown = ~np.isnan(c[..., 0])
    both = shown[1:] & shown[:-1]
    d = np.linalg.norm(c[1:] - c[:-1], axis=-1)
    return {
        "smooth": float((d[both] <= max_step).mean()) if both.any() else float("nan"),
        "persist": float(both.sum() / max(shown[:-1].sum(), 1)),
    }
