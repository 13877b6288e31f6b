"""The converted transformer checkpoint format and its I/O.

A converted checkpoint is a directory::

    DIR/config.json   {"format": "fkv_jax.transformer", "format_version": 1,
                       "model": ModelConfig.to_dict(), "dtype": "float32" | "bfloat16",
                       "source": {"path": ..., "kind": ..., "key": ..., "lora": ...}}
    DIR/params/       Orbax (StandardCheckpointer) checkpoint of the nested pure param dict
                      (the tree of ``nnx.split(model, nnx.Param)``, blocks stacked on a leading [L] axis)

It is written by ``python -m checkpoints_convert`` (which reads PyTorch / safetensors / diffusers files) and
read here without any conversion work: the abstract model gives the target tree, Orbax fills it.
"""

from __future__ import annotations

import dataclasses
import json
import shutil
import uuid
from collections.abc import Mapping
from pathlib import Path
from typing import Any

import jax
import jax.numpy as jnp
import numpy as np
import orbax.checkpoint as ocp
from flax import nnx

from fkv_jax.config import ModelConfig
from fkv_jax.model.build import abstract_model
from fkv_jax.model.transformer import CausalWanModel

FORMAT = "fkv_jax.transformer"
FORMAT_VERSION = 1
# Every converted-checkpoint kind (``config.json`` "format" -> what it is), for clear errors on a wrong directory.
KIND_NAMES = {
    FORMAT: "transformer",
    "fkv_jax.vae": "VAE",
    "fkv_jax.text_encoder": "text encoder (UMT5)",
    "fkv_jax.taehv": "TAEHV preview decoder",
    "fkv_jax.model_dir": "model folder (transformer/, vae/, text_encoder/, tokenizer/: use --model-dir)",
}
CONFIG_FILE = "config.json"
PARAMS_DIR = "params"
DTYPES: dict[str, Any] = {"float32": jnp.float32, "bfloat16": jnp.bfloat16}


class CheckpointError(ValueError):
    """A converted checkpoint directory is missing, malformed or does not match its config."""


@dataclasses.dataclass(frozen=True)
class CheckpointInfo:
    """What ``config.json`` of a converted checkpoint says."""

    cfg: ModelConfig
    dtype: str  # a key of DTYPES: the dtype the params are stored in
    source: dict[str, Any]  # where the weights came from (path, kind, key, lora)


# ---- helpers ------------------------------------------------------------------------------------------


def _dtype_name(dtype: Any) -> str:
    name = jnp.dtype(dtype).name
    if name not in DTYPES:
        raise CheckpointError(f"unsupported dtype {name!r}; choose one of {', '.join(DTYPES)}")
    return name


def _flatten(tree: Mapping, prefix: str = "") -> dict[str, Any]:
    """Nested dict -> {"a/b/c": leaf}."""
    out: dict[str, Any] = {}
    for k, v in tree.items():
        path = f"{prefix}{k}"
        if isinstance(v, Mapping):
            out.update(_flatten(v, path + "/"))
        else:
            out[path] = v
    return out


def abstract_params(cfg: ModelConfig, dtype: Any = jnp.float32) -> dict:
    """The pure param dict of a model with this config, as ``jax.ShapeDtypeStruct`` leaves (allocates nothing)."""
    return nnx.to_pure_dict(nnx.state(abstract_model(cfg, dtype), nnx.Param))


def _check_tree(found: Mapping[str, tuple[int, ...]], expected: Mapping[str, tuple[int, ...]], what: str) -> None:
    """Raise if the flattened {path: shape} ``found`` differs from ``expected``, naming every bad key."""
    problems = [f"missing {k} {list(s)}" for k, s in expected.items() if k not in found]
    problems += [f"unexpected {k} {list(found[k])}" for k in found if k not in expected]
    problems += [
        f"{k} has shape {list(found[k])}, the config expects {list(s)}"
        for k, s in expected.items()
        if k in found and tuple(found[k]) != tuple(s)
    ]
    if problems:
        shown = "; ".join(problems[:20]) + (f"; ... and {len(problems) - 20} more" if len(problems) > 20 else "")
        raise CheckpointError(f"{what} do not match the model config ({len(problems)} problems): {shown}")


def _shapes(tree: Mapping) -> dict[str, tuple[int, ...]]:
    return {k: tuple(np.shape(v)) for k, v in _flatten(tree).items()}


# ---- save ---------------------------------------------------------------------------------------------


def _is_checkpoint_dir(path: Path) -> bool:
    """Whether ``path/config.json`` declares a converted fkv_jax checkpoint of any kind (transformer, VAE, text
    encoder; the only thing overwrite replaces)."""
    try:
        return str(json.loads((path / CONFIG_FILE).read_text()).get("format", "")).startswith("fkv_jax.")
    except (OSError, ValueError, AttributeError):
        return False


