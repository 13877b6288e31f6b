"""TAEHV preview decoder: parity with the reference code (madebyollin/taehv) on random weights, whole-video and
streaming decode, the converter (.pth / .safetensors, key map errors, model folders) and bf16.

The fixtures (tests/data/taehv, see its README) hold the reference's inputs and outputs; the weights (the real
channel counts: 11 M parameters, too big to ship) are regenerated here from a seeded recipe and checked
against the SHA-256 recorded when the reference ran on them. Tolerance: relative error <= 1e-4 (float32).
"""

from __future__ import annotations

import hashlib
import json
from pathlib import Path

import jax
import numpy as np
import pytest
import torch
from safetensors.numpy import save_file

from fkv_jax.cli.convert import main as convert_main
from fkv_jax.convert import ConvertError
from fkv_jax.convert.taehv import convert_taehv, plan_taehv
from fkv_jax.vae import TAEHV, StreamingDecoder, TAEHVConfig, read_taehv_config
from fkv_jax.vae.taehv import decode_chunk, decode_video, init_state
from helpers import rel_err

DATA = Path(__file__).parent / "data" / "taehv"
META = json.loads((DATA / "weights.json").read_text())


def random_state_dict(shapes: dict, seed: int, gain: float) -> dict[str, np.ndarray]:
    """The fixture weights: per tensor in file order, uniform draws from PCG64(seed)'s raw 64-bit stream (stable
    across numpy versions), conv weights in +-gain sqrt(3 / fan_in), biases in +-0.1."""
    bits = np.random.PCG64(seed)
    out = {}
    for name, shape in shapes.items():
        u = (bits.random_raw(int(np.prod(shape))) >> np.uint64(11)).astype(np.float64) * 2.0**-53  # [0, 1)
        scale = gain * np.sqrt(3.0 / int(np.prod(shape[1:]))) if len(shape) == 4 else 0.1
        out[name] = ((2.0 * u - 1.0) * scale).astype(np.float32).reshape(shape)
    return out


def fixture_weights(name: str) -> dict[str, np.ndarray]:
    m = META[name]
    sd = random_state_dict({k: tuple(v) for k, v in m["shapes"].items()}, m["seed"], m["gain"])
    digest = hashlib.sha256(b"".join(sd[k].tobytes() for k in m["shapes"])).hexdigest()
    assert digest == m["sha256"], "the regenerated weights differ from the ones the reference ran on"
    return sd


def load_fixture(name: str) -> tuple[np.ndarray, np.ndarray]:
    """(latents [B, T, z, h, w], reference frames [B, T', H, W, 3] in [0, 1], not clamped)."""
    with np.load(DATA / f"{name}.npz") as f:
        return f["latents"], f["frames_raw"].transpose(0, 1, 3, 4, 2)


def to_unit(video):
    """Our [-1, 1] convention -> the reference's [0, 1]."""
    return (np.asarray(video) + 1.0) / 2.0


@pytest.fixture(scope="module")
def pth(tmp_path_factory):
    path = tmp_path_factory.mktemp("taehv_src") / "taew2_1.pth"
    torch.save({k: torch.from_numpy(v) for k, v in fixture_weights("taew2_1").items()}, path)
    return path


@pytest.fixture(scope="module")
def tae_dir(pth, tmp_path_factory):
    out = tmp_path_factory.mktemp("taehv") / "taehv"
    assert convert_main(["--taehv", str(pth), "--output", str(out)]) == 0
    return out


@pytest.fixture(scope="module")
def tae(tae_dir):
    return TAEHV.load(tae_dir)


def test_config_read_from_the_weights(tae_dir):
    cfg = read_taehv_config(tae_dir)
    assert cfg == TAEHVConfig()  # latent 16, widths 256/128/64/64, 3 MemBlocks per level, patch 1
    assert (cfg.spatial_factor, cfg.temporal_factor, cfg.num_video_frames(21)) == (8, 4, 81)  # the Wan VAE's


def test_decode_matches_reference(tae):
    lat, ref = load_fixture("taew2_1")
    raw = tae.decode(lat, clamp=False)
    assert raw.shape == (2, 13, 24, 40, 3) and raw.dtype == np.float32
    assert rel_err(to_unit(raw), ref) <= 1e-4
    video = tae.decode(lat)  # clamped, in [-1, 1] like the Wan VAE's output
    assert video.min() == -1.0 and video.max() == 1.0  # the fixture reaches both sides of the clamp
    assert rel_err(to_unit(video), np.clip(ref, 0, 1)) <= 1e-4


def test_streaming_equals_whole_video_and_reference(tae):
    lat, ref = load_fixture("taew2_1")
    full = tae.decode(lat, clamp=False)
    for split in ([1, 1, 1, 1], [3, 1]):
        dec, parts, s = tae.stream(clamp=False), [], 0
        for n in split:
            parts.append(dec(lat[:, s : s + n]))
            s += n
        assert [p.shape[1] for p in parts] == [4 * split[0] - 3, *(4 * n for n in split[1:])]
        assert dec.frames_out == 13
        video = np.concatenate(parts, axis=1)
        assert rel_err(video, full) <= 1e-5, split
        assert rel_err(to_unit(video), ref) <= 1e-4, split


