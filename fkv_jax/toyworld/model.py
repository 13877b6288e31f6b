"""The shipped toy-world model: loading, text context, and video generation with the KV-cache Sampler.

    from fkv_jax.toyworld.model import generate_video
    frames = generate_video(["a red circle and a blue square"], num_frames=24, seed=0)   # [1, 24, 3, 32, 32]

Generation is the real AR rollout of :class:`fkv_jax.sampling.rollout.Sampler` (per chunk of 3 frames: the
denoising steps, then the clean t = 0 pass whose K/V go to the cache), in pixel space, so there is no VAE.
"""

from __future__ import annotations

import dataclasses
import functools
import json
from pathlib import Path

import jax
import jax.numpy as jnp
import numpy as np
from flax import nnx

from fkv_jax.config import ModelConfig, SamplerConfig
from fkv_jax.model.build import abstract_model
from fkv_jax.model.transformer import CausalWanModel
from fkv_jax.sampling.rollout import Sampler
from fkv_jax.toyworld.text import ToyTextEncoder, tokenize

TOY_DIR = Path(__file__).resolve().parent
WEIGHTS_DIR = TOY_DIR / "weights"
SAMPLER_JSON = TOY_DIR / "toy_sampler.json"


def toy_sampler_config(weights: str | Path | None = None, **overrides) -> SamplerConfig:
    """The toy model's default sampler (``fkv_jax/toyworld/toy_sampler.json``), with optional overrides.

    ``prediction`` (what the model outputs, x0 or flow) comes from the weights' ``config.json`` (the
    training config it was trained with), the shipped weights by default.
    """
    sc = SamplerConfig.from_dict(json.loads(SAMPLER_JSON.read_text())["sampler"])
    pred = weights_prediction(weights)
    if pred is not None:
        sc = dataclasses.replace(sc, prediction=pred)
    return dataclasses.replace(sc, **overrides) if overrides else sc


def weights_prediction(weights: str | Path | None = None) -> str | None:
    """``"x0"`` or ``"flow"``: the output a toy weights directory was trained to predict (None: unknown)."""
    meta_file = Path(weights if weights is not None else WEIGHTS_DIR) / "config.json"
    if not meta_file.is_file():
        return None
    return json.loads(meta_file.read_text()).get("train", {}).get("prediction", "flow")


def _abstract_text_encoder(cfg: ModelConfig) -> ToyTextEncoder:
    return nnx.eval_shape(lambda: ToyTextEncoder(cfg.text_dim, cfg.text_len, rngs=nnx.Rngs(0)))


def load_params(path: str | Path | None = None) -> tuple[ModelConfig, dict]:
    """(config, {"model": pure dict, "text": pure dict}) from an exported weights directory."""
    from fkv_jax.toyworld.train import unflatten

    path = Path(path) if path is not None else WEIGHTS_DIR
    meta_file, params_file = path / "config.json", path / "params.npz"
    if not meta_file.is_file() or not params_file.is_file():
        raise FileNotFoundError(f"{path} is not a toy-world weights directory (needs config.json and params.npz); "
                                "train one with `python -m fkv_jax.toyworld.train --export DIR`")
    try:
        cfg = ModelConfig.from_dict(json.loads(meta_file.read_text())["model"])
    except (ValueError, KeyError, TypeError) as e:
        raise ValueError(f"{meta_file} is not a toy-world config.json (no valid 'model' section): {e}") from e
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
    problems += [f"{k} has shape {have[k]}, the config needs {want[k]}"
                 for k in sorted(want.keys() & have.keys()) if have[k] != want[k]]
    if problems:
        raise ValueError(f"{params_file} does not match its config.json: " + "; ".join(problems[:8])
                         + (f"; ... {len(problems) - 8} more" if len(problems) > 8 else ""))


