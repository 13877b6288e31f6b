"""Text -> mp4 end to end on a tiny model folder built the way users build theirs:

    python -m checkpoints_convert --wan-dir WAN --generator GEN.pt --output DIR
    python -m fkv_jax.generate --model-dir DIR "a prompt"

WAN is assembled from the test data: the tiny VAE and UMT5 fixtures under their Wan2.1 file names and the tiny
tokenizer as ``google/umt5-xxl``; GEN is the tiny Self Forcing checkpoint. Latents are 4x6 (32x48 video).
"""

from __future__ import annotations

import dataclasses
import json
import shutil
from pathlib import Path

import numpy as np
import pytest

from checkpoints_convert.__main__ import main as convert_main
from helpers import CHECKPOINT_PT
from fkv_jax.config import sampler_preset
from fkv_jax.decode import main as decode_main
from fkv_jax.generate import main as generate_main
from fkv_jax.pipeline import PipelineError, read_schedule_file
from fkv_jax.video import read_video

pytestmark = pytest.mark.slow

DATA = Path(__file__).parent / "data"
# LongLive-style rolling cache (window 9 = sink 3 + 3 + chunk 3), the geometry tests/test_recache.py compiles
SMALL = ["--latent-size", "4x6", "--preset", "longlive", "--local-attn-size", "9", "--sink-size", "3", "--no-progress"]


@pytest.fixture(autouse=True)
def same_compilation_cache(monkeypatch):
    """The CLI points JAX's persistent cache at FKV_JAX_CACHE_DIR; keep the test session's (the cache directory
    is part of XLA's compile options, so another one would also change every cache key)."""
    import jax

    monkeypatch.setenv("FKV_JAX_CACHE_DIR", jax.config.jax_compilation_cache_dir or "")


@pytest.fixture(scope="module")
def model_dir(tmp_path_factory):
    root = tmp_path_factory.mktemp("pipeline")
    wan = root / "Wan2.1-T2V-1.3B"
    (wan / "google").mkdir(parents=True)
    shutil.copy(DATA / "vae" / "vae.pth", wan / "Wan2.1_VAE.pth")
    shutil.copy(DATA / "text" / "umt5.pth", wan / "models_t5_umt5-xxl-enc-bf16.pth")
    shutil.copytree(DATA / "text" / "tokenizer", wan / "google" / "umt5-xxl")
    out = root / "model"
    assert (
        convert_main(
            [
                "--wan-dir",
                str(wan),
                "--generator",
                str(CHECKPOINT_PT),
                "--output",
                str(out),
                "--num-heads",
                "2",
                "--text-len",
                "16",
            ]
        )
        == 0
    )
    assert sorted(p.name for p in out.iterdir()) == ["config.json", "text_encoder", "tokenizer", "transformer", "vae"]
    return out


def test_prompt_to_mp4_and_the_decode_cli(model_dir, tmp_path):
    out = tmp_path / "videos"
    assert (
        generate_main(
            [
                "--model-dir",
                str(model_dir),
                "A red cat, surfing!",
                "--frames",
                "6",
                *SMALL,
                "--output-dir",
                str(out),
                "--save-latents",
                str(tmp_path / "lat.npy"),
            ]
        )
        == 0
    )
    frames, meta = read_video(out / "000_a-red-cat-surfing_seed0_longlive.mp4")
    assert frames.shape == (1 + 4 * 5, 32, 48, 3) and meta["fps"] == 16 and meta["codec"] == "h264"
    lat = np.load(tmp_path / "lat.npy")
    assert lat.shape == (1, 6, 16, 4, 6)
    # the saved latents decode (whole video, decode CLI) to what was streamed into the mp4
    assert (
        decode_main(
            [
                "--vae",
                str(model_dir / "vae"),
                "--latents",
                str(tmp_path / "lat.npy"),
                "--output",
                str(tmp_path / "v.npy"),
                "--no-progress",
            ]
        )
        == 0
    )
    v = np.load(tmp_path / "v.npy")[0].transpose(1, 2, 3, 0)
    luma = np.array([0.299, 0.587, 0.114])
    ref, got = np.round((v + 1) * 127.5) @ luma, frames.astype(np.float64) @ luma
    assert np.abs(ref - got).mean() < 8 and np.corrcoef(ref.ravel(), got.ravel())[0, 1] > 0.98


