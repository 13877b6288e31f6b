"""Wan2.1 VAE: parity with the official code (tests/data/vae, the wan_vae_tiny fixture) for the full decode,
the streaming decode and the encoder; the converter (Wan .pth and diffusers layouts); the decode CLI.

The tiny fixture VAE has the real structure at base width 12. Tolerance: relative error <= 1e-4 (float32).
"""

from __future__ import annotations

import json
import re
from pathlib import Path

import jax
import numpy as np
import pytest
import torch
from safetensors.numpy import save_file

from fkv_jax.convert import ConvertError
from checkpoints_convert.__main__ import main as convert_main
from helpers import rel_err
from fkv_jax.checkpoint import CheckpointError, load_transformer
from fkv_jax.decode import main as decode_main
from fkv_jax.vae import VAE, VAEConfig, read_vae_config
from fkv_jax.video import read_video

DATA = Path(__file__).parent / "data" / "vae"
PTH = DATA / "vae.pth"


@pytest.fixture(scope="module")
def fx():
    with np.load(DATA / "inputs.npz") as i, np.load(DATA / "outputs.npz") as o:
        return {**{k: i[k] for k in i.files}, **{k: o[k] for k in o.files}}


@pytest.fixture(scope="module")
def vae_dir(tmp_path_factory):
    out = tmp_path_factory.mktemp("vae") / "vae"
    assert convert_main(["--input", str(PTH), "--output", str(out)]) == 0  # detected as a VAE from the names
    return out


@pytest.fixture(scope="module")
def vae(vae_dir):
    return VAE.load(vae_dir)


def latents(fx):
    """The fixture's z [B, C, T, h, w] in the sampler's layout [B, T, C, h, w]."""
    return fx["z"].transpose(0, 2, 1, 3, 4)


def video(a):
    """[B, 3, T, H, W] -> [B, T, H, W, 3]."""
    return a.transpose(0, 2, 3, 4, 1)


def test_config_read_from_the_weights(vae_dir, fx):
    cfg = read_vae_config(vae_dir)
    assert cfg == VAEConfig(dim=12, name="vae")
    np.testing.assert_allclose(cfg.latents_mean, fx["latents_mean"], rtol=1e-6)
    np.testing.assert_allclose(cfg.latents_std, fx["latents_std"], rtol=1e-6)
    assert (cfg.spatial_factor, cfg.temporal_factor, cfg.num_video_frames(21)) == (8, 4, 81)


def test_decode_matches_upstream(vae, fx):
    raw = vae.decode(latents(fx), clamp=False)
    assert raw.shape == (1, 9, 32, 48, 3)
    assert rel_err(raw, video(fx["decoded_raw"])) <= 1e-4
    assert rel_err(np.clip(raw, -1, 1), video(fx["decoded"])) <= 1e-4


def test_streaming_decode_matches_upstream_and_the_full_decode(vae, fx):
    full = vae.decode(latents(fx))
    lat = latents(fx)
    for split in ([1, 1, 1], [2, 1], [3]):
        dec, parts, s = vae.stream(), [], 0
        for n in split:
            parts.append(dec(lat[:, s : s + n]))
            s += n
        assert [p.shape[1] for p in parts] == [1 + 4 * (split[0] - 1)] + [4 * n for n in split[1:]]
        out = np.concatenate(parts, axis=1)
        assert rel_err(out, video(fx["decoded_streaming"])) <= 1e-4
        assert rel_err(out, full) <= 1e-4


def test_encoder_matches_upstream(vae, fx):
    mu = vae.encode(video(fx["video_for_encoder"]))
    assert mu.shape == (1, 3, 16, 4, 6)  # sampler layout [B, T, C, h, w]
    assert rel_err(mu, fx["encoded_mu"].transpose(0, 2, 1, 3, 4)) <= 1e-4


def _diffusers_names(wan: dict[str, np.ndarray], nrb: int = 2) -> dict[str, np.ndarray]:
    """Wan VAE names -> diffusers AutoencoderKLWan names, written from the reference's rename list."""
    res = [
        ("residual.0.gamma", "norm1.gamma"),
        ("residual.2.", "conv1."),
        ("residual.3.gamma", "norm2.gamma"),
        ("residual.6.", "conv2."),
        ("shortcut.", "conv_shortcut."),
    ]
    out = {}
    for k, v in wan.items():
        n = re.sub(r"^conv1\.", "quant_conv.", re.sub(r"^conv2\.", "post_quant_conv.", k))
        n = re.sub(r"^(encoder|decoder)\.conv1\.", r"\1.conv_in.", n)
        n = re.sub(r"^(encoder|decoder)\.head\.0\.", r"\1.norm_out.", n)
        n = re.sub(r"^(encoder|decoder)\.head\.2\.", r"\1.conv_out.", n)
        n = re.sub(r"\.middle\.0\.", ".mid_block.resnets.0.", n)
        n = re.sub(r"\.middle\.1\.", ".mid_block.attentions.0.", n)
        n = re.sub(r"\.middle\.2\.", ".mid_block.resnets.1.", n)
        n = re.sub(r"^encoder\.downsamples\.", "encoder.down_blocks.", n)
        if m := re.match(r"^decoder\.upsamples\.(\d+)\.(.+)$", n):
            j, k_ = divmod(int(m[1]), nrb + 2)
            n = f"decoder.up_blocks.{j}." + (f"resnets.{k_}." if k_ <= nrb else "upsamplers.0.") + m[2]
        for a, b in res:
            if ".resnets." in n or ".down_blocks." in n:
                n = n.replace(a, b)
        out[n] = v
    return out


