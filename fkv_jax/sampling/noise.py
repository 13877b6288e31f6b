"""Every random draw of a rollout, on the host, in one place.

Draws are numpy (``default_rng``), not JAX: compiling JAX's threefry normal on CPU costs about a second per
shape, which dominated small models' start-up. The seeding convention is part of the output's identity (the
same seed gives the same video in every entry point):

* initial noise of a video: ``default_rng(seed)``, ``[1, F, C, H, W]`` per video, stacked over a batch
  (:func:`initial_noise`); or one draw ``[B, F, C, H, W]`` for a whole batch of one seed (:func:`batch_noise`,
  the toy model's convention);
* re-noise draws of block ``b`` (Self Forcing's sampler re-noises x0 after each denoising step but the last):
  ``default_rng((seed, b))``, ``[n - 1, B, C_blk, C, H, W]``.
"""

from __future__ import annotations

from collections.abc import Sequence

import numpy as np


def initial_noise(seeds: int | Sequence[int], frames: int, channels: int, latent_hw: tuple[int, int]) -> np.ndarray:
    """float32 [B, F, C, H, W]: one video's noise per seed (an int seed gives B = 1)."""
    seeds = [seeds] if isinstance(seeds, (int, np.integer)) else list(seeds)
    shape = (1, frames, channels, *latent_hw)
    return np.concatenate([np.random.default_rng(int(s)).standard_normal(shape, np.float32) for s in seeds])


def batch_noise(seed, shape: tuple[int, ...]) -> np.ndarray:
    """float32 ``shape``: one float64 draw of ``default_rng(seed)`` for a whole batch, cast."""
    return np.random.default_rng(seed).standard_normal(shape).astype(np.float32)


def renoise_draws(seed: int, block: int, steps: int, chunk_shape: tuple[int, ...]) -> np.ndarray:
    """float32 [steps - 1, *chunk_shape]: the re-noise draws of one block (``steps`` denoising steps)."""
    return np.random.default_rng((seed, block)).standard_normal((steps - 1, *chunk_shape), np.float32)