def test_taehv_decoder(model_dir, tmp_path, capsys):
    """--decoder taehv decodes with the folder's taehv/ part (a small random TAEHV here): the same frame count
    and size as the Wan VAE; without taehv/ it is one error line naming the convert command."""
    from flax import nnx

    from fkv_jax.vae import TAEHVConfig, TAEHVDecoder, save_taehv

    args = ["a cat", "--frames", "6", *SMALL, "--decoder", "taehv"]
    assert generate_main(["--model-dir", str(model_dir), *args, "--output-dir", str(tmp_path / "x")]) == 2
    err = capsys.readouterr().err.strip().splitlines()
    assert len(err) == 1 and "taehv not found" in err[0] and "fkv convert --taehv" in err[0]
    assert not (tmp_path / "x").exists()
    d = _copy(model_dir, tmp_path)
    cfg = TAEHVConfig(channels=(16, 8, 8, 8), blocks_per_level=1)
    params = nnx.to_pure_dict(nnx.state(TAEHVDecoder(cfg), nnx.Param))
    save_taehv(d / "taehv", cfg, params, "float32", {"note": "random, for the test"})
    out = tmp_path / "videos"
    assert generate_main(["--model-dir", str(d), *args, "--output-dir", str(out)]) == 0
    (mp4,) = out.glob("*.mp4")
    frames, _ = read_video(mp4)
    assert frames.shape == (1 + 4 * 5, 32, 48, 3)


def test_prompt_file_batches_and_seeds(model_dir, tmp_path):
    prompts = tmp_path / "p.txt"
    prompts.write_text("a red cat\n\na blue dog on the sky\na ball\n")
    out = tmp_path / "v"
    assert (
        generate_main(
            [
                "--model-dir",
                str(model_dir),
                "--prompts",
                str(prompts),
                "--batch-size",
                "2",
                "--frames",
                "3",
                *SMALL,
                "--output-dir",
                str(out),
            ]
        )
        == 0
    )
    names = sorted(p.name for p in out.iterdir())
    assert names == [
        "000_a-red-cat_seed0_longlive.mp4",
        "001_a-blue-dog-on-the-sky_seed0_longlive.mp4",
        "002_a-ball_seed0_longlive.mp4",
    ]
    videos = [read_video(out / n)[0] for n in names]
    assert all(v.shape == (9, 32, 48, 3) for v in videos)
    assert np.abs(videos[0].astype(int) - videos[1].astype(int)).mean() > 1  # different prompts, different videos


def test_prompt_switching_with_seeds(model_dir, tmp_path):
    prompts = tmp_path / "p.txt"
    prompts.write_text("a red cat\na blue dog\n")
    out = tmp_path / "v"
    assert (
        generate_main(
            [
                "--model-dir",
                str(model_dir),
                "--prompts",
                str(prompts),
                "--switch-frames",
                "9",
                "--frames",
                "12",
                "--seeds",
                "1,2",
                *SMALL,
                "--output-dir",
                str(out),
            ]
        )
        == 0
    )
    names = sorted(p.name for p in out.iterdir())
    assert names == ["000_a-red-cat_seed1_longlive.mp4", "000_a-red-cat_seed2_longlive.mp4"]
    assert all(read_video(out / n)[0].shape == (45, 32, 48, 3) for n in names)


def _boom_after(monkeypatch, calls: int, exc):
    """Make the streaming decoder (called once per chunk, inside the chunk callback) fail at call ``calls``."""
    from fkv_jax.vae.codec import StreamingDecoder

    orig, n = StreamingDecoder.__call__, {"calls": 0}

    def call(self, latents):
        n["calls"] += 1
        if n["calls"] == calls:
            raise exc
        return orig(self, latents)

    monkeypatch.setattr(StreamingDecoder, "__call__", call)


def test_interrupted_generation_leaves_a_playable_file(model_dir, tmp_path, monkeypatch, capsys):
    from fkv_jax.pipeline import TextToVideo

    _boom_after(monkeypatch, 2, RuntimeError("crash in the chunk callback"))
    sc = dataclasses.replace(sampler_preset("longlive"), local_attn_size=9)
    t2v = TextToVideo(model_dir, sc, num_frames=6, latent_hw=(4, 6), progress=False)
    with pytest.raises(RuntimeError, match="crash"):
        t2v.generate(["a red cat"], [tmp_path / "a.mp4"], seeds=[0])
    assert read_video(tmp_path / "a.mp4")[0].shape[0] == 9  # the chunk decoded before the crash
    _boom_after(monkeypatch, 2, KeyboardInterrupt())  # Ctrl-C through the CLI: exit 130, file kept
    assert (
        generate_main(
            ["--model-dir", str(model_dir), "a dog", "--frames", "6", *SMALL, "--output-dir", str(tmp_path / "o")]
        )
        == 130
    )
    assert read_video(tmp_path / "o" / "000_a-dog_seed0_longlive.mp4")[0].shape[0] == 9
    assert "interrupted; kept" in capsys.readouterr().err


