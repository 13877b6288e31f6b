"""LongLive LoRA adapters: read a PEFT ``lora.pt`` and merge it into Wan Linear weights.

A LongLive ``lora.pt`` is ``{"generator_lora": state dict, ...}`` (or a raw state dict) with keys
``base_model.model.blocks.{i}.<module>.lora_A.weight`` [r, in] and ``.lora_B.weight`` [out, r]. The merge is
``W += (alpha / r) * B @ A`` in float32, with ``alpha = r`` unless given (LongLive: alpha = rank, scale 1).
"""

from __future__ import annotations

import dataclasses
import re
from pathlib import Path

import numpy as np

from fkv_jax.convert import layouts, wan_keymap
from fkv_jax.convert.errors import ConvertError
from fkv_jax.convert.readers import select_state_dict, torch_load

PREFERRED_KEYS = ("generator_lora",)
PEFT_SEGMENTS = ("base_model",)  # PEFT's wrapper, dropped on top of the usual wrapper segments
LORA_KEY = re.compile(r"^(?P<module>.+)\.lora_(?P<part>[AB])\.weight$")


@dataclasses.dataclass(frozen=True)
class LoraPair:
    """The two factors of one adapted Linear layer."""

    a: np.ndarray  # [r, in]
    b: np.ndarray  # [out, r]
    a_key: str  # stored names, for error messages
    b_key: str

    @property
    def rank(self) -> int:
        return self.a.shape[0]


@dataclasses.dataclass(frozen=True)
class Lora:
    """A LoRA adapter: Wan module name (e.g. ``blocks.0.self_attn.q``) -> its factors."""

    path: Path
    key: str | None  # top-level entry of the file (``generator_lora``) or None for a raw state dict
    pairs: dict[str, LoraPair]


def read_lora(path: str | Path) -> Lora:
    """Read and pair up the factors of a PEFT LoRA ``.pt``; raises naming any key that is not a LoRA factor."""
    path = Path(path)
    if not path.exists():
        raise ConvertError(f"LoRA file {path} does not exist")
    key, sd = select_state_dict(torch_load(path), path, None, PREFERRED_KEYS, key_flag=None)
    parts: dict[str, dict[str, tuple[str, np.ndarray]]] = {}
    for stored, tensor in sd.items():
        m = LORA_KEY.match(layouts.strip_wrappers(stored, PEFT_SEGMENTS))
        if m is None:
            raise ConvertError(f"{path}: {stored!r} is not a LoRA factor (expected <module>.lora_A/lora_B.weight)")
        parts.setdefault(m["module"], {})[m["part"]] = (stored, tensor.detach().float().numpy())
    pairs = {}
    for module, ab in parts.items():
        if set(ab) != {"A", "B"}:
            have = next(iter(ab.values()))[0]
            raise ConvertError(f"{path}: {have!r} has no matching lora_{'B' if 'A' in ab else 'A'} factor")
        (a_key, a), (b_key, b) = ab["A"], ab["B"]
        if a.ndim != 2 or b.ndim != 2 or a.shape[0] != b.shape[1]:
            raise ConvertError(
                f"{path}: {a_key!r} {list(a.shape)} and {b_key!r} {list(b.shape)} are not [r, in] / [out, r]"
            )
        pairs[module] = LoraPair(a=a, b=b, a_key=a_key, b_key=b_key)
    return Lora(path=path, key=key, pairs=pairs)


def merge_lora(wan: dict[str, np.ndarray], lora: Lora, alpha: float | None = None) -> dict[str, np.ndarray]:
    """Wan state dict with every adapted Linear weight replaced by ``W + (alpha / r) * B @ A`` (float32).

    ``alpha`` defaults to each pair's rank (scale 1). Every factor must adapt an existing Linear weight of
    the right shape; otherwise the error names the LoRA key.
    """
    merged = dict(wan)
    for module, pair in lora.pairs.items():
        target = f"{module}.weight"
        row = wan_keymap.lookup(target)
        if target not in wan or row is None or row[1] is not wan_keymap.LINEAR:
            raise ConvertError(
                f"{lora.path}: LoRA key {pair.a_key!r} adapts {target!r}, not a Linear weight of the base model"
            )
        w = wan[target]
        if (pair.b.shape[0], pair.a.shape[1]) != w.shape:
            raise ConvertError(
                f"{lora.path}: LoRA keys {pair.a_key!r} {list(pair.a.shape)} / {pair.b_key!r} {list(pair.b.shape)} "
                f"do not fit {target!r} {list(w.shape)}"
            )
        scale = np.float32((pair.rank if alpha is None else alpha) / pair.rank)
        merged[target] = (w.astype(np.float32) + scale * (pair.b @ pair.a)).astype(np.float32)
    return merged
