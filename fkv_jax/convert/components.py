"""Converting the other parts of a Wan2.1 model: the VAE, the UMT5 text encoder, and a whole model folder.

* :func:`detect_kind`: ``"umt5" | "vae" | "transformer"`` from the tensor names alone.
* :func:`convert_vae` / :func:`convert_umt5`: one checkpoint -> one converted directory (shapes planned and
  checked by name first, tensors read one at a time straight into the target dtype, atomic save).
* :func:`convert_model_dir`: ``--wan-dir WAN2.1_DOWNLOAD --generator GEN.pt --output DIR`` -> ``DIR/transformer``,
  ``DIR/vae`` (``Wan2.1_VAE.pth``), ``DIR/text_encoder`` (``models_t5_umt5-xxl-enc-bf16.pth``) and
  ``DIR/tokenizer`` (a copy of ``google/umt5-xxl``): every input is opened and planned before anything is read
  or written, everything is written to a temporary sibling and renamed into place at the end.
"""

from __future__ import annotations

import dataclasses
import json
import shutil
import uuid
from collections.abc import Callable, Mapping
from pathlib import Path
from typing import Any

import jax
import numpy as np
from tqdm import tqdm

from fkv_jax.convert import layouts, umt5_keymap, vae_keymap
from fkv_jax.convert.convert import PROGRESS_MIN_TENSORS, convert
from fkv_jax.convert.errors import ConvertError
from fkv_jax.convert.plan import _fmt, _listing, plan
from fkv_jax.convert.readers import Source, open_checkpoint, resolve_dir
from fkv_jax.convert.taehv import is_taehv
from fkv_jax.checkpoint import DTYPES, CheckpointError, _flatten, check_output_dir, swap_into_place

KINDS = ("transformer", "vae", "umt5")
# Files of the Wan2.1 download (Wan-AI/Wan2.1-T2V-1.3B) that the model folder is built from.
WAN_VAE_FILE = "Wan2.1_VAE.pth"
WAN_T5_FILE = "models_t5_umt5-xxl-enc-bf16.pth"
WAN_TOKENIZER_DIR = Path("google") / "umt5-xxl"
MODEL_DIR_FORMAT = "fkv_jax.model_dir"
COMPONENT_DIRS = {"transformer": "transformer", "vae": "vae", "umt5": "text_encoder", "tokenizer": "tokenizer"}


def detect_kind(names) -> str:
    """What a checkpoint holds, from its tensor names (wrapper prefixes ignored)."""
    stripped = [layouts.strip_wrappers(n) for n in names]
    if umt5_keymap.is_umt5(stripped):
        return "umt5"
    if is_taehv(stripped):  # also has encoder.* / decoder.* names: before the VAE test
        return "taehv"
    if vae_keymap.is_vae(stripped):
        return "vae"
    return "transformer"


@dataclasses.dataclass(frozen=True)
class ComponentPlan:
    """A VAE or text-encoder checkpoint, planned from shapes only."""

    kind: str  # "vae" | "umt5"
    layout: str  # "wan" | "diffusers" | "hf"
    cfg: Any  # VAEConfig | UMT5Config
    names: dict[str, str]  # stored name -> Wan name (tensors to read)
    ignored: list[str]  # stored names deliberately not converted (e.g. a HF model's decoder)
    rows: dict[str, tuple[str, Any, int | None]]  # Wan name -> (Flax path, transform, layer index or None)


def _validate(
    kind: str,
    stored: Mapping[str, tuple[int, ...]],
    names: Mapping[str, str],
    expected: Mapping[str, tuple[int, ...]],
    what: str,
) -> None:
    """One error listing every missing, unexpected and mis-shaped tensor."""
    wan_to_stored = {w: s for s, w in names.items()}
    missing = [f"{w} {_fmt(s)}" for w, s in expected.items() if w not in wan_to_stored]
    unexpected = [f"{s} {_fmt(stored[s])}" for s, w in names.items() if w not in expected]
    wrong = [
        f"{s}: {_fmt(stored[s])}, expected {_fmt(expected[w])}"
        for s, w in names.items()
        if w in expected and tuple(stored[s]) != tuple(expected[w])
    ]
    if missing or unexpected or wrong:
        head = (
            f"the checkpoint does not match a {what}: {len(missing)} missing, {len(unexpected)} unexpected, "
            f"{len(wrong)} wrong shape"
        )
        body = _listing("missing (Wan names)", missing) + _listing("unexpected", unexpected)
        raise ConvertError("\n".join([head, *body, *_listing("wrong shape", wrong)]))


def _read_json(file: Path) -> dict:
    try:
        d = json.loads(file.read_text())
    except (OSError, UnicodeDecodeError, json.JSONDecodeError) as e:
        raise ConvertError(f"{file} (beside the weights) is not valid JSON: {e}") from None
    return d if isinstance(d, dict) else {}


