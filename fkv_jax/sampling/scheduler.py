"""Flow-matching schedule of Self Forcing / CausVid (host-side numpy, computed once per run).

The training table: ``sigma_raw = linspace(1, 0, 1001)[:-1]``, ``sigma = shift*s / (1 + (shift-1)*s)``,
``timesteps = 1000 * sigma`` (float32, as upstream). A denoising list ``[1000, 750, 500, 250]`` is *warped*
by reading ``concat(timesteps, [0])[1000 - list]`` (-> 1000, 937.5, 833.33, 625 for shift 5). Sigmas of any
timestep are looked up by nearest table entry. The model predicts flow ``v``; ``x0 = x_t - sigma * v``;
re-noising to the next level is ``(1 - sigma') * x0 + sigma' * eps``.
"""

from __future__ import annotations

import dataclasses

import numpy as np

from fkv_jax.config import SamplerConfig

NUM_TRAIN_TIMESTEPS = 1000


def training_table(shift: float) -> tuple[np.ndarray, np.ndarray]:
    """(sigmas, timesteps), float32 [1000] each."""
    s = np.linspace(1.0, 0.0, NUM_TRAIN_TIMESTEPS + 1, dtype=np.float32)[:-1]
    sig = (np.float32(shift) * s / (np.float32(1) + np.float32(shift - 1) * s)).astype(np.float32)
    return sig, (sig * np.float32(NUM_TRAIN_TIMESTEPS)).astype(np.float32)


def sigma_of(t: float, sigmas: np.ndarray, timesteps: np.ndarray) -> float:
    """Sigma of the nearest table timestep (upstream's lookup), as a Python float."""
    return float(sigmas[int(np.argmin(np.abs(timesteps.astype(np.float64) - float(t))))])


@dataclasses.dataclass(frozen=True)
class Schedule:
    """Per-step numbers for one sampler config. ``timesteps[i]`` enters the model at step i; step ``n`` is the
    clean pass at t = 0."""

    timesteps: np.ndarray  # float32 [n + 1] (last = context_noise = 0)
    sigmas: np.ndarray  # float32 [n + 1] flow -> x0 sigma of each call
    renoise_sigmas: np.ndarray  # float32 [n - 1] sigma used to re-noise after step i (= sigma of step i+1)

    @property
    def num_steps(self) -> int:
        return len(self.timesteps) - 1


def make_schedule(sampler: SamplerConfig) -> Schedule:
    sig, ts = training_table(sampler.shift)
    steps = np.asarray(sampler.denoising_steps, dtype=np.float64)
    if sampler.warp_denoising_step:
        ext = np.concatenate([ts, np.zeros(1, np.float32)])
        idx = (NUM_TRAIN_TIMESTEPS - steps).astype(np.int64)
        if np.any(idx < 0) or np.any(idx > NUM_TRAIN_TIMESTEPS) or np.any(idx != NUM_TRAIN_TIMESTEPS - steps):
            raise ValueError(
                f"warped denoising steps must be integers in [0, 1000], got {list(sampler.denoising_steps)}"
            )
        t = ext[idx].astype(np.float32)
    else:
        t = steps.astype(np.float32)
    all_t = np.concatenate([t, np.asarray([sampler.context_noise], np.float32)])
    sigmas = np.asarray([sigma_of(x, sig, ts) for x in all_t], np.float32)
    return Schedule(timesteps=all_t, sigmas=sigmas, renoise_sigmas=sigmas[1:-1].copy())