def swap_into_place(tmp: Path, dest: Path, old: Path) -> None:
    """Move the finished directory ``tmp`` to ``dest``; an existing ``dest`` is parked at ``old`` first and
    put back if the move fails (the caller deletes ``old`` afterwards)."""
    if dest.exists():
        dest.rename(old)
    try:
        tmp.rename(dest)
    except BaseException:
        if old.exists():
            old.rename(dest)
        raise


def check_output_dir(path: str | Path, overwrite: bool = False) -> Path:
    """Raise unless ``path`` can receive a checkpoint: absent, empty, or (with ``overwrite``) a converted checkpoint."""
    path = Path(path).absolute()
    if path.exists() and not path.is_dir():
        raise CheckpointError(f"output {path} exists and is not a directory")
    if path.is_dir() and any(path.iterdir()):
        if not overwrite:
            raise CheckpointError(
                f"output directory {path} exists and is not empty (pass overwrite=True / --overwrite to replace it)"
            )
        if not _is_checkpoint_dir(path):
            raise CheckpointError(f"refusing to replace {path}: it is not an fkv_jax checkpoint directory")
    existing = next(p for p in path.parents if p.exists())
    if not existing.is_dir():
        raise CheckpointError(f"cannot create {path}: {existing} is not a directory")
    return path


def _missing_dirs(path: Path) -> list[Path]:
    """``path`` and its ancestors that do not exist yet, outermost first."""
    return [p for p in reversed((path, *path.parents)) if not p.exists()]


def save_transformer(
    path: str | Path,
    cfg: ModelConfig,
    params: Mapping,
    dtype: Any,
    source: Mapping[str, Any],
    *,
    overwrite: bool = False,
) -> Path:
    """Write a converted checkpoint atomically and return its absolute path.

    ``params`` is the nested pure param dict (numpy or jax leaves); leaves are cast to ``dtype``
    (``"float32"`` or ``"bfloat16"``). Everything is written to a temporary sibling directory that is
    renamed into place only when complete; on failure nothing is left behind (missing parent directories
    are created, and removed again on failure). An existing non-empty ``path`` is replaced only with
    ``overwrite=True`` and only if it is itself an fkv_jax checkpoint.
    """
    config = {"format": FORMAT, "format_version": FORMAT_VERSION, "model": cfg.to_dict()}
    return save_checkpoint_dir(path, config, params, dtype, source, abstract_params(cfg), overwrite=overwrite)


def save_checkpoint_dir(
    path: str | Path,
    config: Mapping[str, Any],
    params: Mapping,
    dtype: Any,
    source: Mapping[str, Any],
    expected: Mapping,
    *,
    overwrite: bool = False,
) -> Path:
    """The atomic writer behind every converted-checkpoint kind (transformer, VAE, text encoder).

    ``config`` holds ``format``, ``format_version`` and the kind's own fields; ``dtype`` and ``source`` are
    added. ``params`` must have exactly the shapes of ``expected`` (a param tree of arrays or
    ``ShapeDtypeStruct``). Same guarantees as :func:`save_transformer`.
    """
    path = check_output_dir(path, overwrite)
    name = _dtype_name(dtype)
    np_dtype = jnp.dtype(DTYPES[name])
    _check_tree(_shapes(params), _shapes(expected), "params")
    params = jax.tree.map(lambda a: np.asarray(a).astype(np_dtype, copy=False), dict(params))
    config = {**config, "dtype": name, "source": dict(source)}
    tag = uuid.uuid4().hex[:8]
    tmp = path.with_name(f".{path.name}.tmp-{tag}")
    old = path.with_name(f".{path.name}.old-{tag}")
    created, done = _missing_dirs(path.parent), False
    try:
        path.parent.mkdir(parents=True, exist_ok=True)
        tmp.mkdir()
        (tmp / CONFIG_FILE).write_text(json.dumps(config, indent=2) + "\n")
        with ocp.StandardCheckpointer() as ckptr:
            ckptr.save(tmp / PARAMS_DIR, params)
            ckptr.wait_until_finished()
        check_output_dir(path, overwrite)  # re-check: something may have appeared while writing
        swap_into_place(tmp, path, old)
        done = True
    finally:
        shutil.rmtree(tmp, ignore_errors=True)
        shutil.rmtree(old, ignore_errors=True)
        for d in () if done else reversed(created):
            if d.is_dir() and not any(d.iterdir()):
                d.rmdir()
    return path


# ---- load ---------------------------------------------------------------------------------------------


