"""The checkpoint converter: every input format, LoRA merge, CLI, errors, and the 1.3B layout (shapes only).

Data in tests/data/convert/ (see its README.md): the tiny Self Forcing checkpoint (generator + generator_ema,
``model.``-prefixed), the diffusers transformer folder of the same generator_ema weights, the LongLive LoRA
adapter, and the case C inputs with the expected merged-LoRA flow. Safetensors inputs are built here.
"""

from __future__ import annotations

import json
import math
import subprocess
import sys
from pathlib import Path

import jax
import jax.numpy as jnp
import ml_dtypes
import numpy as np
import pytest
import torch
from flax import nnx
from safetensors.numpy import save_file

from fkv_jax.convert import ConvertError, convert, layouts, load_wan_state_dict, plan
from checkpoints_convert.__main__ import main
from fkv_jax.convert.wan_keymap import expected_shapes, to_flax_params
from fkv_jax.checkpoint import load_params, load_transformer
from fkv_jax.config import model_preset
from fkv_jax.model.embeddings import timestep_sinusoid_np
from fkv_jax.model.rope import make_rope_tables

DATA = Path(__file__).parent / "data" / "convert"
PT = DATA / "checkpoint.pt"
DIFFUSERS = DATA / "diffusers_transformer"
LORA = DATA / "lora.pt"
TINY = model_preset("tiny")
TINY_OPTS = {"num_heads": 2, "text_len": 16}  # not readable from tensor shapes


@pytest.fixture(scope="module")
def raw() -> dict:
    """checkpoint.pt as loaded by torch: {"generator": sd, "generator_ema": sd}, keys ``model.<Wan name>``."""
    return torch.load(PT, map_location="cpu", weights_only=True)


def wan_numpy(sd) -> dict[str, np.ndarray]:
    """A ``model.``-prefixed torch state dict as {Wan name: float32 array}."""
    return {k.removeprefix("model."): v.float().numpy() for k, v in sd.items()}


@pytest.fixture(scope="module")
def ema(raw) -> dict[str, np.ndarray]:
    return wan_numpy(raw["generator_ema"])


def converted(tmp_path, input, name="out", **opts):
    """Convert into tmp_path/name and return the restored pure param dict (numpy leaves) and config."""
    out = convert(input, tmp_path / name, **{**TINY_OPTS, **opts})
    cfg, params = load_params(out)
    return cfg, jax.tree.map(np.asarray, params)


def assert_tree_equal(a, b):
    assert jax.tree.structure(a) == jax.tree.structure(b)
    for (path, x), y in zip(jax.tree_util.tree_leaves_with_path(a), jax.tree.leaves(b), strict=True):
        assert x.shape == y.shape and x.dtype == y.dtype, path
        np.testing.assert_array_equal(x, y, err_msg=str(path))


def write_safetensors(path: Path, tensors: dict[str, np.ndarray]) -> Path:
    save_file({k: np.ascontiguousarray(v) for k, v in tensors.items()}, str(path))
    return path


def no_leftovers(tmp_path, *allowed):
    """Nothing (in particular no output or temporary directory) besides the test's own inputs."""
    assert sorted(p.name for p in tmp_path.iterdir()) == sorted(allowed)


# ---- .pt ----------------------------------------------------------------------------------------------------


def test_pt_generator_ema_by_default(tmp_path, ema, raw):
    cfg, params = converted(tmp_path, PT)
    assert cfg == TINY
    assert_tree_equal(params, to_flax_params(ema, TINY))
    # spot-check the transforms by hand against the torch tensors
    q0 = raw["generator_ema"]["model.blocks.0.self_attn.q.weight"].numpy()
    np.testing.assert_array_equal(params["blocks"]["self_attn"]["q"]["kernel"][0], q0.T)
    patch = raw["generator_ema"]["model.patch_embedding.weight"].numpy()  # [128, 16, 1, 2, 2]
    np.testing.assert_array_equal(params["patch_embedding"]["kernel"], patch.reshape(128, 64).T)
    mod1 = raw["generator_ema"]["model.blocks.1.modulation"].numpy()  # [1, 6, 128]
    np.testing.assert_array_equal(params["blocks"]["modulation"][1], mod1[0])
    source = json.loads((tmp_path / "out" / "config.json").read_text())["source"]
    assert source == {"path": str(PT.absolute()), "kind": "self_forcing_pt", "key": "generator_ema", "lora": None}


