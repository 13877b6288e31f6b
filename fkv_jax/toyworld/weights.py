"""Toy-world weights on disk: ``config.json`` + ``params.npz`` (float16), read and checked.

``python -m fkv_jax.toyworld.train --export DIR`` writes them; :func:`load_params` reads them back as float32
pure dicts and checks every tensor against the config, so a broken file is one clear error naming it.
"""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np
from flax import nnx

from fkv_jax.config import ModelConfig
from fkv_jax.model.build import abstract_model
from fkv_jax.toyworld.text import ToyTextEncoder

WEIGHTS_DIR = Path(__file__).resolve().parent / "weights"


def flatten(tree: dict, prefix: str = "") -> dict[str, np.ndarray]:
    """Nested dict -> {"a/b/0/c": array} (the keys of params.npz)."""
    out = {}
    for k, v in tree.items():
        name = f"{prefix}{k}"
        if isinstance(v, dict):
            out.update(flatten(v, name + "/"))
        else:
            out[name] = np.asarray(v)
    return out


def unflatten(flat: dict[str, np.ndarray]) -> dict:
    """The inverse of :func:`flatten` (integer path parts become int keys)."""
    out: dict = {}
    for name, v in flat.items():
        node = out
        parts = name.split("/")
        for p in parts[:-1]:
            node = node.setdefault(int(p) if p.isdigit() else p, {})
        node[int(parts[-1]) if parts[-1].isdigit() else parts[-1]] = v
    return out


def _abstract_text_encoder(cfg: ModelConfig) -> ToyTextEncoder:
    return nnx.eval_shape(lambda: ToyTextEncoder(cfg.text_dim, cfg.text_len, rngs=nnx.Rngs(0)))


def weights_prediction(weights: str | Path | None = None) -> str | None:
    """``"x0"`` or ``"flow"``: the output a toy weights directory was trained to predict (None: unknown)."""
    meta_file = Path(weights if weights is not None else WEIGHTS_DIR) / "config.json"
    if not meta_file.is_file():
        return None
    return json.loads(meta_file.read_text()).get("train", {}).get("prediction", "flow")


def weights_train_frames(weights: str | Path | None = None) -> int | None:
    """Frames per training clip of a toy weights directory (``train.frames`` in its config.json; None: unknown)."""
    meta_file = Path(weights if weights is not None else WEIGHTS_DIR) / "config.json"
    if not meta_file.is_file():
        return None
    frames = json.loads(meta_file.read_text()).get("train", {}).get("frames")
    return int(frames) if frames else None


def load_config(path: str | Path | None = None) -> ModelConfig:
    """The model config of a toy weights directory (its ``config.json``; the shipped weights by default),
    without reading the parameters."""
    meta_file = Path(path if path is not None else WEIGHTS_DIR) / "config.json"
    if not meta_file.is_file():
        raise FileNotFoundError(f"{meta_file.parent} is not a toy-world weights directory (no config.json)")
    try:
        return ModelConfig.from_dict(json.loads(meta_file.read_text())["model"])
    except (ValueError, KeyError, TypeError) as e:
        raise ValueError(f"{meta_file} is not a toy-world config.json (no valid 'model' section): {e}") from e


def load_params(path: str | Path | None = None) -> tuple[ModelConfig, dict]:
    """(config, {"model": pure dict, "text": pure dict}) from an exported weights directory."""
    path = Path(path) if path is not None else WEIGHTS_DIR
    meta_file, params_file = path / "config.json", path / "params.npz"
    if not meta_file.is_file() or not params_file.is_file():
        raise FileNotFoundError(
            f"{path} is not a toy-world weights directory (needs config.json and params.npz); "
            "train one with `python -m fkv_jax.toyworld.train --export DIR`"
        )
    cfg = load_config(path)
    try:
        with np.load(params_file) as z:
            tree = unflatten({k: z[k].astype(np.float32) for k in z.files})  # stored as float16 (export_weights)
    except Exception as e:  # noqa: BLE001 - truncated / not an npz: one clear error naming the file
        raise ValueError(f"cannot read {params_file}: {type(e).__name__}: {e}") from e
    _check_shapes(cfg, tree, params_file)
    return cfg, tree


def _check_shapes(cfg: ModelConfig, tree: dict, params_file: Path) -> None:
    """Every tensor the config needs, at its shape; a ValueError listing every difference otherwise."""

    def shapes(node, prefix=""):  # the key names of train.flatten, leaf -> shape
        if isinstance(node, dict):
            return {k: v for name, sub in node.items() for k, v in shapes(sub, f"{prefix}{name}/").items()}
        return {prefix[:-1]: tuple(node.shape)}

    want = {}
    for key, module in (("model", abstract_model(cfg)), ("text", _abstract_text_encoder(cfg))):
        want.update(shapes(nnx.to_pure_dict(nnx.split(module, nnx.Param)[1]), f"{key}/"))
    have = shapes(tree)
    problems = [f"missing {k} {want[k]}" for k in sorted(want.keys() - have.keys())]
    problems += [f"unexpected {k}" for k in sorted(have.keys() - want.keys())]
    problems += [
        f"{k} has shape {have[k]}, the config needs {want[k]}"
        for k in sorted(want.keys() & have.keys())
        if have[k] != want[k]
    ]
    if problems:
        raise ValueError(
            f"{params_file} does not match its config.json: "
            + "; ".join(problems[:8])
            + (f"; ... {len(problems) - 8} more" if len(problems) > 8 else "")
        )
