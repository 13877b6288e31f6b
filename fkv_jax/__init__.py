"""fkv_jax: JAX/Flax inference for autoregressive video diffusion with a fixed-shape KV cache.

Public surface::

    import fkv_jax
    fkv_jax.count_params("wan2.1-t2v-1.3b")            # 1418996800, abstract build
    cfg = fkv_jax.model_preset("tiny")
    model = fkv_jax.init_model(cfg, seed=0)             # or fkv_jax.load_transformer(converted_dir)
    graphdef, params = nnx.split(model, nnx.Param)
    sampler = fkv_jax.Sampler(graphdef, cfg, fkv_jax.sampler_preset("self_forcing"),
                              batch=1, latent_hw=(8, 12), num_frames=9)
    latents = sampler.generate(params, context, noise, seed=0)
"""

from fkv_jax.cache.kv_cache import CacheGeometry, init_cache
from fkv_jax.config import ModelConfig, SamplerConfig, list_presets, model_preset, sampler_preset
from fkv_jax.model.build import abstract_model, count_params, init_model
from fkv_jax.model.transformer import CausalWanModel
from fkv_jax.sampling.rollout import Rollout, Sampler, rollout
from fkv_jax.sampling.scheduler import make_schedule

__version__ = "0.1.0"


def load_transformer(path, dtype=None):
    """Load a converted checkpoint directory: returns (ModelConfig, CausalWanModel)."""
    from fkv_jax.checkpoint import load_transformer as _load

    return _load(path, dtype=dtype)


__all__ = [
    "CacheGeometry",
    "CausalWanModel",
    "ModelConfig",
    "Rollout",
    "Sampler",
    "SamplerConfig",
    "abstract_model",
    "count_params",
    "init_cache",
    "init_model",
    "list_presets",
    "load_transformer",
    "make_schedule",
    "model_preset",
    "rollout",
    "sampler_preset",
]
