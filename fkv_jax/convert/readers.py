"""Reading tensors from PyTorch pickles, safetensors files and sharded safetensors indexes.

:func:`open_checkpoint` returns a :class:`Source`: the stored tensor names with their shapes (cheap: no
tensor data is read for safetensors) and a function that reads one tensor as numpy with floating point
upcast to float32 (bf16/fp16 included). Names are returned as stored; unwrapping prefixes and mapping
diffusers names is the job of :mod:`fkv_jax.convert.layouts`.

PyTorch is imported only for ``.pt`` files; safetensors are read with the numpy framework (bf16 via
ml_dtypes), so converting a safetensors checkpoint does not need torch.
"""

from __future__ import annotations

import dataclasses
import json
import pickle
import zipfile
from collections.abc import Callable, Mapping
from pathlib import Path
from typing import Any

import numpy as np
from safetensors import safe_open

from fkv_jax.convert.errors import ConvertError

PT_SUFFIXES = (".pt", ".pth", ".ckpt")
SAFETENSORS_SUFFIX = ".safetensors"
INDEX_SUFFIX = ".safetensors.index.json"
# Top-level entries of a training checkpoint holding the generator, in order of preference
# (Self Forcing: generator_ema > generator; CausVid: generator; LongLive base: generator_ema/generator/model).
PREFERRED_KEYS = ("generator_ema", "generator", "model")
# A config.json beside safetensors weights is read only if it describes one of these model classes ...
MODEL_CONFIG_CLASSES = frozenset({"WanTransformer3DModel", "WanModel"})
# ... and only these fields, which fix sizes the tensor shapes cannot tell (config field -> ModelConfig field).
CONFIG_HINT_FIELDS = {"num_attention_heads": "num_heads", "num_heads": "num_heads", "text_len": "text_len"}
FLOAT_DTYPES = frozenset({"float16", "bfloat16", "float32", "float64"})


@dataclasses.dataclass(frozen=True)
class Source:
    """An opened checkpoint: stored tensor names, their shapes, and a reader for one tensor."""

    path: Path  # the file (or sharded index) the tensors come from
    container: str  # "pt" | "safetensors"
    key: str | None  # top-level entry chosen in a .pt; None for a raw state dict or safetensors
    shapes: dict[str, tuple[int, ...]]  # stored name -> shape
    read: Callable[[str], np.ndarray]  # stored name -> array, floating point as float32
    hints: dict[str, int] = dataclasses.field(default_factory=dict)  # sizes from a model config.json
    hints_file: Path | None = None  # where the hints came from


def as_float32(a: np.ndarray) -> np.ndarray:
    """Floating-point arrays (bf16, fp16, fp32, fp64) as float32; anything else unchanged."""
    return a.astype(np.float32, copy=False) if a.dtype.name in FLOAT_DTYPES else a


# ---- PyTorch pickles -------------------------------------------------------------------------------------


def _torch():
    try:
        import torch
    except ImportError:
        raise ConvertError(
            "reading .pt checkpoints needs PyTorch (pip install torch, CPU build); safetensors inputs do not"
        ) from None
    return torch


def torch_load(path: Path) -> Any:
    """``torch.load(path, map_location="cpu", weights_only=True)`` with clear errors naming the file.

    Zip-format files (every ``torch.save`` since 1.6) are memory-mapped: entries that are not converted
    (a critic, the other generator) are never read into memory.
    """
    torch = _torch()
    try:
        return torch.load(str(path), map_location="cpu", weights_only=True, mmap=zipfile.is_zipfile(path))
    except pickle.UnpicklingError as e:
        first = str(e).strip().splitlines()[0] if str(e).strip() else type(e).__name__
        raise ConvertError(f"{path}: torch.load(weights_only=True) refused the file: {first}") from None
    except Exception as e:  # noqa: BLE001 - torch raises OSError/RuntimeError/KeyError/... for damaged files
        raise ConvertError(
            f"cannot read {path} as a PyTorch checkpoint (truncated or corrupt?): {type(e).__name__}: {e}"
        ) from None