def build(cfg: ModelConfig, params: dict) -> tuple[CausalWanModel, ToyTextEncoder]:
    """Modules with the given pure-dict params (shapes checked by ``replace_by_pure_dict``)."""
    out = []
    for abstract, key in ((abstract_model(cfg), "model"), (_abstract_text_encoder(cfg), "text")):
        gdef, state = nnx.split(abstract, nnx.Param)
        nnx.replace_by_pure_dict(state, jax.tree.map(jnp.asarray, params[key]))
        out.append(nnx.merge(gdef, state))
    return out[0], out[1]


@functools.lru_cache(maxsize=4)
def load_toy_model(path: str | None = None) -> tuple[ModelConfig, CausalWanModel, ToyTextEncoder]:
    """(ModelConfig, CausalWanModel, text encoder) from the shipped weights (or an exported directory)."""
    cfg, params = load_params(path)
    model, enc = build(cfg, params)
    return cfg, model, enc


def toy_context(prompts: list[str], text_encoder: ToyTextEncoder | None = None,
                cfg: ModelConfig | None = None) -> np.ndarray:
    """Text context float32 [B, text_len, text_dim] of the prompts (zero rows past each prompt's length)."""
    if text_encoder is None:
        cfg, _, text_encoder = load_toy_model()
    ids, _ = tokenize(list(prompts), text_encoder.text_len)
    return np.asarray(jax.jit(lambda m, i: m(i))(text_encoder, jnp.asarray(ids)), np.float32)


_SAMPLERS: dict = {}


def _sampler(graphdef, cfg: ModelConfig, sc: SamplerConfig, batch: int, num_frames: int) -> Sampler:
    cap = num_frames if sc.local_attn_size == -1 else None
    key = (id(graphdef), cfg, sc, batch, cap)
    if key not in _SAMPLERS:
        _SAMPLERS[key] = Sampler(graphdef, cfg, sc, batch=batch, latent_hw=cfg.latent_hw, num_frames=num_frames)
    return _SAMPLERS[key]


def generate_video(prompts: list[str], num_frames: int, seed: int = 0, sampler_cfg: SamplerConfig | None = None,
                   *, weights: str | Path | None = None, progress: bool = False,
                   return_latents: bool = False) -> np.ndarray:
    """Generate one video per prompt with the KV-cache AR rollout.

    Args:
      prompts: e.g. ``["a red circle and a blue square"]`` (closed vocabulary, see ``toyworld.text.VOCAB``).
      num_frames: a multiple of the sampler's frames_per_block (3).
      seed: seeds the initial noise (``default_rng(seed)``) and the re-noise draws (``default_rng((seed, block))``).
      sampler_cfg: default :func:`toy_sampler_config`; ``sampler_preset("self_forcing")`` also works.
      return_latents: return the raw model output instead of clipping to [-1, 1].
    Returns:
      frames float32 [B, T, 3, H, W] in [-1, 1].
    """
    cfg, model, enc = load_toy_model(None if weights is None else str(weights))
    sc = sampler_cfg or toy_sampler_config(weights)
    ctx = toy_context(prompts, enc, cfg)
    graphdef, params = _split(model)
    sampler = _sampler(graphdef, cfg, sc, len(prompts), num_frames)
    h, w = cfg.latent_hw
    sampler.check_length(num_frames)
    noise = np.random.default_rng(seed).standard_normal((len(prompts), num_frames, cfg.in_dim, h, w)).astype(np.float32)
    out = sampler.generate(params, ctx, noise, seed=seed, progress=progress)
    return out if return_latents else np.clip(out, -1.0, 1.0)


_SPLITS: dict = {}


def _split(model: CausalWanModel):
    if id(model) not in _SPLITS:
        _SPLITS[id(model)] = nnx.split(model, nnx.Param)
    return _SPLITS[id(model)]


def save_video(path: str | Path, frames: np.ndarray, fps: int = 8, scale: int = 8) -> Path:
    """mp4 (H.264, yuv420p) of frames [T, 3, H, W] or [B, T, 3, H, W] (tiled), upscaled by nearest neighbour."""
    from fkv_jax.toyworld.video import save_mp4

    return save_mp4(path, frames, fps=fps, scale=scale)
