"""Frozen configuration dataclasses and the named presets shipped in ``fkv_jax/presets/``.

Three small configs describe a run:

* :class:`ModelConfig`: the causal Wan2.1 DiT (sizes only; the weights live elsewhere).
* :class:`SamplerConfig`: the flow-matching schedule and the chunking of the AR rollout.
* :class:`CacheConfig`: the fixed-shape KV cache geometry (sink slots, ring slots, tokens per frame).

Presets are JSON files in ``fkv_jax/presets/``, read by :func:`fkv_jax.presets.load`.
"""

from __future__ import annotations

import dataclasses
from typing import Any


def _known_fields(cls, d: dict[str, Any], what: str) -> dict[str, Any]:
    """The entries of ``d`` that are fields of ``cls`` (a ``description`` is allowed and dropped)."""
    names = {f.name for f in dataclasses.fields(cls)}
    unknown = sorted(set(d) - names - {"description"})
    if unknown:
        raise ValueError(f"unknown {what} config keys: {unknown}")
    return {k: v for k, v in d.items() if k in names}


@dataclasses.dataclass(frozen=True)
class ModelConfig:
    """Sizes of a Wan2.1 causal DiT (``model_type='t2v'``)."""

    dim: int = 1536
    ffn_dim: int = 8960
    num_heads: int = 12
    num_layers: int = 30
    freq_dim: int = 256
    text_dim: int = 4096
    text_len: int = 512
    in_dim: int = 16
    out_dim: int = 16
    patch_size: tuple[int, int, int] = (1, 2, 2)
    eps: float = 1e-6
    # Default latent frame size [h, w] for this preset (the model itself works at any size that the patch divides).
    latent_hw: tuple[int, int] = (60, 104)
    name: str = "custom"
    # Frames of absolute temporal RoPE position the upstream table covers.
    rope_max_frames: int = 1024

    def __post_init__(self):
        if self.dim % self.num_heads:
            raise ValueError(f"dim={self.dim} is not divisible by num_heads={self.num_heads}")
        if self.head_dim % 2:
            raise ValueError(f"head_dim={self.head_dim} must be even for RoPE")
        if self.freq_dim % 2:
            raise ValueError(f"freq_dim={self.freq_dim} must be even")
        if self.patch_size[0] != 1:
            raise ValueError(f"temporal patch size must be 1 for the causal model, got patch_size={self.patch_size}")

    @property
    def head_dim(self) -> int:
        return self.dim // self.num_heads

    @property
    def patch_dim(self) -> int:
        pt, ph, pw = self.patch_size
        return self.in_dim * pt * ph * pw

    @property
    def out_patch_dim(self) -> int:
        pt, ph, pw = self.patch_size
        return self.out_dim * pt * ph * pw

    def tokens_per_frame(self, latent_hw: tuple[int, int] | None = None) -> int:
        gh, gw = self.grid_hw(tuple(latent_hw or self.latent_hw))
        return gh * gw

    def grid_hw(self, latent_hw: tuple[int, int]) -> tuple[int, int]:
        h, w = latent_hw
        _, ph, pw = self.patch_size
        if h % ph or w % pw:
            raise ValueError(f"latent size {h}x{w} is not divisible by the patch size {ph}x{pw}")
        return h // ph, w // pw

    def to_dict(self) -> dict[str, Any]:
        d = dataclasses.asdict(self)
        d["patch_size"] = list(self.patch_size)
        d["latent_hw"] = list(self.latent_hw)
        return d

    @classmethod
    def from_dict(cls, d: dict[str, Any]) -> "ModelConfig":
        kw = _known_fields(cls, d, "model")
        for k in ("patch_size", "latent_hw"):
            if k in kw:
                kw[k] = tuple(int(x) for x in kw[k])
        return cls(**kw)


@dataclasses.dataclass(frozen=True)
class SamplerConfig:
    """Flow-matching few-step sampler and AR chunking (upstream names where they exist)."""

    shift: float = 5.0
    denoising_steps: tuple[float, ...] = (1000, 750, 500, 250)
    warp_denoising_step: bool = True
    frames_per_block: int = 3
    local_attn_size: int = -1
    sink_size: int = 0
    context_noise: float = 0.0
    name: str = "custom"
    # "renoise": after step i take x0 and add fresh noise at sigma_{i+1} (upstream's few-step sampler, made for
    # distilled generators); "euler": deterministic flow-ODE step x + (sigma_{i+1} - sigma_i) v (for plain,
    # non-distilled flow-matching models); the last step returns x0 in both.
    solver: str = "renoise"
    # what the model outputs: "flow" (v = eps - x0; Wan and every upstream model) or "x0" (the clean frames,
    # then v = (x_t - x0) / sigma; the toy-world model, whose 8x8x3 pixel patches are as wide as its width)
    prediction: str = "flow"

    def __post_init__(self):
        if not self.denoising_steps:
            raise ValueError("denoising_steps is empty")
        if self.solver not in ("renoise", "euler"):
            raise ValueError(f"solver must be 'renoise' or 'euler', got {self.solver!r}")
        if self.prediction not in ("flow", "x0"):
            raise ValueError(f"prediction must be 'flow' or 'x0', got {self.prediction!r}")
        if self.frames_per_block < 1:
            raise ValueError(f"frames_per_block must be >= 1, got {self.frames_per_block}")
        if self.context_noise != 0:
            raise ValueError("context_noise != 0 is not supported at inference (upstream inference uses 0)")

    def to_dict(self) -> dict[str, Any]:
        d = dataclasses.asdict(self)
        d["denoising_steps"] = list(self.denoising_steps)
        return d

    @classmethod
    def from_dict(cls, d: dict[str, Any]) -> "SamplerConfig":
        kw = _known_fields(cls, d, "sampler")
        if "denoising_steps" in kw:
            kw["denoising_steps"] = tuple(float(x) for x in kw["denoising_steps"])
        return cls(**kw)


def list_presets(kind: str) -> list[str]:
    """Names of the presets of one kind (``models``, ``samplers``, ``policies``, ``heads``)."""
    from fkv_jax import presets

    return presets.names(kind)


def _read_preset(kind: str, name: str) -> dict[str, Any]:
    from fkv_jax import presets

    return presets.load(kind, name)


def model_preset(name: str) -> ModelConfig:
    """A model preset by name, e.g. ``"wan2.1-t2v-1.3b"`` or ``"tiny"``."""
    return ModelConfig.from_dict(_read_preset("models", name))


def sampler_preset(name: str) -> SamplerConfig:
    """A sampler preset by name: ``self_forcing``, ``longlive``, ``causvid`` or ``toy`` (the toy-world model's)."""
    return SamplerConfig.from_dict(_read_preset("samplers", name))
