"""A corpus of bad command lines: each ends in exactly one `error:` line on stderr, exit code 2, no traceback,
nothing written, and before any heavy work (loading weights, encoding, converting, evaluating)."""

from __future__ import annotations

import os
import shlex
import subprocess
import sys

import pytest

from fkv_jax.cli.main import main as fkv

IN = "{in}"  # replaced by the folder of input fixtures


@pytest.fixture
def inputs(tmp_path):
    """Input fixtures, in tmp_path/in: a non-UTF-8 prompts file, a plain file, a directory, a bad .npz."""
    d = tmp_path / "in"
    (d / "dir").mkdir(parents=True)
    (d / "latin1.txt").write_bytes("a red circle \xe9\n".encode("latin-1"))
    (d / "file.txt").write_text("a red circle\n")
    (d / "noise.npz").write_text("not an npz")
    return d


@pytest.fixture(autouse=True)
def no_heavy_work(monkeypatch, tmp_path):
    """Run in tmp_path (default outputs would land there) and make every heavy step fail the test."""
    import fkv_jax.cli.common as common
    import fkv_jax.eval.harness as harness
    import fkv_jax.pipeline as pipeline
    import fkv_jax.vae as vae

    def heavy(*a, **k):
        pytest.fail("heavy work started before the error was found")

    monkeypatch.chdir(tmp_path)
    monkeypatch.delenv("FKV_INTERPRET", raising=False)
    monkeypatch.setattr(common, "load_model", heavy)
    monkeypatch.setattr(pipeline.TextToVideo, "encode", heavy)
    monkeypatch.setattr(vae.VAE, "load", heavy)
    monkeypatch.setattr(harness, "evaluate", heavy)


