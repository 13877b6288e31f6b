"""Plain helpers shared by the tests (import with ``from helpers import ...``); fixtures live in conftest.py."""

from __future__ import annotations

from pathlib import Path

import jax
import jax.numpy as jnp
import numpy as np
from flax import nnx

DATA = Path(__file__).parent / "data"
CHECKPOINT_PT = DATA / "convert" / "checkpoint.pt"


def rel_err(ours, ref) -> float:
    """||ours - ref|| / ||ref|| in float64."""
    ours, ref = np.asarray(ours, np.float64), np.asarray(ref, np.float64)
    return float(np.linalg.norm(ours - ref) / np.linalg.norm(ref))


def load_tiny(path, num_layers):
    """(cfg, graphdef, params) of a tiny fixture model stored at ``path`` (.pt or .safetensors, Wan names)."""
    import dataclasses

    from fkv_jax.convert import load_wan_state_dict
    from fkv_jax.convert.wan_keymap import to_flax_params
    from fkv_jax.config import model_preset
    from fkv_jax.model.build import abstract_model

    cfg = dataclasses.replace(model_preset("tiny"), num_layers=num_layers)
    graphdef, params = nnx.split(abstract_model(cfg), nnx.Param)
    nnx.replace_by_pure_dict(params, jax.tree.map(jnp.asarray, to_flax_params(load_wan_state_dict(path), cfg)))
    return cfg, graphdef, params


def load_policy_fixture(stem: str):
    """(cfg, graphdef, params, ref) of a policy fixture: ``tests/data/policies/<stem>.{pt|safetensors}`` (a 4-layer
    tiny model) and the authors' run recorded in ``<stem>.npz``."""
    folder = DATA / "policies"
    weights = next(folder / f"{stem}{ext}" for ext in (".pt", ".safetensors") if (folder / f"{stem}{ext}").exists())
    cfg, graphdef, params = load_tiny(weights, 4)
    with np.load(folder / f"{stem}.npz") as z:
        ref = {k: z[k] for k in z.files}
    return cfg, graphdef, params, ref


def run_reference_rollout(fixture, policy, record=None):
    """The Self Forcing rollout of a policy fixture, replaying its recorded noise: (sampler, Rollout). With a
    ``record`` list, every chunk's outputs (trajectories included) are appended to it."""
    from fkv_jax.config import sampler_preset
    from fkv_jax.sampling.rollout import Sampler, rollout

    cfg, graphdef, params, ref = fixture
    frames = ref["noise"].shape[1]
    s = Sampler(
        graphdef,
        cfg,
        sampler_preset("self_forcing"),
        batch=1,
        latent_hw=ref["noise"].shape[3:],
        num_frames=frames,
        policy=policy,
        trajectories=record is not None,
    )
    ren = ref["renoise"].reshape(frames // 3, 3, 1, 3, *ref["noise"].shape[2:])
    res = rollout(
        s,
        params,
        [ref["context"]],
        ref["noise"],
        renoise=ren,
        on_chunk=None if record is None else (lambda b, r: record.append(jax.device_get(r))),
    )
    return s, res
