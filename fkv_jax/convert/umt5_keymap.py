"""Declarative key map of the UMT5 text encoder: Wan names <-> fkv_jax param paths, and the HF layout.

Two layouts reach the converter:

* ``wan``: Wan's ``models_t5_umt5-xxl-enc-bf16.pth`` (``token_embedding.weight``, ``blocks.N.{norm1,norm2}.weight``,
  ``blocks.N.attn.{q,k,v,o}.weight``, ``blocks.N.ffn.{gate.0,fc1,fc2}.weight``,
  ``blocks.N.pos_embedding.embedding.weight`` [buckets, heads], ``norm.weight``).
* ``hf``: Hugging Face ``UMT5EncoderModel`` / ``UMT5ForConditionalGeneration`` safetensors
  (``encoder.block.N.layer.0.SelfAttention.*``, ``...layer.1.DenseReluDense.wi_0/wi_1/wo``, ``shared.weight``),
  mapped back to Wan names by :data:`HF_BLOCK` (``wi_0`` is the GELU-gated branch = Wan ``gate.0``, ``wi_1`` the
  linear branch = ``fc1``). Decoder and ``lm_head`` tensors are ignored.
"""

from __future__ import annotations

import re
from collections.abc import Iterable, Mapping

from fkv_jax.convert.errors import ConvertError
from fkv_jax.convert.wan_keymap import IDENTITY, LINEAR, Transform
from fkv_jax.text.umt5 import UMT5Config

TOP_LEVEL: dict[str, tuple[str, Transform]] = {
    "token_embedding.weight": ("token_embedding", IDENTITY),
    "norm.weight": ("norm/scale", IDENTITY),
}
PER_BLOCK: dict[str, tuple[str, Transform]] = {
    "norm1.weight": ("norm1/scale", IDENTITY),
    **{f"attn.{p}.weight": (f"attn/{p}/kernel", LINEAR) for p in ("q", "k", "v", "o")},
    "norm2.weight": ("norm2/scale", IDENTITY),
    "ffn.gate.0.weight": ("ffn/gate/kernel", LINEAR),
    "ffn.fc1.weight": ("ffn/fc1/kernel", LINEAR),
    "ffn.fc2.weight": ("ffn/fc2/kernel", LINEAR),
    "pos_embedding.embedding.weight": ("pos_embedding", IDENTITY),
}
BLOCK_KEY = re.compile(r"^blocks\.(\d+)\.(.+)$")

# Hugging Face (T5 family) -> Wan, inside ``encoder.block.N.``
HF_BLOCK: dict[str, str] = {
    "layer.0.layer_norm.weight": "norm1.weight",
    **{f"layer.0.SelfAttention.{p}.weight": f"attn.{p}.weight" for p in ("q", "k", "v", "o")},
    "layer.0.SelfAttention.relative_attention_bias.weight": "pos_embedding.embedding.weight",
    "layer.1.layer_norm.weight": "norm2.weight",
    "layer.1.DenseReluDense.wi_0.weight": "ffn.gate.0.weight",
    "layer.1.DenseReluDense.wi_1.weight": "ffn.fc1.weight",
    "layer.1.DenseReluDense.wo.weight": "ffn.fc2.weight",
}
HF_TOP = {"encoder.embed_tokens.weight": "token_embedding.weight", "encoder.final_layer_norm.weight": "norm.weight"}
_HF_BLOCK = re.compile(r"^encoder\.block\.(\d+)\.(.+)$")
HF_IGNORED = re.compile(r"^(decoder\.|lm_head\.)")
# Hints from a HF config.json (UMT5Config / T5Config) -> our field
HF_CONFIG_FIELDS = {
    "num_heads": "num_heads",
    "relative_attention_num_buckets": "num_buckets",
    "relative_attention_max_distance": "max_dist",
    "layer_norm_epsilon": "eps",
}


def is_umt5(names: Iterable[str]) -> bool:
    names = set(names)
    return ("token_embedding.weight" in names and any(".attn.q.weight" in n for n in names)) or any(
        n.startswith("encoder.block.") and ".SelfAttention." in n for n in names
    )