def test_pure_functional_api_threads_state(tae):
    """decode_chunk(model, state, latents) -> (state, frames), jitted, with the state as a pytree argument."""
    from flax import nnx

    lat, ref = load_fixture("taew2_1")
    model = nnx.merge(tae.graphdef, tae.params)
    gdef, params = nnx.split(model, nnx.Param)
    step = jax.jit(lambda p, s, z: decode_chunk(nnx.merge(gdef, p), s, z, clamp=False))
    state = init_state(tae.cfg, 2, (3, 5))
    assert not state.started and [m.shape for m in state.memory][::3] == [
        (2, 3, 5, 256),
        (2, 6, 10, 128),
        (2, 12, 20, 64),
    ]
    state, a = step(params, state, lat[:, :2])
    assert state.started
    state, b = step(params, state, lat[:, 2:])
    video = np.concatenate([a, b], axis=1)
    assert rel_err(to_unit(video), ref) <= 1e-4
    whole = jax.jit(lambda p, z: decode_video(nnx.merge(gdef, p), z, clamp=False))(params, lat)
    assert rel_err(video, whole) <= 1e-5


def test_same_calls_as_the_wan_streaming_decoder(tae):
    """The pipeline swaps the two: same methods and attributes, same shapes for the same latents."""
    dec = tae.stream(clamp=False)
    for attr in ("vae", "clamp", "cache", "frames_out"):  # the Wan decoder's attributes
        assert hasattr(dec, attr) and attr in vars(StreamingDecoder(None))
    lat = np.zeros((2, 4, 16, 3, 5), np.float32)
    assert dec(lat[:, :3]).shape == (2, 9, 24, 40, 3)  # 1 + 4 (3 - 1) frames, like the Wan VAE
    assert dec(lat[:, 3:]).shape == (2, 4, 24, 40, 3)
    with pytest.raises(ValueError, match=r"latents must be \[B, F, 16, h, w\]"):
        tae.decode(np.zeros((1, 2, 3, 4), np.float32))
    with pytest.raises(ValueError, match="the state was made for other videos"):
        dec(np.zeros((1, 1, 16, 3, 5), np.float32))


def test_patch2_variant_from_safetensors(tmp_path):
    """A Wan2.2-style TAEHV (48 latent channels, pixel shuffle 2), read from .safetensors via the Python API."""
    src = tmp_path / "taew2_2.safetensors"
    save_file(fixture_weights("patch2"), str(src))
    out = convert_taehv(src, tmp_path / "tae2")
    tae = TAEHV.load(out)
    assert (tae.cfg.latent_channels, tae.cfg.patch_size, tae.cfg.spatial_factor) == (48, 2, 16)
    lat, ref = load_fixture("patch2")
    video = tae.decode(lat, clamp=False)
    assert video.shape == (1, 5, 32, 48, 3)
    assert rel_err(to_unit(video), ref) <= 1e-4


def test_bfloat16_compute(tae_dir, tae):
    import jax.numpy as jnp

    lat, _ = load_fixture("taew2_1")
    bf = TAEHV.load(tae_dir, dtype=jnp.bfloat16)
    assert bf.dtype == jnp.bfloat16
    video = bf.decode(lat[:1, :2], clamp=False)
    assert video.dtype == np.float32
    assert rel_err(video, tae.decode(lat[:1, :2], clamp=False)) <= 5e-2


# ---- converter errors and model folders ----------------------------------------------------------------


def _shapes():
    return {k: tuple(v) for k, v in META["taew2_1"]["shapes"].items()}


def test_converter_names_missing_unexpected_and_misshaped_keys():
    shapes = _shapes()
    del shapes["decoder.9.conv.2.bias"]
    shapes["decoder.99.weight"] = (3, 3, 3, 3)
    shapes["decoder.14.weight"] = (64, 64, 3, 3)
    with pytest.raises(ConvertError) as e:
        plan_taehv(shapes)
    msg = str(e.value)
    assert "1 missing, 1 unexpected, 1 wrong shape" in msg
    assert "decoder.9.conv.2.bias" in msg and "decoder.99.weight" in msg
    assert "decoder.14.weight: [64, 64, 3, 3], expected [64, 128, 3, 3]" in msg
    p = plan_taehv(_shapes())
    assert len(p.ignored) == sum(k.startswith("encoder.") for k in _shapes()) > 0  # the encoder is skipped
    with pytest.raises(ConvertError, match="'decoder.1.weight' is missing"):
        plan_taehv({k: s for k, s in _shapes().items() if k != "decoder.1.weight"})


