"""`fkv generate` on the shipped toy model: policies out of the box, --seeds, names that never collide."""

from __future__ import annotations

import os
import shutil
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest

from fkv_jax.cli.main import main as fkv
from fkv_jax.toyworld.weights import load_config

pytestmark = pytest.mark.slow


@pytest.fixture(autouse=True)
def in_tmp(monkeypatch, tmp_path):
    monkeypatch.chdir(tmp_path)  # a default ./outputs would land here, never in the repository


@pytest.mark.parametrize("policy", ["forcing_kv", "focused_forcing"])
def test_policies_work_on_the_default_model_out_of_the_box(policy, tmp_path, capsys):
    """The shipped head table / importance file and a num_frame_patch dividing the toy frame (one per grid row)."""
    assert (
        fkv(
            [
                "generate",
                "--policy",
                policy,
                "--frames",
                "12",
                "--output-dir",
                str(tmp_path / "v"),
                "--save-latents",
                str(tmp_path / "lat.npy"),
                "--no-progress",
            ]
        )
        == 0
    )
    assert f"policy {policy}" in capsys.readouterr().err
    assert [p.name for p in (tmp_path / "v").iterdir()] == [f"000_a-red-circle-and-a-blue-square_seed0_{policy}.mp4"]
    lat = np.load(tmp_path / "lat.npy")
    assert lat.shape == (1, 12, 3, *load_config().latent_hw) and np.isfinite(lat).all()


def test_shipped_profiles_match_the_model():
    from fkv_jax.policies import load_head_table, load_importance
    from fkv_jax.toyworld.model import WEIGHTS_DIR

    table = load_head_table(WEIGHTS_DIR / "forcingkv_heads.json", 4, 4)
    assert table.dynamic.shape == (4, 4) and 0 < table.dynamic.sum() <= 16
    imp = load_importance(WEIGHTS_DIR / "head_importance.json", 4, 4)
    assert imp.shape == (4, 4) and (imp > 0).all()


def test_seeds_give_one_video_each_independent_of_the_batch(tmp_path):
    out = tmp_path / "v"
    assert (
        fkv(
            [
                "generate",
                "--seeds",
                "3,5",
                "--frames",
                "6",
                "--output-dir",
                str(out),
                "--save-latents",
                str(tmp_path / "two.npy"),
                "--no-progress",
            ]
        )
        == 0
    )
    names = sorted(p.name for p in out.iterdir())
    assert names == ["000_a-red-circle-and-a-blue-square_seed3.mp4", "000_a-red-circle-and-a-blue-square_seed5.mp4"]
    two = np.load(tmp_path / "two.npy")
    assert not np.allclose(two[0], two[1])
    assert (
        fkv(
            [
                "generate",
                "--seed",
                "5",
                "--frames",
                "6",
                "--output-dir",
                str(out),
                "--save-latents",
                str(tmp_path / "one.npy"),
                "--no-progress",
            ]
        )
        == 0
    )
    # the same video alone as in a batch of two, up to float32 rounding (batch-shaped GEMMs round differently;
    # over 16 Euler steps that reaches ~1e-5 on the shipped model; another seed differs by ~1)
    np.testing.assert_allclose(np.load(tmp_path / "one.npy")[0], two[1], atol=1e-4)
    # the same name again: a numbered suffix, the first file is kept
    assert (out / "000_a-red-circle-and-a-blue-square_seed5-2.mp4").is_file()
    assert len(list(out.iterdir())) == 3


def test_same_slug_twice_in_one_run_does_not_collide(tmp_path):
    prompts = tmp_path / "p.txt"
    prompts.write_text("A red circle\na red circle\n")
    out = tmp_path / "v"
    assert fkv(["generate", "--prompts", str(prompts), "--frames", "3", "--output-dir", str(out), "--no-progress"]) == 0
    assert sorted(p.name for p in out.iterdir()) == ["000_a-red-circle_seed0.mp4", "001_a-red-circle_seed0.mp4"]


def test_model_preset_alias_and_estimate(capsys):
    """`--model-preset 1.3b` is the 1.3B preset; a run of it on a CPU announces an estimate first."""
    from flax import nnx

    from fkv_jax.cli import common as C
    from fkv_jax.config import model_preset, sampler_preset
    from fkv_jax.model.build import abstract_model
    from fkv_jax.sampling.rollout import Sampler

    assert C.preset_name("1.3b") == "wan2.1-t2v-1.3b"
    cfg = model_preset("wan2.1-t2v-1.3b")
    s = Sampler(
        nnx.split(abstract_model(cfg), nnx.Param)[0],
        cfg,
        sampler_preset("self_forcing"),
        batch=1,
        latent_hw=cfg.latent_hw,
        num_frames=21,
    )
    lines = []
    secs = C.print_estimate(cfg, s, 21, 1, log=lines.append)
    assert secs > 600 and len(lines) == 1 and "an estimate, not a measurement" in lines[0], lines


def test_backends_that_run_here_resolve():
    from fkv_jax.cli import common as C
    from fkv_jax.config import model_preset

    cfg = model_preset("tiny")
    assert C.check_backend("xla", cfg, cfg.latent_hw, "float32", None, 3) == "xla"
    assert C.check_backend("auto", cfg, cfg.latent_hw, "bfloat16", None, 3) == "xla"


@pytest.mark.subprocess
def test_fkv_console_script_and_module_alias(tmp_path):
    """`fkv generate` (the installed console script, when this venv has it) and `python -m fkv_jax.generate`."""
    env = dict(os.environ, JAX_PLATFORMS="cpu")
    script = shutil.which("fkv", path=str(Path(sys.executable).parent))
    runs = [[sys.executable, "-m", "fkv_jax.generate"]] + ([[script, "generate"]] if script else [])
    for i, cmd in enumerate(runs):
        r = subprocess.run(
            [*cmd, "--frames", "3", "--output-dir", f"o{i}", "--no-progress"],
            cwd=tmp_path,
            env=env,
            capture_output=True,
            text=True,
            timeout=300,
        )
        assert r.returncode == 0, r.stderr
        assert [p.name for p in (tmp_path / f"o{i}").iterdir()] == ["000_a-red-circle-and-a-blue-square_seed0.mp4"]
    help_ = subprocess.run([sys.executable, "-m", "fkv_jax.cli", "--help"], env=env, capture_output=True, text=True)
    assert help_.returncode == 0 and all(
        c in help_.stdout for c in ("generate", "convert", "decode", "profile", "eval", "bench", "aot")
    )


def test_eval_saves_its_profiles_for_reuse(tmp_path):
    from fkv_jax.cli.eval import _save_profiles
    from fkv_jax.policies import load_head_table, load_importance

    scores = [[0.9, 0.1], [0.5, 0.85]]
    report = {
        "profiles": {
            "forcing_kv_heads": {"static": 2, "dynamic": 2, "scores": scores},
            "head_importance": [[0.1, 0.2], [0.3, 0.4]],
        }
    }
    paths = _save_profiles(report, tmp_path)
    assert sorted(p.name for p in paths) == ["forcingkv_heads.json", "head_importance.json"]
    table = load_head_table(tmp_path / "forcingkv_heads.json", 2, 2)
    assert table.dynamic.tolist() == [[False, True], [True, False]]
    assert load_importance(tmp_path / "head_importance.json", 2, 2)[1, 1] == 0.4
