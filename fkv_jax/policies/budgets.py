"""Budget allocators: how many frames or tokens each layer and head may keep.

* :func:`fixed_budgets`: the same budget everywhere.
* :func:`importance_budgets`: Focused Forcing's ``round(min + x^gamma (max - min))`` from per-head importance.
* :func:`pyramid_budgets`: PyramidKV's per-layer schedule, decreasing linearly from the first layer to the
  last with the same total as a uniform budget (host side, static).
* :func:`uniform_head_budgets` / :func:`adakv_head_budgets`: per-head token budgets of one layer from the
  candidates' scores, traced (they run inside the jitted chunk step). Ada-KV takes the global top-B of the
  scores of all heads of a layer, after guaranteeing every head ``floor(alpha * B / H)`` of its own best.

The per-head results are counts; a policy expresses them by padding (``mem_valid`` for memory tokens,
``-1`` slots for frames), so shapes stay static.
"""

from __future__ import annotations

import math

import jax
import jax.numpy as jnp
import numpy as np

ALLOCATORS = ("uniform", "adakv")


def importance_budgets(importance: np.ndarray, min_budget: int, max_budget: int, gamma: float = 2.0) -> np.ndarray:
    """int32 [L, H] budgets b = round(min + x^gamma (max - min)), x min-max normalised over all heads.

    Rounding is Python's (half to even). With ``min_budget == max_budget`` the importance is not needed.
    """
    if min_budget == max_budget:
        return np.full(np.shape(importance), min_budget, np.int32)
    s = np.asarray(importance, np.float64)
    lo, hi = s.min(), s.max()
    x = (s - lo) / (hi - lo) if hi > lo else np.zeros_like(s)
    return np.asarray(
        [round(min_budget + v**gamma * (max_budget - min_budget)) for v in x.reshape(-1)], np.int32
    ).reshape(s.shape)


def fixed_budgets(num_layers: int, num_heads: int, budget: int) -> np.ndarray:
    """int32 [L, H], every head ``budget``."""
    return np.full((num_layers, num_heads), budget, np.int32)


def pyramid_budgets(num_layers: int, avg_budget: int, beta: float = 20.0) -> np.ndarray:
    """PyramidKV's per-layer budgets: int32 [L], arithmetic from ``2 * avg - avg / beta`` (layer 0) down to
    ``avg / beta`` (last layer), rounded so that the total is exactly ``num_layers * avg_budget``.

    PyramidKV computes ``min = avg // beta``, ``max = 2 * avg - min`` and integer steps, so its total drifts
    by up to a step per layer; here the real-valued line is rounded by the largest-remainder rule (ties to the
    lower layer), which keeps the schedule non-increasing and the total exact.
    """
    if num_layers < 1 or avg_budget < 0 or beta < 1:
        raise ValueError(f"need num_layers >= 1, avg_budget >= 0, beta >= 1; got {num_layers}, {avg_budget}, {beta}")
    if num_layers == 1:
        return np.array([avg_budget], np.int32)
    lo = avg_budget / beta
    hi = 2.0 * avg_budget - lo
    raw = np.linspace(hi, lo, num_layers)
    base = np.floor(raw + 1e-9).astype(np.int64)
    short = num_layers * avg_budget - int(base.sum())
    order = np.argsort(-(raw - base), kind="stable")  # largest fractional part first, lower layer on ties
    base[order[:short]] += 1
    return base.astype(np.int32)


def uniform_head_budgets(valid: jax.Array, budget) -> jax.Array:
    """int32 [..., H]: ``min(budget, valid candidates of the head)``. valid: bool [..., H, N]."""
    return jnp.minimum(jnp.asarray(budget, jnp.int32), valid.sum(-1).astype(jnp.int32))


def adakv_floor(total, num_heads: int, alpha: float):
    """Tokens every head is guaranteed under Ada-KV's safeguard: ``floor(alpha * total / H)``."""
    return (jnp.asarray(total, jnp.float32) * alpha / num_heads).astype(jnp.int32)


def adakv_head_budgets(
    scores: jax.Array, valid: jax.Array, total, alpha: float = 0.2, cap: int | None = None
) -> jax.Array:
    """Ada-KV allocation of one layer's budget ``total`` (B) over its heads.

    Args:
      scores: float [..., H, N] candidate scores, comparable across heads (e.g. attention mass).
      valid: bool [..., H, N] which candidates exist.
      total: B, the layer's token budget (static or traced).
      alpha: safeguard: each head first gets its own top ``floor(alpha * B / H)`` (Ada-KV's ``floor_alpha``).
      cap: optional per-head maximum (the capacity of a fixed-shape per-head buffer).
    Returns:
      int32 [..., H] per-head budgets. Their sum is ``min(B, sum_h min(cap, valid_h))``; every head gets at
      least ``min(floor, cap, valid_h)``; beyond the floor, tokens go to the highest scores of the whole layer
      (ties to the lower head, then the lower candidate index). Within a head the kept tokens are always its
      own top-b by score, so the counts are all a policy needs.
    """
    h, n = scores.shape[-2:]
    s = jnp.where(valid, scores.astype(jnp.float32), -jnp.inf)
    order = jnp.argsort(-s, axis=-1, stable=True)
    rank = jnp.argsort(order, axis=-1, stable=True)  # rank of each candidate within its head
    prio = jnp.where(rank < adakv_floor(total, h, alpha), jnp.inf, s)
    ok = valid if cap is None else valid & (rank < cap)
    prio = jnp.where(ok, prio, -jnp.inf)
    flat = prio.reshape(*prio.shape[:-2], h * n)
    grank = jnp.argsort(jnp.argsort(-flat, axis=-1, stable=True), axis=-1, stable=True)
    take = (grank < jnp.asarray(total, jnp.int32)) & (flat > -jnp.inf)
    return take.reshape(prio.shape).sum(-1).astype(jnp.int32)


def head_capacity(per_head_budget: int, num_heads: int, allocator: str, cap_ratio: float) -> int:
    """Static per-head buffer size for one layer: the budget itself (uniform) or ``ceil(cap_ratio * budget)``
    bounded by the layer total (Ada-KV, whose heads may take more than the average)."""
    if allocator == "uniform":
        return per_head_budget
    if allocator == "adakv":
        return min(per_head_budget * num_heads, int(math.ceil(cap_ratio * per_head_budget)))
    raise ValueError(f"unknown allocator {allocator!r}; choose one of {ALLOCATORS}")


__all__ = [
    "ALLOCATORS",
    "adakv_floor",
    "adakv_head_budgets",
    "fixed_budgets",
    "head_capacity",
    "importance_budgets",
    "pyramid_budgets",
    "uniform_head_budgets",
]