def _hints(src: Source, kind: str) -> tuple[dict, Path | None]:
    """Sizes a config.json beside the weights states (diffusers AutoencoderKLWan / HF UMT5-T5 configs only)."""
    file = src.path.parent / "config.json"
    if not file.is_file():
        return {}, None
    cfg = _read_json(file)
    if kind == "vae" and cfg.get("_class_name") == "AutoencoderKLWan":
        return {k: cfg[k] for k in ("latents_mean", "latents_std") if isinstance(cfg.get(k), list)}, file
    if kind == "umt5" and cfg.get("model_type") in ("umt5", "t5", "mt5"):
        return {dst: cfg[src_] for src_, dst in umt5_keymap.HF_CONFIG_FIELDS.items() if src_ in cfg}, file
    return {}, None


def plan_component(
    kind: str, src: Source, *, num_heads: int | None = None, text_len: int | None = None
) -> ComponentPlan:
    """Names, config and rows of a VAE / text-encoder checkpoint, validated against the expected tensors."""
    hints, _ = _hints(src, kind)
    if kind == "vae":
        if num_heads is not None or text_len is not None:
            raise ConvertError("--num-heads / --text-len do not apply to a VAE")
        layout, names, ignored = vae_keymap.normalise_names(src.shapes)
        wan_shapes = {names[k]: tuple(src.shapes[k]) for k in names}
        cfg = vae_keymap.infer_config(wan_shapes, hints)
        expected = vae_keymap.expected_shapes(cfg)
        rows = {k: (path, tf, None) for k, (path, tf, _) in vae_keymap.rows(cfg).items()}
        what = f"Wan VAE with dim={cfg.dim}, z_dim={cfg.z_dim}, dim_mult={list(cfg.dim_mult)}"
    elif kind == "umt5":
        layout, names, ignored = umt5_keymap.normalise_names(src.shapes)
        wan_shapes = {names[k]: tuple(src.shapes[k]) for k in names}
        cfg = umt5_keymap.infer_config(wan_shapes, num_heads=num_heads, text_len=text_len or 512, hints=hints)
        expected = umt5_keymap.expected_shapes(cfg)
        rows = umt5_keymap.rows(cfg)
        what = (
            f"UMT5 encoder with dim={cfg.dim}, layers={cfg.num_layers}, heads={cfg.num_heads}, vocab={cfg.vocab_size}"
        )
    else:
        raise ConvertError(f"unknown component kind {kind!r}")
    _validate(kind, src.shapes, names, expected, what)
    return ComponentPlan(kind=kind, layout=layout, cfg=cfg, names=names, ignored=ignored, rows=rows)


def _abstract(kind: str, cfg) -> dict:
    if kind == "vae":
        from fkv_jax.vae.model import abstract_params
    else:
        from fkv_jax.text.umt5 import abstract_params
    return abstract_params(cfg)


def build_params(p: ComponentPlan, src: Source, dtype: str, progress: bool = False) -> dict:
    """Read every tensor once, transform it and write it straight into a target-dtype array of the Flax tree."""
    np_dtype = np.dtype(DTYPES[dtype])
    expected = _abstract(p.kind, p.cfg)
    arrays = {k: np.empty(a.shape, np_dtype) for k, a in _flatten(expected).items()}
    wan_to_stored = {w: s for s, w in p.names.items()}
    items = tqdm(
        p.rows.items(),
        desc="reading",
        unit="tensor",
        disable=None if progress and len(p.rows) >= PROGRESS_MIN_TENSORS else True,
    )
    for wan, (path, tf, layer) in items:
        value = tf.apply(src.read(wan_to_stored[wan]))
        target = arrays[path] if layer is None else arrays[path][layer]
        if value.shape != target.shape:  # a key-map bug, never bad input (shapes were validated)
            raise AssertionError(f"{wan} -> {path}: {value.shape} vs {target.shape}")
        target[...] = value
    return jax.tree_util.tree_map_with_path(
        lambda kp, _: arrays["/".join(str(getattr(k, "key", k)) for k in kp)], expected
    )


def _open(input: str | Path, kind: str | None, key: str | None) -> Source:
    """Open a checkpoint; a diffusers pipeline folder resolves to its ``vae/`` or ``text_encoder/`` for those kinds."""
    path = Path(input)
    sub = {"vae": "vae", "umt5": "text_encoder"}.get(kind or "")
    if path.is_dir() and sub and (path / sub).is_dir():
        path = resolve_dir(path / sub)
    return open_checkpoint(path, key)


