"""The shipped toy-world model: loading, text context, and video generation with the KV-cache Sampler.

    from fkv_jax.toyworld.model import generate_video
    frames = generate_video(["a red circle and a blue square"], num_frames=24, seed=0)   # [1, 24, 3, 24, 24]

Generation is the real AR rollout of :class:`fkv_jax.sampling.rollout.Sampler` (per chunk of 3 frames: the
denoising steps, then the clean t = 0 pass whose K/V go to the cache), in pixel space, so there is no VAE.
"""

from __future__ import annotations

import dataclasses
from pathlib import Path

import jax
import jax.numpy as jnp
import numpy as np
from flax import nnx

from fkv_jax.config import ModelConfig, SamplerConfig, sampler_preset
from fkv_jax.model.build import abstract_model
from fkv_jax.model.transformer import CausalWanModel
from fkv_jax.sampling.noise import batch_noise
from fkv_jax.sampling.rollout import Sampler, rollout
from fkv_jax.toyworld.text import ToyTextEncoder, tokenize
from fkv_jax.toyworld.weights import (
    WEIGHTS_DIR,
    _abstract_text_encoder,
    load_params,
    weights_prediction,
    weights_train_frames,
)

TOY_DIR = Path(__file__).resolve().parent

__all__ = [
    "WEIGHTS_DIR",
    "ToyModel",
    "build",
    "generate_video",
    "load_params",
    "load_toy_model",
    "save_video",
    "toy_context",
    "toy_policy_options",
    "toy_sampler_config",
    "weights_prediction",
    "weights_train_frames",
]


def toy_sampler_config(weights: str | Path | None = None, **overrides) -> SamplerConfig:
    """The toy model's default sampler (the ``toy`` sampler preset), with optional overrides.

    ``prediction`` (what the model outputs, x0 or flow) and the rolling window ``local_attn_size`` (the
    training clip length, so every attention distance is one training saw) come from the weights'
    ``config.json`` (the training config it was trained with), the shipped weights by default.
    """
    sc = sampler_preset("toy")
    pred = weights_prediction(weights)
    if pred is not None:
        sc = dataclasses.replace(sc, prediction=pred)
    clip = weights_train_frames(weights)
    if clip is not None and clip >= sc.frames_per_block:
        sc = dataclasses.replace(sc, local_attn_size=clip)
    return dataclasses.replace(sc, **overrides) if overrides else sc


def toy_policy_options(policy: str, cfg: ModelConfig) -> dict[str, str]:
    """Option defaults a KV policy needs on a toy model: Forcing-KV segments each frame by rows of its token
    grid (4 for a 4x4 grid, 6 for 6x6; the preset's 6 segments fit the 1.3B model's frames, not every grid)."""
    if policy == "forcing_kv":
        return {"num_frame_patch": str(cfg.grid_hw(cfg.latent_hw)[0])}
    return {}


def build(cfg: ModelConfig, params: dict) -> tuple[CausalWanModel, ToyTextEncoder]:
    """Modules with the given pure-dict params (shapes checked by ``replace_by_pure_dict``)."""
    out = []
    for abstract, key in ((abstract_model(cfg), "model"), (_abstract_text_encoder(cfg), "text")):
        gdef, state = nnx.split(abstract, nnx.Param)
        nnx.replace_by_pure_dict(state, jax.tree.map(jnp.asarray, params[key]))
        out.append(nnx.merge(gdef, state))
    return out[0], out[1]