CORPUS = [
    # attention backends: unknown, or not runnable on this CPU machine
    ("generate --attention-backend nope", "unknown attention backend 'nope'"),
    ("generate --attention-backend triton", "needs a CUDA or ROCm GPU"),
    ("generate --attention-backend pallas_tpu", "needs a TPU"),
    ("generate --attention-backend mosaic_gpu", "needs an NVIDIA Hopper GPU"),
    ("generate --model-preset tiny --attention-backend triton --dtype bfloat16", "--attention-backend"),
    # text
    ("generate --prompts {in}/latin1.txt", "is not UTF-8 text"),
    ("generate --prompts {in}/dir", "is a directory"),
    ("generate --prompts {in}/missing.txt", "--prompts not found"),
    ("generate 'a purple dog'", "outside the toy vocabulary"),
    ("generate a red circle", "quote a prompt of several words"),
    ("generate --prompt", "expected one argument"),
    ("generate 'a red circle' --prompt 'a blue square'", "either positionally or with --prompt"),
    ("generate --text-embeddings {in}/dir", "is a directory"),
    ("generate --checkpoint {in}/missing", "--checkpoint directory not found"),
    # sizes
    ("generate --latent-size 0x0", "--latent-size must be positive"),
    ("generate --latent-size 32", "--latent-size must look like"),
    ("generate --latent-size 30x30", "not divisible by the patch size"),
    ("generate --frames 0", "--frames must be a positive multiple"),
    ("generate --frames -3", "--frames must be a positive multiple"),
    ("generate --frames 10", "multiple of frames_per_block=3"),
    ("generate --frames x", "invalid int value"),
    ("generate --frames-per-block 0", "--frames-per-block must be >= 1"),
    ("generate --cache-frames 0", "--cache-frames must be >= 1"),
    ("generate --local-attn-size 0", "--local-attn-size must be -1"),
    ("generate --sink-size -1", "--sink-size must be >= 0"),
    ("generate --denoising-steps 2000,500", "must lie in (0, 1000]"),
    ("generate --denoising-steps 1000,abc", "comma-separated numbers"),
    ("generate --seed -1", "--seed must be >= 0"),
    ("generate --seeds 0,x", "--seeds must be comma-separated integers"),
    ("generate --seeds 0,-1", "--seeds values must be >= 0"),
    ("generate --seeds 1,1", "repeats a value"),
    ("generate --model-preset tiny --seeds 0,1", "take one --seed"),
    ("generate --fps 0", "--fps must be positive"),
    ("generate --model-preset tiny --fps 8", "--fps sets the frame rate of an mp4"),
    # presets and models
    ("generate --preset self_forcing", "the toy-world model has its own"),
    ("generate --preset longlive", "the toy-world model has its own"),
    ("generate --preset causvid", "the toy-world model has its own"),
    ("generate --preset nope", "unknown sampler preset"),
    ("generate --model-preset tiny --preset nope", "unknown sampler preset 'nope'"),
    ("generate --model-preset tiny --preset toyworld", "is the toy-world model's sampler"),
    ("generate --model-preset tiny --preset toy", "is the toy-world model's sampler"),
    ("generate --model-preset nope", "unknown model preset 'nope'"),
    ("generate --model-preset tiny --checkpoint {in}/dir", "two different models"),
    ("generate --toy-weights {in}/missing", "cannot load --toy-weights"),
    ("generate --dtype float16", "invalid choice: 'float16'"),
    ("generate --rope-mode nope", "invalid choice"),
    ("generate --no-such-flag", "unrecognized arguments: --no-such-flag"),
    # policies
    ("generate --policy nope", "unknown policy 'nope'"),
    ("generate --policy forcing_kv --policy-opt garbage", "KEY=VALUE"),
    ("generate --policy forcing_kv --policy-opt nope=1", "has no option(s) ['nope']"),
    ("generate --policy forcing_kv --policy-opt ar_start=x", "ar_start"),
    ("generate --policy forcing_kv --head-table {in}/dir", "is a directory"),
    ("generate --policy forcing_kv --head-table {in}/missing.json", "fkv profile heads"),
    ("generate --policy forcing_kv --head-table selfforcing", "num_layers=30, the model has 4"),
    ("generate --policy forcing_kv --head-importance {in}/file.txt", "Focused Forcing's"),
    ("generate --policy focused_forcing --head-importance {in}/missing.json", "fkv profile importance"),
    ("generate --policy sink_window --local-attn-size 12", "with --policy set the window"),
    ("generate --policy-opt a=1", "need --policy"),
    # outputs
    ("generate --save-latents {in}/dir", "is a directory"),
    ("generate --save-latents {in}/out.txt", "must end in .npy"),
    ("generate --output-dir {in}/file.txt", "exists and is not a directory"),
    ("generate --output-dir {in}/file.txt/videos", "cannot be created"),
    ("generate --output-dir /proc/fkv_videos", "not writable"),
    # devices
    ("generate --mesh bogus", "--mesh: bad mesh spec"),
    ("generate --mesh data=3", "--mesh"),
    # replay files
    ("generate --model-preset tiny --noise-file {in}/noise.npz", "cannot read --noise-file"),
    # text to video
    ("generate --model-dir {in}/missing cat", "does not exist"),
    ("generate --model-dir {in}/dir cat", "lacks"),
    ("generate --switch-frames 3 cat", "need(s) --model-dir"),
    # decode
    ("decode --vae {in}/dir --latents {in}/x.npy --output {in}/o.mp4 --fps 0", "--fps must be positive"),
    ("decode --vae {in}/dir --latents {in}/x.npy --output {in}/o.avi", "must end in .mp4 or .npy"),
    ("decode --vae {in}/missing --latents {in}/x.npy --output {in}/o.mp4", "--vae directory not found"),
    ("decode --vae {in}/dir --latents {in}/x.npy --output {in}/o.mp4 --chunk 0", "--chunk must be >= 1"),
    ("decode --vae {in}/dir --latents {in}/x.npy --output {in}/dir", "is a directory"),
    # convert
    ("convert --input {in}/file.txt --output {in}/ck --num-heads 0", "--num-heads must be a positive integer"),
    ("convert --input {in}/file.txt --output {in}/ck --text-len -1", "--text-len must be a positive integer"),
    ("convert --input {in}/missing.pt --output {in}/ck", "--input not found"),
    ("convert --input {in}/file.txt --output {in}/file.txt", "exists and is a file"),
    ("convert --input {in}/file.txt --output {in}/ck --lora-alpha 4", "--lora-alpha goes with --lora"),
    ("convert --input {in}/file.txt", "the following arguments are required: --output"),
    ("convert --wan-dir {in}/file.txt --generator {in}/file.txt --output {in}/ck", "is not a directory"),
    # profile
    ("profile heads --frames 5 --output {in}/h.json", "--frames must be a multiple of 3"),
    ("profile heads --output {in}/dir", "is a directory"),
    ("profile heads --output {in}/h.txt", "must end in .json"),
    ("profile importance --seeds 0 --output {in}/h.json", "--seeds must be >= 1"),
    ("profile heads --threshold 2 --output {in}/h.json", "--threshold must be in (0, 1]"),
    ("profile --output {in}/h.json", "invalid choice"),
    ("profile", "required"),
    ("profile heads --preset longlive --output {in}/h.json", "the toy-world model has its own"),
    # eval
    ("eval --episodes 0", "--episodes must be >= 1"),
    ("eval --policies nope", "unknown policy 'nope'"),
    ("eval --output-dir {in}/file.txt", "exists and is not a directory"),
    ("eval --frames 0", "must be positive"),
    # aot (delegates to fkv_jax.aot)
    ("aot --target nope", "--target must be one of"),
    ("aot --bogus", "unrecognized arguments: --bogus"),
    # the command itself
    ("nope", "unknown subcommand 'nope'"),
    ("generat", "did you mean 'generate'"),
    ("bench nope", "unknown benchmark 'nope'"),
]


