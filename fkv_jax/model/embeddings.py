"""Timestep sinusoid and patch (un)embedding helpers for the Wan2.1 DiT."""

from __future__ import annotations

import jax
import jax.numpy as jnp
import numpy as np


def timestep_sinusoid_np(t, freq_dim: int) -> np.ndarray:
    """Wan's sinusoidal timestep embedding computed on the host in float64 (as upstream), cast to float32.

    ``[cos(t * w), sin(t * w)]`` with ``w_i = 10000^(-i / half)``: cos half first. ``t`` can be any shape;
    the result has shape ``t.shape + (freq_dim,)``. Angles reach ~1000 rad, so computing them in float32
    would cost ~1e-5 relative accuracy; the sampler's timesteps are known up front, so we do it here.
    """
    t = np.asarray(t, dtype=np.float64)
    half = freq_dim // 2
    w = np.power(10000.0, -np.arange(half, dtype=np.float64) / half)
    ang = t[..., None] * w
    return np.concatenate([np.cos(ang), np.sin(ang)], axis=-1).astype(np.float32)


def timestep_sinusoid(t: jax.Array, freq_dim: int) -> jax.Array:
    """In-graph float32 version of :func:`timestep_sinusoid_np` (for traced timesteps, e.g. training)."""
    half = freq_dim // 2
    w = jnp.asarray(np.power(10000.0, -np.arange(half, dtype=np.float64) / half), jnp.float32)
    ang = t.astype(jnp.float32)[..., None] * w
    return jnp.concatenate([jnp.cos(ang), jnp.sin(ang)], axis=-1)


def patchify(x: jax.Array, patch_hw: tuple[int, int]) -> jax.Array:
    """[B, F, C, H, W] latents -> [B, F * gh * gw, C * ph * pw] patch vectors ordered (c, kh, kw).

    Tokens are in (f, y, x) row-major order, the order of Wan's Conv3d patch embedding output.
    """
    b, f, c, h, w = x.shape
    ph, pw = patch_hw
    x = x.reshape(b, f, c, h // ph, ph, w // pw, pw)
    x = x.transpose(0, 1, 3, 5, 2, 4, 6)  # [B, F, gh, gw, C, ph, pw]
    return x.reshape(b, f * (h // ph) * (w // pw), c * ph * pw)


def unpatchify(x: jax.Array, num_frames: int, grid_hw: tuple[int, int], patch_hw: tuple[int, int], c: int) -> jax.Array:
    """[B, F * gh * gw, ph * pw * C] head output (channel index = q*pw*C + r*C + c) -> [B, F, C, H, W]."""
    b = x.shape[0]
    gh, gw = grid_hw
    ph, pw = patch_hw
    x = x.reshape(b, num_frames, gh, gw, ph, pw, c)
    x = x.transpose(0, 1, 6, 2, 4, 3, 5)  # [B, F, C, gh, ph, gw, pw]
    return x.reshape(b, num_frames, c, gh * ph, gw * pw)