def test_cli_errors_write_nothing(tmp_path, pth, capsys):
    sd = fixture_weights("taew2_1")
    sd["decoder.22.bias"] = np.zeros((4,), np.float32)
    bad = tmp_path / "bad.pth"
    torch.save({k: torch.from_numpy(v) for k, v in sd.items()}, bad)
    out = tmp_path / "out"
    assert convert_main(["--taehv", str(bad), "--output", str(out)]) == 2
    err = capsys.readouterr().err
    assert err.startswith("error: ") and "decoder.22.bias: [4], expected [3]" in err
    assert not out.exists()
    for extra, needle in (
        (["--input", str(pth)], "--taehv and --input"),
        (["--lora", str(pth)], "--lora do not apply to --taehv"),
        (["--kind", "vae"], "--kind applies to --input"),
    ):
        assert convert_main(["--taehv", str(pth), "--output", str(out), *extra]) == 2
        assert needle in capsys.readouterr().err
    assert not out.exists()
    assert convert_main(["--input", str(pth), "--output", str(out)]) == 2  # detected: points to --taehv
    assert "is a TAEHV decoder checkpoint: convert it with --taehv" in capsys.readouterr().err
    vae_pth = Path(__file__).parent / "data" / "vae" / "vae.pth"  # a Wan VAE, not a TAEHV
    assert convert_main(["--taehv", str(vae_pth), "--output", str(out)]) == 2
    assert "is not a TAEHV checkpoint" in capsys.readouterr().err and not out.exists()


def test_adds_into_a_model_folder(tmp_path, pth, tae_dir, capsys):
    folder = tmp_path / "models" / "sf"
    folder.mkdir(parents=True)
    comps = ["text_encoder", "tokenizer", "transformer", "vae"]
    (folder / "config.json").write_text(json.dumps({"format": "fkv_jax.model_dir", "components": comps}))
    assert convert_main(["--taehv", str(pth), "--output", str(folder), "--dtype", "bfloat16"]) == 0
    assert json.loads((folder / "config.json").read_text())["components"] == sorted([*comps, "taehv"])
    assert read_taehv_config(folder / "taehv") == TAEHVConfig()
    assert json.loads((folder / "taehv" / "config.json").read_text())["dtype"] == "bfloat16"
    capsys.readouterr()
    assert convert_main(["--taehv", str(pth), "--output", str(folder)]) == 2  # taken: needs --overwrite
    assert "exists and is not empty" in capsys.readouterr().err
    assert convert_main(["--taehv", str(pth), "--output", str(folder), "--overwrite"]) == 0
    assert json.loads((folder / "taehv" / "config.json").read_text())["dtype"] == "float32"
    # a non-empty folder that is not a model folder is refused
    assert convert_main(["--taehv", str(pth), "--output", str(tae_dir.parent)]) == 2


def test_bench_checks_its_options(capsys):
    from fkv_jax.bench.decoders import main as bench_main

    with pytest.raises(SystemExit) as e:
        bench_main(["--help"])
    assert e.value.code == 0 and "Wan2.1 VAE" in capsys.readouterr().out
    for bad, needle in ((["--latent-hw", "8by13"], "--latent-hw must be HxW"), (["--chunks", "1"], "--chunks")):
        with pytest.raises(SystemExit) as e:
            bench_main(bad)
        assert e.value.code == 2 and needle in capsys.readouterr().err


def test_built_with_the_model_folder(tmp_path, pth, capsys):
    """`--wan-dir W --generator G --taehv T` builds the folder with taehv/ in it; a bad TAEHV file is found
    before anything is written."""
    import shutil

    from helpers import CHECKPOINT_PT

    data = Path(__file__).parent / "data"
    wan = tmp_path / "Wan2.1-T2V-1.3B"
    (wan / "google").mkdir(parents=True)
    shutil.copy(data / "vae" / "vae.pth", wan / "Wan2.1_VAE.pth")
    shutil.copy(data / "text" / "umt5.pth", wan / "models_t5_umt5-xxl-enc-bf16.pth")
    shutil.copytree(data / "text" / "tokenizer", wan / "google" / "umt5-xxl")
    args = ["--wan-dir", str(wan), "--generator", str(CHECKPOINT_PT), "--num-heads", "2", "--text-len", "16"]
    out = tmp_path / "model"
    assert convert_main([*args, "--taehv", str(data / "vae" / "vae.pth"), "--output", str(out)]) == 2
    assert "is not a TAEHV checkpoint" in capsys.readouterr().err and not out.exists()
    assert convert_main([*args, "--taehv", str(pth), "--output", str(out), "--no-progress"]) == 0
    assert sorted(p.name for p in out.iterdir()) == [
        "config.json",
        "taehv",
        "text_encoder",
        "tokenizer",
        "transformer",
        "vae",
    ]
    assert "taehv" in json.loads((out / "config.json").read_text())["components"]
    assert read_taehv_config(out / "taehv") == TAEHVConfig()
