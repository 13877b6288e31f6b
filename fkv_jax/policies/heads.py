"""Per-head tables: Forcing-KV's offline static/dynamic classification, and per-head importance scores.

The Forcing-KV JSON format (both shapes are accepted)::

    {"format": "forcingkv_offline_head_custom2", "profile": ..., "num_layers": L, "num_heads": H,
     "description": ..., "layers": [{"layer_idx": 0, "static_head": [...], "dynamic_head": [...]}, ...]}
    [{"layer_idx": 0, "static_head": [...], "dynamic_head": [...]}, ...]           (bare list, Krea 14B)

Layers missing from a table are all-dynamic, as in the official code.

Importance files use Focused Forcing's format: ``{"<layer * num_heads + head>": score, ...}``.
"""

from __future__ import annotations

import dataclasses
import json
from pathlib import Path

import numpy as np

from fkv_jax import presets
from fkv_jax.policies.base import ValueHashed

FORMAT = "forcingkv_offline_head_custom2"


@dataclasses.dataclass(frozen=True, eq=False)
class HeadTable(ValueHashed):
    """``dynamic[l, h]`` is True for a dynamic head, False for a static one."""

    dynamic: np.ndarray  # bool [L, H]
    profile: str = ""
    description: str = ""

    @property
    def num_layers(self) -> int:
        return self.dynamic.shape[0]

    @property
    def num_heads(self) -> int:
        return self.dynamic.shape[1]

    def counts(self) -> tuple[int, int]:
        """(static, dynamic) head counts."""
        d = int(self.dynamic.sum())
        return self.dynamic.size - d, d

    def to_json(self) -> dict:
        return {
            "format": FORMAT,
            "profile": self.profile,
            "num_layers": self.num_layers,
            "num_heads": self.num_heads,
            "description": self.description,
            "layers": [
                {
                    "layer_idx": i,
                    "static_head": [int(h) for h in np.flatnonzero(~row)],
                    "dynamic_head": [int(h) for h in np.flatnonzero(row)],
                }
                for i, row in enumerate(self.dynamic)
            ],
        }

    def save(self, path: str | Path) -> None:
        Path(path).write_text(json.dumps(self.to_json(), indent=2) + "\n")

    @classmethod
    def all_static(cls, num_layers: int, num_heads: int) -> "HeadTable":
        return cls(np.zeros((num_layers, num_heads), bool), profile="all_static")


def packaged_head_tables() -> list[str]:
    """Names of the head tables shipped with the package (``selfforcing``, ``longlive``, ...)."""
    return presets.names("heads")


def resolve_head_table(name_or_path: str | Path) -> Path:
    """A path as given, or a packaged table by short name (e.g. ``selfforcing``)."""
    p = Path(name_or_path)
    if p.is_file() or p.suffix == ".json" or "/" in str(name_or_path):
        return p
    packaged = presets.path("heads", str(name_or_path))
    if packaged is None:
        raise ValueError(
            f"head table {name_or_path!r} is neither a file nor a packaged table ({', '.join(packaged_head_tables())})"
        )
    return Path(str(packaged))


def load_head_table(path: str | Path, num_layers: int, num_heads: int) -> HeadTable:
    """Read a Forcing-KV head table (a path or a packaged name) and check it against the model's sizes."""
    path = resolve_head_table(path)
    try:
        raw = json.loads(path.read_text())
    except FileNotFoundError:
        raise ValueError(f"head table not found: {path}") from None
    except json.JSONDecodeError as e:
        raise ValueError(f"head table {path} is not valid JSON: {e}") from None
    if isinstance(raw, dict):
        for key, want in (("num_layers", num_layers), ("num_heads", num_heads)):
            if key in raw and int(raw[key]) != want:
                raise ValueError(f"head table {path} is for {key}={raw[key]}, the model has {want}")
        layers = raw.get("layers")
        profile, description = str(raw.get("profile", "")), str(raw.get("description", ""))
    else:
        layers, profile, description = raw, "", ""
    if not isinstance(layers, list):
        raise ValueError(f"head table {path}: expected a list of layers")
    dynamic = np.ones((num_layers, num_heads), bool)
    for entry in layers:
        try:
            li, st, dy = int(entry["layer_idx"]), list(entry["static_head"]), list(entry["dynamic_head"])
        except (KeyError, TypeError, ValueError) as e:
            raise ValueError(f"head table {path}: malformed layer entry {entry!r}") from e
        if not 0 <= li < num_layers:
            raise ValueError(f"head table {path}: layer_idx {li} out of range for {num_layers} layers")
        heads = st + dy
        if any(not 0 <= h < num_heads for h in heads) or len(set(heads)) != len(heads):
            raise ValueError(f"head table {path}: layer {li} has out-of-range or repeated heads {sorted(heads)}")
        if len(heads) != num_heads:
            raise ValueError(f"head table {path}: layer {li} classifies {len(heads)} of {num_heads} heads")
        dynamic[li] = False
        dynamic[li, dy] = True
    return HeadTable(dynamic, profile, description)


def load_importance(path: str | Path, num_layers: int, num_heads: int) -> np.ndarray:
    """Per-head importance float64 [L, H] from ``{"<layer * num_heads + head>": score}``."""
    path = Path(path)
    try:
        raw = json.loads(path.read_text())
    except FileNotFoundError:
        raise ValueError(f"head importance file not found: {path}") from None
    except json.JSONDecodeError as e:
        raise ValueError(f"head importance file {path} is not valid JSON: {e}") from None
    n = num_layers * num_heads
    keys = sorted(int(k) for k in raw)
    if keys != list(range(n)):
        missing = sorted(set(range(n)) - set(keys))[:10]
        raise ValueError(
            f"head importance file {path} must have one score per head 0..{n - 1} "
            f"(layer * {num_heads} + head); missing e.g. {missing}, has {len(keys)} entries"
        )
    return np.asarray([float(raw[str(i)]) for i in range(n)], np.float64).reshape(num_layers, num_heads)


def save_importance(path: str | Path, scores: np.ndarray) -> None:
    flat = np.asarray(scores, np.float64).reshape(-1)
    Path(path).write_text(json.dumps({str(i): float(s) for i, s in enumerate(flat)}, indent=1) + "\n")
