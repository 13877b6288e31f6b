"""Quality metrics for generated toy-world videos, against a reference rollout or the simulator's truth.

Frames are float [T, 3, H, W] in [-1, 1]. Ground truth comes from :class:`fkv_jax.toyworld.world.Episode`.
Sprites are found in generated frames by colour (each scene's sprites have distinct palette colours).
"""

from __future__ import annotations

import numpy as np

from fkv_jax.toyworld.analysis import colour_centroids, palette_labels
from fkv_jax.toyworld.world import COLOUR_NAMES, SHAPES, Episode, WorldConfig, coverage


def psnr(a: np.ndarray, b: np.ndarray) -> float:
    """PSNR in dB of frames in [-1, 1] (peak 1 after mapping to [0, 1]); inf when identical."""
    mse = float(np.mean(((np.asarray(a, np.float64) - b) / 2) ** 2))
    return float("inf") if mse == 0 else 10 * np.log10(1.0 / mse)


def _box(x: np.ndarray, k: int) -> np.ndarray:
    """Mean over k x k windows ('valid') of [..., H, W]."""
    c = np.cumsum(np.cumsum(np.pad(x, [(0, 0)] * (x.ndim - 2) + [(1, 0), (1, 0)]), -2), -1)
    return (c[..., k:, k:] - c[..., :-k, k:] - c[..., k:, :-k] + c[..., :-k, :-k]) / (k * k)


def ssim(a: np.ndarray, b: np.ndarray, k: int = 7) -> float:
    """Mean SSIM (7x7 box windows, per channel, data range 1) of frames in [-1, 1]."""
    x, y = (np.asarray(a, np.float64) + 1) / 2, (np.asarray(b, np.float64) + 1) / 2
    c1, c2 = 0.01**2, 0.03**2
    mx, my = _box(x, k), _box(y, k)
    vx, vy = _box(x * x, k) - mx * mx, _box(y * y, k) - my * my
    cxy = _box(x * y, k) - mx * my
    s = ((2 * mx * my + c1) * (2 * cxy + c2)) / ((mx * mx + my * my + c1) * (vx + vy + c2))
    return float(s.mean())


def chunk_discontinuity(frames: np.ndarray, frames_per_block: int = 3) -> float:
    """Mean |frame difference| across chunk boundaries over the mean within chunks (1 = seamless)."""
    d = np.abs(np.diff(np.asarray(frames, np.float64), axis=0)).mean(axis=(1, 2, 3))  # [T - 1]
    boundary = (np.arange(1, len(frames)) % frames_per_block) == 0  # diff t-1 -> t crosses into a new chunk
    if not boundary.any() or boundary.all():
        return float("nan")
    return float(d[boundary].mean() / max(d[~boundary].mean(), 1e-12))


def _fully_visible(ep: Episode, thresh: float = 0.9) -> np.ndarray:
    return ep.visible_frac >= thresh  # [T, N]


def position_error(frames: np.ndarray, ep: Episode, start: int = 0, stop: int | None = None) -> float:
    """Mean distance (pixels) between each sprite's true centre and the centroid of its colour in the frame,
    over frames in [start, stop) where the sprite is fully visible. A sprite whose colour is missing counts
    the frame diagonal (the worst error)."""
    cents = colour_centroids(frames)  # [T, K, 2]
    vis = _fully_visible(ep)
    diag = float(np.hypot(*frames.shape[-2:]))
    errs = []
    for n, cid in enumerate(ep.colour_ids):
        for t in range(start, len(frames) if stop is None else min(stop, len(frames))):
            if vis[t, n]:
                c = cents[t, cid]
                errs.append(diag if np.isnan(c).any() else float(np.hypot(*(c - ep.positions[t, n]))))
    return float(np.mean(errs)) if errs else float("nan")


