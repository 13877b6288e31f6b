"""The toy world's text side: a closed-vocabulary word tokenizer and a small learned text encoder.

The encoder stands where UMT5 stands for the real models: it produces the context ``[B, L, text_dim]``
that the transformer's own text MLP (``text_embedding``) maps to its width for cross-attention. Rows past
the prompt's length are exactly zero, as upstream pads the UMT5 output.

To bind an adjective to its noun ("a red circle and a blue square" vs "a blue circle and a red square"),
each token sees its predecessor: ``h_i = e_i + pos_i + MLP([e_i, e_{i-1}])``.
"""

from __future__ import annotations

import re

import jax
import jax.numpy as jnp
import numpy as np
from flax import nnx

from fkv_jax.toyworld.world import COLOUR_NAMES, SHAPES

PAD = "<pad>"
VOCAB: tuple[str, ...] = (PAD, "a", "and", "with", "pillar", *COLOUR_NAMES, *SHAPES)
_INDEX = {w: i for i, w in enumerate(VOCAB)}


def words(prompt: str) -> list[str]:
    return re.findall(r"[a-z]+", prompt.lower())


def tokenize(prompts: list[str], text_len: int) -> tuple[np.ndarray, np.ndarray]:
    """Prompts -> (ids int32 [B, text_len] padded with 0, lengths int32 [B]).

    Raises ValueError on a word outside the vocabulary or a prompt longer than ``text_len`` tokens.
    """
    ids = np.zeros((len(prompts), text_len), np.int32)
    lens = np.zeros((len(prompts),), np.int32)
    for b, p in enumerate(prompts):
        ws = words(p)
        unknown = sorted({w for w in ws if w not in _INDEX or w == PAD})
        if unknown:
            raise ValueError(
                f"prompt {p!r} has words outside the toy vocabulary: {unknown}; known words: {', '.join(VOCAB[1:])}"
            )
        if not ws:
            raise ValueError("empty prompt")
        if len(ws) > text_len:
            raise ValueError(f"prompt {p!r} has {len(ws)} words, more than text_len={text_len}")
        ids[b, : len(ws)] = [_INDEX[w] for w in ws]
        lens[b] = len(ws)
    return ids, lens


class ToyTextEncoder(nnx.Module):
    """ids [B, L] -> context [B, L, text_dim], zero rows where ids == 0 (padding)."""

    def __init__(self, text_dim: int, text_len: int, *, hidden: int | None = None, rngs: nnx.Rngs):
        hidden = hidden or 2 * text_dim
        self.text_dim, self.text_len = text_dim, text_len
        self.embed = nnx.Embed(len(VOCAB), text_dim, rngs=rngs, embedding_init=nnx.initializers.normal(1.0))
        self.pos = nnx.Param(0.1 * jax.random.normal(rngs.params(), (text_len, text_dim)))
        self.fc1 = nnx.Linear(2 * text_dim, hidden, rngs=rngs)
        self.fc2 = nnx.Linear(hidden, text_dim, rngs=rngs)

    def __call__(self, ids: jax.Array) -> jax.Array:
        b, l = ids.shape
        e = self.embed(ids)  # [B, L, D]
        prev = jnp.pad(e, ((0, 0), (1, 0), (0, 0)))[:, :-1]
        h = e + self.pos[...][None, :l] + self.fc2(jax.nn.gelu(self.fc1(jnp.concatenate([e, prev], -1))))
        return h * (ids > 0)[..., None].astype(h.dtype)


def init_text_encoder(text_dim: int, text_len: int, seed: int = 0) -> ToyTextEncoder:
    return ToyTextEncoder(text_dim, text_len, rngs=nnx.Rngs(seed))