@pytest.mark.slow
def test_diffusers_layout_converts_to_the_same_params(tmp_path, vae_dir):
    wan = {k: v.numpy() for k, v in torch.load(PTH, weights_only=True).items()}
    d = _diffusers_names(wan)
    assert (
        "decoder.up_blocks.1.resnets.0.conv_shortcut.weight" in d
        and "decoder.up_blocks.2.upsamplers.0.resample.1.weight" in d
    )
    folder = tmp_path / "pipe" / "vae"
    folder.mkdir(parents=True)
    save_file({k: np.ascontiguousarray(v) for k, v in d.items()}, str(folder / "diffusion_pytorch_model.safetensors"))
    cfg = read_vae_config(vae_dir)
    (folder / "config.json").write_text(
        json.dumps(
            {
                "_class_name": "AutoencoderKLWan",
                "base_dim": 12,
                "latents_mean": list(cfg.latents_mean),
                "latents_std": list(cfg.latents_std),
            }
        )
    )
    out = tmp_path / "conv"
    assert convert_main(["--input", str(tmp_path / "pipe"), "--kind", "vae", "--output", str(out)]) == 0
    assert read_vae_config(out) == cfg
    a, b = VAE.load(vae_dir).params, VAE.load(out).params
    for x, y in zip(jax.tree.leaves(a), jax.tree.leaves(b)):
        np.testing.assert_array_equal(np.asarray(x), np.asarray(y))


def test_wrong_kind_and_damaged_checkpoints(tmp_path, vae_dir):
    with pytest.raises(CheckpointError, match="holds a converted VAE .* not a transformer"):
        load_transformer(vae_dir)
    assert convert_main(["--input", str(PTH), "--kind", "transformer", "--output", str(tmp_path / "t")]) == 2
    assert not (tmp_path / "t").exists()
    wan = {k: v.numpy() for k, v in torch.load(PTH, weights_only=True).items()}
    del wan["decoder.upsamples.4.shortcut.weight"]
    wan["decoder.head.2.bias"] = np.zeros(5, np.float32)
    save_file(wan, str(tmp_path / "bad.safetensors"))
    from fkv_jax.convert.components import convert_any

    with pytest.raises(ConvertError, match=r"1 missing, 0 unexpected, 1 wrong shape(.|\n)*upsamples\.4\.shortcut"):
        convert_any(tmp_path / "bad.safetensors", tmp_path / "b")
    assert not (tmp_path / "b").exists()


@pytest.mark.slow
def test_decode_cli(tmp_path, vae_dir, fx):
    lat = np.concatenate([latents(fx), 0.5 * latents(fx)]).astype(np.float32)
    np.save(tmp_path / "lat.npy", lat)
    assert (
        decode_main(
            [
                "--vae",
                str(vae_dir),
                "--latents",
                str(tmp_path / "lat.npy"),
                "--output",
                str(tmp_path / "v.npy"),
                "--no-progress",
            ]
        )
        == 0
    )
    v = np.load(tmp_path / "v.npy")
    assert v.dtype == np.float32 and v.shape == (2, 3, 9, 32, 48) and np.abs(v).max() <= 1
    assert rel_err(v[:1], fx["decoded"]) <= 1e-4
    assert rel_err(video(v[1:]), VAE.load(vae_dir).decode(0.5 * latents(fx))) <= 1e-5  # batched = per sample
    assert (
        decode_main(
            [
                "--vae",
                str(vae_dir),
                "--latents",
                str(tmp_path / "lat.npy"),
                "--output",
                str(tmp_path / "v.mp4"),
                "--no-progress",
            ]
        )
        == 0
    )
    for i in range(2):
        frames, meta = read_video(tmp_path / f"v_{i}.mp4")
        assert frames.shape == (9, 32, 48, 3) and meta["fps"] == 16
    # the mp4 holds the same video up to H.264 / yuv420p loss (compared on luma: chroma is subsampled)
    luma = np.array([0.299, 0.587, 0.114])
    ref = np.round((video(v[1:])[0] + 1) * 127.5) @ luma
    got = frames.astype(np.float64) @ luma
    assert np.abs(got - ref).mean() < 8 and np.corrcoef(got.ravel(), ref.ravel())[0, 1] > 0.98


@pytest.mark.parametrize("case", ["kind", "shape", "suffix", "missing"])
def test_decode_cli_bad_input(tmp_path, vae_dir, capsys, case):
    np.save(tmp_path / "lat.npy", np.zeros((1, 2, 16, 4, 6), np.float32))
    args = {
        "kind": ["--vae", str(tmp_path)],
        "shape": ["--vae", str(vae_dir)],
        "suffix": ["--vae", str(vae_dir)],
        "missing": ["--vae", str(vae_dir)],
    }[case]
    lat = tmp_path / ("nope.npy" if case == "missing" else "lat.npy")
    if case == "shape":
        np.save(lat, np.zeros((1, 2, 8, 4, 6), np.float32))
    out = tmp_path / ("o.gif" if case == "suffix" else "o.npy")
    assert decode_main([*args, "--latents", str(lat), "--output", str(out)]) == 2
    err = capsys.readouterr().err.strip().splitlines()
    assert len(err) == 1 and err[0].startswith("error: ")
    assert not out.exists()