def classify_shape(mask: np.ndarray, cfg: WorldConfig | None = None) -> str | None:
    """The shape whose rendering (the world's own anti-aliased coverage > 0.5) overlaps a blob mask [H, W] best
    (IoU). Each template is placed so that its centroid falls on the blob's (a triangle's centroid is not its
    centre), then tried at a few sub-pixel offsets."""
    cfg = WorldConfig.for_size(mask.shape[-1]) if cfg is None else cfg
    if mask.sum() < 4 or mask.shape != (cfg.size, cfg.size):
        return None
    yy, xx = np.mgrid[0 : mask.shape[0], 0 : mask.shape[1]] + 0.5
    cx, cy = (mask * xx).sum() / mask.sum(), (mask * yy).sum() / mask.sum()
    best, best_iou = None, -1.0
    for s in SHAPES:
        cov = coverage(s, cx, cy, cfg)
        w = cov.sum()
        x0 = cx + (cx - (cov * xx).sum() / w) if w > 0 else cx  # shift the template's centroid onto the blob's
        y0 = cy + (cy - (cov * yy).sum() / w) if w > 0 else cy
        for dx in (-0.5, 0.0, 0.5):
            for dy in (-0.5, 0.0, 0.5):
                tmpl = coverage(s, x0 + dx, y0 + dy, cfg) > 0.5
                iou = (tmpl & mask).sum() / max((tmpl | mask).sum(), 1)
                if iou > best_iou:
                    best, best_iou = s, iou
    return best


def prompt_sprites(prompt: str) -> list[tuple[str, str]]:
    """(colour, shape) pairs a prompt names, back to front: "a red circle and a blue square" ->
    [("red", "circle"), ("blue", "square")]."""
    from fkv_jax.toyworld.text import words

    w = words(prompt)
    return [(a, b) for a, b in zip(w, w[1:]) if a in COLOUR_NAMES and b in SHAPES]


def shape_agreement(frames: np.ndarray, prompt: str, min_pixels: int | None = None) -> tuple[int, int]:
    """(agreeing, judged): over frames [T, 3, H, W] and the prompt's sprites, the (frame, sprite) pairs whose
    colour forms a blob of >= ``min_pixels`` pixels clear of the left and right edges (a sprite cut by the
    wrap-around is not judged) and whose :func:`classify_shape` is the prompted shape. Needs no ground truth,
    so it applies to videos drawn from text alone; on the simulator's own frames it measures the classifier.
    ``min_pixels`` defaults to 12 at 32x32 frames, scaled by the frame area."""
    lab = palette_labels(frames)  # [T, H, W]
    if min_pixels is None:
        min_pixels = max(4, round(12 * lab.shape[-1] * lab.shape[-2] / 32**2))
    agree = judged = 0
    for colour, shape in prompt_sprites(prompt):
        m = lab == 2 + COLOUR_NAMES.index(colour)  # [T, H, W]
        for t in range(len(frames)):
            if m[t].sum() >= min_pixels and not (m[t, :, 0].any() or m[t, :, -1].any()):
                judged += 1
                agree += classify_shape(m[t]) == shape
    return agree, judged


def prompt_alignment(frames: np.ndarray, ep: Episode, start: int = 0) -> dict:
    """Over frames >= start: fraction of (frame, sprite) pairs with the sprite fully visible in truth whose
    colour shows, fraction of those whose blob has the prompted shape, and the mean number of pixels per
    frame in colours the prompt does not name."""
    lab = palette_labels(frames)  # [T, H, W]
    vis = _fully_visible(ep)
    colour_ok, shape_ok = [], []
    for n, (cid, sid) in enumerate(zip(ep.colour_ids, ep.shape_ids)):
        for t in range(start, len(frames)):
            if vis[t, n]:
                m = lab[t] == 2 + cid
                colour_ok.append(m.sum() >= 4)
                shape_ok.append(classify_shape(m) == SHAPES[sid])
    others = [2 + i for i in range(len(COLOUR_NAMES)) if i not in set(ep.colour_ids.tolist())]
    extra = float(np.isin(lab[start:], others).sum((-2, -1)).mean())
    return {
        "colour": float(np.mean(colour_ok)) if colour_ok else float("nan"),
        "shape": float(np.mean(shape_ok)) if shape_ok else float("nan"),
        "extra_colour_pixels": extra,
    }


