"""Focused Forcing against the authors' code's run (tests/data/policies/focused_forcing_tiny*)."""

import dataclasses

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from helpers import DATA, load_policy_fixture, rel_err, run_reference_rollout
from fkv_jax.config import sampler_preset
from fkv_jax.policies import FocusedForcing, SinkWindow, importance_budgets, load_importance, make_policy
from fkv_jax.sampling.rollout import Sampler

P = DATA / "policies"


@pytest.fixture(scope="module")
def ff():
    return load_policy_fixture("focused_forcing_tiny")


def run(ff, policy, record=None):
    s, res = run_reference_rollout(ff, policy, record)
    return s, res.latents


def test_budgets_round_half_to_even(ff):
    imp = load_importance(P / "focused_forcing_dm_loss.json", 4, 2)
    b = importance_budgets(imp, 4, 12)
    np.testing.assert_array_equal(b, ff[3]["kv_budget"])
    assert b[0, 1] == 4  # 4.5 rounds to 4


def our_slot_frames(chunk: int) -> np.ndarray:
    """Frame held by each of our 18 cache slots at the start of ``chunk`` >= 6: sink 0..14, ring = last chunk."""
    return np.concatenate([np.arange(15), np.arange(3 * chunk - 3, 3 * chunk)])


@pytest.mark.slow
def test_matches_authors_code(ff):
    policy = make_policy(
        "focused_forcing",
        {"pooled_tokens": "2"},
        head_importance=P / "focused_forcing_dm_loss.json",
        num_layers=4,
        num_heads=2,
    )
    outs = []
    s, lat = run(ff, policy, outs)
    ref = ff[3]
    assert rel_err(lat, ref["latents_focused_forcing"]) <= 1e-4
    assert s.trace_count == 1
    for i, chunk in enumerate(range(6, 11)):
        aux = outs[chunk].select_aux  # leaves [calls, layers, B, C, H, ...]
        np.testing.assert_allclose(aux["attn_z"][:, :, 0], ref["attn_scores_z"][i], atol=5e-5)
        # upstream window slots 0..17 hold the history in frame order, 18..20 the current chunk (always kept)
        hist_frames = ref["window_slot_frames"][i][:18]
        slots = [int(np.flatnonzero(our_slot_frames(chunk) == f)[0]) for f in hist_frames]
        ours = np.ones(ref["selected_mask"][i].shape, bool)
        ours[..., :18] = aux["selected"][:, :, 0][..., slots]
        np.testing.assert_array_equal(ours, ref["selected_mask"][i])
        # every (call, layer, query frame, head) keeps exactly its budget
        np.testing.assert_array_equal(
            ours.sum(-1), np.broadcast_to(ref["kv_budget"][None, :, None, :], ours.shape[:-1])
        )
    # before the window is full, nothing is pruned
    assert not outs[5].select_aux["selected"].any()


@pytest.mark.slow
def test_no_pruning_matches_and_equals_window_without_rerotation(ff):
    ref = ff[3]
    _, a = run(ff, FocusedForcing(min_budget=21, max_budget=21, pooled_tokens=2))
    assert rel_err(a, ref["latents_ff_no_pruning"]) <= 1e-4
    # budget = everything and no sink re-rotation == plain sink 15 + window 21 (plain Self Forcing)
    _, b = run(ff, FocusedForcing(min_budget=21, max_budget=21, pooled_tokens=2, sink_rerotation=False))
    _, c = run(ff, SinkWindow(local_attn_size=21, sink_size=15))
    assert rel_err(c, ref["latents_self_forcing"]) <= 1e-4
    assert rel_err(b, c) <= 1e-5


@dataclasses.dataclass(frozen=True, eq=False)
class _BlindFocusedForcing(FocusedForcing):
    """Focused Forcing whose calls see a cache of NaNs: what select reads from the cache would show."""

    def select(self, call):
        nan = jnp.full_like(call.cache_k, jnp.nan)
        return super().select(dataclasses.replace(call, cache_k=nan, cache_v=nan))


@pytest.mark.slow
def test_calls_do_not_reread_the_cache_history(ff):
    """The history's pooled keys are computed once per chunk (on_chunk_start), not by every call: a select
    that sees a NaN cache picks the same frames with the same scores."""
    kw = dict(importance=load_importance(P / "focused_forcing_dm_loss.json", 4, 2), pooled_tokens=2)
    a, b = [], []
    _, lat_a = run(ff, FocusedForcing(**kw), a)
    _, lat_b = run(ff, _BlindFocusedForcing(**kw), b)
    for chunk in range(6, 11):
        np.testing.assert_array_equal(a[chunk].select_aux["selected"], b[chunk].select_aux["selected"])
        np.testing.assert_array_equal(a[chunk].select_aux["attn_z"], b[chunk].select_aux["attn_z"])
    assert np.isfinite(lat_b).all()
    np.testing.assert_array_equal(lat_a, lat_b)


def test_bad_options():
    with pytest.raises(ValueError, match="needs per-head importance"):
        make_policy("focused_forcing", num_layers=4, num_heads=2).budgets(4, 2)
    with pytest.raises(ValueError, match="no option"):
        make_policy("focused_forcing", {"budget": "3"})
    with pytest.raises(ValueError, match="not a int"):
        make_policy("focused_forcing", {"min_budget": "x"})


@pytest.mark.slow
def test_longlive_variant_budgets_own_frame_and_full_budget_equivalence():
    import dataclasses

    from flax import nnx

    import fkv_jax
    from fkv_jax.policies import FocusedForcingLongLive

    cfg = fkv_jax.model_preset("tiny")
    graphdef, params = nnx.split(fkv_jax.init_model(cfg, seed=2), nnx.Param)
    rng = np.random.default_rng(2)
    ctx = rng.standard_normal((1, 5, 64), np.float32)
    noise = rng.standard_normal((1, 27, 16, 8, 12), np.float32)
    imp = np.array([[0.0, 1.0], [0.3, 0.6]])
    pol = FocusedForcingLongLive(importance=imp, pooled_tokens=4)
    outs = []
    s = Sampler(graphdef, cfg, sampler_preset("self_forcing"), batch=1, latent_hw=(8, 12), policy=pol)
    lat = s.generate(params, ctx, noise, seed=0, progress=False, on_chunk=lambda b, r: outs.append(jax.device_get(r)))
    assert np.isfinite(lat).all() and s.trace_count == 1
    budgets = importance_budgets(imp, 4, 12)
    for chunk in range(6, 9):
        sel = outs[chunk].select_aux["selected"][:, :, 0]  # [calls, L, C(query), H, hist + C]
        np.testing.assert_array_equal(sel.sum(-1), np.broadcast_to(budgets[None, :, None, :], sel.shape[:-1]))
        for f in range(3):  # the query frame's own frame is always kept
            assert sel[:, :, f, :, 9 + f].all()
        assert sel[..., :3].any(-1).all()  # and a front frame
    assert not outs[5].select_aux["selected"].any()
    # the whole window as budget == LongLive's plain sink 3 + window 12
    full = dataclasses.replace(pol, min_budget=12, max_budget=12)
    a = Sampler(graphdef, cfg, sampler_preset("self_forcing"), batch=1, latent_hw=(8, 12), policy=full).generate(
        params, ctx, noise, seed=0, progress=False
    )
    b = Sampler(
        graphdef, cfg, sampler_preset("self_forcing"), batch=1, latent_hw=(8, 12), policy=SinkWindow(12, 3)
    ).generate(params, ctx, noise, seed=0, progress=False)
    assert rel_err(a, b) <= 1e-5
