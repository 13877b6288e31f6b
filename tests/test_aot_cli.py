"""``python -m fkv_jax.aot``: the report's keys on a tiny model, and one-line errors for bad input."""

from __future__ import annotations

import json

import pytest

from fkv_jax.aot import libtpu_available, main, parse_target
from fkv_jax.cli import UsageError

needs_libtpu = pytest.mark.skipif(not libtpu_available(), reason="libtpu is not importable (pip install -e '.[tpu]')")


@needs_libtpu
@pytest.mark.kernels
def test_tiny_model_report(tmp_path, capsys):
    out = tmp_path / "r.json"
    # tiny: head_dim 64 is not a Mosaic TPU block, so the XLA attention backend
    assert (
        main(
            [
                "--target",
                "tpu-v5e",
                "--model-preset",
                "tiny",
                "--frames",
                "6",
                "--attention-backend",
                "xla",
                "--json",
                str(out),
            ]
        )
        == 0
    )
    r = json.loads(out.read_text())
    assert isinstance(r["fits"], bool) and r["fits"]
    assert isinstance(r["cache_copies"], int)
    assert r["flops_per_chunk"] > 0 and r["bytes_per_chunk"] > 0
    assert set(r["roofline"]) == {"tpu-v5e", "tpu-v5p", "tpu-v6e", "h100", "h200"}
    assert r["estimate"]["fps"] == pytest.approx(r["frames_per_chunk"] / (r["estimate"]["ms_per_chunk"] / 1e3))
    assert r["estimate"]["video_fps"] == pytest.approx(4 * r["estimate"]["fps"])
    text = capsys.readouterr().out
    assert "ESTIMATES" in text and "fits" in text


@pytest.mark.parametrize(
    "argv, message",
    [
        (["--target", "tpu-v9"], "--target must be one of"),
        (["--target", "tpu-v5e:big"], "topology must look like"),
        (["--target", "h200:2x2"], "takes no topology"),
        (["--model-preset", "nope"], "--model-preset"),
        (["--model-preset", "tiny", "--frames", "4"], "multiple of frames_per_block"),
        (["--model-preset", "tiny", "--latent-size", "8by12"], "--latent-size"),
        (["--model-preset", "tiny", "--attention-backend", "triton"], "--attention-backend"),
        (["--model-preset", "tiny", "--attention-backend", "xla", "--policy", "nope"], "unknown --policy"),
        (["--frames", "many"], "--frames"),
        (["--model-preset", "tiny", "--latent-size", "7x12"], "patch size"),
        (["--model-preset", "tiny"], "head_dim=64"),  # pallas_tpu, the default backend, needs D % 128 == 0
    ],
)
def test_bad_input_is_one_error_line(argv, message, capsys):
    assert main(argv) == 2
    err = capsys.readouterr().err.strip().splitlines()
    assert len(err) == 1 and err[0].startswith("error: ") and message in err[0]


def test_gpu_targets_compile_for_tpu_and_say_so():
    assert parse_target("h200") == ("h200", "v5p:2x2x1", False)
    assert parse_target("tpu-v5e:2x4") == ("tpu-v5e", "v5e:2x4", True)
    with pytest.raises(UsageError):
        parse_target("a100")


@pytest.mark.kernels
def test_h200_target_compiles_for_the_gpu_with_the_cuda_plugin(tmp_path):
    """With jaxlib's CUDA plugin, --target h200 is a real XLA:GPU compile for a deviceless H200: the Triton
    kernel reads the stacked cache in place (no cache-sized op) and the report says its cost is not declared."""
    from fkv_jax.attention.backends import jax_triton_available
    from fkv_jax.kernels.gpu_aot import INSTALL_HINT, cuda_pjrt_available

    if not (cuda_pjrt_available() and jax_triton_available()):
        pytest.skip(f"needs jaxlib's CUDA plugin and jax-triton ({INSTALL_HINT}; pip install --no-deps jax-triton)")
    out = tmp_path / "r.json"
    argv = ["--target", "h200", "--model-preset", "tiny", "--frames", "6", "--attention-backend", "triton"]
    assert main([*argv, "--json", str(out)]) == 0
    r = json.loads(out.read_text())
    assert r["device_kind"] == "NVIDIA H200" and r["cache_copies"] == 0 and r["fits"]
    assert r["kernel_calls_per_chunk"] > 0 and any("declare no cost" in n for n in r["notes"])
    assert main([*argv[:-1], "pallas_tpu"]) == 2  # a TPU kernel for a GPU target: one error line
