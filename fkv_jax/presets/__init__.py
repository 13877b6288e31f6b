"""Packaged presets: JSON files by kind, read with one loader.

Kinds: ``models`` (:class:`~fkv_jax.config.ModelConfig`), ``samplers`` (:class:`~fkv_jax.config.SamplerConfig`;
``toy`` is the toy-world model's), ``policies`` (each policy's paper defaults) and ``heads`` (published
Forcing-KV head tables, ``forcingkv_heads_<name>.json``).
"""

from __future__ import annotations

import json
from importlib import resources
from importlib.abc import Traversable
from typing import Any

KINDS = ("models", "samplers", "policies", "heads")
_PREFIX = {"heads": "forcingkv_heads_"}


def _folder(kind: str) -> Traversable:
    if kind not in KINDS:
        raise ValueError(f"unknown preset kind {kind!r}; kinds: {', '.join(KINDS)}")
    return resources.files(__name__) / kind


def names(kind: str) -> list[str]:
    """The preset names of one kind, sorted."""
    prefix = _PREFIX.get(kind, "")
    return sorted(
        p.name[len(prefix) : -5]
        for p in _folder(kind).iterdir()
        if p.name.endswith(".json") and p.name.startswith(prefix)
    )


def path(kind: str, name: str) -> Traversable | None:
    """The packaged file of preset ``name`` of ``kind``, or None if there is none."""
    p = _folder(kind) / f"{_PREFIX.get(kind, '')}{name}.json"
    return p if p.is_file() else None


def load(kind: str, name: str) -> dict[str, Any]:
    """The JSON of preset ``name`` of ``kind``; a ValueError listing the available names otherwise."""
    p = path(kind, name)
    if p is None:
        raise ValueError(f"unknown {kind[:-1]} preset {name!r}; available: {', '.join(names(kind))}")
    return json.loads(p.read_text())