def _snapshot(root):
    return sorted(str(p.relative_to(root)) for p in root.rglob("*"))


@pytest.mark.parametrize("line, message", CORPUS, ids=[c[0] for c in CORPUS])
def test_bad_command_line_is_one_error(line, message, inputs, tmp_path, capsys):
    before = _snapshot(tmp_path)
    argv = [a.replace(IN, str(inputs)) for a in shlex.split(line)]
    rc = fkv(argv)
    err = capsys.readouterr().err
    lines = [ln for ln in err.splitlines() if ln.strip()]
    assert rc == 2, err
    assert "Traceback" not in err
    assert len([ln for ln in lines if ln.startswith("error:")]) == 1 and lines[-1].startswith("error:"), err
    assert message in lines[-1], err
    assert _snapshot(tmp_path) == before  # nothing written, not even an empty folder


def test_converter_names_the_damaged_tensor(tmp_path, tiny_wan, capsys):
    """A head.head.weight with twice its rows: the error names it (and its bias), not only the bias."""
    import numpy as np
    from safetensors.numpy import save_file

    sd = {k: np.ascontiguousarray(v) for k, v in tiny_wan.items()}
    sd["head.head.weight"] = np.concatenate([sd["head.head.weight"]] * 2)
    save_file(sd, str(tmp_path / "broken.safetensors"))
    assert (
        fkv(
            [
                "convert",
                "--input",
                str(tmp_path / "broken.safetensors"),
                "--output",
                str(tmp_path / "ck"),
                "--num-heads",
                "2",
                "--text-len",
                "16",
            ]
        )
        == 2
    )
    err = capsys.readouterr().err
    assert err.startswith("error: ") and "head.head.weight [128, 128]" in err and "head.head.bias [64]" in err, err
    assert not (tmp_path / "ck").exists()


def test_focused_forcing_on_toy_weights_without_importance_names_the_command(random_toy_weights, capsys):
    assert fkv(["generate", "--toy-weights", str(random_toy_weights), "--policy", "focused_forcing"]) == 2
    err = capsys.readouterr().err
    assert f"fkv profile importance --toy-weights {random_toy_weights}" in err


@pytest.mark.subprocess
@pytest.mark.parametrize(
    "argv, message",
    [
        (["-m", "fkv_jax.generate", "--attention-backend", "triton"], "needs a CUDA or ROCm GPU"),
        (["-m", "checkpoints_convert", "--input", "x.pt", "--output", "ck", "--num-heads", "0"], "--num-heads"),
        (["-m", "fkv_jax.decode", "--vae", "v", "--latents", "l.npy", "--output", "o.mp4", "--fps", "0"], "--fps"),
        (["-m", "fkv_jax.cli", "generate", "--preset", "longlive"], "the toy-world model has its own"),
    ],
)
def test_real_processes(argv, message, tmp_path):
    env = dict(os.environ, JAX_PLATFORMS="cpu")
    env.pop("FKV_INTERPRET", None)
    r = subprocess.run([sys.executable, *argv], cwd=tmp_path, env=env, capture_output=True, text=True, timeout=120)
    lines = [ln for ln in r.stderr.splitlines() if ln.startswith("error:")]
    assert r.returncode == 2 and len(lines) == 1 and message in lines[0] and "Traceback" not in r.stderr, r.stderr
    assert list(tmp_path.iterdir()) == []
