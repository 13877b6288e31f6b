"""Shared fixtures: the tiny upstream reference model (weights converted from the fixture checkpoint)."""

from __future__ import annotations

import os
from pathlib import Path

os.environ.setdefault("JAX_PLATFORMS", "cpu")

import tempfile  # noqa: E402

import jax  # noqa: E402
import jax.numpy as jnp  # noqa: E402
import numpy as np  # noqa: E402
import pytest  # noqa: E402
from flax import nnx  # noqa: E402

# Many tests build samplers with identical programs: a persistent compilation cache turns the repeats into
# cache hits (the first test run on a machine fills it).
jax.config.update("jax_compilation_cache_dir", str(Path(tempfile.gettempdir()) / "fkv_jax_test_xla_cache"))
jax.config.update("jax_persistent_cache_min_compile_time_secs", 0)

from helpers import CHECKPOINT_PT, DATA, load_tiny, rel_err  # noqa: E402,F401  (tests import them from helpers)


@pytest.fixture(scope="session")
def ref():
    """Arrays recorded from the upstream Self Forcing code (tests/data/causal_wan_tiny.npz)."""
    with np.load(DATA / "causal_wan_tiny.npz") as z:
        return {k: z[k] for k in z.files}


@pytest.fixture(scope="session")
def tiny_cfg():
    from fkv_jax.config import model_preset

    return model_preset("tiny")


@pytest.fixture(scope="session")
def tiny_wan():
    """The fixture's generator_ema state dict with Wan names (numpy)."""
    from fkv_jax.convert import load_wan_state_dict

    return load_wan_state_dict(CHECKPOINT_PT)


@pytest.fixture(scope="session")
def tiny_model(tiny_cfg, tiny_wan):
    """(graphdef, params) of the reference tiny model."""
    from fkv_jax.convert.wan_keymap import to_flax_params
    from fkv_jax.model.build import abstract_model

    graphdef, params = nnx.split(abstract_model(tiny_cfg), nnx.Param)
    nnx.replace_by_pure_dict(params, jax.tree.map(jnp.asarray, to_flax_params(tiny_wan, tiny_cfg)))
    return graphdef, params


@pytest.fixture(scope="session")
def random_toy_weights(tmp_path_factory):
    """An exported toy-world weights directory with the toy architecture and untrained (random) weights."""
    from fkv_jax.toyworld.train import TrainConfig, export_weights, init_params, toy_model_config

    cfg = toy_model_config()
    _, params = init_params(cfg, 0)
    # the init zeroes the output head (x0 = 0 whatever the input): jitter every weight so outputs depend on input
    leaves, tree = jax.tree.flatten(params)
    rng = np.random.default_rng(0)
    params = jax.tree.unflatten(
        tree, [np.asarray(x) + 0.02 * rng.standard_normal(np.shape(x)).astype(np.float32) for x in leaves]
    )
    return export_weights(tmp_path_factory.mktemp("toy") / "w", params, cfg, TrainConfig(), {"note": "untrained"})
