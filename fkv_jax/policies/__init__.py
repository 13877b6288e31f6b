"""KV selection policies: small pure pieces composed into Forcing-KV, Focused Forcing and baselines.

    from fkv_jax.policies import make_policy
    policy = make_policy("forcing_kv", head_table="forcingkv_heads_selfforcing.json", num_layers=30, num_heads=12)
    sampler = fkv_jax.Sampler(graphdef, cfg, sampler_cfg, batch=1, latent_hw=(60, 104), policy=policy)

Every policy has a preset of its paper's defaults in ``fkv_jax/presets/policies/NAME.json``; options use the
upstream configuration names where one exists. A new policy is a frozen dataclass subclassing
:class:`~fkv_jax.policies.base.Policy` (see README, "Writing a policy").
"""

from __future__ import annotations

import dataclasses
import types
import typing
from pathlib import Path
from typing import Any

from fkv_jax import presets
from fkv_jax.policies.base import Call, Policy, WriteCall, dense_selection
from fkv_jax.policies.dense import Full, SinkWindow, Window
from fkv_jax.policies.budgets import importance_budgets
from fkv_jax.policies.focused_forcing import FocusedForcing, FocusedForcingLongLive
from fkv_jax.policies.forcing_kv import ForcingKV
from fkv_jax.policies.heads import HeadTable, load_head_table, load_importance
from fkv_jax.policies.deep_forcing import DeepForcing
from fkv_jax.policies.dummy_forcing import DummyForcing
from fkv_jax.policies.llm_baselines import H2O, RKV, SnapKV

POLICIES: dict[str, type[Policy]] = {
    "full": Full,
    "window": Window,
    "sink_window": SinkWindow,
    "forcing_kv": ForcingKV,
    "focused_forcing": FocusedForcing,
    "focused_forcing_longlive": FocusedForcingLongLive,
    "dummy_forcing": DummyForcing,
    "deep_forcing": DeepForcing,
    "h2o": H2O,
    "snapkv": SnapKV,
    "rkv": RKV,
}


def register(name: str, cls: type[Policy]) -> type[Policy]:
    """Make a user policy available to :func:`make_policy` and ``--policy``."""
    POLICIES[name] = cls
    return cls


def preset(name: str) -> dict[str, Any]:
    """The preset options of a policy (its paper's defaults); {} when it has no preset file."""
    if presets.path("policies", name) is None:
        return {}
    d = presets.load("policies", name)
    d.pop("description", None)
    return d


def _coerce(cls, key: str, value: Any) -> Any:
    """Turn a CLI string into the field's type (int, float, bool, str, optional)."""
    if not isinstance(value, str):
        return value
    hints = typing.get_type_hints(cls)
    typ = hints.get(key, str)
    args = typing.get_args(typ)
    if typing.get_origin(typ) in (typing.Union, types.UnionType):
        if value.lower() in ("none", "null", ""):
            return None
        typ = next(a for a in args if a is not type(None))
    if typ is bool:
        if value.lower() in ("1", "true", "yes", "on"):
            return True
        if value.lower() in ("0", "false", "no", "off"):
            return False
        raise ValueError(f"option {key}={value!r} is not a boolean")
    if typ in (int, float, str):
        try:
            return typ(value)
        except ValueError:
            raise ValueError(f"option {key}={value!r} is not a {typ.__name__}") from None
    raise ValueError(f"option {key} cannot be set from the command line")


def make_policy(
    name: str,
    options: dict[str, Any] | None = None,
    *,
    head_table: str | Path | HeadTable | None = None,
    head_importance: str | Path | Any = None,
    num_layers: int | None = None,
    num_heads: int | None = None,
) -> Policy:
    """Build a policy from its preset, overridden by ``options`` (values may be CLI strings)."""
    if name not in POLICIES:
        raise ValueError(f"unknown policy {name!r}; available: {', '.join(sorted(POLICIES))}")
    cls = POLICIES[name]
    fields = {f.name for f in dataclasses.fields(cls)}
    opts = {**preset(name), **(options or {})}
    unknown = sorted(set(opts) - fields)
    if unknown:
        settable = sorted(fields - {"head_table", "importance"})
        raise ValueError(f"policy {name} has no option(s) {unknown}; options: {settable}")
    kw = {k: _coerce(cls, k, v) for k, v in opts.items()}
    if head_table is not None:
        if "head_table" not in fields:
            raise ValueError(f"policy {name} takes no head table")
        if not isinstance(head_table, HeadTable):
            if num_layers is None or num_heads is None:
                raise ValueError("loading a head table needs num_layers and num_heads")
            head_table = load_head_table(head_table, num_layers, num_heads)
        kw["head_table"] = head_table
    if head_importance is not None:
        if "importance" not in fields:
            raise ValueError(f"policy {name} takes no head importance")
        if isinstance(head_importance, (str, Path)):
            if num_layers is None or num_heads is None:
                raise ValueError("loading head importance needs num_layers and num_heads")
            head_importance = load_importance(head_importance, num_layers, num_heads)
        kw["importance"] = head_importance
    return cls(**kw)


def parse_options(pairs: list[str]) -> dict[str, str]:
    """``["key=value", ...]`` (the repeatable ``--policy-opt``) -> dict."""
    out = {}
    for p in pairs:
        key, sep, value = p.partition("=")
        if not sep or not key.strip():
            raise ValueError(f"--policy-opt must look like KEY=VALUE, got {p!r}")
        out[key.strip()] = value.strip()
    return out


__all__ = [
    "Call",
    "DeepForcing",
    "DummyForcing",
    "H2O",
    "RKV",
    "SnapKV",
    "FocusedForcing",
    "FocusedForcingLongLive",
    "ForcingKV",
    "Full",
    "HeadTable",
    "POLICIES",
    "Policy",
    "SinkWindow",
    "Window",
    "WriteCall",
    "dense_selection",
    "importance_budgets",
    "load_head_table",
    "load_importance",
    "make_policy",
    "parse_options",
    "preset",
    "register",
]