def _copy(model_dir, tmp_path):
    d = tmp_path / "m"
    shutil.copytree(model_dir, d)
    return d


@pytest.mark.parametrize(
    "case",
    [
        "tokenizer",
        "vae_as_transformer",
        "vae_as_checkpoint",
        "unwritable",
        "empty_prompts",
        "switch_without_prompts",
        "schedule_mismatch",
        "no_model_dir",
        "rope_mode",
        "mesh",
    ],
)
def test_bad_input_is_one_error_line_before_any_work(model_dir, tmp_path, monkeypatch, capsys, case):
    from fkv_jax.pipeline import TextToVideo

    monkeypatch.setattr(TextToVideo, "encode", lambda *a: pytest.fail("heavy work started"))
    args = ["--model-dir", str(model_dir), "a cat", "--output-dir", str(tmp_path / "out"), *SMALL]
    if case == "tokenizer":
        d = _copy(model_dir, tmp_path)
        (d / "tokenizer" / "tokenizer.json").unlink()
        args[1], want = str(d), "neither tokenizer.json nor spiece.model"
    elif case == "vae_as_transformer":
        d = _copy(model_dir, tmp_path)
        shutil.rmtree(d / "transformer")
        shutil.copytree(d / "vae", d / "transformer")
        args[1], want = str(d), "holds a converted VAE"
    elif case == "vae_as_checkpoint":
        args, want = (
            ["--checkpoint", str(model_dir / "vae"), "--text-embeddings", str(tmp_path / "x.npy")],
            "holds a converted VAE",
        )
        np.save(tmp_path / "x.npy", np.zeros((1, 4, 64), np.float32))
    elif case == "unwritable":
        (tmp_path / "file").write_text("not a folder")
        args[4], want = str(tmp_path / "file" / "videos"), "cannot be created"
    elif case == "empty_prompts":
        (tmp_path / "p.txt").write_text("\n  \n")
        args[2:3], want = ["--prompts", str(tmp_path / "p.txt")], "has no prompts"
    elif case == "switch_without_prompts":
        args, want = args + ["--switch-frames", "3"], "--switch-frames needs --prompts"
    elif case == "schedule_mismatch":
        (tmp_path / "s.json").write_text(json.dumps({"prompts": ["a", "b", "c"], "switch_frames": [3]}))
        args[2:3], want = ["--schedule", str(tmp_path / "s.json")], "3 prompts need 2 switch_frames"
    elif case == "rope_mode":  # honoured: the Sampler refuses window-relative RoPE on a global cache
        args, want = args[:5] + ["--latent-size", "4x6", "--rope-mode", "window_relative"], "needs a rolling cache"
    elif case == "mesh":  # honoured: checked against this machine's devices
        args, want = args + ["--mesh", "data=3"], "--mesh"
    else:
        args, want = ["--no-global-sink", "a cat"], "need(s) --model-dir"
    assert generate_main(args) == 2
    err = capsys.readouterr().err.strip().splitlines()
    assert len(err) == 1 and err[0].startswith("error: ") and want in err[0], err
    assert not (tmp_path / "out").exists()


def test_schedule_files(tmp_path):
    (tmp_path / "s.yaml").write_text(
        "- prompt: a cat\n- prompt: a dog\n  start_frame: 40\n- {prompt: a car, start: 80}\n"
    )
    s = read_schedule_file(tmp_path / "s.yaml")
    assert s.prompts == ("a cat", "a dog", "a car") and s.switch_frames == (40, 80)
    (tmp_path / "s.jsonl").write_text('{"prompt": "a cat"}\n{"prompt": "a dog", "start_frame": 12}\n')
    assert read_schedule_file(tmp_path / "s.jsonl").switch_frames == (12,)
    (tmp_path / "s2.yaml").write_text("prompts: [a, b]\nswitch_frames: [9]\n")
    assert read_schedule_file(tmp_path / "s2.yaml").switch_frames == (9,)
    assert s.segment_of_chunk(39) == 0 and s.segment_of_chunk(42) == 1 and s.segment_of_chunk(81) == 2
    for text, msg in (
        ("- prompt: a\n- prompt: b\n", "needs an integer"),
        ("- prompt: a\n  start_frame: 3\n", "starts at frame 0"),
        ("- prompt: a\n- {prompt: b, start_frame: 9}\n- {prompt: c, start_frame: 5}\n", "increasing"),
        ("[", "cannot read"),
    ):
        (tmp_path / "bad.yaml").write_text(text)
        with pytest.raises(PipelineError, match=msg):
            read_schedule_file(tmp_path / "bad.yaml")