def test_pt_key_generator_picks_the_other_dict(tmp_path, raw):
    _, params = converted(tmp_path, PT, key="generator")
    assert_tree_equal(params, to_flax_params(wan_numpy(raw["generator"]), TINY))
    ema_q = raw["generator_ema"]["model.blocks.0.self_attn.q.weight"].numpy().T
    assert not np.array_equal(params["blocks"]["self_attn"]["q"]["kernel"][0], ema_q)


def test_wrapper_prefixes_are_stripped(tmp_path, raw, ema):
    """FSDP/DDP/checkpoint wrapper segments anywhere in the name, under a 'model' entry (LongLive base);
    saved in the legacy (pre-zip) torch format, which cannot be memory-mapped."""
    sd = {
        k.replace("model.blocks.", "module._fsdp_wrapped_module.model.blocks.").replace(
            ".self_attn.", "._checkpoint_wrapped_module.self_attn."
        ): v
        for k, v in raw["generator_ema"].items()
    }
    torch.save({"model": sd, "step": 3}, tmp_path / "wrapped.pt", _use_new_zipfile_serialization=False)
    wan = load_wan_state_dict(tmp_path / "wrapped.pt")
    assert set(wan) == set(ema) and all(np.array_equal(wan[k], ema[k]) for k in ema)


# ---- safetensors ----------------------------------------------------------------------------------------------


def test_safetensors_single_and_sharded_agree(tmp_path, ema):
    single = write_safetensors(tmp_path / "model.safetensors", ema)
    shards = tmp_path / "sharded"
    shards.mkdir()
    names = sorted(ema)
    weight_map = {n: f"model-0000{1 + (i % 2)}-of-00002.safetensors" for i, n in enumerate(names)}
    for shard in sorted(set(weight_map.values())):
        write_safetensors(shards / shard, {n: ema[n] for n in names if weight_map[n] == shard})
    index = shards / "model.safetensors.index.json"
    index.write_text(json.dumps({"metadata": {"total_size": 0}, "weight_map": weight_map}))

    expected = to_flax_params(ema, TINY)
    _, p_single = converted(tmp_path, single, "single")
    _, p_index = converted(tmp_path, index, "index")
    _, p_dir = converted(tmp_path, shards, "dir")  # a directory holding the index
    for p in (p_single, p_index, p_dir):
        assert_tree_equal(p, expected)
    assert json.loads((tmp_path / "index" / "config.json").read_text())["source"]["kind"] == "wan_safetensors"


def test_safetensors_bf16_input_and_bf16_output(tmp_path, ema):
    bf16 = {k: v.astype(ml_dtypes.bfloat16) for k, v in ema.items()}
    src = write_safetensors(tmp_path / "bf16.safetensors", bf16)
    rounded = {k: v.astype(np.float32) for k, v in bf16.items()}
    assert not all(np.array_equal(rounded[k], ema[k]) for k in ema)  # the rounding is visible

    _, p32 = converted(tmp_path, src, "f32")
    assert_tree_equal(p32, to_flax_params(rounded, TINY))

    out = convert(src, tmp_path / "bf16", dtype="bfloat16", **TINY_OPTS)
    assert json.loads((out / "config.json").read_text())["dtype"] == "bfloat16"
    _, model = load_transformer(out)
    state = jax.tree.map(np.asarray, nnx.to_pure_dict(nnx.state(model, nnx.Param)))
    assert_tree_equal(state, to_flax_params(rounded, TINY, ml_dtypes.bfloat16))


