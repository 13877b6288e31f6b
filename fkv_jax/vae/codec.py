"""The converted VAE directory and the jitted decode / encode built on :class:`fkv_jax.vae.model.WanVAE`.

A converted VAE is a directory like a converted transformer (:mod:`fkv_jax.checkpoint`)::

    DIR/config.json   {"format": "fkv_jax.vae", "format_version": 1, "vae": VAEConfig.to_dict(),
                       "dtype": ..., "source": ...}
    DIR/params/       Orbax checkpoint of the VAE's pure param dict (channel-last kernels)

Latents use the sampler's layout ``[B, F, 16, h, w]`` in model space (normalised, what the DiT produces);
videos are channel-last ``[B, T, H, W, 3]`` in [-1, 1].
"""

from __future__ import annotations

import functools
from collections.abc import Mapping
from pathlib import Path
from typing import Any

import jax
import jax.numpy as jnp
import numpy as np
from flax import nnx

from fkv_jax.checkpoint import CheckpointError, read_meta, restore_checkpoint_params, save_checkpoint_dir
from fkv_jax.vae.model import VAEConfig, WanVAE, abstract_params, abstract_vae

FORMAT = "fkv_jax.vae"
FORMAT_VERSION = 1
ENCODE_CHUNK = 4  # frames per encoder call after the first (fixed upstream, whatever the temporal factor)


def save_vae(
    path: str | Path, cfg: VAEConfig, params: Mapping, dtype: Any, source: Mapping[str, Any], *, overwrite: bool = False
) -> Path:
    """Write a converted VAE atomically (see :func:`fkv_jax.checkpoint.save_checkpoint_dir`)."""
    config = {"format": FORMAT, "format_version": FORMAT_VERSION, "vae": cfg.to_dict()}
    return save_checkpoint_dir(path, config, params, dtype, source, abstract_params(cfg), overwrite=overwrite)


def read_vae_config(path: str | Path) -> VAEConfig:
    """The config of a converted VAE (cheap: reads config.json only)."""
    meta = read_meta(path, FORMAT, FORMAT_VERSION)
    try:
        return VAEConfig.from_dict(meta["vae"])
    except (KeyError, TypeError, ValueError) as e:
        raise CheckpointError(f"{Path(path) / 'config.json'}: bad VAE config: {e}") from None


def load_vae(path: str | Path, dtype: Any = None) -> tuple[VAEConfig, WanVAE]:
    """Load a converted VAE as ``(cfg, WanVAE)``; ``dtype`` defaults to the stored one."""
    meta = read_meta(path, FORMAT, FORMAT_VERSION)
    cfg = read_vae_config(path)
    params = restore_checkpoint_params(path, abstract_params(cfg), meta["dtype"], dtype)
    gdef, state = nnx.split(abstract_vae(cfg, jax.tree.leaves(params)[0].dtype), nnx.Param)
    nnx.replace_by_pure_dict(state, params)
    return cfg, nnx.merge(gdef, state)


def _decode_step_fn(graphdef, params, z, cache):
    """One latent frame ``z [B, 1, h, w, C]`` (model space) -> video frames ``[B, 1|4, H, W, 3]`` (not clamped)
    and the new cache; ``cache=None`` starts a video."""
    y, cache = nnx.merge(graphdef, params).decode_step(z, cache)
    return y.astype(jnp.float32), cache


def _encode_step_fn(graphdef, params, video, cache):
    """A chunk of frames ``[B, 1|4, H, W, 3]`` -> normalised mu ``[B, 1, h, w, C]``, new cache."""
    mu, cache = nnx.merge(graphdef, params).encode_step(video, cache)
    return mu.astype(jnp.float32), cache


# XLA:CPU compiler options for the VAE: its time goes to convolution library calls, so LLVM's optimisation of the
# small fused element-wise kernels bought no measurable speed in our runs (a real-width decoder step at a 16x26
# latent took the same time at either level) while it took most of the compile time.
CPU_COMPILER_OPTIONS = {"xla_backend_optimization_level": 0}


@functools.cache
def _jitted(name: str):
    """The jitted step, built on first use (module-level, so every VAE of one structure shares executables:
    two per latent size, the first frame and every later one)."""
    fn = {"decode": _decode_step_fn, "encode": _encode_step_fn}[name]
    opts = CPU_COMPILER_OPTIONS if jax.default_backend() == "cpu" else None
    return jax.jit(fn, static_argnums=(0,), compiler_options=opts)


def _decode_step(graphdef, params, z, cache):
    return _jitted("decode")(graphdef, params, z, cache)


def _encode_step(graphdef, params, video, cache):
    return _jitted("encode")(graphdef, params, video, cache)