def test_job_mode_on_a_mesh_resumes(model_dir, tmp_path, capsys):
    """--mesh and --resume with --model-dir: fixed names, a manifest, and a rerun that has nothing left to do."""
    out = tmp_path / "o"
    (tmp_path / "p.txt").write_text("a red cat\na dog\n")
    argv = ["--model-dir", str(model_dir), "--prompts", str(tmp_path / "p.txt"), "--frames", "3", *SMALL]
    argv += ["--output-dir", str(out), "--mesh", "data=1", "--batch-size", "2", "--resume"]
    assert generate_main(argv) == 0
    names = ["000_a-red-cat_seed0_longlive.mp4", "001_a-dog_seed0_longlive.mp4"]
    assert sorted(p.name for p in out.glob("*.mp4")) == names  # renamed into place: no partial file left
    entries = [json.loads(x) for x in (out / "manifest.jsonl").read_text().splitlines()]
    assert [e["file"] for e in entries] == names and entries[0]["prompt"] == "a red cat"
    assert all(read_video(out / n)[0].shape[0] > 0 for n in names)
    capsys.readouterr()
    assert generate_main(argv) == 0
    assert "nothing to do" in capsys.readouterr().err


@pytest.mark.parametrize("decoder", ["wan", "taehv"])
def test_serve_streams_a_model_folder(model_dir, tmp_path, decoder):
    """`fkv serve --model-dir DIR [--decoder taehv]` without the web layer: the scheduler streams a 6-frame video
    of the tiny model folder chunk by chunk through the chosen decoder (21 frames of 32x48, 9 then 12), switches
    its prompt mid-stream with a KV re-cache, and saves the mp4."""
    import queue

    from flax import nnx

    from fkv_jax.cli.serve_engine import Engine
    from fkv_jax.serve.protocol import ServeConfig
    from fkv_jax.serve.scheduler import Scheduler, Stream
    from fkv_jax.vae import TAEHVConfig, TAEHVDecoder, save_taehv

    d = _copy(model_dir, tmp_path)
    if decoder == "taehv":
        cfg = TAEHVConfig(channels=(16, 8, 8, 8), blocks_per_level=1)
        save_taehv(d / "taehv", cfg, nnx.to_pure_dict(nnx.state(TAEHVDecoder(cfg), nnx.Param)), "float32", {})
    eng = Engine(ServeConfig(model_dir=d, decoder=decoder, max_batch=1, max_frames=6, default_frames=6, fps=16))
    eng.load()
    sched = Scheduler(eng, gather_s=0.0, video_dir=tmp_path / "videos")
    (tmp_path / "videos").mkdir()
    sched.start()
    inbox: queue.Queue = queue.Queue()

    def send(m):  # called by the worker: a switch asked right after chunk 0 applies before chunk 1
        if m["type"] == "chunk" and m["index"] == 0:
            sched.switch(stream, "a dog")
        inbox.put(m)

    try:
        stream = Stream(eng.validate({"prompt": "a cat", "frames": 6, "preset": "longlive"}), send)
        sched.submit(stream)
        msgs = []
        while not msgs or msgs[-1]["type"] not in ("done", "error", "stopped"):
            msgs.append(inbox.get(timeout=300))
    finally:
        sched.close()
    assert msgs[-1]["type"] == "done", msgs[-1]
    chunks = [m for m in msgs if m["type"] == "chunk"]
    assert [len(m["frames"]) for m in chunks] == [9, 12]
    (sw,) = [m for m in msgs if m["type"] == "switched"]
    assert sw["frame"] == 3 and sw["recache"] is True
    frames, meta = read_video(tmp_path / "videos" / msgs[-1]["video"].rsplit("/", 1)[1])
    assert frames.shape[0] == 21 and frames.shape[1:3] == tuple(8 * x for x in eng.latent_hw)