@pytest.mark.slow
def test_safetensors_does_not_need_torch(tmp_path, ema):
    src = write_safetensors(tmp_path / "model.safetensors", ema)
    code = (
        "import sys; sys.modules['torch'] = None\n"  # any `import torch` now raises ImportError
        "from fkv_jax.convert import convert\n"
        f"convert({str(src)!r}, {str(tmp_path / 'out')!r}, num_heads=2, text_len=16)\n"
    )
    subprocess.run([sys.executable, "-c", code], check=True, capture_output=True, timeout=120)
    assert (tmp_path / "out" / "params").is_dir()


# ---- diffusers ----------------------------------------------------------------------------------------------


def test_diffusers_rename_table_matches_the_fixture_map():
    key_map = json.loads((DATA / "wan_to_diffusers_key_map.json").read_text())
    assert len(key_map) == 69
    assert {layouts.diffusers_to_wan(d): w for w, d in key_map.items()} == {w: w for w in key_map}


def test_diffusers_folder_equals_generator_ema(tmp_path, ema):
    cfg, p_dir = converted(tmp_path, DIFFUSERS, "dir", num_heads=None)  # heads from its config.json
    assert cfg == TINY
    assert_tree_equal(p_dir, to_flax_params(ema, TINY))
    source = json.loads((tmp_path / "dir" / "config.json").read_text())["source"]
    assert source["kind"] == "diffusers_safetensors"
    _, p_file = converted(tmp_path, DIFFUSERS / "diffusion_pytorch_model.safetensors", "file", num_heads=None)
    assert_tree_equal(p_file, p_dir)


def test_diffusers_config_heads_conflict(tmp_path):
    with pytest.raises(ConvertError, match=r"conflicting num_heads: 4 from --num-heads, 2 from .*config.json"):
        convert(DIFFUSERS, tmp_path / "out", num_heads=4, text_len=16)
    no_leftovers(tmp_path)


# ---- LoRA ---------------------------------------------------------------------------------------------------


@pytest.fixture(scope="module")
def lora_sd() -> dict[str, np.ndarray]:
    return {k: v.numpy() for k, v in torch.load(LORA, map_location="cpu", weights_only=True)["generator_lora"].items()}


def hand_merge(base: dict[str, np.ndarray], lora_sd: dict[str, np.ndarray], scale: float = 1.0) -> dict:
    merged = dict(base)
    for k in lora_sd:
        if k.endswith(".lora_A.weight"):
            module = k.removeprefix("base_model.model.").removesuffix(".lora_A.weight")
            a, b = lora_sd[k], lora_sd[k.replace("lora_A", "lora_B")]
            merged[f"{module}.weight"] = base[f"{module}.weight"] + np.float32(scale) * (b @ a)
    return merged


def test_lora_merge_matches_hand_merge(tmp_path, ema, lora_sd):
    assert len(lora_sd) == 40
    _, params = converted(tmp_path, PT, lora=LORA)
    assert_tree_equal(params, to_flax_params(hand_merge(ema, lora_sd), TINY))
    lora_meta = json.loads((tmp_path / "out" / "config.json").read_text())["source"]["lora"]
    assert lora_meta == {"path": str(LORA.absolute()), "key": "generator_lora", "alpha": None, "ranks": [4]}

    _, half = converted(tmp_path, PT, "half", lora=LORA, lora_alpha=2.0)  # alpha 2 / rank 4
    assert_tree_equal(half, to_flax_params(hand_merge(ema, lora_sd, 0.5), TINY))


@pytest.mark.slow
def test_lora_merged_forward_matches_longlive(tmp_path):
    case = np.load(DATA / "caseC_lora.npz")
    out = convert(PT, tmp_path / "out", lora=LORA, **TINY_OPTS)
    cfg, model = load_transformer(out)
    rope = make_rope_tables(cfg.head_dim, cfg.grid_hw((8, 12)))
    tsin = timestep_sinusoid_np(np.full((1, 3), 937.5), cfg.freq_dim)
    ckv = model.context_kv(jnp.asarray(case["context"]))
    flow, _, _ = model(jnp.asarray(case["caseC_x"]), jnp.asarray(tsin), ckv, rope, jnp.arange(3, dtype=jnp.int32))
    ref = case["caseC_flow_merged"]
    rel = np.linalg.norm(np.asarray(flow) - ref) / np.linalg.norm(ref)
    assert rel <= 1e-4, rel


