"""Declarative map from the original Wan2.1 transformer key names to fkv_jax parameter paths.

One table row per tensor: Wan name -> (path in the Flax param tree, transform). Block rows use the name
after ``blocks.{i}.``; their tensors are stacked on a leading layer axis in the Flax tree. Each transform
knows both directions of the shape mapping, so the same table validates a checkpoint (expected Wan shapes
from a config) and converts it.
"""

from __future__ import annotations

import dataclasses
import re
from collections.abc import Callable

import numpy as np

from fkv_jax.config import ModelConfig


@dataclasses.dataclass(frozen=True)
class Transform:
    name: str
    apply: Callable[[np.ndarray], np.ndarray]  # Wan tensor -> Flax tensor


IDENTITY = Transform("identity", lambda a: a)
# torch Linear weight [out, in] -> Flax kernel [in, out]
LINEAR = Transform("transpose", lambda a: a.T)
# [1, k, D] modulation table -> [k, D]
SQUEEZE0 = Transform("squeeze0", lambda a: a.reshape(a.shape[1:]))
# Conv3d weight [D, C, kt, kh, kw] with kernel = stride -> Linear kernel [C*kt*kh*kw, D] on (c, kt, kh, kw) patches
CONV_PATCH = Transform("conv_patch", lambda a: a.reshape(a.shape[0], -1).T)

TOP_LEVEL: dict[str, tuple[str, Transform]] = {
    "patch_embedding.weight": ("patch_embedding/kernel", CONV_PATCH),
    "patch_embedding.bias": ("patch_embedding/bias", IDENTITY),
    "text_embedding.0.weight": ("text_embedding/fc1/kernel", LINEAR),
    "text_embedding.0.bias": ("text_embedding/fc1/bias", IDENTITY),
    "text_embedding.2.weight": ("text_embedding/fc2/kernel", LINEAR),
    "text_embedding.2.bias": ("text_embedding/fc2/bias", IDENTITY),
    "time_embedding.0.weight": ("time_embedding/fc1/kernel", LINEAR),
    "time_embedding.0.bias": ("time_embedding/fc1/bias", IDENTITY),
    "time_embedding.2.weight": ("time_embedding/fc2/kernel", LINEAR),
    "time_embedding.2.bias": ("time_embedding/fc2/bias", IDENTITY),
    "time_projection.1.weight": ("time_projection/kernel", LINEAR),
    "time_projection.1.bias": ("time_projection/bias", IDENTITY),
    "head.head.weight": ("head/head/kernel", LINEAR),
    "head.head.bias": ("head/head/bias", IDENTITY),
    "head.modulation": ("head/modulation", SQUEEZE0),
}


def _block_rows() -> dict[str, tuple[str, Transform]]:
    rows: dict[str, tuple[str, Transform]] = {"modulation": ("modulation", SQUEEZE0)}
    for attn in ("self_attn", "cross_attn"):
        for p in ("q", "k", "v", "o"):
            rows[f"{attn}.{p}.weight"] = (f"{attn}/{p}/kernel", LINEAR)
            rows[f"{attn}.{p}.bias"] = (f"{attn}/{p}/bias", IDENTITY)
        for n in ("norm_q", "norm_k"):
            rows[f"{attn}.{n}.weight"] = (f"{attn}/{n}/scale", IDENTITY)
    rows["norm3.weight"] = ("norm3/scale", IDENTITY)
    rows["norm3.bias"] = ("norm3/bias", IDENTITY)
    rows["ffn.0.weight"] = ("ffn/fc1/kernel", LINEAR)
    rows["ffn.0.bias"] = ("ffn/fc1/bias", IDENTITY)
    rows["ffn.2.weight"] = ("ffn/fc2/kernel", LINEAR)
    rows["ffn.2.bias"] = ("ffn/fc2/bias", IDENTITY)
    return rows


PER_BLOCK: dict[str, tuple[str, Transform]] = _block_rows()
BLOCK_KEY = re.compile(r"^blocks\.(\d+)\.(.+)$")


def lookup(name: str) -> tuple[str, Transform] | None:
    """The row of one Wan name: (Flax param path, transform), or None if the name is not a Wan parameter.

    Block rows get the path inside the stacked ``blocks`` tree (``blocks/self_attn/q/kernel``).
    """
    if name in TOP_LEVEL:
        return TOP_LEVEL[name]
    m = BLOCK_KEY.match(name)
    if m is None or m[2] not in PER_BLOCK:
        return None
    path, tf = PER_BLOCK[m[2]]
    return f"blocks/{path}", tf


def expected_shapes(cfg: ModelConfig) -> dict[str, tuple[int, ...]]:
    """Every Wan key of a model with this config and its PyTorch shape (825 keys for the 1.3B model)."""
    d, f, pt_, ph, pw = cfg.dim, cfg.ffn_dim, *cfg.patch_size
    top = {
        "patch_embedding.weight": (d, cfg.in_dim, pt_, ph, pw),
        "patch_embedding.bias": (d,),
        "text_embedding.0.weight": (d, cfg.text_dim),
        "text_embedding.0.bias": (d,),
        "text_embedding.2.weight": (d, d),
        "text_embedding.2.bias": (d,),
        "time_embedding.0.weight": (d, cfg.freq_dim),
        "time_embedding.0.bias": (d,),
        "time_embedding.2.weight": (d, d),
        "time_embedding.2.bias": (d,),
        "time_projection.1.weight": (6 * d, d),
        "time_projection.1.bias": (6 * d,),
        "head.head.weight": (cfg.out_patch_dim, d),
        "head.head.bias": (cfg.out_patch_dim,),
        "head.modulation": (1, 2, d),
    }
    block = {
        "modulation": (1, 6, d),
        "norm3.weight": (d,),
        "norm3.bias": (d,),
        "ffn.0.weight": (f, d),
        "ffn.0.bias": (f,),
        "ffn.2.weight": (d, f),
        "ffn.2.bias": (d,),
    }
    for attn in ("self_attn", "cross_attn"):
        for p in ("q", "k", "v", "o"):
            block[f"{attn}.{p}.weight"] = (d, d)
            block[f"{attn}.{p}.bias"] = (d,)
        block[f"{attn}.norm_q.weight"] = (d,)
        block[f"{attn}.norm_k.weight"] = (d,)
    assert set(block) == set(PER_BLOCK) and set(top) == set(TOP_LEVEL)
    out = dict(top)
    for i in range(cfg.num_layers):
        out.update({f"blocks.{i}.{k}": s for k, s in block.items()})
    return out


def _set(tree: dict, path: str, value) -> None:
    *parents, leaf = path.split("/")
    for p in parents:
        tree = tree.setdefault(p, {})
    tree[leaf] = value


def to_flax_params(wan: dict[str, np.ndarray], cfg: ModelConfig, dtype=np.float32) -> dict:
    """Convert a complete, validated Wan state dict (numpy arrays) into the nested Flax param dict."""
    tree: dict = {}
    for key, (path, tf) in TOP_LEVEL.items():
        _set(tree, path, np.ascontiguousarray(tf.apply(wan[key])).astype(dtype))
    blocks: dict = {}
    for key, (path, tf) in PER_BLOCK.items():
        first = tf.apply(wan[f"blocks.0.{key}"])
        stacked = np.empty((cfg.num_layers, *first.shape), dtype)
        for i in range(cfg.num_layers):
            stacked[i] = tf.apply(wan[f"blocks.{i}.{key}"])
        _set(blocks, path, stacked)
    tree["blocks"] = blocks
    return tree