def _save(p: ComponentPlan, src: Source, output: Path, dtype: str, overwrite: bool, progress: bool) -> Path:
    params = build_params(p, src, dtype, progress)
    source = {"path": str(src.path.absolute()), "kind": f"{p.kind}_{p.layout}_{src.container}", "key": src.key}
    if p.kind == "vae":
        from fkv_jax.vae.codec import save_vae as save
    else:
        from fkv_jax.text.encoder import save_text_encoder as save
    return save(output, p.cfg, params, dtype, source, overwrite=overwrite)


def _summary(p: ComponentPlan, src: Source, dtype: str, out: Path) -> list[str]:
    c = p.cfg
    if p.kind == "vae":
        desc = (
            f"VAE dim {c.dim}, z_dim {c.z_dim}, dim_mult {list(c.dim_mult)}, res blocks {c.num_res_blocks}, "
            f"temporal downsample {list(c.temperal_downsample)}"
        )
    else:
        desc = (
            f"UMT5 encoder: dim {c.dim}, layers {c.num_layers}, heads {c.num_heads}, ffn {c.dim_ffn}, "
            f"vocab {c.vocab_size}, {c.num_buckets} buckets (max dist {c.max_dist}), text_len {c.text_len}"
        )
    n = sum(int(np.prod(s)) for s in (src.shapes[k] for k in p.names))
    lines = [
        f"source:  {src.path} ({p.kind}, {p.layout} layout, {len(src.shapes)} tensors)",
        f"config:  {desc}",
        f"params:  {n:,} ({dtype})",
        f"output:  {out}",
    ]
    if p.ignored:
        lines.insert(1, f"ignored: {len(p.ignored)} tensors not part of the encoder (e.g. {p.ignored[0]})")
    return lines


def convert_component(
    kind: str,
    input: str | Path,
    output: str | Path,
    *,
    num_heads: int | None = None,
    text_len: int | None = None,
    key: str | None = None,
    dtype: str = "float32",
    overwrite: bool = False,
    progress: bool = False,
    log: Callable[[str], None] | None = None,
) -> Path:
    """Convert a VAE (``kind="vae"``) or UMT5 text encoder (``kind="umt5"``) checkpoint into a directory."""
    if dtype not in DTYPES:
        raise ConvertError(f"unsupported dtype {dtype!r}; choose one of {', '.join(DTYPES)}")
    try:
        out = check_output_dir(output, overwrite)
        src = _open(input, kind, key)
        found = detect_kind(src.shapes)
        if found != kind:
            raise ConvertError(f"{src.path} holds a {_KIND_TEXT[found]} checkpoint, not a {_KIND_TEXT[kind]} one")
        p = plan_component(kind, src, num_heads=num_heads, text_len=text_len)
        out = _save(p, src, out, dtype, overwrite, progress)
    except CheckpointError as e:
        raise ConvertError(str(e)) from None
    if log is not None:
        for line in _summary(p, src, dtype, out):
            log(line)
    return out


_KIND_TEXT = {"transformer": "transformer (DiT)", "vae": "VAE", "umt5": "UMT5 text encoder", "taehv": "TAEHV decoder"}


def convert_any(input: str | Path, output: str | Path, *, kind: str | None = None, **kw) -> Path:
    """The CLI's single-input path: detect (or take ``kind``) and convert. Transformer options apply to the DiT."""
    if kind is not None and kind not in KINDS:
        raise ConvertError(f"unknown --kind {kind!r}; choose one of {', '.join(KINDS)}")
    if kind is None:
        try:
            check_output_dir(output, kw.get("overwrite", False))
        except CheckpointError as e:
            raise ConvertError(str(e)) from None
        kind = detect_kind(_open(input, None, kw.get("key")).shapes)
    if kind == "taehv":
        raise ConvertError(f"{input} is a TAEHV decoder checkpoint: convert it with --taehv {input} --output DIR")
    if kind == "transformer":
        return convert(input, output, **kw)
    bad = [f"--{k.replace('_', '-')}" for k in ("lora", "lora_alpha", "preset") if kw.get(k) is not None]
    if bad:
        raise ConvertError(f"{', '.join(bad)} only apply to a transformer; {input} is a {_KIND_TEXT[kind]} checkpoint")
    if kind == "vae" and (kw.get("num_heads") is not None or kw.get("text_len") is not None):
        raise ConvertError("--num-heads / --text-len do not apply to a VAE")
    keep = {k: kw[k] for k in ("num_heads", "text_len", "key", "dtype", "overwrite", "progress", "log") if k in kw}
    return convert_component(kind, input, output, **keep)


# ---- the whole model folder ------------------------------------------------------------------------------


def _wan_file(wan_dir: Path, name: str, what: str) -> Path:
    f = wan_dir / name
    if not f.is_file():
        raise ConvertError(f"--wan-dir {wan_dir} has no {name} ({what}); it should be the Wan2.1-T2V-1.3B download")
    return f


