"""Orchestration: open -> plan (shapes only) -> read -> merge LoRA -> Flax param tree -> save.

Nothing is written unless every step before the save succeeded, and the save itself is atomic
(:func:`fkv_jax.checkpoint.save_transformer`).
"""

from __future__ import annotations

from collections.abc import Callable
from pathlib import Path

import numpy as np
from tqdm import tqdm

from fkv_jax.convert import layouts
from fkv_jax.convert.errors import ConvertError
from fkv_jax.convert.lora import Lora, merge_lora, read_lora
from fkv_jax.convert.plan import Plan, plan
from fkv_jax.convert.readers import Source, open_checkpoint
from fkv_jax.convert.wan_keymap import to_flax_params
from fkv_jax.checkpoint import DTYPES, CheckpointError, check_output_dir, save_transformer

# (container, layout) -> source kind recorded in config.json
KINDS = {
    ("pt", "wan"): "self_forcing_pt",
    ("pt", "diffusers"): "diffusers_pt",
    ("safetensors", "wan"): "wan_safetensors",
    ("safetensors", "diffusers"): "diffusers_safetensors",
}
PROGRESS_MIN_TENSORS = 100  # show a progress bar (on a TTY) from this many tensors on


def _read_all(src: Source, names: dict[str, str], progress: bool) -> dict[str, np.ndarray]:
    """Every tensor of ``src`` under its Wan name, floats as float32."""
    items = tqdm(
        names.items(),
        desc="reading",
        unit="tensor",
        disable=None if progress and len(names) >= PROGRESS_MIN_TENSORS else True,
    )
    return {wan: src.read(stored) for stored, wan in items}


def load_wan_state_dict(path: str | Path, key: str | None = None) -> dict[str, np.ndarray]:
    """Read any supported checkpoint as ``{Wan name: array}`` (wrappers stripped, diffusers names mapped back,
    floats upcast to float32). No validation against a model config."""
    src = open_checkpoint(path, key)
    _, names = layouts.normalise_names(src.shapes)
    return _read_all(src, names, progress=False)


def _apply_lora(wan: dict[str, np.ndarray], adapter: Lora, alpha: float | None) -> tuple[dict, dict, str]:
    """Merge ``adapter``; returns the merged dict, its config.json record and a summary line."""
    merged = merge_lora(wan, adapter, alpha)
    ranks = sorted({pair.rank for pair in adapter.pairs.values()})
    meta = {"path": str(adapter.path.absolute()), "key": adapter.key, "alpha": alpha, "ranks": ranks}
    shown = "= rank" if alpha is None else alpha
    line = f"lora:    {adapter.path} ({len(adapter.pairs)} Linear layers merged, rank {ranks}, alpha {shown})"
    return merged, meta, line


def _summary(src: Source, p: Plan, lora_line: str | None, dtype: str, output: Path) -> list[str]:
    c = p.cfg
    key = f", key {src.key!r}" if src.key else ""
    lines = [
        f"source:  {src.path} ({KINDS[src.container, p.layout]}{key}, {len(src.shapes)} tensors)",
        f"config:  {c.name}: dim {c.dim}, heads {c.num_heads}, layers {c.num_layers}, ffn {c.ffn_dim}, "
        f"text_dim {c.text_dim}, text_len {c.text_len}, freq_dim {c.freq_dim}, in/out {c.in_dim}/{c.out_dim}, "
        f"patch {list(c.patch_size)}",
        f"params:  {p.num_params:,} ({dtype})",
        f"output:  {output}",
    ]
    if lora_line:
        lines.insert(1, lora_line)
    return lines


def convert(
    input: str | Path,
    output: str | Path,
    *,
    num_heads: int | None = None,
    text_len: int | None = None,
    key: str | None = None,
    dtype: str = "float32",
    lora: str | Path | None = None,
    lora_alpha: float | None = None,
    preset: str | None = None,
    overwrite: bool = False,
    progress: bool = False,
    log: Callable[[str], None] | None = None,
) -> Path:
    """Convert a PyTorch/safetensors/diffusers Wan2.1 checkpoint into an fkv_jax checkpoint directory.

    Returns the absolute output path. ``log`` receives the summary lines. Raises :class:`ConvertError`
    on bad input; nothing is left at ``output`` then.
    """
    if dtype not in DTYPES:
        raise ConvertError(f"unsupported dtype {dtype!r}; choose one of {', '.join(DTYPES)}")
    if lora is None and lora_alpha is not None:
        raise ConvertError("--lora-alpha needs --lora")
    try:
        out = check_output_dir(output, overwrite)  # fail before reading gigabytes
        src = open_checkpoint(input, key)
        origin = str(src.hints_file) if src.hints_file else "config.json"
        p = plan(
            src.shapes, num_heads=num_heads, text_len=text_len, preset=preset, hints=src.hints, hints_origin=origin
        )
        adapter = read_lora(lora) if lora is not None else None  # small: read (and check its keys) first
        wan = _read_all(src, p.names, progress)
        lora_meta, lora_line = None, None
        if adapter is not None:
            wan, lora_meta, lora_line = _apply_lora(wan, adapter, lora_alpha)
        params = to_flax_params(wan, p.cfg, np.dtype(DTYPES[dtype]))
        kind = KINDS[src.container, p.layout]
        source = {"path": str(src.path.absolute()), "kind": kind, "key": src.key, "lora": lora_meta}
        summary = _summary(src, p, lora_line, dtype, out)
        del wan, src  # the source tensors: saving copies the params once more
        out = save_transformer(out, p.cfg, params, dtype, source, overwrite=overwrite)
    except CheckpointError as e:
        raise ConvertError(str(e)) from None
    if log is not None:
        for line in summary:
            log(line)
    return out
