"""The Wan2.1 video VAE: Flax NNX modules (channel-last), explicit causal feature cache, streaming decode.

from fkv_jax.vae import VAE
vae = VAE.load("DIR/vae")                     # converted by `python -m checkpoints_convert`
video = vae.decode(latents)                   # [B, F, 16, h, w] model space -> [B, 1 + 4(F-1), 8h, 8w, 3]
dec = vae.stream()                            # chunk by chunk, as the sampler emits them
frames = dec(latents[:, :3])                  # 9 frames, then 12 per later chunk of 3

from fkv_jax.vae import TAEHV                 # the tiny preview decoder, the same calls (fkv_jax/vae/taehv.py)
tae = TAEHV.load("DIR/taehv")                 # converted by `fkv convert --taehv taew2_1.pth --output DIR`
"""

from fkv_jax.vae.codec import FORMAT, VAE, StreamingDecoder, load_vae, read_vae_config, save_vae
from fkv_jax.vae.taehv import (
    TAEHV,
    TAEHVConfig,
    TAEHVDecoder,
    TAEHVState,
    TAEHVStreamingDecoder,
    load_taehv,
    read_taehv_config,
    save_taehv,
)
from fkv_jax.vae.model import WAN21_LATENTS_MEAN, WAN21_LATENTS_STD, VAEConfig, WanVAE, abstract_params

__all__ = [
    "FORMAT",
    "VAE",
    "VAEConfig",
    "StreamingDecoder",
    "TAEHV",
    "TAEHVConfig",
    "TAEHVDecoder",
    "TAEHVState",
    "TAEHVStreamingDecoder",
    "WAN21_LATENTS_MEAN",
    "WAN21_LATENTS_STD",
    "WanVAE",
    "abstract_params",
    "load_taehv",
    "load_vae",
    "read_taehv_config",
    "read_vae_config",
    "save_taehv",
    "save_vae",
]
