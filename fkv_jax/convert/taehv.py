"""TAEHV checkpoints (``taew2_1.pth`` / ``.safetensors`` of madebyollin/taehv) -> a converted TAEHV directory.

The key map is declarative: :func:`rows` lists, for a config, every stored decoder tensor with its Flax param
path, its transform and its expected PyTorch shape, from the same layer sequence that builds
:class:`fkv_jax.vae.taehv.TAEHVDecoder`. The reference decoder is one ``nn.Sequential``; its indices are::

    decoder.1                 conv3x3 latent -> n0 (weight, bias)            -> conv_in
    decoder.{b}.conv.{0,2,4}  MemBlock convs (weight, bias), b = 3 + 6 l + k   -> levels/l/blocks/k/conv{1,2,3}
    decoder.{3 + 6 l + 4}     TGrow 1x1 conv, n_l -> stride * n_l (no bias) -> levels/l/tgrow
    decoder.{3 + 6 l + 5}     conv3x3 n_l -> n_l+1 (no bias)                -> levels/l/conv
    decoder.22                conv3x3 n3 -> 3 p^2 (weight, bias)             -> conv_out

(``6`` is ``blocks_per_level + 3``). Transforms: conv ``[o, i, kh, kw] -> [kh, kw, i, o]``; a TGrow stored with
more output channels than the model's time stride uses keeps its last ``stride * n_l`` ones (the reference's
rule for a checkpoint trained with time upscaling, run with less). The encoder's tensors are not converted.
"""

from __future__ import annotations

import dataclasses
import json
import math
import os
import re
import uuid
from collections.abc import Callable, Mapping
from pathlib import Path

import jax
import numpy as np

from fkv_jax.checkpoint import DTYPES, CheckpointError, _flatten, check_output_dir
from fkv_jax.convert.errors import ConvertError
from fkv_jax.convert.plan import _fmt, _listing
from fkv_jax.convert.readers import Source, open_checkpoint
from fkv_jax.convert.wan_keymap import IDENTITY, Transform
from fkv_jax.vae.taehv import IMAGE_CHANNELS, TAEHVConfig, abstract_params, save_taehv

CONV = Transform("conv2d", lambda a: a.transpose(2, 3, 1, 0))
IGNORED_PREFIXES = ("encoder.",)  # the encoder: not part of the decoder
MODEL_DIR_FORMAT = "fkv_jax.model_dir"
COMPONENT = "taehv"  # the sub-folder of a model folder


def _keep_last(n: int) -> Transform:
    return Transform(f"last_{n}_out_channels", lambda a: CONV.apply(a[-n:]))


@dataclasses.dataclass(frozen=True)
class Row:
    path: str  # Flax param path, "a/b/c"
    transform: Transform
    shape: tuple[int, ...]  # expected stored shape (the TGrow's out channels may be larger, see _keep_last)


def _conv(rows: dict, key: str, path: str, cin: int, cout: int, k: int, bias: bool) -> None:
    rows[f"{key}.weight"] = Row(f"{path}/kernel", CONV, (cout, cin, k, k))
    if bias:
        rows[f"{key}.bias"] = Row(f"{path}/bias", IDENTITY, (cout,))


def level_base(cfg: TAEHVConfig, level: int) -> int:
    """Index in ``decoder.N`` of the first MemBlock of ``level``."""
    return 3 + (cfg.blocks_per_level + 3) * level


def rows(cfg: TAEHVConfig) -> dict[str, Row]:
    """Every stored decoder tensor of a TAEHV with this config -> its :class:`Row`."""
    n = cfg.channels
    r: dict[str, Row] = {}
    _conv(r, "decoder.1", "conv_in", cfg.latent_channels, n[0], 3, True)
    for lv in range(3):
        base, c = level_base(cfg, lv), n[lv]
        for k in range(cfg.blocks_per_level):
            pre, path = f"decoder.{base + k}", f"levels/{lv}/blocks/{k}"
            _conv(r, f"{pre}.conv.0", f"{path}/conv1", 2 * c, c, 3, True)
            _conv(r, f"{pre}.conv.2", f"{path}/conv2", c, c, 3, True)
            _conv(r, f"{pre}.conv.4", f"{path}/conv3", c, c, 3, True)
        grow = c * (2 if cfg.time_upscale[lv] else 1)
        r[f"decoder.{base + cfg.blocks_per_level + 1}.conv.weight"] = Row(
            f"levels/{lv}/tgrow/kernel", _keep_last(grow), (grow, c, 1, 1)
        )
        _conv(r, f"decoder.{base + cfg.blocks_per_level + 2}", f"levels/{lv}/conv", c, n[lv + 1], 3, False)
    _conv(r, f"decoder.{level_base(cfg, 3) + 1}", "conv_out", n[3], IMAGE_CHANNELS * cfg.patch_size**2, 3, True)
    return r