class ToyModel:
    """The toy-world model as explicit values: config, graph, params and text encoder, plus the samplers it has
    built (one per sampler config, batch and cache size; each compiles its chunk step once).

    Build with :meth:`load`; keep the object for as many videos as you like, drop it to free everything.
    """

    def __init__(
        self, cfg: ModelConfig, model: CausalWanModel, text_encoder: ToyTextEncoder, weights: str | Path | None = None
    ):
        self.cfg, self.text_encoder, self.weights = cfg, text_encoder, weights
        self.graphdef, self.params = nnx.split(model, nnx.Param)
        self._samplers: dict = {}

    @classmethod
    def load(cls, path: str | Path | None = None) -> "ToyModel":
        """From the shipped weights (default) or an exported directory."""
        cfg, model, enc = load_toy_model(path)
        return cls(cfg, model, enc, path)

    def context(self, prompts: list[str]) -> np.ndarray:
        """Text context float32 [B, text_len, text_dim] of the prompts."""
        return toy_context(prompts, self.text_encoder, self.cfg)

    def sampler(self, sampler_cfg: SamplerConfig | None = None, batch: int = 1, num_frames: int = 24) -> Sampler:
        """The sampler for this configuration (built once per configuration and kept by this object)."""
        sc = sampler_cfg or toy_sampler_config(self.weights)
        cap = num_frames if sc.local_attn_size == -1 else None
        key = (sc, batch, cap)
        if key not in self._samplers:
            self._samplers[key] = Sampler(
                self.graphdef, self.cfg, sc, batch=batch, latent_hw=self.cfg.latent_hw, num_frames=num_frames
            )
        return self._samplers[key]

    def generate(
        self,
        prompts: list[str],
        num_frames: int,
        seed: int = 0,
        sampler_cfg: SamplerConfig | None = None,
        *,
        progress: bool = False,
        return_latents: bool = False,
    ) -> np.ndarray:
        """One video per prompt with the KV-cache AR rollout: frames float32 [B, T, 3, H, W] in [-1, 1].

        ``seed`` seeds the initial noise (``default_rng(seed)``, all prompts drawn together) and the re-noise
        draws (:func:`fkv_jax.sampling.noise.renoise_draws`); ``return_latents`` returns the raw model output
        instead of clipping to [-1, 1].
        """
        sampler = self.sampler(sampler_cfg, len(prompts), num_frames)
        sampler.check_length(num_frames)
        noise = batch_noise(seed, (len(prompts), num_frames, self.cfg.in_dim, *self.cfg.latent_hw))
        out = rollout(sampler, self.params, [self.context(prompts)], noise, seed=seed, progress=progress).latents
        return out if return_latents else np.clip(out, -1.0, 1.0)


def load_toy_model(path: str | Path | None = None) -> tuple[ModelConfig, CausalWanModel, ToyTextEncoder]:
    """(ModelConfig, CausalWanModel, text encoder) from the shipped weights (or an exported directory); new
    modules on every call (keep a :class:`ToyModel` to reuse them)."""
    cfg, params = load_params(None if path is None else str(path))
    model, enc = build(cfg, params)
    return cfg, model, enc


def toy_context(
    prompts: list[str], text_encoder: ToyTextEncoder | None = None, cfg: ModelConfig | None = None
) -> np.ndarray:
    """Text context float32 [B, text_len, text_dim] of the prompts (zero rows past each prompt's length)."""
    if text_encoder is None:
        cfg, _, text_encoder = load_toy_model()
    ids, _ = tokenize(list(prompts), text_encoder.text_len)
    return np.asarray(jax.jit(lambda m, i: m(i))(text_encoder, jnp.asarray(ids)), np.float32)


def generate_video(
    prompts: list[str],
    num_frames: int,
    seed: int = 0,
    sampler_cfg: SamplerConfig | None = None,
    *,
    weights: str | Path | None = None,
    progress: bool = False,
    return_latents: bool = False,
) -> np.ndarray:
    """:meth:`ToyModel.generate` of a freshly loaded model (``weights``: default the shipped ones). Keep a
    :class:`ToyModel` when generating several videos: its samplers compile once."""
    return ToyModel.load(weights).generate(
        prompts, num_frames, seed, sampler_cfg, progress=progress, return_latents=return_latents
    )


def save_video(path: str | Path, frames: np.ndarray, fps: int = 8, scale: int = 8) -> Path:
    """mp4 (H.264, yuv420p) of frames [T, 3, H, W] or [B, T, 3, H, W] (tiled), upscaled by nearest neighbour."""
    from fkv_jax.toyworld.video import save_mp4

    return save_mp4(path, frames, fps=fps, scale=scale)
