"""The ``Selection``: the contract between KV selection policies and attention backends.

For one layer and one query chunk of ``C`` frames, a policy says what each (query frame group, head) reads:

* ``frames: int32[B, Qf, H, K]``: cache slots, **left-packed** (valid entries first, ``-1`` padding after),
  ``K`` a static maximum budget; a per-head budget is expressed by padding. ``Qf = C`` for per-frame
  policies (Focused Forcing) or 1 when the whole chunk shares one selection.
* ``chunk_mask: bool[B, Qf, H, C]`` (optional): which frames of the current chunk are allowed (a policy may
  drop some); default all.
* ``mem_k, mem_v: [B, M, H, Dh]`` with ``mem_valid: bool[B, H, M]`` (optional): extra memory tokens, e.g.
  Forcing-KV's segment buffer or token-level picks, already rotated.

Attention for (b, qf, h) is a softmax over {the selected slots' tokens} U {allowed chunk frames' tokens} U
{valid memory tokens}. Every backend computes exactly that; the XLA reference defines the numbers.
"""

from __future__ import annotations

import dataclasses

import jax
import jax.numpy as jnp
from jaxtyping import Array, Bool, Float, Int


@dataclasses.dataclass(frozen=True)
class Selection:
    frames: Int[Array, "B Qf H K"]  # left-packed slots, -1 = unused
    chunk_mask: Bool[Array, "B Qf H C"] | None = None
    mem_k: Float[Array, "B M H Dh"] | None = None
    mem_v: Float[Array, "B M H Dh"] | None = None
    mem_valid: Bool[Array, "B H M"] | None = None

    @property
    def num_query_groups(self) -> int:
        return self.frames.shape[1]

    @property
    def budget(self) -> int:
        return self.frames.shape[3]


jax.tree_util.register_dataclass(
    Selection, data_fields=["frames", "chunk_mask", "mem_k", "mem_v", "mem_valid"], meta_fields=[]
)


def pack_mask(mask: jax.Array, budget: int | None = None) -> jax.Array:
    """bool[..., N] slot mask -> int32[..., K] left-packed slot indices (ascending), -1 padded.

    ``budget`` (K) defaults to N; with a smaller K the caller guarantees no row has more than K slots.
    """
    n = mask.shape[-1]
    k = n if budget is None else budget
    idx = jnp.arange(n, dtype=jnp.int32)
    # sort key: selected slots first in ascending order, unselected after
    key = jnp.where(mask, idx, n + idx)
    order = jnp.sort(key, axis=-1)[..., :k]
    return jnp.where(order < n, order, -1).astype(jnp.int32)


def from_slot_mask(slot_mask: jax.Array, batch: int, num_heads: int, budget: int | None = None) -> Selection:
    """A Selection equivalent to a dense slot mask ``bool[B|1, Qf, H|1, N]``."""
    b, qf, h, n = slot_mask.shape
    full = jnp.broadcast_to(slot_mask, (batch, qf, num_heads, n))
    return Selection(frames=pack_mask(full, budget))


def to_slot_mask(sel: Selection, num_slots: int) -> jax.Array:
    """bool[B, Qf, H, N]: the slots a Selection reads (for tests and the dense path)."""
    onehot = (sel.frames[..., None] == jnp.arange(num_slots)) & (sel.frames[..., None] >= 0)
    return onehot.any(axis=-2)
