"""The converted-checkpoint format: atomic save, restore without conversion, clear errors."""

from __future__ import annotations

import json
import shutil

import jax
import ml_dtypes
import numpy as np
import orbax.checkpoint as ocp
import pytest
from flax import nnx

from fkv_jax.checkpoint import (
    CheckpointError,
    abstract_params,
    load_params,
    load_transformer,
    read_info,
    save_transformer,
)
from fkv_jax.config import model_preset

CFG = model_preset("tiny")
SOURCE = {"path": "/nowhere/ckpt.pt", "kind": "self_forcing_pt", "key": "generator_ema", "lora": None}


def random_params(cfg=CFG, seed=0) -> dict:
    """A pure param dict of the right tree and shapes, random float32 values."""
    rng = np.random.default_rng(seed)
    return jax.tree.map(lambda a: rng.standard_normal(a.shape).astype(np.float32), abstract_params(cfg))


def leaves_equal(a, b) -> bool:
    pairs = zip(jax.tree.leaves(a), jax.tree.leaves(b), strict=True)
    return jax.tree.structure(a) == jax.tree.structure(b) and all(np.array_equal(x, y) for x, y in pairs)


def siblings(tmp_path) -> list[str]:
    return sorted(p.name for p in tmp_path.iterdir())


def test_roundtrip_float32(tmp_path):
    params = random_params()
    out = save_transformer(tmp_path / "ck", CFG, params, "float32", SOURCE)
    assert out == (tmp_path / "ck").absolute()
    assert siblings(tmp_path) == ["ck"]  # no temporary directory left
    meta = json.loads((out / "config.json").read_text())
    assert meta["format"] == "fkv_jax.transformer" and meta["format_version"] == 1 and meta["dtype"] == "float32"
    assert meta["source"] == SOURCE and meta["model"] == CFG.to_dict()
    info = read_info(out)
    assert info.cfg == CFG and info.source == SOURCE

    cfg, restored = load_params(out)
    assert cfg == CFG and leaves_equal(restored, params)

    cfg, model = load_transformer(out)
    state = nnx.to_pure_dict(nnx.state(model, nnx.Param))
    assert leaves_equal(state, params)
    assert all(x.dtype == np.float32 for x in jax.tree.leaves(state))


def test_bfloat16_store_and_cast_on_load(tmp_path):
    params = random_params()
    out = save_transformer(tmp_path / "ck", CFG, params, "bfloat16", SOURCE)
    _, stored = load_params(out)
    rounded = jax.tree.map(lambda a: a.astype(ml_dtypes.bfloat16), params)
    assert all(x.dtype == ml_dtypes.bfloat16 for x in jax.tree.leaves(stored)) and leaves_equal(stored, rounded)
    _, model = load_transformer(out)
    assert {x.dtype for x in jax.tree.leaves(nnx.state(model, nnx.Param))} == {np.dtype(ml_dtypes.bfloat16)}
    _, model32 = load_transformer(out, dtype="float32")
    leaves = jax.tree.leaves(nnx.to_pure_dict(nnx.state(model32, nnx.Param)))
    assert {x.dtype for x in leaves} == {np.dtype(np.float32)}


def test_failed_save_leaves_nothing(tmp_path, monkeypatch):
    def boom(*args, **kwargs):
        raise OSError("disk full")

    monkeypatch.setattr(ocp.StandardCheckpointer, "save", boom)
    with pytest.raises(OSError, match="disk full"):
        save_transformer(tmp_path / "new" / "parents" / "ck", CFG, random_params(), "float32", SOURCE)
    assert siblings(tmp_path) == []  # neither the temporary directory nor the parents it created


def test_save_creates_missing_parents(tmp_path):
    out = save_transformer(tmp_path / "a" / "b" / "ck", CFG, random_params(), "float32", SOURCE)
    assert read_info(out).cfg == CFG and sorted(p.name for p in out.parent.iterdir()) == ["ck"]


