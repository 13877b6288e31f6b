"""Shapes-only planning: stored names and shapes -> model config, name mapping and a full validation.

Nothing here touches tensor data, so a 1.3B checkpoint (or a synthetic list of its 825 shapes) is planned
without allocating its 5.7 GB. Sizes come from tensor shapes (:data:`SIZE_RULES`); the head count and the
text length cannot be read from shapes and come from flags, a preset or a model config.json.
"""

from __future__ import annotations

import dataclasses
import math
from collections.abc import Callable, Mapping

from fkv_jax.convert import layouts
from fkv_jax.convert.errors import ConvertError
from fkv_jax.convert.wan_keymap import BLOCK_KEY, expected_shapes
from fkv_jax.config import ModelConfig, list_presets, model_preset

DEFAULT_HEAD_DIM = 128  # Wan2.1: num_heads = dim // 128 unless told otherwise
DEFAULT_TEXT_LEN = 512
MAX_LISTED = 20  # names listed per problem category in a validation error

# ModelConfig field -> (Wan tensor, its rank, shape -> value). out_dim needs the patch size: see infer_sizes.
SIZE_RULES: dict[str, tuple[str, int, Callable[[tuple[int, ...]], object]]] = {
    "dim": ("patch_embedding.weight", 5, lambda s: s[0]),  # Conv3d [D, C, pt, ph, pw]
    "in_dim": ("patch_embedding.weight", 5, lambda s: s[1]),
    "patch_size": ("patch_embedding.weight", 5, lambda s: tuple(s[2:])),
    "text_dim": ("text_embedding.0.weight", 2, lambda s: s[1]),  # [D, text_dim]
    "freq_dim": ("time_embedding.0.weight", 2, lambda s: s[1]),  # [D, freq_dim]
    "ffn_dim": ("blocks.0.ffn.0.weight", 2, lambda s: s[0]),  # [ffn, D]
}
OUT_RULE = ("head.head.weight", 2)  # [out_dim * pt * ph * pw, D]
# Tensors that state the same size (tensor, rank, axis): when they disagree, the error names every one of them
# (sizes are otherwise read from one tensor, and a damaged one would make its healthy neighbours look wrong).
SIZE_WITNESSES: dict[str, list[tuple[str, int, int]]] = {
    "dim": [
        ("patch_embedding.weight", 5, 0),
        ("patch_embedding.bias", 1, 0),
        ("head.head.weight", 2, 1),
        ("text_embedding.0.weight", 2, 0),
        ("time_embedding.0.weight", 2, 0),
    ],
    "out_dim x patch volume": [("head.head.weight", 2, 0), ("head.head.bias", 1, 0)],
    "ffn_dim": [("blocks.0.ffn.0.weight", 2, 0), ("blocks.0.ffn.0.bias", 1, 0), ("blocks.0.ffn.2.weight", 2, 1)],
}
# Fields a preset must share with the sizes read from the tensors.
SIZE_FIELDS = ("dim", "in_dim", "out_dim", "patch_size", "text_dim", "freq_dim", "ffn_dim", "num_layers")


@dataclasses.dataclass(frozen=True)
class Plan:
    """What a checkpoint is: its model config, its layout, and where each stored tensor goes."""

    cfg: ModelConfig
    layout: str  # "wan" | "diffusers"
    names: dict[str, str]  # stored name -> Wan name

    @property
    def num_params(self) -> int:
        return sum(math.prod(s) for s in expected_shapes(self.cfg).values())


def _shape(shapes: Mapping[str, tuple[int, ...]], key: str, rank: int) -> tuple[int, ...]:
    if key not in shapes:
        raise ConvertError(
            f"cannot infer the model size: tensor {key!r} is missing (is this a Wan2.1 transformer checkpoint? "
            f"found {len(shapes)} tensors, e.g. {sorted(shapes)[:5]})"
        )
    if len(shapes[key]) != rank:
        raise ConvertError(f"cannot infer the model size: {key!r} has shape {list(shapes[key])}, expected {rank} dims")
    return tuple(shapes[key])


def infer_sizes(wan_shapes: Mapping[str, tuple[int, ...]]) -> dict[str, object]:
    """Every ModelConfig size readable from Wan-named shapes (all but num_heads and text_len)."""
    for size, witnesses in SIZE_WITNESSES.items():
        seen = [
            (k, tuple(wan_shapes[k]), wan_shapes[k][axis])
            for k, rank, axis in witnesses
            if k in wan_shapes and len(wan_shapes[k]) == rank
        ]
        if len({v for _, _, v in seen}) > 1:
            raise ConvertError(
                f"the tensors disagree on {size}: "
                + ", ".join(f"{k} {_fmt(s)} gives {v}" for k, s, v in seen)
                + " (one of them is damaged or comes from another model)"
            )
    sizes = {f: fn(_shape(wan_shapes, key, rank)) for f, (key, rank, fn) in SIZE_RULES.items()}
    patch_volume = math.prod(sizes["patch_size"])
    out_patch = _shape(wan_shapes, *OUT_RULE)[0]
    if out_patch % patch_volume:
        raise ConvertError(f"head.head.weight rows ({out_patch}) are not a multiple of the patch volume {patch_volume}")
    sizes["out_dim"] = out_patch // patch_volume
    sizes["num_layers"] = 1 + max(int(m[1]) for k in wan_shapes if (m := BLOCK_KEY.match(k)))
    return sizes