def is_taehv(names) -> bool:
    """Whether stored names look like a TAEHV checkpoint (a MemBlock conv under ``decoder.N.conv.0``)."""
    return any(re.match(r"^decoder\.\d+\.conv\.0\.weight$", n) for n in names)


def infer_config(
    shapes: Mapping[str, tuple[int, ...]], time_upscale: tuple[bool, ...] = (False, True, True)
) -> TAEHVConfig:
    """Sizes from the tensor shapes: latent channels (``decoder.1``), level widths, MemBlocks per level and the
    output patch size (``decoder.22``). The time strides are not in the weights: ``time_upscale`` (default
    TAEHV's (False, True, True))."""

    def shape(key: str) -> tuple[int, ...]:
        if key not in shapes:
            raise ConvertError(
                f"not a TAEHV checkpoint: tensor {key!r} is missing (found {len(shapes)} tensors, e.g. "
                f"{sorted(shapes)[:5]})"
            )
        s = tuple(shapes[key])
        if len(s) != 4:
            raise ConvertError(f"TAEHV tensor {key!r} has shape {_fmt(s)}; expected a conv weight [out, in, kh, kw]")
        return s

    conv_in = shape("decoder.1.weight")
    blocks = 0
    while f"decoder.{3 + blocks}.conv.0.weight" in shapes:
        blocks += 1
    if blocks == 0:
        raise ConvertError("not a TAEHV checkpoint: no MemBlock at decoder.3 (decoder.3.conv.0.weight is missing)")
    widths = [conv_in[0]]
    for lv in range(3):
        widths.append(shape(f"decoder.{3 + (blocks + 3) * lv + blocks + 2}.weight")[0])
    out = shape(f"decoder.{3 + (blocks + 3) * 3 + 1}.weight")[0]
    patch = math.isqrt(out // IMAGE_CHANNELS)
    if out % IMAGE_CHANNELS or patch * patch * IMAGE_CHANNELS != out:
        raise ConvertError(f"the output conv has {out} channels; expected 3 p^2 for a patch size p")
    try:
        return TAEHVConfig(
            latent_channels=conv_in[1],
            patch_size=patch,
            channels=tuple(widths),
            blocks_per_level=blocks,
            time_upscale=tuple(bool(t) for t in time_upscale),
            name="taew2.1" if (conv_in[1], patch) == (16, 1) else "taehv",
        )
    except ValueError as e:
        raise ConvertError(f"the inferred TAEHV config is invalid: {e}") from None


@dataclasses.dataclass(frozen=True)
class TAEHVPlan:
    cfg: TAEHVConfig
    rows: dict[str, Row]
    ignored: list[str]  # stored names deliberately not converted (the encoder)


def plan_taehv(shapes: Mapping[str, tuple[int, ...]], time_upscale=(False, True, True)) -> TAEHVPlan:
    """Config and key map from shapes only; one :class:`ConvertError` lists every missing, unexpected and
    mis-shaped tensor by name."""
    cfg = infer_config(shapes, time_upscale)
    r = rows(cfg)
    ignored = sorted(k for k in shapes if k.startswith(IGNORED_PREFIXES))
    missing = [f"{k} {_fmt(row.shape)}" for k, row in r.items() if k not in shapes]
    unexpected = [f"{k} {_fmt(s)}" for k, s in shapes.items() if k not in r and not k.startswith(IGNORED_PREFIXES)]
    wrong = []
    for k, row in r.items():
        if k not in shapes:
            continue
        s = tuple(shapes[k])
        grows = row.transform.name.startswith("last_")  # a TGrow may store more output channels than it uses
        ok = s == row.shape or (grows and len(s) == 4 and s[1:] == row.shape[1:] and s[0] > row.shape[0])
        if not ok:
            wrong.append(f"{k}: {_fmt(s)}, expected {_fmt(row.shape)}")
    if missing or unexpected or wrong:
        head = (
            f"the checkpoint does not match a TAEHV decoder with latent_channels={cfg.latent_channels}, "
            f"channels={list(cfg.channels)}, patch_size={cfg.patch_size}: {len(missing)} missing, "
            f"{len(unexpected)} unexpected, {len(wrong)} wrong shape"
        )
        body = _listing("missing", missing) + _listing("unexpected", unexpected) + _listing("wrong shape", wrong)
        raise ConvertError("\n".join([head, *body]))
    return TAEHVPlan(cfg, r, ignored)


def to_flax_params(p: TAEHVPlan, read: Callable[[str], np.ndarray], dtype: str = "float32") -> dict:
    """Read each decoder tensor once, transform it into the nested Flax param dict (numpy, ``dtype``)."""
    np_dtype = np.dtype(DTYPES[dtype])
    expected = abstract_params(p.cfg)
    shapes = {path: tuple(a.shape) for path, a in _flatten(expected).items()}
    flat: dict[str, np.ndarray] = {}
    for key, row in p.rows.items():
        value = row.transform.apply(np.asarray(read(key), np.float32))
        want = shapes[row.path]
        if value.shape != want:  # a key-map bug, never bad input (shapes were validated)
            raise AssertionError(f"{key} -> {row.path}: {value.shape} vs {want}")
        flat[row.path] = value.astype(np_dtype)
    return jax.tree_util.tree_map_with_path(
        lambda kp, _: flat["/".join(str(getattr(k, "key", k)) for k in kp)], expected
    )


# ---- where the output goes --------------------------------------------------------------------------------


def is_model_dir(path: str | Path) -> bool:
    """Whether ``path`` is a model folder made by ``fkv convert --wan-dir`` (its config.json says so)."""
    try:
        meta = json.loads((Path(path) / "config.json").read_text())
    except (OSError, ValueError):
        return False
    return isinstance(meta, dict) and meta.get("format") == MODEL_DIR_FORMAT


def target_dir(output: str | Path, overwrite: bool = False) -> tuple[Path, Path | None]:
    """``(where the TAEHV goes, the model folder or None)``: ``OUTPUT/taehv`` inside a model folder, else
    ``OUTPUT`` itself. Raises if the place is taken (an existing TAEHV is replaced only with ``overwrite``)."""
    output = Path(output)
    model_dir = output if is_model_dir(output) else None
    dest = output / COMPONENT if model_dir is not None else output
    try:
        dest = check_output_dir(dest, overwrite)
    except CheckpointError as e:
        raise ConvertError(str(e)) from None
    return dest, model_dir


def _register_component(model_dir: Path) -> None:
    """Add ``taehv`` to the model folder's config.json ``components`` (written atomically)."""
    file = model_dir / "config.json"
    meta = json.loads(file.read_text())
    comps = sorted(set(meta.get("components") or []) | {COMPONENT})
    if comps == meta.get("components"):
        return
    meta["components"] = comps
    tmp = file.with_name(f".{file.name}.tmp-{uuid.uuid4().hex[:8]}")
    try:
        tmp.write_text(json.dumps(meta, indent=2) + "\n")
        os.replace(tmp, file)
    finally:
        tmp.unlink(missing_ok=True)


def open_taehv(input: str | Path, key: str | None = None, time_upscale=(False, True, True)) -> tuple[Source, TAEHVPlan]:
    """Open and plan a TAEHV checkpoint (shapes only; nothing is read or written)."""
    src = open_checkpoint(input, key)
    if not is_taehv(src.shapes):
        raise ConvertError(
            f"{src.path} is not a TAEHV checkpoint (no decoder.N.conv.0.weight MemBlock tensors among its "
            f"{len(src.shapes)} tensors, e.g. {sorted(src.shapes)[:4]})"
        )
    return src, plan_taehv(src.shapes, time_upscale)


def convert_taehv(
    input: str | Path,
    output: str | Path,
    *,
    key: str | None = None,
    dtype: str = "float32",
    time_upscale: tuple[bool, ...] = (False, True, True),
    overwrite: bool = False,
    log: Callable[[str], None] | None = None,
) -> Path:
    """Convert a TAEHV ``.pth`` / ``.safetensors`` into ``output`` (a new directory), or into ``output/taehv`` when
    ``output`` is a model folder made by ``fkv convert --wan-dir``. Returns the TAEHV directory."""
    if dtype not in DTYPES:
        raise ConvertError(f"unsupported dtype {dtype!r}; choose one of {', '.join(DTYPES)}")
    dest, model_dir = target_dir(output, overwrite)
    src, p = open_taehv(input, key, time_upscale)
    params = to_flax_params(p, src.read, dtype)
    source = {"path": str(src.path.absolute()), "kind": f"taehv_{src.container}", "key": src.key}
    try:
        out = save_taehv(dest, p.cfg, params, dtype, source, overwrite=overwrite)
    except CheckpointError as e:
        raise ConvertError(str(e)) from None
    if model_dir is not None:
        _register_component(model_dir)
    if log is not None:
        n = sum(int(np.prod(row.shape)) for row in p.rows.values())
        c = p.cfg
        log(f"source:  {src.path} (TAEHV, {len(src.shapes)} tensors; {len(p.ignored)} encoder tensors not used)")
        log(
            f"config:  TAEHV decoder: latent channels {c.latent_channels}, widths {list(c.channels)}, "
            f"{c.blocks_per_level} MemBlocks per level, time upscale {list(c.time_upscale)}, patch {c.patch_size}"
        )
        log(f"params:  {n:,} ({dtype})")
        log(f"output:  {out}" + (f" (in the model folder {model_dir})" if model_dir is not None else ""))
    return out
