"""Stored tensor names -> original Wan2.1 names: wrapper segments and the diffusers rename table.

Two layouts reach the converter:

* ``wan``: the original Wan names (Self Forcing / CausVid / LongLive ``.pt`` and Wan safetensors), possibly
  wrapped by training code: ``model.`` (``WanDiffusionWrapper``), ``module.`` (DDP),
  ``_fsdp_wrapped_module.`` / ``_checkpoint_wrapped_module.`` (FSDP, activation checkpointing),
  ``diffusion_model.`` (community single files), ``_orig_mod.`` (torch.compile).
* ``diffusers``: ``WanTransformer3DModel`` names, mapped back with :data:`DIFFUSERS_TOP` / :data:`DIFFUSERS_BLOCK`.

Unknown names pass through unchanged, so validation reports them as unexpected by name.
"""

from __future__ import annotations

import re
from collections.abc import Iterable, Mapping

from fkv_jax.convert.errors import ConvertError

# Path segments added by wrappers; dropped wherever they occur (no Wan or diffusers module has these names).
WRAPPER_SEGMENTS = frozenset(
    {"model", "module", "_fsdp_wrapped_module", "_checkpoint_wrapped_module", "diffusion_model", "_orig_mod"}
)
# Segments that only diffusers names contain.
DIFFUSERS_MARKERS = frozenset({"attn1", "attn2", "scale_shift_table", "condition_embedder"})

# diffusers module (or tensor) name -> Wan name, outside the blocks.
DIFFUSERS_TOP: dict[str, str] = {
    "patch_embedding": "patch_embedding",
    "condition_embedder.text_embedder.linear_1": "text_embedding.0",
    "condition_embedder.text_embedder.linear_2": "text_embedding.2",
    "condition_embedder.time_embedder.linear_1": "time_embedding.0",
    "condition_embedder.time_embedder.linear_2": "time_embedding.2",
    "condition_embedder.time_proj": "time_projection.1",
    "proj_out": "head.head",
    "scale_shift_table": "head.modulation",  # [1, 2, D]
}
# Inside ``blocks.{i}.``. Note the swap: diffusers ``norm2`` is Wan ``norm3`` (the affine cross-attn pre-norm);
# the parameter-free norms (Wan norm1/norm2, diffusers norm1/norm3) have no tensors.
DIFFUSERS_BLOCK: dict[str, str] = {
    "scale_shift_table": "modulation",  # [1, 6, D]
    **{
        f"{d_attn}.{d_proj}": f"{w_attn}.{w_proj}"
        for d_attn, w_attn in (("attn1", "self_attn"), ("attn2", "cross_attn"))
        for d_proj, w_proj in (
            ("to_q", "q"),
            ("to_k", "k"),
            ("to_v", "v"),
            ("to_out.0", "o"),
            ("norm_q", "norm_q"),
            ("norm_k", "norm_k"),
        )
    },
    "norm2": "norm3",
    "ffn.net.0.proj": "ffn.0",
    "ffn.net.2": "ffn.2",
}
_BLOCK = re.compile(r"^(blocks\.\d+)\.(.+)$")


def strip_wrappers(name: str, extra: Iterable[str] = ()) -> str:
    """Drop wrapper path segments anywhere in a dotted name (plus ``extra`` ones, e.g. PEFT's ``base_model``)."""
    drop = WRAPPER_SEGMENTS | set(extra)
    return ".".join(s for s in name.split(".") if s not in drop)


def is_diffusers(names: Iterable[str]) -> bool:
    """Whether (wrapper-stripped) names use the diffusers layout."""
    return any(DIFFUSERS_MARKERS.intersection(n.split(".")) for n in names)


def _rename(name: str, table: Mapping[str, str]) -> str:
    for src, dst in table.items():
        if name == src or name.startswith(src + "."):
            return dst + name[len(src) :]
    return name


def diffusers_to_wan(name: str) -> str:
    """One diffusers tensor name -> its Wan name (unknown names unchanged)."""
    m = _BLOCK.match(name)
    if m:
        return f"{m[1]}.{_rename(m[2], DIFFUSERS_BLOCK)}"
    return _rename(name, DIFFUSERS_TOP)


def normalise_names(names: Iterable[str]) -> tuple[str, dict[str, str]]:
    """Stored names -> ``(layout, {stored name: Wan name})``; raises if two names land on one Wan name."""
    names = list(names)
    stripped = {n: strip_wrappers(n) for n in names}
    layout = "diffusers" if is_diffusers(stripped.values()) else "wan"
    mapping = {n: diffusers_to_wan(s) for n, s in stripped.items()} if layout == "diffusers" else stripped
    seen: dict[str, str] = {}
    for stored, wan in mapping.items():
        if wan in seen:
            raise ConvertError(f"tensors {seen[wan]!r} and {stored!r} both map to the Wan name {wan!r}")
        seen[wan] = stored
    return layout, mapping