def test_save_rejects_wrong_tree_before_writing(tmp_path):
    params = random_params()
    params["blocks"]["ffn"]["fc1"]["kernel"] = np.zeros((2, 128, 99), np.float32)
    del params["head"]["modulation"]
    with pytest.raises(CheckpointError) as e:
        save_transformer(tmp_path / "ck", CFG, params, "float32", SOURCE)
    assert "blocks/ffn/fc1/kernel has shape [2, 128, 99], the config expects [2, 128, 256]" in str(e.value)
    assert "missing head/modulation [2, 128]" in str(e.value)
    assert siblings(tmp_path) == []


def test_overwrite_rules(tmp_path):
    first, second = random_params(seed=1), random_params(seed=2)
    out = save_transformer(tmp_path / "ck", CFG, first, "float32", SOURCE)
    with pytest.raises(CheckpointError, match="exists and is not empty"):
        save_transformer(out, CFG, second, "float32", SOURCE)
    assert leaves_equal(load_params(out)[1], first)
    save_transformer(out, CFG, second, "float32", SOURCE, overwrite=True)
    assert leaves_equal(load_params(out)[1], second)
    assert siblings(tmp_path) == ["ck"]

    other = tmp_path / "not_a_checkpoint"
    other.mkdir()
    (other / "precious.txt").write_text("keep me")
    with pytest.raises(CheckpointError, match="refusing to replace"):
        save_transformer(other, CFG, first, "float32", SOURCE, overwrite=True)
    assert (other / "precious.txt").read_text() == "keep me"

    empty = tmp_path / "empty"
    empty.mkdir()
    save_transformer(empty, CFG, first, "float32", SOURCE)  # an empty directory is fine
    assert read_info(empty).cfg == CFG


@pytest.fixture(scope="module")
def saved(tmp_path_factory):
    return save_transformer(tmp_path_factory.mktemp("ck") / "ck", CFG, random_params(), "float32", SOURCE)


def copy_of(saved, tmp_path):
    return shutil.copytree(saved, tmp_path / "copy")


def edit_config(path, **changes):
    meta = json.loads((path / "config.json").read_text())
    for k, v in changes.items():
        meta[k] = v
    (path / "config.json").write_text(json.dumps(meta))


def test_load_errors(saved, tmp_path):
    with pytest.raises(CheckpointError, match="does not exist"):
        load_transformer(tmp_path / "nope")

    ck = copy_of(saved, tmp_path)
    (ck / "config.json").write_text("{not json")
    with pytest.raises(CheckpointError, match="config.json is not valid JSON"):
        load_transformer(ck)
    (ck / "config.json").unlink()
    with pytest.raises(CheckpointError, match="config.json is missing"):
        load_transformer(ck)


@pytest.mark.parametrize(
    "changes, message",
    [
        ({"format": "something.else"}, "format is 'something.else', expected 'fkv_jax.transformer'"),
        ({"format_version": 99}, "format_version 99 is not supported"),
        ({"dtype": "float16"}, "dtype 'float16' is not one of"),
        ({"model": {"dim": 130, "num_heads": 3}}, "bad model config"),
    ],
)
def test_bad_config(saved, tmp_path, changes, message):
    ck = copy_of(saved, tmp_path)
    edit_config(ck, **changes)
    with pytest.raises(CheckpointError, match=message):
        load_transformer(ck)


def test_params_missing(saved, tmp_path):
    ck = copy_of(saved, tmp_path)
    shutil.rmtree(ck / "params")
    with pytest.raises(CheckpointError, match="params is missing"):
        load_transformer(ck)


def test_shape_mismatch_names_key_and_shapes(saved, tmp_path):
    ck = copy_of(saved, tmp_path)
    edit_config(ck, model={**CFG.to_dict(), "ffn_dim": 512})
    with pytest.raises(CheckpointError) as e:
        load_transformer(ck)
    assert "blocks/ffn/fc1/kernel has shape [2, 128, 256], the config expects [2, 128, 512]" in str(e.value)


def test_stored_dtype_must_match_config(saved, tmp_path):
    ck = copy_of(saved, tmp_path)
    edit_config(ck, dtype="bfloat16")
    with pytest.raises(CheckpointError, match="not stored as bfloat16"):
        load_params(ck)