def test_lora_key_without_base_weight(tmp_path, lora_sd):
    bad = dict(lora_sd)
    for part in "AB":
        bad[f"base_model.model.blocks.0.self_attn.zz.lora_{part}.weight"] = bad.pop(
            f"base_model.model.blocks.0.self_attn.q.lora_{part}.weight"
        )
    torch.save({"generator_lora": {k: torch.from_numpy(v) for k, v in bad.items()}}, tmp_path / "bad_lora.pt")
    with pytest.raises(ConvertError, match=r"blocks\.0\.self_attn\.zz\.lora_A\.weight"):
        convert(PT, tmp_path / "out", lora=tmp_path / "bad_lora.pt", **TINY_OPTS)
    no_leftovers(tmp_path, "bad_lora.pt")


# ---- CLI ----------------------------------------------------------------------------------------------------


def test_cli_main_converts_and_refuses_to_clobber(tmp_path, capsys, raw):
    out = tmp_path / "out"
    assert main(["--input", str(PT), "--output", str(out), "--num-heads", "2", "--text-len", "16"]) == 0
    printed = capsys.readouterr().out
    assert "generator_ema" in printed and "589,248" in printed and str(out) in printed

    before = (out / "config.json").read_text()
    assert main(["--input", str(PT), "--output", str(out), "--preset", "tiny", "--key", "generator"]) == 2
    err = capsys.readouterr().err
    assert err.startswith("error: ") and "--overwrite" in err and "Traceback" not in err
    assert (out / "config.json").read_text() == before

    argv = ["--input", str(PT), "--output", str(out), "--preset", "tiny", "--key", "generator"]
    assert main(argv + ["--overwrite"]) == 0
    _, params = load_params(out)
    assert_tree_equal(jax.tree.map(np.asarray, params), to_flax_params(wan_numpy(raw["generator"]), TINY))
    no_leftovers(tmp_path, "out")

    keep = tmp_path / "mine"
    keep.mkdir()
    (keep / "notes.txt").write_text("not a checkpoint")
    assert main(["--input", str(PT), "--output", str(keep), "--preset", "tiny"]) == 2
    assert (keep / "notes.txt").read_text() == "not a checkpoint"


@pytest.mark.slow
def test_cli_help_subprocess():
    r = subprocess.run(
        [sys.executable, "-m", "checkpoints_convert", "--help"], capture_output=True, text=True, timeout=120
    )
    assert r.returncode == 0
    for flag in (
        "--input",
        "--output",
        "--num-heads",
        "--text-len",
        "--key",
        "--dtype",
        "--lora",
        "--lora-alpha",
        "--preset",
        "--overwrite",
        "generator_ema",
        "diffusers",
        "index.json",
    ):
        assert flag in r.stdout


def test_preset_mismatch(tmp_path):
    with pytest.raises(ConvertError, match="does not match preset 'wan2.1-t2v-1.3b'.*dim: checkpoint 128, preset 1536"):
        convert(PT, tmp_path / "out", preset="wan2.1-t2v-1.3b")
    no_leftovers(tmp_path)


# ---- broken inputs: a clear error naming the file/key, and nothing written -----------------------------------


def _broken_pt(tmp_path, raw, edit) -> Path:
    sd = dict(raw["generator_ema"])
    edit(sd)
    torch.save({"generator_ema": sd}, tmp_path / "broken.pt")
    return tmp_path / "broken.pt"


def _expect_error(tmp_path, input, *fragments, allowed=(), **opts):
    out = tmp_path / "out"
    with pytest.raises(ConvertError) as e:
        convert(input, out, **{**TINY_OPTS, **opts})
    for f in fragments:
        assert f in str(e.value), (f, str(e.value))
    assert not out.exists()
    no_leftovers(tmp_path, *allowed)
    return str(e.value)