def _agree(field: str, candidates: list[tuple[str, int | None]], default: Callable[[], int]) -> int:
    """The one value every given source states for ``field``, or the default if none does."""
    given = [(origin, v) for origin, v in candidates if v is not None]
    if len({v for _, v in given}) > 1:
        raise ConvertError(f"conflicting {field}: " + ", ".join(f"{v} from {origin}" for origin, v in given))
    return given[0][1] if given else default()


def _default_heads(dim: int) -> int:
    if dim % DEFAULT_HEAD_DIM:
        raise ConvertError(f"dim={dim} is not a multiple of {DEFAULT_HEAD_DIM}: pass --num-heads (or --preset)")
    return dim // DEFAULT_HEAD_DIM


def _matching_preset(cfg: ModelConfig) -> ModelConfig:
    """The shipped preset with exactly these sizes (for its name and latent size), else ``cfg`` itself."""
    keep = ("name", "latent_hw")
    for name in list_presets("models"):
        p = model_preset(name)
        if dataclasses.replace(p, **{k: getattr(cfg, k) for k in keep}) == cfg:
            return p
    return cfg


def resolve_config(
    sizes: Mapping[str, object],
    *,
    num_heads: int | None = None,
    text_len: int | None = None,
    preset: str | None = None,
    hints: Mapping[str, int] | None = None,
    hints_origin: str = "config.json",
) -> ModelConfig:
    """Build the ModelConfig from inferred sizes plus head count and text length from flags/preset/config file.

    Every source that states ``num_heads`` (or ``text_len``) must agree; a preset must also match the sizes.
    """
    hints = hints or {}
    p = None
    if preset is not None:
        try:
            p = model_preset(preset)
        except ValueError as e:
            raise ConvertError(str(e)) from None
        diff = [f"{f}: checkpoint {sizes[f]}, preset {getattr(p, f)}" for f in SIZE_FIELDS if getattr(p, f) != sizes[f]]
        if diff:
            raise ConvertError(f"the checkpoint does not match preset {preset!r}: " + "; ".join(diff))
    heads = _agree(
        "num_heads",
        [("--num-heads", num_heads), (f"preset {preset}", p and p.num_heads), (hints_origin, hints.get("num_heads"))],
        lambda: _default_heads(int(sizes["dim"])),
    )
    tlen = _agree(
        "text_len",
        [("--text-len", text_len), (f"preset {preset}", p and p.text_len), (hints_origin, hints.get("text_len"))],
        lambda: DEFAULT_TEXT_LEN,
    )
    if p is not None:
        return p
    try:
        cfg = ModelConfig(**sizes, num_heads=heads, text_len=tlen)
    except (TypeError, ValueError) as e:
        raise ConvertError(f"the inferred model config is invalid: {e}") from None
    return _matching_preset(cfg)


def _fmt(shape: tuple[int, ...]) -> str:
    return "[" + ", ".join(map(str, shape)) + "]"


def _listing(title: str, lines: list[str]) -> list[str]:
    if not lines:
        return []
    more = [f"    ... and {len(lines) - MAX_LISTED} more"] if len(lines) > MAX_LISTED else []
    return [f"  {title} ({len(lines)}):"] + [f"    {x}" for x in lines[:MAX_LISTED]] + more


def validate(stored: Mapping[str, tuple[int, ...]], names: Mapping[str, str], cfg: ModelConfig) -> None:
    """Raise one error listing every missing, unexpected and mis-shaped tensor (stored names, with shapes)."""
    expected = expected_shapes(cfg)
    wan_to_stored = {w: s for s, w in names.items()}
    missing = [f"{w} {_fmt(s)}" for w, s in expected.items() if w not in wan_to_stored]
    unexpected = [f"{s} {_fmt(stored[s])}" for s, w in names.items() if w not in expected]
    wrong = [
        f"{s}: {_fmt(stored[s])}, expected {_fmt(expected[w])}"
        for s, w in names.items()
        if w in expected and tuple(stored[s]) != expected[w]
    ]
    if missing or unexpected or wrong:
        head = (
            f"the checkpoint does not match a Wan2.1 model with dim={cfg.dim}, layers={cfg.num_layers}, "
            f"ffn_dim={cfg.ffn_dim}, text_dim={cfg.text_dim}: {len(missing)} missing, {len(unexpected)} unexpected, "
            f"{len(wrong)} wrong shape"
        )
        body = _listing("missing (Wan names)", missing) + _listing("unexpected", unexpected)
        body += _listing("wrong shape", wrong)
        raise ConvertError("\n".join([head, *body]))


def plan(
    shapes: Mapping[str, tuple[int, ...]],
    *,
    num_heads: int | None = None,
    text_len: int | None = None,
    preset: str | None = None,
    hints: Mapping[str, int] | None = None,
    hints_origin: str = "config.json",
) -> Plan:
    """Stored names and shapes (any supported layout) -> validated :class:`Plan`. Touches shapes only."""
    layout, names = layouts.normalise_names(shapes)
    wan_shapes = {names[k]: tuple(s) for k, s in shapes.items()}
    if not any(BLOCK_KEY.match(k) for k in wan_shapes):
        raise ConvertError(
            f"no transformer blocks (blocks.N.*) among {len(shapes)} tensors, e.g. {sorted(shapes)[:5]}: "
            "not a Wan2.1 transformer checkpoint"
        )
    sizes = infer_sizes(wan_shapes)
    cfg = resolve_config(
        sizes, num_heads=num_heads, text_len=text_len, preset=preset, hints=hints, hints_origin=hints_origin
    )
    validate(shapes, names, cfg)
    return Plan(cfg=cfg, layout=layout, names=names)