def normalise_names(names: Iterable[str]) -> tuple[str, dict[str, str], list[str]]:
    """Stored names -> ``(layout, {stored: Wan name}, ignored stored names)``. Unknown names pass through."""
    names = list(names)
    if not any(_HF_BLOCK.match(n) for n in names):
        return "wan", {n: n for n in names}, []
    mapping, ignored = {}, []
    for n in names:
        m = _HF_BLOCK.match(n)
        if HF_IGNORED.match(n):
            ignored.append(n)
        elif m and m[2] in HF_BLOCK:
            mapping[n] = f"blocks.{m[1]}.{HF_BLOCK[m[2]]}"
        elif n in HF_TOP:
            mapping[n] = HF_TOP[n]
        elif n == "shared.weight":  # tied to encoder.embed_tokens: use it only when that one is absent
            if "encoder.embed_tokens.weight" in names:
                ignored.append(n)
            else:
                mapping[n] = "token_embedding.weight"
        else:
            mapping[n] = n
    return "hf", mapping, ignored


def infer_config(
    wan_shapes: Mapping[str, tuple[int, ...]],
    *,
    num_heads: int | None = None,
    text_len: int = 512,
    hints: Mapping[str, object] | None = None,
) -> UMT5Config:
    """Sizes from the shapes (vocab, dim, dim_attn, dim_ffn, layers, buckets and heads of the position tables)."""
    hints = dict(hints or {})

    def shape(key, rank):
        s = wan_shapes.get(key)
        if s is None or len(s) != rank:
            raise ConvertError(
                f"cannot infer the text encoder size: {key!r} is "
                f"{'missing' if s is None else f'of shape {list(s)}'} (found e.g. {sorted(wan_shapes)[:5]})"
            )
        return s

    vocab, dim = shape("token_embedding.weight", 2)
    dim_attn = shape("blocks.0.attn.q.weight", 2)[0]
    dim_ffn = shape("blocks.0.ffn.fc1.weight", 2)[0]
    buckets, heads = shape("blocks.0.pos_embedding.embedding.weight", 2)
    layers = 1 + max(int(m[1]) for k in wan_shapes if (m := BLOCK_KEY.match(k)))
    stated = [(f, v) for f, v in (("--num-heads", num_heads), ("config.json", hints.get("num_heads"))) if v is not None]
    for origin, v in stated:
        if v != heads:
            raise ConvertError(f"{origin} says num_heads={v}, but the position bias tables have {heads} heads")
    if hints.get("num_buckets") not in (None, buckets):
        raise ConvertError(f"config.json says {hints['num_buckets']} buckets, the tables have {buckets}")
    try:
        return UMT5Config(
            vocab_size=vocab,
            dim=dim,
            dim_attn=dim_attn,
            dim_ffn=dim_ffn,
            num_heads=heads,
            num_layers=layers,
            num_buckets=buckets,
            max_dist=int(hints.get("max_dist", 128)),
            eps=float(hints.get("eps", 1e-6)),
            text_len=text_len,
            name="umt5-xxl" if (vocab, dim, layers) == (256384, 4096, 24) else "umt5",
        )
    except ValueError as e:
        raise ConvertError(f"the inferred text encoder config is invalid: {e}") from None


def expected_shapes(cfg: UMT5Config) -> dict[str, tuple[int, ...]]:
    """Every Wan key of an encoder with this config, with its PyTorch shape."""
    d, a, f = cfg.dim, cfg.dim_attn, cfg.dim_ffn
    block = {
        "norm1.weight": (d,),
        "attn.q.weight": (a, d),
        "attn.k.weight": (a, d),
        "attn.v.weight": (a, d),
        "attn.o.weight": (d, a),
        "norm2.weight": (d,),
        "ffn.gate.0.weight": (f, d),
        "ffn.fc1.weight": (f, d),
        "ffn.fc2.weight": (d, f),
        "pos_embedding.embedding.weight": (cfg.num_buckets, cfg.num_heads),
    }
    assert set(block) == set(PER_BLOCK)
    out = {"token_embedding.weight": (cfg.vocab_size, d), "norm.weight": (d,)}
    for i in range(cfg.num_layers):
        out.update({f"blocks.{i}.{k}": s for k, s in block.items()})
    return out


def rows(cfg: UMT5Config) -> dict[str, tuple[str, Transform, int | None]]:
    """Wan name -> (Flax param path, transform, layer index in the stacked blocks or None)."""
    out = {k: (p, tf, None) for k, (p, tf) in TOP_LEVEL.items()}
    for i in range(cfg.num_layers):
        out.update({f"blocks.{i}.{k}": (f"blocks/{p}", tf, i) for k, (p, tf) in PER_BLOCK.items()})
    return out
