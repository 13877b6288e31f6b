"""Where every array of a rollout lives on a ``(data, model)`` mesh.

* model params: attention q/k/v (self and cross) split on their output (heads) axis, with the q/k RMSNorm
  scales; the attention output projection on its input (heads) axis; the FFN on its hidden axis (fc1 out,
  fc2 in); everything else replicated. Each device then holds whole heads, so attention needs no
  communication; XLA inserts the all-reduces after the o projection, the FFN and the full-width RMSNorm.
* KV cache ``k, v: [L, B, H, N, T, Dh]``: batch on ``data``, heads on ``model``; slot bookkeeping replicated.
* cross-attention K/V ``[L, B, Lt, H, Dh]``: batch on ``data``, heads on ``model``.
* per-chunk inputs and outputs (noise, re-noise, latents): batch on ``data``.
"""

from __future__ import annotations

import jax
from jax.sharding import Mesh, NamedSharding
from jax.sharding import PartitionSpec as P

from fkv_jax.config import ModelConfig

CACHE_KV = P(None, "data", "model", None, None, None)  # [L, B, H, N, T, Dh]
CONTEXT_KV = P(None, "data", None, "model", None)  # [L, B, Lt, H, Dh]
HEADS = P("data", None, "model", None)  # [B, S, H, Dh] activations, [B, Qf, H, K] selections


def param_spec(path: tuple[str, ...], ndim: int) -> P:
    """PartitionSpec of one parameter from its path in the NNX state (block params have a leading [L] axis)."""
    *parents, name = path
    owner = parents[-1] if parents else ""
    in_attn = "self_attn" in parents or "cross_attn" in parents
    if (in_attn and owner in ("q", "k", "v")) or ("ffn" in parents and owner == "fc1"):
        return P(*([None] * (ndim - 1)), "model")  # kernel [L, D, out] / bias [L, out]: split the output
    if in_attn and owner in ("norm_q", "norm_k"):
        return P(None, "model")  # [L, D], matches q/k
    if ((in_attn and owner == "o") or ("ffn" in parents and owner == "fc2")) and name == "kernel":
        return P(None, "model", None)  # [L, in, D]: split the input
    return P()


def check_divisible(cfg: ModelConfig, mesh: Mesh, batch: int) -> None:
    model, data = mesh.shape["model"], mesh.shape["data"]
    if cfg.num_heads % model or cfg.ffn_dim % model:
        raise ValueError(f"model axis {model} must divide num_heads={cfg.num_heads} and ffn_dim={cfg.ffn_dim}")
    if batch % data:
        raise ValueError(f"data axis {data} must divide the batch {batch}")


def param_shardings(params, mesh: Mesh):
    """NamedShardings with the structure of ``params`` (an NNX ``State`` or nested dict of arrays)."""

    def spec(path, x):
        keys = tuple(str(getattr(k, "key", getattr(k, "name", k))) for k in path)
        keys = tuple(k for k in keys if k != "value")
        return NamedSharding(mesh, param_spec(keys, x.ndim))

    return jax.tree_util.tree_map_with_path(spec, params)


def cache_shardings(mesh: Mesh) -> dict:
    """Shardings of the cache dict ``{"k", "v", "slot_frame", "next_frame"}``."""
    kv, rep = NamedSharding(mesh, CACHE_KV), NamedSharding(mesh, P())
    return {"k": kv, "v": kv, "slot_frame": rep, "next_frame": rep}


def batch_sharding(mesh: Mesh, ndim: int, batch_axis: int = 0) -> NamedSharding:
    """Batch axis on ``data``, the rest replicated."""
    spec = [None] * ndim
    spec[batch_axis] = "data"
    return NamedSharding(mesh, P(*spec))