def test_missing_key(tmp_path, raw):
    src = _broken_pt(tmp_path, raw, lambda sd: sd.pop("model.blocks.1.ffn.2.bias"))
    _expect_error(tmp_path, src, "1 missing", "blocks.1.ffn.2.bias [128]", allowed=["broken.pt"])


def test_extra_key(tmp_path, raw):
    src = _broken_pt(tmp_path, raw, lambda sd: sd.update({"model.blocks.0.extra.weight": torch.zeros(3)}))
    _expect_error(tmp_path, src, "1 unexpected", "model.blocks.0.extra.weight [3]", allowed=["broken.pt"])


def test_wrong_shape(tmp_path, raw):
    src = _broken_pt(tmp_path, raw, lambda sd: sd.update({"model.blocks.0.self_attn.q.weight": torch.zeros(128, 64)}))
    _expect_error(
        tmp_path, src, "model.blocks.0.self_attn.q.weight: [128, 64], expected [128, 128]", allowed=["broken.pt"]
    )


def test_many_problems_in_one_capped_error(tmp_path, raw):
    def edit(sd):
        for k in [k for k in sd if k.startswith("model.blocks.1.")]:
            del sd[k]
        sd["model.blocks.2.self_attn.q.weight"] = torch.zeros(128, 64)  # makes it a 3-layer model
        sd["model.head.extra"] = torch.zeros(2)

    src = _broken_pt(tmp_path, raw, edit)
    msg = _expect_error(
        tmp_path,
        src,
        "53 missing, 1 unexpected, 1 wrong shape",
        "... and 33 more",
        "model.head.extra [2]",
        "model.blocks.2.self_attn.q.weight: [128, 64], expected [128, 128]",
        allowed=["broken.pt"],
    )
    assert msg.count("\n") < 60


