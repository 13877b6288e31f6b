"""Declarative key map of the Wan2.1 video VAE: Wan names <-> fkv_jax param paths, and the diffusers layout.

Rows are generated from the layer plans of :class:`fkv_jax.vae.VAEConfig` (the same plans build the Flax
modules), one row per tensor: Wan name -> (Flax path, transform, PyTorch shape). Transforms turn PyTorch
layouts into channel-last ones: Conv3d ``[o, i, t, h, w] -> [t, h, w, i, o]``, Conv2d ``[o, i, h, w] -> [h, w, i, o]``,
1x1 Conv2d (attention) -> dense ``[i, o]``, RMS-norm gamma ``[C, 1, 1(, 1)] -> [C]``.

Layouts: ``wan`` (``Wan2.1_VAE.pth``: ``encoder.downsamples.N``, ``decoder.upsamples.N``, ``residual.{0,2,3,6}``,
top-level ``conv1`` / ``conv2``) and ``diffusers`` (``AutoencoderKLWan``: ``down_blocks``, ``mid_block``,
``up_blocks.J.resnets.K`` / ``upsamplers.0``, ``norm1/conv1/norm2/conv2/conv_shortcut``, ``conv_in``/``norm_out``/
``conv_out``, ``quant_conv``/``post_quant_conv``), mapped back to Wan names by :func:`diffusers_to_wan`.
"""

from __future__ import annotations

import dataclasses
import re
from collections.abc import Iterable, Mapping

from fkv_jax.convert.errors import ConvertError
from fkv_jax.convert.wan_keymap import IDENTITY, Transform
from fkv_jax.vae.model import WAN21_LATENTS_MEAN, WAN21_LATENTS_STD, VAEConfig

CONV3D = Transform("conv3d", lambda a: a.transpose(2, 3, 4, 1, 0))
CONV2D = Transform("conv2d", lambda a: a.transpose(2, 3, 1, 0))
CONV1X1 = Transform("conv1x1_dense", lambda a: a.reshape(a.shape[0], a.shape[1]).T)
GAMMA = Transform("gamma", lambda a: a.reshape(-1))

Row = tuple[str, Transform, tuple[int, ...]]  # (Flax path, transform, PyTorch shape)


def _conv(rows, wan, path, cin, cout, kernel, tf=CONV3D):
    rows[f"{wan}.weight"] = (f"{path}/kernel", tf, (cout, cin, *kernel))
    rows[f"{wan}.bias"] = (f"{path}/bias", IDENTITY, (cout,))


def _gamma(rows, wan, path, c, rank=4):
    rows[f"{wan}.gamma"] = (f"{path}/gamma", GAMMA, (c, *(1,) * (rank - 1)))


def _res(rows, wan, path, cin, cout):
    _gamma(rows, f"{wan}.residual.0", f"{path}/norm1", cin)
    _conv(rows, f"{wan}.residual.2", f"{path}/conv1", cin, cout, (3, 3, 3))
    _gamma(rows, f"{wan}.residual.3", f"{path}/norm2", cout)
    _conv(rows, f"{wan}.residual.6", f"{path}/conv2", cout, cout, (3, 3, 3))
    if cin != cout:
        _conv(rows, f"{wan}.shortcut", f"{path}/shortcut", cin, cout, (1, 1, 1))


def _attn(rows, wan, path, c):
    _gamma(rows, f"{wan}.norm", f"{path}/norm", c, rank=3)
    _conv(rows, f"{wan}.to_qkv", f"{path}/to_qkv", c, 3 * c, (1, 1), CONV1X1)
    _conv(rows, f"{wan}.proj", f"{path}/proj", c, c, (1, 1), CONV1X1)