def _is_tensor_dict(obj: Any) -> bool:
    torch = _torch()
    return isinstance(obj, Mapping) and bool(obj) and all(isinstance(v, torch.Tensor) for v in obj.values())


def select_state_dict(
    obj: Any, path: Path, key: str | None, preferred: tuple[str, ...], key_flag: str | None = "--key"
) -> tuple[str | None, Mapping]:
    """Pick the state dict inside a loaded pickle: ``obj[key]``, else a raw tensor dict, else a preferred entry.

    Returns ``(chosen key or None, state dict)``; raises naming the file if nothing is a state dict
    (``key_flag``: the option that picks an entry, suggested in that error).
    """
    if not isinstance(obj, Mapping):
        raise ConvertError(f"{path} does not hold a state dict (it holds a {type(obj).__name__})")
    top = [str(k) for k in obj]
    if key is not None:
        if key not in obj:
            raise ConvertError(f"{path} has no top-level key {key!r}; available keys: {top}")
        chosen, sd = key, obj[key]
    elif _is_tensor_dict(obj):
        chosen, sd = None, obj
    else:
        found = [k for k in preferred if isinstance(obj.get(k), Mapping) and obj[k]]
        if not found:
            raise ConvertError(
                f"{path} holds no state dict: none of {list(preferred)} is a non-empty dict and the top level is "
                f"not a tensor dict; top-level keys: {top}" + (f" (choose one with {key_flag})" if key_flag else "")
            )
        chosen, sd = found[0], obj[found[0]]
    where = f"{path}[{chosen!r}]" if chosen is not None else str(path)
    if not isinstance(sd, Mapping) or not sd:
        what = "empty" if isinstance(sd, Mapping) else f"a {type(sd).__name__}"
        raise ConvertError(f"{where} is not a state dict (it is {what})")
    torch = _torch()
    for name, value in sd.items():
        if not isinstance(name, str) or not isinstance(value, torch.Tensor):
            raise ConvertError(f"{where} is not a state dict: entry {name!r} is a {type(value).__name__}, not a tensor")
    return chosen, sd


def _torch_to_numpy(t) -> np.ndarray:
    t = t.detach()
    return (t.float() if t.is_floating_point() else t).numpy()


def read_pt(path: Path, key: str | None = None) -> Source:
    """A Self Forcing / CausVid / LongLive ``.pt`` (or a raw state dict pickle)."""
    chosen, sd = select_state_dict(torch_load(path), path, key, PREFERRED_KEYS)
    return Source(
        path=path,
        container="pt",
        key=chosen,
        shapes={k: tuple(v.shape) for k, v in sd.items()},
        read=lambda name: _torch_to_numpy(sd[name]),
    )


# ---- safetensors -------------------------------------------------------------------------------------------


def _open_safetensors(file: Path):
    if not file.is_file():
        raise ConvertError(f"safetensors file {file} does not exist")
    try:
        return safe_open(str(file), framework="numpy")
    except Exception as e:  # noqa: BLE001 - SafetensorError is not importable as a stable name
        raise ConvertError(f"cannot read {file} as safetensors (truncated or corrupt?): {e}") from None


def _config_hints(folder: Path) -> tuple[dict[str, int], Path | None]:
    """Sizes from a diffusers/Wan model ``config.json`` in ``folder`` (num_heads, text_len), if there is one."""
    file = folder / "config.json"
    if not file.is_file():
        return {}, None
    try:
        cfg = json.loads(file.read_text())
    except (OSError, UnicodeDecodeError, json.JSONDecodeError) as e:
        raise ConvertError(f"{file} (beside the weights) is not valid JSON: {e}") from None
    if not isinstance(cfg, dict) or cfg.get("_class_name") not in MODEL_CONFIG_CLASSES:
        return {}, None
    hints = {dst: int(cfg[src]) for src, dst in CONFIG_HINT_FIELDS.items() if isinstance(cfg.get(src), int)}
    return hints, (file if hints else None)