def test_truncated_files(tmp_path, ema):
    data = PT.read_bytes()
    (tmp_path / "cut.pt").write_bytes(data[: len(data) // 2])
    _expect_error(tmp_path, tmp_path / "cut.pt", "cut.pt", "truncated or corrupt", allowed=["cut.pt"])
    full = write_safetensors(tmp_path / "full.safetensors", ema).read_bytes()
    (tmp_path / "full.safetensors").unlink()
    (tmp_path / "cut.safetensors").write_bytes(full[: len(full) - 1000])
    _expect_error(tmp_path, tmp_path / "cut.safetensors", "cut.safetensors", allowed=["cut.pt", "cut.safetensors"])


@pytest.mark.parametrize(
    "payload, fragment",
    [
        ([1, 2, 3], "does not hold a state dict (it holds a list)"),
        ({"a": "b", "c": "d"}, "holds no state dict"),
        ({"generator": {"x": "not a tensor"}}, "entry 'x' is a str, not a tensor"),
    ],
)
def test_not_a_state_dict(tmp_path, payload, fragment):
    torch.save(payload, tmp_path / "odd.pt")
    _expect_error(tmp_path, tmp_path / "odd.pt", "odd.pt", fragment, allowed=["odd.pt"])


def test_nonexistent_path(tmp_path):
    _expect_error(tmp_path, tmp_path / "missing.pt", "missing.pt", "does not exist")


def test_unknown_key_lists_available(tmp_path):
    _expect_error(tmp_path, PT, "no top-level key 'critic'", "'generator'", "'generator_ema'", key="critic")


def test_cli_error_is_one_line_exit_2(tmp_path, capsys):
    assert main(["--input", str(tmp_path / "nope.pt"), "--output", str(tmp_path / "out")]) == 2
    err = capsys.readouterr().err
    assert err.startswith("error: --input not found") and "nope.pt" in err and err.count("\n") == 1
    no_leftovers(tmp_path)


# ---- the 1.3B layout, shapes only ------------------------------------------------------------------------------


def wan13b_shapes() -> dict[str, tuple[int, ...]]:
    """The 825 Wan2.1-T2V-1.3B tensors, written out from the reference table (independent of wan_keymap)."""
    d, f, t, c = 1536, 8960, 4096, 16
    shapes = {
        "patch_embedding.weight": (d, c, 1, 2, 2),
        "patch_embedding.bias": (d,),
        "text_embedding.0.weight": (d, t),
        "text_embedding.0.bias": (d,),
        "text_embedding.2.weight": (d, d),
        "text_embedding.2.bias": (d,),
        "time_embedding.0.weight": (d, 256),
        "time_embedding.0.bias": (d,),
        "time_embedding.2.weight": (d, d),
        "time_embedding.2.bias": (d,),
        "time_projection.1.weight": (6 * d, d),
        "time_projection.1.bias": (6 * d,),
        "head.head.weight": (64, d),
        "head.head.bias": (64,),
        "head.modulation": (1, 2, d),
    }
    for i in range(30):
        b = f"blocks.{i}."
        shapes[b + "modulation"] = (1, 6, d)
        for attn in ("self_attn", "cross_attn"):
            for p in "qkvo":
                shapes[f"{b}{attn}.{p}.weight"], shapes[f"{b}{attn}.{p}.bias"] = (d, d), (d,)
            shapes[f"{b}{attn}.norm_q.weight"] = shapes[f"{b}{attn}.norm_k.weight"] = (d,)
        shapes[b + "norm3.weight"] = shapes[b + "norm3.bias"] = (d,)
        shapes[b + "ffn.0.weight"], shapes[b + "ffn.0.bias"] = (f, d), (f,)
        shapes[b + "ffn.2.weight"], shapes[b + "ffn.2.bias"] = (d, f), (d,)
    return shapes


def test_plan_13b_shapes_only():
    shapes = wan13b_shapes()
    assert len(shapes) == 825
    preset = model_preset("wan2.1-t2v-1.3b")
    assert shapes == expected_shapes(preset)
    # zero-stride views: a "state dict" of the real shapes that allocates nothing; plan reads shapes only
    zeros = {k: np.broadcast_to(np.float32(0), s) for k, s in shapes.items()}
    assert sum(z.base.nbytes if z.base is not None else z.nbytes for z in zeros.values()) < 10_000
    p = plan({f"model.{k}": z.shape for k, z in zeros.items()})
    assert p.cfg == preset and p.layout == "wan"  # heads = 1536 // 128, text_len 512 by default
    assert p.num_params == 1_418_996_800 == sum(math.prod(s) for s in shapes.values())
    assert p.names == {f"model.{k}": k for k in shapes}
    assert plan(shapes, preset="wan2.1-t2v-1.3b").cfg == preset


def test_plan_13b_diffusers_names_map_back():
    """Diffusers names for all 30 blocks, generalised from the fixture's wan -> diffusers map (blocks 0 and 1)."""
    fixture_map = json.loads((DATA / "wan_to_diffusers_key_map.json").read_text())
    template = {w: d for w, d in fixture_map.items() if not w.startswith("blocks.1.")}
    to_diffusers = {}
    for w, d in template.items():
        if w.startswith("blocks.0."):
            for i in range(30):
                to_diffusers[w.replace("blocks.0.", f"blocks.{i}.", 1)] = d.replace("blocks.0.", f"blocks.{i}.", 1)
        else:
            to_diffusers[w] = d
    shapes = wan13b_shapes()
    assert set(to_diffusers) == set(shapes)
    p = plan({to_diffusers[w]: s for w, s in shapes.items()})
    assert p.layout == "diffusers" and p.cfg == model_preset("wan2.1-t2v-1.3b")
    assert p.names == {d: w for w, d in to_diffusers.items()}
    assert p.names["blocks.7.norm2.weight"] == "blocks.7.norm3.weight"  # the norm2/norm3 swap


def test_plan_default_heads_need_a_multiple_of_128():
    shapes = {k: tuple(1000 if n == 1536 else n for n in s) for k, s in wan13b_shapes().items()}
    with pytest.raises(ConvertError, match="dim=1000 is not a multiple of 128: pass --num-heads"):
        plan(shapes)
