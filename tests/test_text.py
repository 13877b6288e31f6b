"""UMT5 text encoder: parity with Wan's T5 code (tests/data/text, the umt5_tiny fixture), the converter (Wan
.pth and Hugging Face layouts), the tokenizer (tokenizer.json and spiece.model) and bad input."""

from __future__ import annotations

import io
import math
from pathlib import Path

import jax
import jax.numpy as jnp
import numpy as np
import pytest
import torch
from flax import nnx
from safetensors.numpy import save_file

from fkv_jax.convert import ConvertError
from checkpoints_convert.__main__ import main as convert_main
from helpers import rel_err
from fkv_jax.checkpoint import CheckpointError
from fkv_jax.text import (
    TextEncoder,
    TokenizerError,
    UMT5Tokenizer,
    clean_prompt,
    encode_token_ids,
    load_text_encoder,
    relative_position_buckets,
)

DATA = Path(__file__).parent / "data" / "text"
PTH = DATA / "umt5.pth"
TOKENIZER = DATA / "tokenizer"


@pytest.fixture(scope="module")
def fixture():
    with np.load(DATA / "inputs.npz") as i, np.load(DATA / "outputs.npz") as o:
        return {**{k: i[k] for k in i.files}, **{k: o[k] for k in o.files}}


@pytest.fixture(scope="module")
def encoder_dir(tmp_path_factory):
    out = tmp_path_factory.mktemp("t5") / "enc"
    assert convert_main(["--input", str(PTH), "--output", str(out)]) == 0  # detected as UMT5 from the names
    return out


def test_encode_token_ids_matches_upstream(encoder_dir, fixture):
    out = encode_token_ids(encoder_dir, fixture["ids"], fixture["mask"])
    assert out.dtype == np.float32 and out.shape == (2, 20, 64)
    assert rel_err(out, fixture["encoder_out_zeroed"]) <= 1e-4
    assert np.all(out[0, 13:] == 0) and np.abs(out[0, :13]).min() > 0


@pytest.mark.slow
def test_encoder_all_positions_and_layers(encoder_dir, fixture):
    """Unzeroed output (padded queries too), each layer's output and position bias, against upstream."""
    cfg, model = load_text_encoder(encoder_dir)
    ids, mask = jnp.asarray(fixture["ids"]), jnp.asarray(fixture["mask"])
    assert rel_err(model(ids, mask), fixture["encoder_out"]) <= 1e-4
    buckets = relative_position_buckets(20, 20, cfg.num_buckets, cfg.max_dist)
    gdef, state = nnx.split(model.blocks)
    x = jnp.take(model.token_embedding[...], ids, axis=0)
    for i in range(cfg.num_layers):
        blk = nnx.merge(gdef, jax.tree.map(lambda a: a[i], state))
        bias = np.asarray(blk.pos_embedding[...])[buckets].transpose(2, 0, 1)[None]
        assert rel_err(bias, fixture[f"block{i}_pos_bias"]) <= 1e-6
        x = blk(x, jnp.asarray(buckets), mask > 0)
        assert rel_err(x, fixture[f"block{i}_out"]) <= 1e-4


def test_relative_position_buckets(fixture):
    assert np.array_equal(relative_position_buckets(20, 20), fixture["relative_position_buckets"])
    # the documented rule with integer maths: n < 8 -> n, else min(15, 8 + floor(2 log2(n / 8)))
    b = relative_position_buckets(1, 1024)[0]  # key j, query 0: rel = j
    n = np.arange(1024)
    half = np.where(n < 8, n, np.minimum(15, 8 + np.floor(2 * np.log2(np.maximum(n, 1) / 8) + 1e-9).astype(int)))
    assert np.array_equal(b, np.where(n > 0, 16, 0) + half)
    assert np.array_equal(relative_position_buckets(1024, 1)[:, 0], half)  # rel = -i: the lower half


def _hf_names(wan: dict) -> dict:
    """Wan names -> Hugging Face UMT5ForConditionalGeneration names (written out independently of the key map)."""
    out = {
        "shared.weight": wan["token_embedding.weight"],
        "encoder.final_layer_norm.weight": wan["norm.weight"],
        "lm_head.weight": np.zeros((4, 4), np.float32),
        "decoder.block.0.layer.0.SelfAttention.q.weight": np.zeros((4, 4), np.float32),
    }
    hf = {
        "norm1.weight": "layer.0.layer_norm.weight",
        "attn.q.weight": "layer.0.SelfAttention.q.weight",
        "attn.k.weight": "layer.0.SelfAttention.k.weight",
        "attn.v.weight": "layer.0.SelfAttention.v.weight",
        "attn.o.weight": "layer.0.SelfAttention.o.weight",
        "pos_embedding.embedding.weight": "layer.0.SelfAttention.relative_attention_bias.weight",
        "norm2.weight": "layer.1.layer_norm.weight",
        "ffn.gate.0.weight": "layer.1.DenseReluDense.wi_0.weight",
        "ffn.fc1.weight": "layer.1.DenseReluDense.wi_1.weight",
        "ffn.fc2.weight": "layer.1.DenseReluDense.wo.weight",
    }
    for k, v in wan.items():
        if k.startswith("blocks."):
            _, i, rest = k.split(".", 2)
            out[f"encoder.block.{i}.{hf[rest]}"] = v
    return out