def _layer(rows, wan, path, spec):
    kind = spec[0]
    if kind == "res":
        _res(rows, wan, path, spec[1], spec[2])
    elif kind == "attn":
        _attn(rows, wan, path, spec[1])
    else:  # "up" halves the channels, "down" keeps them; both may have a (3, 1, 1) temporal conv
        c, temporal = spec[1], spec[2]
        _conv(rows, f"{wan}.resample.1", f"{path}/resample", c, c // 2 if kind == "up" else c, (3, 3), CONV2D)
        if temporal:
            _conv(rows, f"{wan}.time_conv", f"{path}/time_conv", c, 2 * c if kind == "up" else c, (3, 1, 1))


def rows(cfg: VAEConfig) -> dict[str, Row]:
    """Every Wan key of a VAE with this config -> (Flax path, transform, PyTorch shape)."""
    r: dict[str, Row] = {}
    z = cfg.z_dim
    _conv(r, "conv1", "conv1", 2 * z, 2 * z, (1, 1, 1))
    _conv(r, "conv2", "conv2", z, z, (1, 1, 1))
    c_mid = cfg.mid_dim
    for part, plan in (("encoder", cfg.encoder_plan()), ("decoder", cfg.decoder_plan())):
        c_in, c_out = (3, cfg.dim) if part == "encoder" else (z, c_mid)
        _conv(r, f"{part}.conv1", f"{part}/conv1", c_in, c_out, (3, 3, 3))
        _res(r, f"{part}.middle.0", f"{part}/middle/0", c_mid, c_mid)
        _attn(r, f"{part}.middle.1", f"{part}/middle/1", c_mid)
        _res(r, f"{part}.middle.2", f"{part}/middle/2", c_mid, c_mid)
        seq = "downsamples" if part == "encoder" else "upsamples"
        for i, spec in enumerate(plan):
            _layer(r, f"{part}.{seq}.{i}", f"{part}/{seq}/{i}", spec)
        c_head = c_mid if part == "encoder" else cfg.decoder_out_dim
        _gamma(r, f"{part}.head.0", f"{part}/head_norm", c_head)
        _conv(r, f"{part}.head.2", f"{part}/head_conv", c_head, 2 * z if part == "encoder" else 3, (3, 3, 3))
    return r


def expected_shapes(cfg: VAEConfig) -> dict[str, tuple[int, ...]]:
    return {k: shape for k, (_, _, shape) in rows(cfg).items()}


# ---- detection and layouts ---------------------------------------------------------------------------------

DIFFUSERS_MARKERS = ("down_blocks", "up_blocks", "mid_block", "quant_conv", "conv_in", "conv_out")


def is_vae(names: Iterable[str]) -> bool:
    names = list(names)
    return any(n.startswith("decoder.") for n in names) and any(
        n.startswith(("encoder.", "conv2.", "post_quant_conv.")) for n in names
    )


_RES_RENAME = (
    ("norm1.gamma", "residual.0.gamma"),
    ("conv1.", "residual.2."),
    ("norm2.gamma", "residual.3.gamma"),
    ("conv2.", "residual.6."),
    ("conv_shortcut.", "shortcut."),
)


def _res_inner(rest: str) -> str:
    for src, dst in _RES_RENAME:
        if rest.startswith(src):
            return dst + rest[len(src) :]
    return rest


def diffusers_to_wan(name: str, num_res_blocks: int) -> str:
    """One diffusers ``AutoencoderKLWan`` tensor name -> its Wan name (unknown names unchanged)."""
    for src, dst in (("quant_conv.", "conv1."), ("post_quant_conv.", "conv2.")):
        if name.startswith(src):
            return dst + name[len(src) :]
    m = re.match(r"^(encoder|decoder)\.(.+)$", name)
    if not m:
        return name
    part, rest = m[1], m[2]
    for src, dst in (("conv_in.", "conv1."), ("norm_out.", "head.0."), ("conv_out.", "head.2.")):
        if rest.startswith(src):
            return f"{part}.{dst}{rest[len(src) :]}"
    if mm := re.match(r"^mid_block\.(resnets|attentions)\.(\d+)\.(.+)$", rest):
        idx = {("resnets", "0"): 0, ("attentions", "0"): 1, ("resnets", "1"): 2}.get((mm[1], mm[2]))
        if idx is None:
            return name
        inner = _res_inner(mm[3]) if mm[1] == "resnets" else mm[3]
        return f"{part}.middle.{idx}.{inner}"
    if mm := re.match(r"^down_blocks\.(\d+)\.(.+)$", rest):
        return f"{part}.downsamples.{mm[1]}.{_res_inner(mm[2])}"
    if mm := re.match(r"^up_blocks\.(\d+)\.(resnets\.(\d+)|upsamplers\.0)\.(.+)$", rest):
        base = int(mm[1]) * (num_res_blocks + 2)
        if mm[3] is not None:
            return f"{part}.upsamples.{base + int(mm[3])}.{_res_inner(mm[4])}"
        return f"{part}.upsamples.{base + num_res_blocks + 1}.{mm[4]}"
    return name


def normalise_names(names: Iterable[str]) -> tuple[str, dict[str, str], list[str]]:
    """Stored names -> ``(layout, {stored: Wan name}, ignored)``; raises if two names land on one Wan name."""
    names = list(names)
    if not any(seg in DIFFUSERS_MARKERS for n in names for seg in n.split(".")):
        return "wan", {n: n for n in names}, []
    res = {int(m[1]) for n in names if (m := re.match(r"^decoder\.up_blocks\.0\.resnets\.(\d+)\.", n))}
    if not res:
        raise ConvertError("diffusers VAE without decoder.up_blocks.0.resnets.*: cannot tell num_res_blocks")
    mapping = {n: diffusers_to_wan(n, max(res)) for n in names}
    seen: dict[str, str] = {}
    for stored, wan in mapping.items():
        if wan in seen:
            raise ConvertError(f"tensors {seen[wan]!r} and {stored!r} both map to the Wan name {wan!r}")
        seen[wan] = stored
    return "diffusers", mapping, []


def infer_config(wan_shapes: Mapping[str, tuple[int, ...]], hints: Mapping[str, object] | None = None) -> VAEConfig:
    """Sizes from the encoder's layer sequence (dim, z_dim, dim_mult, residual blocks, attention, temporal
    resamples); latent mean / std from ``hints`` (a diffusers config.json), else Wan2.1's constants."""
    hints = dict(hints or {})

    def shape(key):
        if key not in wan_shapes:
            raise ConvertError(
                f"cannot infer the VAE size: tensor {key!r} is missing "
                f"(found {len(wan_shapes)} tensors, e.g. {sorted(wan_shapes)[:5]})"
            )
        return wan_shapes[key]

    z_dim = shape("conv2.weight")[0]
    dim = shape("encoder.conv1.weight")[0]
    idx = sorted({int(m[1]) for k in wan_shapes if (m := re.match(r"^encoder\.downsamples\.(\d+)\.", k))})
    levels: list[dict] = [{"res": [], "attn": False}]
    temporal: list[bool] = []
    for i in idx:
        pre = f"encoder.downsamples.{i}"
        if f"{pre}.residual.2.weight" in wan_shapes:
            levels[-1]["res"].append(wan_shapes[f"{pre}.residual.2.weight"][0])
        elif f"{pre}.to_qkv.weight" in wan_shapes:
            levels[-1]["attn"] = True
        elif f"{pre}.resample.1.weight" in wan_shapes:
            temporal.append(f"{pre}.time_conv.weight" in wan_shapes)
            levels.append({"res": [], "attn": False})
        else:
            raise ConvertError(
                f"cannot tell what encoder.downsamples.{i} is (no residual, attention or resample tensor)"
            )
    if not levels[0]["res"] or any(not lv["res"] for lv in levels):
        raise ConvertError(
            "every encoder level needs residual blocks; the checkpoint's encoder.downsamples "
            f"sequence does not look like a Wan VAE ({len(idx)} entries)"
        )
    mult = []
    for lv in levels:
        if lv["res"][-1] % dim:
            raise ConvertError(f"encoder level width {lv['res'][-1]} is not a multiple of dim {dim}")
        mult.append(lv["res"][-1] // dim)
    mean = tuple(hints.get("latents_mean") or (WAN21_LATENTS_MEAN if z_dim == len(WAN21_LATENTS_MEAN) else ()))
    std = tuple(hints.get("latents_std") or (WAN21_LATENTS_STD if z_dim == len(WAN21_LATENTS_STD) else ()))
    if not mean or not std:
        raise ConvertError(
            f"z_dim={z_dim}: no latent mean/std known for it (Wan2.1's are for z_dim 16); convert "
            "from a diffusers folder whose config.json has latents_mean / latents_std"
        )
    try:
        cfg = VAEConfig(
            dim=dim,
            z_dim=z_dim,
            dim_mult=tuple(mult),
            num_res_blocks=len(levels[0]["res"]),
            attn_scales=tuple(1.0 / 2**i for i, lv in enumerate(levels) if lv["attn"]),
            temperal_downsample=tuple(temporal),
            latents_mean=mean,
            latents_std=std,
        )
    except ValueError as e:
        raise ConvertError(f"the inferred VAE config is invalid: {e}") from None
    default = VAEConfig()
    name = (
        default.name if (cfg.dim, cfg.dim_mult, cfg.z_dim) == (default.dim, default.dim_mult, default.z_dim) else "vae"
    )
    return dataclasses.replace(cfg, name=name)