def _safetensors_source(path: Path, weight_map: Mapping[str, Path]) -> Source:
    """Tensors spread over one or more safetensors files; ``weight_map``: name -> file."""
    handles = {f: _open_safetensors(f) for f in sorted(set(weight_map.values()))}
    shapes = {}
    for name, file in weight_map.items():
        try:
            shapes[name] = tuple(handles[file].get_slice(name).get_shape())
        except Exception:  # noqa: BLE001 - the binding raises its own error type for an absent name
            raise ConvertError(f"{path}: tensor {name!r} is not in {file}") from None
    hints, hints_file = _config_hints(path.parent)
    return Source(
        path=path,
        container="safetensors",
        key=None,
        shapes=shapes,
        read=lambda name: as_float32(handles[weight_map[name]].get_tensor(name)),
        hints=hints,
        hints_file=hints_file,
    )


def read_safetensors(path: Path) -> Source:
    """One ``.safetensors`` file (original Wan or diffusers names)."""
    handle = _open_safetensors(path)
    return _safetensors_source(path, {name: path for name in handle.keys()})


def read_index(path: Path) -> Source:
    """A sharded checkpoint: ``*.safetensors.index.json`` with a ``weight_map`` {tensor name: shard file}."""
    try:
        index = json.loads(path.read_text())
        weight_map = index["weight_map"]
        if not isinstance(weight_map, dict) or not weight_map:
            raise TypeError("weight_map is not a non-empty object")
    except (OSError, UnicodeDecodeError, json.JSONDecodeError, KeyError, TypeError) as e:
        raise ConvertError(f"{path} is not a safetensors index with a weight_map: {type(e).__name__}: {e}") from None
    return _safetensors_source(path, {name: path.parent / shard for name, shard in weight_map.items()})


# ---- dispatch ---------------------------------------------------------------------------------------------


def resolve_dir(folder: Path) -> Path:
    """The checkpoint file inside a directory: its one sharded index, else its one safetensors file,
    else the same search in ``transformer/`` (a diffusers pipeline folder)."""
    for pattern in (f"*{INDEX_SUFFIX}", f"*{SAFETENSORS_SUFFIX}"):
        found = sorted(folder.glob(pattern))
        if len(found) == 1:
            return found[0]
        if len(found) > 1:
            raise ConvertError(f"{folder} holds several {pattern} files ({[f.name for f in found]}); pass one of them")
    if (folder / "transformer").is_dir():
        return resolve_dir(folder / "transformer")
    raise ConvertError(
        f"no checkpoint in directory {folder} (expected *{INDEX_SUFFIX} or one *{SAFETENSORS_SUFFIX}; "
        "pass a .pt file itself)"
    )


def open_checkpoint(path: str | Path, key: str | None = None) -> Source:
    """Open a ``.pt``, a ``.safetensors`` file, a sharded ``.safetensors.index.json`` or a directory of them."""
    path = Path(path)
    if not path.exists():
        raise ConvertError(f"input {path} does not exist")
    if path.is_dir():
        path = resolve_dir(path)
    if path.name.endswith(PT_SUFFIXES):
        return read_pt(path, key)
    if key is not None:
        raise ConvertError(f"--key selects an entry of a .pt checkpoint; {path} is not one")
    if path.name.endswith(INDEX_SUFFIX):
        return read_index(path)
    if path.name.endswith(SAFETENSORS_SUFFIX):
        return read_safetensors(path)
    raise ConvertError(
        f"unknown checkpoint type {path}: expected {'/'.join(PT_SUFFIXES)}, {SAFETENSORS_SUFFIX}, {INDEX_SUFFIX} "
        "or a directory holding them"
    )
