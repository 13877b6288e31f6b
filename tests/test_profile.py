"""Head profilers on a synthetic model whose attention patterns are planted, so the answer is known."""

import pytest
import json

import jax.numpy as jnp
import numpy as np
from flax import nnx

import fkv_jax
from fkv_jax.config import sampler_preset
from fkv_jax.policies.heads import load_head_table, load_importance
from fkv_jax.policies.calibration import head_importance, profile_static_dynamic
from fkv_jax.sampling.rollout import Sampler


def planted_model():
    """Tiny model where head 0 of every layer attends to nearby frames and head 1 uniformly.

    q and k come only from biases (kernels zeroed), so they are the same vector for every token. Head 0's
    energy sits on a temporal RoPE pair of frequency 0.1 rad/frame: q.k ~ cos(0.1 * frame distance) times a
    large scale, i.e. a sharp preference for the same and adjacent frames (a static head). Head 1's q and k
    are zero: uniform attention over every key (a dynamic head by the mass criterion).
    """
    cfg = fkv_jax.model_preset("tiny")
    model = fkv_jax.init_model(cfg, seed=0)
    graphdef, params = nnx.split(model, nnx.Param)
    pure = nnx.to_pure_dict(params)
    attn = pure["blocks"]["self_attn"]
    for name in ("q", "k"):
        attn[name]["kernel"] = jnp.zeros_like(attn[name]["kernel"])
        bias = np.zeros(attn[name]["bias"].shape, np.float32)
        bias[:, 6] = 1.0  # head 0, temporal pair 3 (theta = 10000^(-6/24) = 0.1), real part
        attn[name]["bias"] = jnp.asarray(bias)
        scale = np.ones(attn[f"norm_{name}"]["scale"].shape, np.float32)
        scale[:, 6] = 4.0
        attn[f"norm_{name}"]["scale"] = jnp.asarray(scale)
    nnx.replace_by_pure_dict(params, pure)
    return cfg, graphdef, params


def make_sampler_fn(cfg, graphdef, frames):
    return lambda policy: Sampler(
        graphdef, cfg, sampler_preset("self_forcing"), batch=1, latent_hw=(8, 12), num_frames=frames, policy=policy
    )


def test_profiler_recovers_planted_static_and_dynamic_heads(tmp_path):
    cfg, graphdef, params = planted_model()
    rng = np.random.default_rng(0)
    runs = [
        (rng.standard_normal((1, 8, 64)).astype(np.float32), rng.standard_normal((1, 15, 16, 8, 12)).astype(np.float32))
    ]
    table, scores = profile_static_dynamic(make_sampler_fn(cfg, graphdef, 15), params, runs, progress=False)
    np.testing.assert_array_equal(table.dynamic, [[False, True], [False, True]])
    assert scores[:, 0].min() > 0.9 and scores[:, 1].max() < 0.6
    # written in the upstream format and read back
    table.save(tmp_path / "heads.json")
    raw = json.loads((tmp_path / "heads.json").read_text())
    assert raw["format"] == "forcingkv_offline_head_custom2" and raw["layers"][0]["static_head"] == [0]
    back = load_head_table(tmp_path / "heads.json", 2, 2)
    np.testing.assert_array_equal(back.dynamic, table.dynamic)


@pytest.mark.slow
def test_importance_is_zero_for_a_head_that_cannot_matter(tmp_path):
    cfg = fkv_jax.model_preset("tiny")
    graphdef, params = nnx.split(fkv_jax.init_model(cfg, seed=1), nnx.Param)
    pure = nnx.to_pure_dict(params)
    o = np.asarray(pure["blocks"]["self_attn"]["o"]["kernel"]).copy()  # [L, D_in, D_out]
    o[1, 64:, :] = 0.0  # layer 1, head 1's output never reaches the residual stream
    pure["blocks"]["self_attn"]["o"]["kernel"] = jnp.asarray(o)
    nnx.replace_by_pure_dict(params, pure)
    rng = np.random.default_rng(1)
    runs = [
        (rng.standard_normal((1, 8, 64)).astype(np.float32), rng.standard_normal((1, 6, 16, 8, 12)).astype(np.float32))
    ]
    scores = head_importance(make_sampler_fn(cfg, graphdef, 6), params, runs, progress=False)
    assert scores.shape == (2, 2)
    assert scores[1, 1] == 0.0
    assert (np.delete(scores.reshape(-1), 3) > 1e-4).all()
    # deterministic for a seed
    again = head_importance(make_sampler_fn(cfg, graphdef, 6), params, runs, progress=False)
    np.testing.assert_array_equal(scores, again)
    from fkv_jax.policies.heads import save_importance

    save_importance(tmp_path / "imp.json", scores)
    np.testing.assert_allclose(load_importance(tmp_path / "imp.json", 2, 2), scores)


@pytest.mark.slow
def test_profile_cli(tmp_path, capsys):
    from fkv_jax.profile import main

    out = tmp_path / "h.json"
    assert main(["heads", "--model-preset", "tiny", "--frames", "12", "--output", str(out), "--no-progress"]) == 0
    assert load_head_table(out, 2, 2).dynamic.shape == (2, 2)
    assert (
        main(
            ["heads", "--model-preset", "tiny", "--frames", "6", "--output", str(tmp_path / "x.json"), "--no-progress"]
        )
        == 2
    )
    assert "no chunk starts at frame >= 7" in capsys.readouterr().err
    assert not (tmp_path / "x.json").exists()


@pytest.mark.slow
def test_profile_cli_on_the_toy_model(random_toy_weights, tmp_path, capsys):
    """The toy-world model (here its architecture with untrained weights), calibrated on toy prompts."""
    from fkv_jax.profile import main

    prompts = tmp_path / "p.txt"
    prompts.write_text("a red circle\na green cross and a blue square\n")
    out = tmp_path / "h.json"
    assert (
        main(
            [
                "heads",
                "--toy-weights",
                str(random_toy_weights),
                "--prompts",
                str(prompts),
                "--frames",
                "12",
                "--output",
                str(out),
                "--no-progress",
            ]
        )
        == 0
    )
    assert load_head_table(out, 4, 4).dynamic.shape == (4, 4)
    assert "static" in capsys.readouterr().err
    prompts.write_text("a red dog\n")
    assert (
        main(
            [
                "importance",
                "--toy-weights",
                str(random_toy_weights),
                "--prompts",
                str(prompts),
                "--frames",
                "6",
                "--output",
                str(tmp_path / "i.json"),
                "--no-progress",
            ]
        )
        == 2
    )
    assert "outside the toy vocabulary: ['dog']" in capsys.readouterr().err