def read_info(path: str | Path) -> CheckpointInfo:
    """Parse and check ``DIR/config.json`` of a converted checkpoint."""
    meta = read_meta(path, FORMAT, FORMAT_VERSION)
    cfg_file = Path(path) / CONFIG_FILE
    try:
        cfg = ModelConfig.from_dict(meta["model"])
    except (KeyError, TypeError, ValueError) as e:
        raise CheckpointError(f"{cfg_file}: bad model config: {e}") from None
    return CheckpointInfo(cfg=cfg, dtype=meta["dtype"], source=dict(meta.get("source") or {}))


def load_params(path: str | Path, dtype: Any = None) -> tuple[ModelConfig, dict]:
    """Restore the pure param dict (jax arrays) of a converted checkpoint, cast to ``dtype`` if given."""
    path = Path(path).absolute()
    info = read_info(path)
    return info.cfg, restore_checkpoint_params(path, abstract_params(info.cfg), info.dtype, dtype)


def restore_checkpoint_params(path: str | Path, expected: Mapping, stored_dtype: str, dtype: Any = None) -> dict:
    """Restore ``path/params`` (any checkpoint kind) into the tree of ``expected`` (shapes checked by name),
    stored as ``stored_dtype`` (config.json's "dtype"), cast to ``dtype`` if given."""
    path = Path(path).absolute()
    params_dir = path / PARAMS_DIR
    if not params_dir.is_dir():
        raise CheckpointError(f"{params_dir} is missing: the checkpoint has no parameters")
    with ocp.StandardCheckpointer() as ckptr:
        try:
            stored = _flatten(ckptr.metadata(params_dir).item_metadata.tree)
        except Exception as e:  # noqa: BLE001 - Orbax raises many types for a damaged directory
            raise CheckpointError(f"cannot read the Orbax checkpoint in {params_dir}: {e}") from None
        _check_tree({k: tuple(m.shape) for k, m in stored.items()}, _shapes(expected), f"stored params in {path}")
        bad = sorted(k for k, m in stored.items() if jnp.dtype(m.dtype).name != stored_dtype)
        if bad:
            raise CheckpointError(f"{path}: params {bad[:5]} are not stored as {stored_dtype} as config.json says")
        sharding = jax.sharding.SingleDeviceSharding(jax.local_devices()[0])
        target = jax.tree.map(
            lambda a: jax.ShapeDtypeStruct(a.shape, DTYPES[stored_dtype], sharding=sharding), expected
        )
        params = ckptr.restore(params_dir, target)
    if dtype is not None and _dtype_name(dtype) != stored_dtype:
        params = jax.tree.map(lambda a: a.astype(DTYPES[_dtype_name(dtype)]), params)
    return params


def load_transformer(path: str | Path, dtype: Any = None) -> tuple[ModelConfig, CausalWanModel]:
    """Load a converted checkpoint as ``(cfg, CausalWanModel)``; ``dtype`` defaults to the stored dtype.

    No random initialisation and no conversion: the model is built abstractly and its params restored.
    """
    cfg, params = load_params(path, dtype)
    model_dtype = jax.tree.leaves(params)[0].dtype
    gdef, state = nnx.split(abstract_model(cfg, model_dtype), nnx.Param)
    nnx.replace_by_pure_dict(state, params)
    return cfg, nnx.merge(gdef, state)


def read_meta(path: str | Path, fmt: str, version: int = 1) -> dict[str, Any]:
    """``DIR/config.json`` of a converted checkpoint of kind ``fmt`` (e.g. ``"fkv_jax.vae"``), checked: format,
    version and dtype. Another kind's directory is a :class:`CheckpointError` naming what it holds."""
    path = Path(path)
    want = KIND_NAMES.get(fmt, fmt)
    if not path.is_dir():
        raise CheckpointError(f"{want} directory {path} does not exist")
    cfg_file = path / CONFIG_FILE
    if not cfg_file.is_file():
        raise CheckpointError(
            f"{cfg_file} is missing: {path} is not a converted fkv_jax {want} "
            "(convert one with `python -m checkpoints_convert`)"
        )
    try:
        meta = json.loads(cfg_file.read_text())
    except (OSError, UnicodeDecodeError, json.JSONDecodeError) as e:
        raise CheckpointError(f"{cfg_file} is not valid JSON: {e}") from None
    found = meta.get("format") if isinstance(meta, dict) else type(meta).__name__
    if found != fmt:
        if found in KIND_NAMES:
            raise CheckpointError(f"{path} holds a converted {KIND_NAMES[found]} (format {found!r}), not a {want}")
        raise CheckpointError(f"{cfg_file}: format is {found!r}, expected {fmt!r}")
    if meta.get("format_version") != version:
        raise CheckpointError(
            f"{cfg_file}: format_version {meta.get('format_version')!r} is not supported (this build reads {version})"
        )
    if meta.get("dtype") not in DTYPES:
        raise CheckpointError(f"{cfg_file}: dtype {meta.get('dtype')!r} is not one of {', '.join(DTYPES)}")
    return meta
