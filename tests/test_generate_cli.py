"""End to end through the public commands: convert the upstream checkpoint, replay recorded rollouts."""

import subprocess
import sys

import numpy as np
import pytest

from helpers import CHECKPOINT_PT, rel_err
from fkv_jax.generate import main as generate_main
from fkv_jax.toyworld.weights import load_config

CASES = {
    "global": ["--local-attn-size", "-1"],
    "rolling": ["--local-attn-size", "6", "--sink-size", "3"],
    "rolling_w9": ["--local-attn-size", "9", "--sink-size", "3"],
}


@pytest.fixture(scope="module")
def converted(tmp_path_factory, tiny_wan):
    """The fixture converted twice: from the Self Forcing .pt and from a plain-Wan-names .safetensors."""
    from safetensors.numpy import save_file

    from checkpoints_convert.__main__ import main as convert_main

    root = tmp_path_factory.mktemp("ckpt")
    st = root / "model.safetensors"
    save_file({k: np.ascontiguousarray(v) for k, v in tiny_wan.items()}, str(st))
    out = {}
    for name, src in {"pt": CHECKPOINT_PT, "safetensors": st}.items():
        out[name] = root / name
        assert (
            convert_main(["--input", str(src), "--output", str(out[name]), "--num-heads", "2", "--text-len", "16"]) == 0
        )
    return out