def convert_model_dir(
    wan_dir: str | Path,
    generator: str | Path,
    output: str | Path,
    *,
    key: str | None = None,
    num_heads: int | None = None,
    text_len: int | None = None,
    dtype: str = "float32",
    lora: str | Path | None = None,
    lora_alpha: float | None = None,
    preset: str | None = None,
    overwrite: bool = False,
    progress: bool = False,
    log: Callable[[str], None] | None = None,
) -> Path:
    """Build the folder ``python -m fkv_jax.generate --model-dir DIR`` reads, from the Wan2.1 download and a
    causal generator checkpoint (Self Forcing / CausVid / LongLive ``.pt``, or any transformer format)."""
    from fkv_jax.text.tokenizer import TokenizerError, find_tokenizer_file

    wan_dir = Path(wan_dir)
    if not wan_dir.is_dir():
        raise ConvertError(f"--wan-dir {wan_dir} is not a directory")
    if dtype not in DTYPES:
        raise ConvertError(f"unsupported dtype {dtype!r}; choose one of {', '.join(DTYPES)}")
    vae_file = _wan_file(wan_dir, WAN_VAE_FILE, "the VAE")
    t5_file = _wan_file(wan_dir, WAN_T5_FILE, "the UMT5 text encoder")
    try:
        find_tokenizer_file(wan_dir / WAN_TOKENIZER_DIR)
    except TokenizerError as e:
        raise ConvertError(str(e)) from None
    try:
        out = check_output_dir(output, overwrite)
        # plan everything (shapes only) before reading a tensor or writing a file
        gen = open_checkpoint(generator, key)
        if (found := detect_kind(gen.shapes)) != "transformer":
            raise ConvertError(f"--generator {generator} holds a {_KIND_TEXT[found]} checkpoint, not a transformer")
        plan(gen.shapes, num_heads=num_heads, text_len=text_len, preset=preset, hints=gen.hints)
        del gen
        srcs = {"vae": open_checkpoint(vae_file), "umt5": open_checkpoint(t5_file)}
        for kind, src in srcs.items():
            if (found := detect_kind(src.shapes)) != kind:
                raise ConvertError(f"{src.path} holds a {_KIND_TEXT[found]} checkpoint, not a {_KIND_TEXT[kind]} one")
        plans = {
            "vae": plan_component("vae", srcs["vae"]),
            "umt5": plan_component("umt5", srcs["umt5"], text_len=text_len),
        }
    except CheckpointError as e:
        raise ConvertError(str(e)) from None

    tmp = out.with_name(f".{out.name}.tmp-{uuid.uuid4().hex[:8]}")
    old = out.with_name(f".{out.name}.old-{uuid.uuid4().hex[:8]}")
    lines: list[str] = []
    created = [p for p in reversed((out.parent, *out.parent.parents)) if not p.exists()]
    done = False
    try:
        out.parent.mkdir(parents=True, exist_ok=True)
        tmp.mkdir()
        convert(
            generator,
            tmp / COMPONENT_DIRS["transformer"],
            num_heads=num_heads,
            text_len=text_len,
            key=key,
            dtype=dtype,
            lora=lora,
            lora_alpha=lora_alpha,
            preset=preset,
            progress=progress,
            log=lines.append,
        )
        for kind in ("vae", "umt5"):
            dst = tmp / COMPONENT_DIRS[kind]
            _save(plans[kind], srcs[kind], dst, dtype, False, progress)
            lines += _summary(plans[kind], srcs[kind], dtype, out / COMPONENT_DIRS[kind])
        shutil.copytree(wan_dir / WAN_TOKENIZER_DIR, tmp / COMPONENT_DIRS["tokenizer"])
        lines.append(f"tokenizer: {wan_dir / WAN_TOKENIZER_DIR} copied to {out / COMPONENT_DIRS['tokenizer']}")
        meta = {
            "format": MODEL_DIR_FORMAT,
            "format_version": 1,
            "dtype": dtype,
            "components": sorted(COMPONENT_DIRS.values()),
            "source": {"wan_dir": str(wan_dir.absolute()), "generator": str(Path(generator).absolute())},
        }
        (tmp / "config.json").write_text(json.dumps(meta, indent=2) + "\n")
        check_output_dir(out, overwrite)
        swap_into_place(tmp, out, old)
        done = True
    except CheckpointError as e:
        raise ConvertError(str(e)) from None
    finally:
        shutil.rmtree(tmp, ignore_errors=True)
        shutil.rmtree(old, ignore_errors=True)
        for d in () if done else reversed(created):
            if d.is_dir() and not any(d.iterdir()):
                d.rmdir()
    if log is not None:
        for line in lines:
            log(line.replace(str(tmp), str(out)))
    return out