def test_hugging_face_layout_converts_to_the_same_params(tmp_path, encoder_dir):
    wan = {k: v.numpy() for k, v in torch.load(PTH, weights_only=True).items()}
    folder = tmp_path / "hf"
    folder.mkdir()
    save_file({k: np.ascontiguousarray(v) for k, v in _hf_names(wan).items()}, str(folder / "model.safetensors"))
    (folder / "config.json").write_text(
        '{"model_type": "umt5", "num_heads": 4, "relative_attention_max_distance": 128}'
    )
    out = tmp_path / "enc"
    assert convert_main(["--input", str(folder), "--output", str(out)]) == 0
    ref_cfg, ref = load_text_encoder(encoder_dir)
    cfg, got = load_text_encoder(out)
    assert cfg == ref_cfg
    for x, y in zip(jax.tree.leaves(nnx.state(ref, nnx.Param)), jax.tree.leaves(nnx.state(got, nnx.Param))):
        np.testing.assert_array_equal(np.asarray(x), np.asarray(y))


def test_converter_errors(tmp_path):
    with pytest.raises(ConvertError, match="num_heads=8"):
        from fkv_jax.convert.components import convert_any

        convert_any(PTH, tmp_path / "a", num_heads=8)
    with pytest.raises(ConvertError, match="UMT5 text encoder checkpoint, not a VAE"):
        convert_any(PTH, tmp_path / "b", kind="vae")
    assert not (tmp_path / "a").exists() and not (tmp_path / "b").exists()


def test_text_encoder_dir_is_not_a_transformer(encoder_dir):
    from fkv_jax.checkpoint import load_transformer

    with pytest.raises(CheckpointError, match="text encoder .* not a transformer"):
        load_transformer(encoder_dir)


# ---- tokenizer ---------------------------------------------------------------------------------------------


def test_tokenizer_json_pads_truncates_and_appends_eos():
    tok = UMT5Tokenizer(TOKENIZER, text_len=8)
    ids, mask = tok(["a red cat", "  a  dog &amp;amp; a\n ball on the sky in the city  "])
    assert ids.shape == mask.shape == (2, 8) and ids.dtype == np.int32
    assert list(ids[0, :4]) == [4, 9, 7, 1] and list(ids[0, 4:]) == [0] * 4  # words, </s>, <pad>
    assert list(mask[0]) == [1, 1, 1, 1, 0, 0, 0, 0]
    assert ids[1, -1] == 1 and mask[1].all()  # truncated to text_len with </s> kept last
    assert tok.token_ids("a dog & a ball")[:3] == tok.token_ids("  a  dog &amp;amp; a ball")[:3]
    assert clean_prompt(" a\t\tb &amp;amp; c\n") == "a b & c"


def test_sentencepiece_model_works_the_same_way(tmp_path):
    spm = pytest.importorskip("sentencepiece")
    model = io.BytesIO()
    words = ["a red cat surfing on a wave", "a blue dog in the city at night", "the sun over the sea"] * 20
    spm.SentencePieceTrainer.train(
        sentence_iterator=iter(words),
        model_writer=model,
        vocab_size=24,
        hard_vocab_limit=False,
        pad_id=0,
        eos_id=1,
        unk_id=2,
        bos_id=-1,
        model_type="unigram",
        minloglevel=2,
    )
    (tmp_path / "spiece.model").write_bytes(model.getvalue())
    tok = UMT5Tokenizer(tmp_path, text_len=32)
    ids, mask = tok(["a red cat"])
    n = int(mask.sum())
    assert ids[0, n - 1] == 1 and (ids[0, n:] == 0).all() and n > 2


def test_missing_tokenizer_files(tmp_path):
    with pytest.raises(TokenizerError, match="neither tokenizer.json nor spiece.model"):
        UMT5Tokenizer(tmp_path)
    with pytest.raises(TokenizerError, match="does not exist"):
        UMT5Tokenizer(tmp_path / "nope")
    (tmp_path / "tokenizer.json").write_text("{not json")
    with pytest.raises(TokenizerError, match="cannot read tokenizer"):
        UMT5Tokenizer(tmp_path)


def test_prompts_to_embeddings(encoder_dir, fixture):
    enc = TextEncoder.load(encoder_dir, TOKENIZER)
    enc.tokenizer = UMT5Tokenizer(TOKENIZER, text_len=20)  # the fixture's [2, 20]: one executable
    out = enc.encode(["a red cat", "a dog"])
    ids, mask = enc.tokenizer(["a red cat", "a dog"])
    assert out.shape == (2, 20, 64)
    np.testing.assert_allclose(out, encode_token_ids(encoder_dir, ids, mask), rtol=1e-6, atol=1e-6)
    assert (out[0, 4:] == 0).all() and (out[1, 3:] == 0).all() and math.isfinite(float(out.sum()))
