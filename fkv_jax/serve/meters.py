"""What the page's meters show, counted inside the chunk step or from the cache geometry.

*Keys read per query*: for one attention call of one layer, the number of key tokens a query attends to (the
selected cache slots' tokens, the allowed frames of its own chunk, and the policy's memory tokens), the count
:mod:`fkv_jax.bench.policies` turns into FLOPs. :class:`~fkv_jax.policies.meter.KeyMeter` wraps a policy and
reports it per (row, head) in the select aux, so the chunk step returns ``[n + 1 calls, L, B, H]``; the plain
cache needs no wrapper: it reads every visible slot and the whole chunk, for every head.

*Full*: what the plain cache of the same sampler settings would read at that point of the video (the visible
window plus the chunk); the saving is ``1 - keys / full``.
"""

from __future__ import annotations

import numpy as np

from fkv_jax.policies.meter import KeyMeter

__all__ = ["KeyMeter", "full_keys", "keys_per_head"]


def keys_per_head(select_aux, num_layers: int, num_heads: int, batch: int) -> np.ndarray | None:
    """Mean keys read per query over the chunk's calls: float [B, L, H] from a KeyMeter aux, else None."""
    if not isinstance(select_aux, tuple) or len(select_aux) != 2:
        return None
    keys = np.asarray(select_aux[1], np.float32)  # [n + 1, L, B, H]
    if keys.ndim != 4 or keys.shape[1:] != (num_layers, batch, num_heads):
        return None
    return keys.mean(axis=0).transpose(1, 0, 2)


def full_keys(sampler_cfg, tokens_per_frame: int, start_frame: int) -> int:
    """Keys per query the plain cache reads for a chunk starting at ``start_frame``: the window's history frames
    (all earlier frames for a global cache) plus the chunk."""
    c, las = sampler_cfg.frames_per_block, sampler_cfg.local_attn_size
    history = start_frame if las == -1 else min(start_frame, las - c)
    return (history + c) * tokens_per_frame
