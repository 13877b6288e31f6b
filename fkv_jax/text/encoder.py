"""The converted text-encoder directory and the prompt -> embedding path.

A converted text encoder is a directory like a converted transformer (:mod:`fkv_jax.checkpoint`)::

    DIR/config.json   {"format": "fkv_jax.text_encoder", "format_version": 1, "text_encoder": UMT5Config.to_dict(),
                       "dtype": ..., "source": {...}}
    DIR/params/       Orbax checkpoint of the encoder's pure param dict (blocks stacked on a leading [L] axis)
"""

from __future__ import annotations

from collections.abc import Mapping, Sequence
from pathlib import Path
from typing import Any

import jax
import jax.numpy as jnp
import numpy as np
from flax import nnx

from fkv_jax.checkpoint import CheckpointError, read_meta, restore_checkpoint_params, save_checkpoint_dir
from fkv_jax.text.tokenizer import UMT5Tokenizer
from fkv_jax.text.umt5 import UMT5Config, UMT5Encoder, abstract_encoder, abstract_params, relative_position_buckets

FORMAT = "fkv_jax.text_encoder"
FORMAT_VERSION = 1


def save_text_encoder(
    path: str | Path,
    cfg: UMT5Config,
    params: Mapping,
    dtype: Any,
    source: Mapping[str, Any],
    *,
    overwrite: bool = False,
) -> Path:
    """Write a converted text encoder atomically (see :func:`fkv_jax.checkpoint.save_checkpoint_dir`)."""
    config = {"format": FORMAT, "format_version": FORMAT_VERSION, "text_encoder": cfg.to_dict()}
    return save_checkpoint_dir(path, config, params, dtype, source, abstract_params(cfg), overwrite=overwrite)


def read_text_encoder_config(path: str | Path) -> UMT5Config:
    """The config of a converted text encoder (cheap: reads config.json only)."""
    meta = read_meta(path, FORMAT, FORMAT_VERSION)
    try:
        return UMT5Config.from_dict(meta["text_encoder"])
    except (KeyError, TypeError, ValueError) as e:
        raise CheckpointError(f"{Path(path) / 'config.json'}: bad text encoder config: {e}") from None


def load_text_encoder(path: str | Path, dtype: Any = None) -> tuple[UMT5Config, UMT5Encoder]:
    """Load a converted text encoder as ``(cfg, UMT5Encoder)``; ``dtype`` defaults to the stored one."""
    meta = read_meta(path, FORMAT, FORMAT_VERSION)
    cfg = read_text_encoder_config(path)
    params = restore_checkpoint_params(path, abstract_params(cfg), meta["dtype"], dtype)
    gdef, state = nnx.split(abstract_encoder(cfg, jax.tree.leaves(params)[0].dtype), nnx.Param)
    nnx.replace_by_pure_dict(state, params)
    return cfg, nnx.merge(gdef, state)


class TextEncoder:
    """UMT5 encoder (+ tokenizer): prompts -> ``[B, text_len, dim]`` float32, zero past each prompt's length.

    The jitted encoder compiles once per (batch, length) shape.
    """

    def __init__(self, cfg: UMT5Config, model: UMT5Encoder, tokenizer: UMT5Tokenizer | None = None):
        self.cfg, self.tokenizer = cfg, tokenizer
        self._graphdef, self.params = nnx.split(model, nnx.Param)
        graphdef = self._graphdef

        def run(params, ids, mask, buckets):
            out = nnx.merge(graphdef, params)(ids, mask, buckets).astype(jnp.float32)
            lens = (mask > 0).sum(axis=1)
            keep = jnp.arange(ids.shape[1])[None, :] < lens[:, None]
            return jnp.where(keep[..., None], out, 0.0)

        self._run = jax.jit(run)

    @classmethod
    def load(cls, encoder_dir: str | Path, tokenizer_dir: str | Path | None = None, dtype: Any = None) -> "TextEncoder":
        cfg, model = load_text_encoder(encoder_dir, dtype)
        tok = UMT5Tokenizer(tokenizer_dir, cfg.text_len) if tokenizer_dir is not None else None
        return cls(cfg, model, tok)

    def encode_ids(self, ids, mask) -> np.ndarray:
        """Token ids and attention mask (int [B, L]) -> ``[B, L, dim]`` float32, zero past each row's length."""
        ids, mask = np.asarray(ids), np.asarray(mask)
        if ids.ndim != 2 or ids.shape != mask.shape:
            raise ValueError(f"ids and mask must both be [B, L]; got {ids.shape} and {mask.shape}")
        if ids.size and (ids.min() < 0 or ids.max() >= self.cfg.vocab_size):
            raise ValueError(f"token ids must be in [0, {self.cfg.vocab_size}); got [{ids.min()}, {ids.max()}]")
        l = ids.shape[1]
        buckets = relative_position_buckets(l, l, self.cfg.num_buckets, self.cfg.max_dist)
        out = self._run(self.params, jnp.asarray(ids, jnp.int32), jnp.asarray(mask, jnp.int32), jnp.asarray(buckets))
        return np.asarray(out)

    def encode(self, prompts: str | Sequence[str]) -> np.ndarray:
        """Prompts -> ``[B, text_len, dim]`` float32 (tokenized, padded to ``text_len``, encoded, zeroed)."""
        if self.tokenizer is None:
            raise ValueError("this TextEncoder has no tokenizer: load it with a tokenizer folder")
        ids, mask = self.tokenizer(list([prompts] if isinstance(prompts, str) else prompts))
        return self.encode_ids(ids, mask)


def encode_token_ids(encoder_dir: str | Path, ids, mask) -> np.ndarray:
    """The converted encoder in ``encoder_dir`` on given token ids and attention mask (int [B, L]):
    ``[B, L, dim]`` float32, zeroed past each sequence's length (``mask.gt(0).sum(1)``)."""
    return TextEncoder.load(encoder_dir).encode_ids(ids, mask)