def identity_after_occlusion(frames: np.ndarray, ep: Episode, start: int = 0) -> float:
    """Fraction of re-appearances (a sprite hidden for >= 2 frames becomes fully visible again, at a frame
    >= start) where the generated frame shows that sprite's colour with its shape (identity kept)."""
    lab = palette_labels(frames)
    hidden = ~ep.visible
    full = _fully_visible(ep)
    hits = []
    for n, (cid, sid) in enumerate(zip(ep.colour_ids, ep.shape_ids)):
        run, pending = 0, False
        for t in range(len(frames)):
            run = run + 1 if hidden[t, n] else 0
            pending = pending or run >= 2
            if full[t, n] and pending:
                pending = False
                if t >= start:
                    m = lab[t] == 2 + cid
                    hits.append(bool(m.sum() >= 4 and classify_shape(m) == SHAPES[sid]))
    return float(np.mean(hits)) if hits else float("nan")


def tracking_error(frames: np.ndarray, ep: Episode, start: int, horizons=(24, 48)) -> dict:
    """Position error (:func:`position_error`) over the first ``h`` generated frames after ``start`` true
    context frames, for each horizon h: ``{"track_24_px": ..., "track_48_px": ...}`` (NaN past the video)."""
    return {
        f"track_{h}_px": position_error(frames, ep, start, start + h) if start + h <= len(frames) else float("nan")
        for h in horizons
    }


def reappearance(frames: np.ndarray, ep: Episode, start: int = 0, min_hidden: int = 2, settle: int = 3) -> dict:
    """After each hidden run of >= ``min_hidden`` frames that ends at a frame >= start: over the first
    ``settle`` frames in which the sprite is fully visible again, the share showing its colour with its shape
    (``identity``) and the mean distance of that colour's centroid from the true centre (``position_px``; a
    missing colour counts the frame diagonal). NaN when the episode has no such reappearance."""
    from fkv_jax.toyworld.world import hidden_runs

    lab = palette_labels(frames)
    cents = colour_centroids(frames)
    full = _fully_visible(ep)
    diag = float(np.hypot(*frames.shape[-2:]))
    ids, errs = [], []
    for n, s, length in hidden_runs(ep.visible):
        end = s + length
        if length < min_hidden or end < start:
            continue
        back = [t for t in range(end, len(frames)) if full[t, n]][:settle]
        cid, sid = ep.colour_ids[n], ep.shape_ids[n]
        for t in back:
            m = lab[t] == 2 + cid
            ids.append(bool(m.sum() >= 4 and classify_shape(m) == SHAPES[sid]))
            c = cents[t, cid]
            errs.append(diag if np.isnan(c).any() else float(np.hypot(*(c - ep.positions[t, n]))))
    return {
        "identity": float(np.mean(ids)) if ids else float("nan"),
        "position_px": float(np.mean(errs)) if errs else float("nan"),
    }


def mean_ci(values, level: float = 0.95, resamples: int = 2000, seed: int = 0) -> tuple[float, float, float]:
    """Mean of the finite values and a percentile-bootstrap confidence interval: (mean, low, high).
    One value gives (v, nan, nan); none gives nans."""
    v = np.asarray([x for x in values if np.isfinite(x)], np.float64)
    if v.size == 0:
        return float("nan"), float("nan"), float("nan")
    if v.size == 1:
        return float(v[0]), float("nan"), float("nan")
    idx = np.random.default_rng(seed).integers(0, v.size, (resamples, v.size))
    means = v[idx].mean(1)
    a = (1 - level) / 2
    return float(v.mean()), float(np.quantile(means, a)), float(np.quantile(means, 1 - a))
