"""The causal Wan DiT against the upstream reference (case C: one call, no history)."""

import pytest
import jax
import jax.numpy as jnp
import numpy as np
from flax import nnx

import fkv_jax
from helpers import rel_err
from fkv_jax.model.embeddings import patchify, timestep_sinusoid_np
from fkv_jax.model.rope import make_rope_tables


def _case_c(graphdef, params, cfg, ref):
    model = nnx.merge(graphdef, params)
    rope = make_rope_tables(cfg.head_dim, cfg.grid_hw((8, 12)))
    tsin = timestep_sinusoid_np(np.full((1, 3), 937.5), cfg.freq_dim)
    ckv = model.context_kv(jnp.asarray(ref["context"]))
    return model, model(jnp.asarray(ref["caseC_x"]), jnp.asarray(tsin), ckv, rope, jnp.arange(3, dtype=jnp.int32))


@pytest.mark.slow
def test_case_c_flow_and_layer0_cache(tiny_model, tiny_cfg, ref):
    graphdef, params = tiny_model
    _, (flow, k, v) = _case_c(graphdef, params, tiny_cfg, ref)
    assert flow.shape == (1, 3, 16, 8, 12)
    assert rel_err(flow, ref["caseC/flow"]) <= 1e-4
    assert rel_err(ref["caseC_x"] - 0.9375 * np.asarray(flow), ref["caseC/x0"]) <= 1e-4
    # layer-0 keys are stored after RoPE; [B, H, F, T, Dh] -> [1, 72, H, Dh] in upstream token order
    assert rel_err(np.moveaxis(np.asarray(k[0]), 1, 3).reshape(1, 72, 2, 64), ref["caseC/kv_layer0_k"]) <= 1e-4
    assert rel_err(np.moveaxis(np.asarray(v[0]), 1, 3).reshape(1, 72, 2, 64), ref["caseC/kv_layer0_v"]) <= 1e-4


def test_case_c_intermediates(tiny_model, tiny_cfg, ref):
    graphdef, params = tiny_model
    model = nnx.merge(graphdef, params)
    x = jnp.asarray(ref["caseC_x"])
    patches = model.patch_embedding(patchify(x, (2, 2)))  # [1, 72, 128] in (f, y, x) order
    ref_patch = ref["caseC/patch_embedding_out"].reshape(1, 128, 72).transpose(0, 2, 1)
    assert rel_err(patches, ref_patch) <= 1e-5
    e, e0 = model.embed_time(jnp.asarray(timestep_sinusoid_np(np.full((1, 3), 937.5), 256)))
    assert rel_err(np.asarray(e)[0], ref["caseC/time_embedding_out"]) <= 1e-5
    assert rel_err(np.asarray(e0).reshape(3, 768), ref["caseC/time_projection_out"]) <= 1e-5
    assert rel_err(model.embed_text(jnp.asarray(ref["context"])), ref["caseC/text_embedding_out"]) <= 1e-5


def test_padded_text_rows_are_not_masked(tiny_model, tiny_cfg, ref):
    """Upstream attends to all text_len rows, zero rows included: dropping them changes the output."""
    graphdef, params = tiny_model
    model = nnx.merge(graphdef, params)
    short = jnp.asarray(ref["context"][:, :7])  # re-padded with zeros to text_len inside: same result
    full = jnp.asarray(ref["context"])
    np.testing.assert_allclose(np.asarray(model.embed_text(short)), np.asarray(model.embed_text(full)), atol=1e-6)


def test_parameter_counts():
    assert fkv_jax.count_params("wan2.1-t2v-1.3b") == 1_418_996_800
    assert fkv_jax.count_params("tiny") == 589_248


def test_abstract_build_allocates_nothing():
    m = fkv_jax.abstract_model(fkv_jax.model_preset("wan2.1-t2v-1.3b"))
    leaf = m.blocks.ffn.fc1.kernel.get_raw_value()
    assert isinstance(leaf, jax.ShapeDtypeStruct) and leaf.shape == (30, 1536, 8960)


def test_random_init_is_deterministic_and_nonzero():
    cfg = fkv_jax.model_preset("tiny")
    a = fkv_jax.init_model(cfg, seed=3).blocks.ffn.fc1.kernel[...]
    b = fkv_jax.init_model(cfg, seed=3).blocks.ffn.fc1.kernel[...]
    c = fkv_jax.init_model(cfg, seed=4).blocks.ffn.fc1.kernel[...]
    np.testing.assert_array_equal(np.asarray(a), np.asarray(b))
    assert not np.allclose(np.asarray(a), np.asarray(c))