class VAE:
    """A loaded VAE with jitted decode / encode, one latent frame (4 video frames) per call like upstream's
    loops: the whole-video and the streaming decode run the very same two executables."""

    def __init__(self, cfg: VAEConfig, model: WanVAE):
        self.cfg = cfg
        self.graphdef, self.params = nnx.split(model, nnx.Param)

    @classmethod
    def load(cls, path: str | Path, dtype: Any = None) -> "VAE":
        return cls(*load_vae(path, dtype))

    def _check_latents(self, latents) -> jax.Array:
        lat = jnp.asarray(latents, jnp.float32)
        if lat.ndim != 5 or lat.shape[2] != self.cfg.z_dim:
            raise ValueError(
                f"latents must be [B, F, {self.cfg.z_dim}, h, w] (the sampler's layout), got {tuple(lat.shape)}"
            )
        return lat

    def decode_chunk(self, latents, cache=None, *, clamp: bool = True):
        """Decode the next latent frames ``[B, T, C, h, w]`` of B videos: ``(video [B, T', H, W, 3] float32, new
        cache)``. ``cache=None`` starts the videos: a first latent frame gives 1 frame, every later one 4.

        Samples are decoded one at a time (the same FLOPs as a batch, a quarter of the activations for B = 4,
        and one executable for every batch size); ``cache`` is the list of their feature caches.
        """
        # committed (like the caches the steps return), whether the latents come from numpy or from the sampler:
        # one executable per step either way
        z = jax.device_put(jnp.transpose(self._check_latents(latents), (0, 1, 3, 4, 2)), jax.local_devices()[0])
        caches = [None] * z.shape[0] if cache is None else list(cache)
        if len(caches) != z.shape[0]:
            raise ValueError(f"the cache holds {len(caches)} videos, the latents {z.shape[0]}")
        videos = []
        for i in range(z.shape[0]):
            outs = []
            for t in range(z.shape[1]):
                y, caches[i] = _decode_step(self.graphdef, self.params, z[i : i + 1, t : t + 1], caches[i])
                outs.append(y)
            videos.append(np.concatenate([np.asarray(y) for y in outs], axis=1))
        video = np.concatenate(videos, axis=0)
        return (np.clip(video, -1.0, 1.0) if clamp else video), caches

    def decode(self, latents, *, clamp: bool = True) -> np.ndarray:
        """Whole-video decode: latents ``[B, F, C, h, w]`` (model space) -> ``[B, 1 + 4 (F - 1), H, W, 3]``,
        clamped to [-1, 1] unless ``clamp=False``."""
        return self.decode_chunk(latents, None, clamp=clamp)[0]

    def encode(self, video) -> np.ndarray:
        """Video ``[B, 1 + 4k, H, W, 3]`` in [-1, 1] -> normalised latent mean ``[B, 1 + k, C, h, w]`` (Wan2.1's
        4x temporal factor): the first frame alone, then chunks of 4 frames (upstream's loop)."""
        v = jnp.asarray(video, jnp.float32)
        sf = self.cfg.spatial_factor
        if v.ndim != 5 or v.shape[-1] != 3 or (v.shape[1] - 1) % ENCODE_CHUNK or v.shape[2] % sf or v.shape[3] % sf:
            raise ValueError(
                f"video must be [B, 1 + {ENCODE_CHUNK}k, H, W, 3] with H, W multiples of {sf}, got {tuple(v.shape)}"
            )
        out = []
        for i in range(v.shape[0]):  # one sample at a time, like decode
            cache, mus = None, []
            for start, stop in [(0, 1)] + [(t, t + ENCODE_CHUNK) for t in range(1, v.shape[1], ENCODE_CHUNK)]:
                mu, cache = _encode_step(self.graphdef, self.params, v[i : i + 1, start:stop], cache)
                mus.append(np.asarray(mu))
            out.append(np.concatenate(mus, axis=1))
        return np.concatenate(out, axis=0).transpose(0, 1, 4, 2, 3)

    def stream(self, *, clamp: bool = True) -> "StreamingDecoder":
        return StreamingDecoder(self, clamp=clamp)


class StreamingDecoder:
    """Decode a video chunk by chunk as the sampler emits it; the feature cache is carried between calls.

    ``dec(latent_chunk [B, C_blk, 16, h, w]) -> np.ndarray [B, T', H, W, 3]``.
    """

    def __init__(self, vae: VAE, *, clamp: bool = True):
        self.vae, self.clamp, self.cache = vae, clamp, None
        self.frames_out = 0

    def __call__(self, latents) -> np.ndarray:
        video, self.cache = self.vae.decode_chunk(latents, self.cache, clamp=self.clamp)
        self.frames_out += video.shape[1]
        return video