def write_replay(ref, case, folder):
    """ctx.npy and noise.npz in the documented CLI formats, from the upstream recording."""
    ctx = folder / "ctx.npy"
    np.save(ctx, ref["context"])
    r = ref[f"{case}/renoise"]
    noise = folder / "noise.npz"
    np.savez(noise, noise=ref[f"{case}/noise"], renoise=r.reshape(r.shape[0] // 3, 3, 1, 3, *r.shape[2:]))
    return ctx, noise


@pytest.mark.slow
@pytest.mark.parametrize("source", ["pt", "safetensors"])
@pytest.mark.parametrize("case", list(CASES))
def test_cli_replays_upstream_rollouts(converted, ref, tmp_path, case, source):
    ctx, noise = write_replay(ref, case, tmp_path)
    out = tmp_path / "out.npy"
    frames = ref[f"{case}/noise"].shape[1]
    rc = generate_main(
        [
            "--checkpoint",
            str(converted[source]),
            "--text-embeddings",
            str(ctx),
            "--noise-file",
            str(noise),
            "--frames",
            str(frames),
            *CASES[case],
            "--save-latents",
            str(out),
            "--no-progress",
        ]
    )
    assert rc == 0
    lat = np.load(out)
    assert lat.dtype == np.float32 and lat.shape == ref[f"{case}/final_latents"].shape
    assert rel_err(lat, ref[f"{case}/final_latents"]) <= 1e-4


@pytest.mark.slow
def test_acceptance_commands_as_a_user_types_them(ref, tmp_path):
    """The issue's 'done when' commands, as subprocesses: converter then generator, window 9 + sink 3."""
    ckpt = tmp_path / "DIR"
    subprocess.run(
        [
            sys.executable,
            "-m",
            "checkpoints_convert",
            "--input",
            str(CHECKPOINT_PT),
            "--output",
            str(ckpt),
            "--num-heads",
            "2",
            "--text-len",
            "16",
        ],
        check=True,
        capture_output=True,
    )
    ctx, noise = write_replay(ref, "rolling_w9", tmp_path)
    out = tmp_path / "out.npy"
    env_run = subprocess.run(
        [
            sys.executable,
            "-m",
            "fkv_jax.generate",
            "--checkpoint",
            str(ckpt),
            "--text-embeddings",
            str(ctx),
            "--noise-file",
            str(noise),
            "--frames",
            "15",
            "--local-attn-size",
            "9",
            "--sink-size",
            "3",
            "--save-latents",
            str(out),
        ],
        capture_output=True,
        text=True,
    )
    assert env_run.returncode == 0, env_run.stderr
    assert rel_err(np.load(out), ref["rolling_w9/final_latents"]) <= 1e-4


@pytest.mark.slow
def test_random_preset_model_runs(tmp_path):
    out = tmp_path / "lat.npy"
    base = ["--model-preset", "tiny", "--frames", "6", "--no-progress"]
    assert generate_main([*base, "--save-latents", str(out), "a red ball"]) == 0
    lat = np.load(out)
    assert lat.shape == (1, 6, 16, 8, 12) and np.isfinite(lat).all() and lat.std() > 0.1
    # same seed, same prompt: same video; another prompt: another video
    out2, out3 = tmp_path / "b.npy", tmp_path / "c.npy"
    generate_main([*base, "--save-latents", str(out2), "a red ball"])
    generate_main([*base, "--save-latents", str(out3), "a blue cube"])
    np.testing.assert_array_equal(np.load(out2), lat)
    assert not np.allclose(np.load(out3), lat)


@pytest.mark.slow
def test_prompts_file_is_a_batch(tmp_path):
    prompts = tmp_path / "p.txt"
    prompts.write_text("one\n\ntwo\n")
    out = tmp_path / "lat.npy"
    assert (
        generate_main(
            [
                "--model-preset",
                "tiny",
                "--prompts",
                str(prompts),
                "--frames",
                "3",
                "--save-latents",
                str(out),
                "--no-progress",
            ]
        )
        == 0
    )
    assert np.load(out).shape[0] == 2


@pytest.mark.slow
def test_toy_model_writes_one_mp4_per_prompt(random_toy_weights, tmp_path):
    """--toy-weights DIR (an export of `toyworld.train`): prompts through the toy text encoder, pixel mp4s."""
    from fkv_jax.toyworld.video import to_uint8
    from fkv_jax.video import read_video

    prompts = tmp_path / "p.txt"
    prompts.write_text("a red circle\na blue square and a green cross\n")
    out, lat_file = tmp_path / "videos", tmp_path / "lat.npy"
    assert (
        generate_main(
            [
                "--toy-weights",
                str(random_toy_weights),
                "--prompts",
                str(prompts),
                "--frames",
                "6",
                "--output-dir",
                str(out),
                "--save-latents",
                str(lat_file),
                "--no-progress",
                "--fps",
                "4",
            ]
        )
        == 0
    )
    lat = np.load(lat_file)
    assert lat.shape == (2, 6, 3, *load_config(random_toy_weights).latent_hw)
    assert not np.allclose(lat[0], lat[1])  # the prompt reaches the model
    names = sorted(p.name for p in out.iterdir())
    assert names == ["000_a-red-circle_seed0.mp4", "001_a-blue-square-and-a-green-cross_seed0.mp4"]
    video, meta = read_video(out / names[1])
    assert video.shape == (6, 256, 256, 3) and meta["fps"] == 4
    want = to_uint8(np.clip(lat[1], -1, 1)).astype(np.float32)
    assert np.abs(video.astype(np.float32) - want).mean() < 12  # H.264 is lossy; another video is ~60 off
    assert np.abs(video.astype(np.float32) - to_uint8(np.clip(lat[0], -1, 1))).mean() > 20


@pytest.mark.slow
def test_default_command_makes_a_sprite_video_with_the_shipped_model(tmp_path, capsys):
    """`python -m fkv_jax.generate` as the quickstart runs it: the shipped toy model, the default prompt."""
    from fkv_jax.toyworld.analysis import colour_report
    from fkv_jax.video import read_video

    lat_file = tmp_path / "lat.npy"
    assert (
        generate_main(
            ["--frames", "12", "--output-dir", str(tmp_path), "--save-latents", str(lat_file), "--no-progress"]
        )
        == 0
    )
    assert "toy-world model (shipped weights)" in capsys.readouterr().err
    video, _ = read_video(tmp_path / "000_a-red-circle-and-a-blue-square_seed0.mp4")
    assert video.shape == (12, 192, 192, 3)  # 24x24 frames, 8x enlarged
    report = colour_report(np.clip(np.load(lat_file)[0], -1, 1), "a red circle and a blue square")
    # a prompted sprite is drawn in most frames (untrained weights: 0), and no colour the prompt does not name
    assert max(report["shown"].values()) >= 0.5, report
    assert report["other_pixels_per_frame"] <= 0.1 * report["prompted_pixels_per_frame"], report


@pytest.mark.parametrize(
    "argv, message",
    [
        (["--checkpoint", "/nonexistent/dir"], "--checkpoint directory not found"),
        (["--frames", "10"], "multiple of frames_per_block=3"),
        (["--local-attn-size", "5", "--sink-size", "3"], "need local_attn_size >= 6"),
        (["--noise-file", "/nonexistent.npz"], "--noise-file not found"),
        (["--model-preset", "tiny", "--preset", "nope"], "unknown sampler preset 'nope'"),
        (["--latent-size", "8by12"], "--latent-size must look like"),
        (["--latent-size", "7x12"], "not divisible by the patch size"),
        (["--latent-size", "0x0"], "--latent-size must be positive"),
        (["--denoising-steps", "1000,abc"], "comma-separated numbers"),
        (["a purple dog"], "outside the toy vocabulary: ['dog', 'purple']"),
        (["--toy-weights", "/nonexistent/w"], "cannot load --toy-weights"),
        (
            ["--toy-weights", "/nonexistent/w", "--model-preset", "tiny"],
            "cannot go with --checkpoint or --model-preset",
        ),
        (["--model-preset", "tiny", "--fps", "4"], "--fps sets the frame rate of an mp4"),
        (["--model-preset", "nope"], "nope"),
    ],
)
def test_bad_input_is_one_clear_error(argv, message, capsys, tmp_path):
    out = tmp_path / "never.npy"
    assert generate_main([*argv, "--save-latents", str(out), "--no-progress"]) == 2
    err = capsys.readouterr().err
    assert message in err and "Traceback" not in err
    assert not out.exists() and not list(tmp_path.glob("*.mp4"))


def test_bad_replay_files(converted, ref, tmp_path, capsys):
    ctx, noise = write_replay(ref, "global", tmp_path)
    out = tmp_path / "never.npy"
    base = ["--checkpoint", str(converted["pt"]), "--save-latents", str(out), "--no-progress"]
    np.savez(tmp_path / "bad.npz", noise=ref["global/noise"])
    assert generate_main([*base, "--text-embeddings", str(ctx), "--noise-file", str(tmp_path / "bad.npz")]) == 2
    assert "lacks key(s) ['renoise']" in capsys.readouterr().err
    np.save(tmp_path / "ctx_bad.npy", np.zeros((1, 16, 65), np.float32))
    assert generate_main([*base, "--text-embeddings", str(tmp_path / "ctx_bad.npy"), "--noise-file", str(noise)]) == 2
    assert "expected [B, L<=16, 64]" in capsys.readouterr().err
    assert generate_main([*base, "--prompt", "a cat"]) == 2
    assert "needs the text encoder output" in capsys.readouterr().err
    r = ref["global/renoise"]
    np.savez(tmp_path / "bad2.npz", noise=ref["global/noise"], renoise=r[:, :2])
    assert generate_main([*base, "--text-embeddings", str(ctx), "--noise-file", str(tmp_path / "bad2.npz")]) == 2
    assert "`renoise` has shape" in capsys.readouterr().err
    assert not out.exists()


@pytest.mark.slow
def test_mesh_flag_runs_sharded_and_matches(tmp_path):
    """--mesh on 2 forced CPU devices gives the single-device numbers (subprocess: XLA_FLAGS before jax)."""
    import os

    env = dict(os.environ, XLA_FLAGS="--xla_force_host_platform_device_count=2", FKV_JAX_CACHE_DIR="")
    outs = []
    for extra in ([], ["--mesh", "data=1,model=2"]):
        out = tmp_path / f"lat{len(outs)}.npy"
        r = subprocess.run(
            [
                sys.executable,
                "-m",
                "fkv_jax.generate",
                "--frames",
                "6",
                "--save-latents",
                str(out),
                "--output-dir",
                str(tmp_path / "videos"),
                "--no-progress",
                *extra,
            ],
            env=env,
            capture_output=True,
            text=True,
            cwd=tmp_path,
        )
        assert r.returncode == 0, r.stderr
        outs.append(np.load(out))
    assert rel_err(outs[1], outs[0]) <= 1e-5


def test_broken_toy_weights_are_one_clear_error(random_toy_weights, tmp_path, capsys):
    """A truncated params.npz, or one that does not match its config.json: one line naming the file, no video."""
    import json
    import shutil

    bad = tmp_path / "w"
    shutil.copytree(random_toy_weights, bad)
    data = (bad / "params.npz").read_bytes()
    (bad / "params.npz").write_bytes(data[: len(data) // 2])
    out = tmp_path / "out"
    argv = ["--toy-weights", str(bad), "--frames", "3", "--output-dir", str(out), "--no-progress"]
    assert generate_main(argv) == 2
    err = capsys.readouterr().err
    assert f"cannot read {bad / 'params.npz'}" in err and "Traceback" not in err
    (bad / "params.npz").write_bytes(data)
    meta = json.loads((bad / "config.json").read_text())
    meta["model"]["dim"] = 128
    (bad / "config.json").write_text(json.dumps(meta))
    assert generate_main(argv) == 2
    err = capsys.readouterr().err
    assert "does not match its config.json" in err and "the config needs (4, 128)" in err
    assert not list(out.glob("*.mp4"))
