"""Replaying the official Forcing-KV and Focused Forcing runs through the public commands."""

import numpy as np
import pytest

from helpers import DATA, rel_err
from fkv_jax.generate import main as generate_main

P = DATA / "policies"


def convert(src, out):
    from checkpoints_convert.__main__ import main as convert_main

    assert convert_main(["--input", str(src), "--output", str(out), "--num-heads", "2", "--text-len", "16"]) == 0
    return out


def replay_files(tmp_path, npz, blocks):
    with np.load(npz) as z:
        ref = {k: z[k] for k in z.files}
    np.save(tmp_path / "ctx.npy", ref["context"])
    r = ref["renoise"]
    np.savez(tmp_path / "noise.npz", noise=ref["noise"], renoise=r.reshape(blocks, 3, 1, 3, *r.shape[2:]))
    return ref, ["--text-embeddings", str(tmp_path / "ctx.npy"), "--noise-file", str(tmp_path / "noise.npz")]


@pytest.mark.slow
def test_forcing_kv_cli_replay(tmp_path):
    ckpt = convert(P / "forcing_kv_tiny.safetensors", tmp_path / "ckpt")
    ref, files = replay_files(tmp_path, P / "forcing_kv_tiny.npz", 7)
    out = tmp_path / "lat.npy"
    assert (
        generate_main(
            [
                "--checkpoint",
                str(ckpt),
                *files,
                "--policy",
                "forcing_kv",
                "--head-table",
                str(P / "forcingkv_heads_tiny.json"),
                "--policy-opt",
                "ar_start=2",
                "--save-latents",
                str(out),
                "--no-progress",
            ]
        )
        == 0
    )
    assert rel_err(np.load(out), ref["latents_forcingkv"]) <= 1e-4


@pytest.mark.slow
def test_focused_forcing_cli_replay(tmp_path):
    ckpt = convert(P / "focused_forcing_tiny.pt", tmp_path / "ckpt")
    ref, files = replay_files(tmp_path, P / "focused_forcing_tiny.npz", 11)
    out = tmp_path / "lat.npy"
    assert (
        generate_main(
            [
                "--checkpoint",
                str(ckpt),
                *files,
                "--policy",
                "focused_forcing",
                "--head-importance",
                str(P / "focused_forcing_dm_loss.json"),
                "--policy-opt",
                "pooled_tokens=2",
                "--save-latents",
                str(out),
                "--no-progress",
            ]
        )
        == 0
    )
    assert rel_err(np.load(out), ref["latents_focused_forcing"]) <= 1e-4


@pytest.mark.parametrize(
    "argv, message",
    [
        (["--policy", "nope"], "unknown policy 'nope'"),
        (["--policy", "forcing_kv", "--policy-opt", "ar_start"], "KEY=VALUE"),
        (["--policy", "forcing_kv", "--policy-opt", "ar_start=x"], "not a int"),
        (["--policy", "forcing_kv", "--head-table", "nope"], "neither a file nor a packaged table"),
        (["--policy", "forcing_kv", "--head-table", "selfforcing"], "num_layers=30, the model has 2"),
        (["--policy", "focused_forcing", "--head-importance", "/nonexistent.json"], "--head-importance not found"),
        (["--policy", "sink_window", "--local-attn-size", "12"], "with --policy set the window"),
        (["--policy-opt", "a=1"], "need --policy"),
    ],
)
def test_policy_flag_errors(argv, message, capsys, tmp_path):
    out = tmp_path / "never.npy"
    assert (
        generate_main(["--model-preset", "tiny", *argv, "--frames", "6", "--save-latents", str(out), "--no-progress"])
        == 2
    )
    assert message in capsys.readouterr().err
    assert not out.exists()
