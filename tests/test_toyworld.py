"""The toy-world testbed: simulator ground truth, tokenizer/text encoder, block-causal training masks,
training (loss goes down, resume equals an uninterrupted run) and the shipped model's rollouts."""

from __future__ import annotations


import dataclasses

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from fkv_jax.config import ModelConfig
from fkv_jax.toyworld import attention as tfa
from fkv_jax.toyworld.analysis import colour_pixels, colour_report
from fkv_jax.toyworld.text import VOCAB, init_text_encoder, tokenize
from fkv_jax.toyworld.world import (
    COLOUR_NAMES,
    COLOURS,
    PILLAR_COLOUR,
    Scene,
    Sprite,
    WorldConfig,
    make_episode,
    simulate,
)

# ---- the world ---------------------------------------------------------------------------------------------


def _rgb_at(frames, t, x, y):
    return (frames[t, :, int(y), int(x)] + 1) / 2


@pytest.mark.parametrize("seed", range(6))
def test_ground_truth_matches_frames(seed):
    ep = make_episode(seed, 30, pillar=seed % 2 == 0)
    n = len(ep.scene.sprites)
    assert ep.frames.shape == (30, 3, 32, 32) and ep.frames.dtype == np.float32
    assert ep.frames.min() >= -1 and ep.frames.max() <= 1
    assert ep.positions.shape == (30, n, 2) and ep.visible_frac.shape == (30, n)
    counts = colour_pixels(ep.frames)  # [T, colours]
    checked_full = checked_hidden = 0
    for i, s in enumerate(ep.scene.sprites):
        c = COLOUR_NAMES.index(s.colour)
        assert ep.colour_ids[i] == c and ep.prompt.count(s.colour) == 1
        for t in range(30):
            if ep.visible_frac[t, i] > 0.999:  # fully visible: its colour is at its centre
                x, y = ep.positions[t, i]
                np.testing.assert_allclose(_rgb_at(ep.frames, t, x, y), COLOURS[s.colour], atol=1e-5)
                assert counts[t, c] >= 20
                checked_full += 1
            elif ep.visible_frac[t, i] == 0:  # hidden (gap, pillar or another sprite): not drawn anywhere
                assert counts[t, c] == 0
                checked_hidden += 1
    assert checked_full > 0
    if seed in (0, 1, 2):
        assert checked_hidden + checked_full > 0


def test_deterministic_from_seed():
    a, b, c = make_episode(7, 12), make_episode(7, 12), make_episode(8, 12)
    np.testing.assert_array_equal(a.frames, b.frames)
    assert a.prompt == b.prompt
    assert not np.array_equal(a.frames, c.frames)


def test_exit_through_the_edge_and_come_back():
    cfg = WorldConfig()
    ep = simulate(Scene((Sprite("square", "red", 24.0, 16.0, 2.0, 0.0),)), 30, cfg)
    vis = ep.visible_frac[:, 0]
    hidden = np.flatnonzero(vis == 0)
    assert len(hidden) >= 3, vis  # it spends a few frames in the hidden gap ...
    assert vis[hidden[-1] + 1] > 0 and ep.positions[hidden[-1] + 1, 0, 0] < 8  # ... and re-enters on the left
    red = COLOUR_NAMES.index("red")
    assert (colour_pixels(ep.frames[hidden])[:, red] == 0).all()
    assert (ep.frames[hidden] == -1).all()  # nothing else in the scene: empty frames
    # constant horizontal velocity, on the ring
    dx = np.diff(ep.positions[:, 0, 0]) % cfg.ring
    np.testing.assert_allclose(dx, 2.0, atol=1e-4)


def test_world_scaled_to_another_frame_size_keeps_its_durations():
    """WorldConfig.for_size scales lengths and speeds together: crossing the view and hiding in the gap take the
    same number of frames at 24x24 as at 32x32, and the episodes render at the new size."""
    from fkv_jax.toyworld.world import make_memory_episode, world_for

    assert WorldConfig.for_size(32) == WorldConfig() == world_for((32, 32))
    small = world_for((24, 24))
    base = WorldConfig()
    assert (small.size, small.gap, small.radius, small.pillar_width) == (24, 12, 3.0, 4)
    for w in (base, small):  # frames to cross the view and to hide in the gap, at the slowest speed
        assert (w.size / w.speed_x[0], (w.gap - 2 * w.radius) / w.speed_x[0]) == pytest.approx((40.0, 10.0))
    ep = make_episode(5, 12, small)
    assert ep.frames.shape == (12, 3, 24, 24)
    assert (ep.positions[..., 1] >= small.radius - 1e-5).all() and (ep.positions[..., 1] <= 21 + 1e-5).all()
    mem = make_memory_episode(2, 48, context_frames=6, min_hidden=8, cfg=small)
    assert mem.frames.shape[-1] == 24 and (~mem.visible[:, 1]).sum() >= 8
    with pytest.raises(ValueError, match="square"):
        world_for((24, 32))


def test_bounce_occlusion_and_pillar():
    cfg = WorldConfig()
    # vertical bounce: y stays within the walls and the vertical velocity flips
    ep = simulate(Scene((Sprite("circle", "green", 16.0, 25.0, 0.0, 1.5),)), 10, cfg)
    y = ep.positions[:, 0, 1]
    assert y.max() <= cfg.size - cfg.radius + 1e-5 and (np.diff(y) < 0).any() and (np.diff(y) > 0).any()
    # draw order: the later sprite covers the earlier one at the same place
    ep = simulate(
        Scene((Sprite("square", "red", 16.0, 16.0, 0.0, 0.0), Sprite("square", "blue", 16.0, 16.0, 0.0, 0.0))), 1
    )
    assert ep.visible_frac[0, 0] == 0 and ep.visible_frac[0, 1] == 1
    np.testing.assert_allclose(_rgb_at(ep.frames, 0, 16, 16), COLOURS["blue"], atol=1e-5)
    # the pillar hides a sprite behind it
    ep = simulate(Scene((Sprite("circle", "yellow", 15.0, 16.0, 0.0, 0.0),), pillar=(10, 20)), 1)
    assert ep.visible_frac[0, 0] == 0 and ep.prompt.endswith("with a pillar")
    np.testing.assert_allclose(_rgb_at(ep.frames, 0, 15, 16), PILLAR_COLOUR, atol=1e-5)


# ---- text -----------------------------------------------------------------------------------------------------


@pytest.mark.slow
def test_tokenizer_and_text_encoder():
    ids, lens = tokenize(["a red circle and a blue square", "a green cross with a pillar"], 16)
    assert ids.shape == (2, 16) and list(lens) == [7, 6]
    assert VOCAB[ids[0, 1]] == "red" and (ids[0, 7:] == 0).all()
    with pytest.raises(ValueError, match="outside the toy vocabulary"):
        tokenize(["a purple circle"], 16)
    with pytest.raises(ValueError, match="more than text_len"):
        tokenize(["a red circle " * 6], 16)
    enc = init_text_encoder(32, 16, seed=0)
    ctx = np.asarray(enc(jnp.asarray(ids)))
    assert ctx.shape == (2, 16, 32)
    assert (ctx[0, 7:] == 0).all() and (ctx[1, 6:] == 0).all() and (np.abs(ctx[0, :7]).sum(-1) > 0).all()
    # colour/shape binding: swapping the colours changes the shape tokens' context
    swapped = np.asarray(enc(jnp.asarray(tokenize(["a blue circle and a red square"], 16)[0])))
    assert not np.allclose(swapped[0, 2], ctx[0, 2])


# ---- block-causal masks ------------------------------------------------------------------------------------------


def test_teacher_forcing_mask_rules():
    f, c, t = 9, 3, 4
    m = tfa.teacher_forcing_mask(f, c, t)
    s = f * t
    idx = np.arange(2 * s)
    blk = (idx % s) // (c * t)
    noisy = idx >= s
    qb, kb = blk[:, None], blk[None, :]
    assert not (m & (kb > qb)).any()  # never a later block
    assert not (m[~noisy][:, noisy]).any()  # clean tokens never read noisy ones
    assert not (m[noisy][:, noisy] & (kb != qb)[noisy][:, noisy]).any()  # noisy: only its own noisy block
    assert not (m[noisy][:, ~noisy] & (kb == qb)[noisy][:, ~noisy]).any()  # noisy: not its own clean block
    np.testing.assert_array_equal(m[:s, :s], tfa.block_causal_mask(f, c, t))  # clean half = block-causal
    assert m.diagonal().all()


@pytest.mark.slow
def test_teacher_forcing_attention_equals_masked_dense():
    f, c, t = 9, 3, 4
    q, k, v = (jax.random.normal(jax.random.key(i), (2, 2 * f * t, 2, 8)) for i in range(3))
    ref = tfa.dense_masked_attention(q, k, v, tfa.teacher_forcing_mask(f, c, t))
    out = tfa.teacher_forcing_attention(q, k, v, f // c)
    np.testing.assert_allclose(out, ref, atol=1e-5)


# ---- training ------------------------------------------------------------------------------------------------------

TINY = ModelConfig(
    dim=32,
    ffn_dim=64,
    num_heads=2,
    num_layers=2,
    freq_dim=32,
    text_dim=16,
    text_len=16,
    in_dim=3,
    out_dim=3,
    patch_size=(1, 8, 8),
    latent_hw=(32, 32),
    name="toy-test",
)


@pytest.mark.slow
def test_training_forward_is_block_causal():
    """Changing the frames of a later block changes nothing in the flow of earlier blocks."""
    from fkv_jax.model.rope import make_rope_tables
    from fkv_jax.toyworld.train import forward_teacher_forcing, init_params, merge

    graphdefs, params = init_params(TINY, seed=0)
    params = jax.tree.map(
        lambda x: x + 0.05 * np.random.default_rng(0).standard_normal(x.shape).astype(x.dtype), params
    )  # leave the zero init so every path is live
    model, enc = merge(graphdefs, params)
    rope = make_rope_tables(TINY.head_dim, TINY.grid_hw(TINY.latent_hw))
    rng = np.random.default_rng(1)
    xc, xn = (jnp.asarray(rng.standard_normal((1, 9, 3, 32, 32)), jnp.float32) for _ in range(2))
    t = jnp.full((1, 9), 500.0)
    ctx = enc(jnp.asarray(tokenize(["a red circle"], 16)[0]))
    fwd = jax.jit(lambda xc, xn: forward_teacher_forcing(model, ctx, xc, xn, t, rope, 3))
    base = np.asarray(fwd(xc, xn))
    changed = np.asarray(fwd(xc.at[:, 6:].add(1.0), xn.at[:, 3:].add(1.0)))  # clean block 2, noisy blocks 1-2
    np.testing.assert_allclose(changed[:, :3], base[:, :3], atol=1e-5)  # block 0 untouched
    assert not np.allclose(changed[:, 3:6], base[:, 3:6])
    changed = np.asarray(fwd(xc.at[:, :3].add(1.0), xn))  # clean block 0 is history for blocks 1, 2 only
    np.testing.assert_allclose(changed[:, :3], base[:, :3], atol=1e-5)
    assert not np.allclose(changed[:, 3:], base[:, 3:])


@pytest.mark.slow
def test_self_history_puts_the_models_own_frames_in_the_history():
    """--self-history: for the chosen clips every frame after the first block becomes the model's x0 prediction
    (x_t - sigma v for a flow model), the first block and the other clips keep their true history, and the
    loss changes while its gradient stays finite."""
    from fkv_jax.model.rope import make_rope_tables
    from fkv_jax.toyworld.train import (
        TrainConfig,
        forward_teacher_forcing,
        init_params,
        make_loss_fn,
        merge,
        self_history,
    )

    graphdefs, params = init_params(TINY, seed=0)
    params = jax.tree.map(
        lambda x: x + 0.05 * np.random.default_rng(0).standard_normal(x.shape).astype(x.dtype), params
    )
    model, enc = merge(graphdefs, params)
    rope = make_rope_tables(TINY.head_dim, TINY.grid_hw(TINY.latent_hw), TINY.rope_max_frames)
    rng = np.random.default_rng(2)
    frames, clean, eps = (jnp.asarray(rng.standard_normal((2, 6, 3, 32, 32)), jnp.float32) for _ in range(3))
    sigma = jnp.asarray(np.repeat([[0.9, 0.4], [0.7, 0.2]], 3, axis=1), jnp.float32)
    ctx = enc(jnp.asarray(tokenize(["a red circle", "a blue cross"], 16)[0]))
    use = jnp.asarray([True, False])
    x_t = (1 - sigma[:, :, None, None, None]) * frames + sigma[:, :, None, None, None] * eps
    out = np.asarray(forward_teacher_forcing(model, ctx, clean, x_t, 1000 * sigma, rope, 3))
    for prediction, pred in (("x0", out), ("flow", np.asarray(x_t) - np.asarray(sigma)[:, :, None, None, None] * out)):
        tc = TrainConfig(frames=6, self_history=0.5, prediction=prediction)
        got = np.asarray(self_history(model, ctx, frames, clean, sigma, 1000 * sigma, eps, use, rope, tc))
        np.testing.assert_array_equal(got[0, :3], np.asarray(clean)[0, :3])  # the first block stays true
        np.testing.assert_allclose(got[0, 3:], pred[0, 3:], rtol=1e-5, atol=1e-5)  # the rest is the model's
        np.testing.assert_array_equal(got[1], np.asarray(clean)[1])  # a clip not chosen keeps its history
    # in the loss (9 frames: block 1 is history for block 2): a different objective, a finite gradient
    ids = jnp.asarray(tokenize(["a red circle", "a blue cross"], 16)[0])
    frames9 = jnp.asarray(rng.standard_normal((2, 9, 3, 32, 32)), jnp.float32)
    losses = {}
    for frac in (0.0, 1.0):
        fn = make_loss_fn(graphdefs, TINY, TrainConfig(frames=9, self_history=frac))
        losses[frac], g = jax.value_and_grad(fn)(params, frames9, ids, jax.random.key(0))
        assert all(np.isfinite(np.asarray(x)).all() for x in jax.tree.leaves(g))
    assert abs(float(losses[1.0]) - float(losses[0.0])) > 1e-4, losses


@pytest.mark.slow
def test_training_reduces_loss_and_resumes_exactly(tmp_path):
    from fkv_jax.toyworld.train import TrainConfig, load_run_params, train

    tc = TrainConfig(steps=12, batch=2, frames=6, lr=3e-3, warmup=2, ckpt_every=6, eval_every=6, seed=3)
    full = train(tc, tmp_path / "a", progress=False, cfg=TINY, export=tmp_path / "w")
    logs = [__import__("json").loads(x) for x in (tmp_path / "a" / "log.jsonl").read_text().splitlines()]
    assert [x["step"] for x in logs] == [6, 12]
    assert logs[-1]["eval_loss"] < logs[0]["eval_loss"] and full["train_loss"] < 1.5
    assert 0 < logs[0]["cpu_seconds"] < logs[1]["cpu_seconds"] <= full["cpu_seconds"]  # the budget is CPU time
    # interrupted after 6 steps, then resumed: the same parameters as the uninterrupted run
    train(tc, tmp_path / "b", progress=False, cfg=TINY, stop_after=6)
    resumed = train(tc, tmp_path / "b", progress=False, cfg=TINY, resume=True)
    assert resumed["cpu_seconds"] > logs[0]["cpu_seconds"] * 0.5  # both stints counted
    (sa, pa), (sb, pb) = (load_run_params(tmp_path / d, which="params", cfg=TINY) for d in "ab")
    assert sa == sb == 12
    jax.tree.map(lambda x, y: np.testing.assert_allclose(x, y, rtol=1e-5, atol=1e-6), pa, pb)
    with pytest.raises(SystemExit, match="different training config"):
        train(dataclasses.replace(tc, lr=1e-3), tmp_path / "b", progress=False, cfg=TINY, resume=True)
    with pytest.raises(SystemExit, match="different model config"):  # e.g. another --frame-size / --patch
        train(tc, tmp_path / "b", progress=False, cfg=dataclasses.replace(TINY, patch_size=(1, 4, 4)), resume=True)
    # the export: EMA weights stored as float16, loaded back as float32, with what the model predicts
    from fkv_jax.toyworld.model import load_params, weights_prediction

    from fkv_jax.toyworld.model import toy_sampler_config

    cfg_w, tree = load_params(tmp_path / "w")
    _, ema = load_run_params(tmp_path / "a", cfg=TINY)
    assert cfg_w == TINY and weights_prediction(tmp_path / "w") == "x0"
    meta = __import__("json").loads((tmp_path / "w" / "config.json").read_text())
    assert meta["world"]["size"] == 32 and meta["world"]["gap"] == 16  # the world it was trained on, recorded
    assert toy_sampler_config(tmp_path / "w").local_attn_size == 6  # the rolling window is the training clip
    for x, y in zip(jax.tree.leaves(ema), jax.tree.leaves(tree), strict=True):
        assert y.dtype == np.float32 and y.shape == x.shape
        np.testing.assert_allclose(y, x, rtol=1e-3, atol=1e-4)


def test_forcing_kv_segments_a_toy_frame_by_token_rows():
    from fkv_jax.toyworld.model import toy_policy_options

    assert toy_policy_options("forcing_kv", TINY) == {"num_frame_patch": "4"}  # 32x32 / patch 8: a 4x4 grid
    small = dataclasses.replace(TINY, latent_hw=(24, 24), patch_size=(1, 4, 4))  # a 6x6 grid
    assert toy_policy_options("forcing_kv", small) == {"num_frame_patch": "6"}
    assert toy_policy_options("focused_forcing", small) == {}


def test_train_cli_rejects_a_frame_size_the_patch_does_not_divide(tmp_path, capsys):
    from fkv_jax.toyworld.train import main

    with pytest.raises(SystemExit) as e:
        main(["--frame-size", "30", "--patch", "4", "--out", str(tmp_path / "run")])
    assert e.value.code == 2 and "--frame-size 30 must be >= 8 and a multiple of --patch 4" in capsys.readouterr().err
    assert not (tmp_path / "run").exists()  # nothing written before the error


# ---- the shipped model -------------------------------------------------------------------------------------


@pytest.mark.slow
def test_shipped_weights_generate_the_prompted_sprites():
    """The shipped model (the embedded default of `generate`) draws what its prompts name, and moves it: on 16
    held-out episodes' prompts at 24 frames, against the simulator's own frames of the same episodes."""
    from fkv_jax.toyworld.analysis import motion_report
    from fkv_jax.toyworld.model import WEIGHTS_DIR, generate_video, load_toy_model, toy_sampler_config
    from fkv_jax.toyworld.world import make_episode, world_for

    assert (WEIGHTS_DIR / "params.npz").stat().st_size <= 10 * 2**20
    cfg, model, enc = load_toy_model()
    assert (cfg.in_dim, cfg.patch_size, cfg.latent_hw) == (3, (1, 4, 4), (24, 24))
    assert toy_sampler_config().prediction == "x0"  # read from the shipped config.json
    eps = [make_episode(70_000 + i, 24, world_for(cfg.latent_hw)) for i in range(16)]
    prompts = [ep.prompt for ep in eps]
    frames = generate_video(prompts, num_frames=24, seed=0)
    assert frames.shape == (16, 24, 3, 24, 24) and np.isfinite(frames).all()

    def stats(videos):
        reps = [colour_report(v, p) for v, p in zip(videos, prompts)]
        return {
            "shown": np.mean([np.mean(list(r["shown"].values())) for r in reps]),
            "prompted": np.mean([r["prompted_pixels_per_frame"] for r in reps]),
            "other": np.mean([r["other_pixels_per_frame"] for r in reps]),
            "persist": np.nanmean([motion_report(v)["persist"] for v in videos]),
            "smooth": np.nanmean([motion_report(v)["smooth"] for v in videos]),
        }

    got, data = stats(frames), stats([ep.frames for ep in eps])
    # What this test computed on the shipped weights when they shipped: shown 0.43, prompted pixels 0.66x the
    # data's, persistence 0.84, smooth 0.86. The previous default (32x32, patch 8; toyworld_runs/tw32p8) gives
    # 0.41, 0.45x, 0.75, 0.87 on the same test, untrained weights ~0 shown; the data: 0.72, 1x, 0.95, 0.99.
    assert got["shown"] >= 0.38, (got, data)
    assert got["prompted"] >= 0.55 * data["prompted"], (got, data)  # sprites drawn near their real size
    assert got["persist"] >= 0.8, (got, data)  # a sprite in view stays in view, as the simulator's do
    assert got["smooth"] >= 0.75, (got, data)  # sprites move a few pixels per frame, they do not jump
    assert got["other"] <= 0.1 * got["prompted"], (got, data)  # colours the prompts do not name: ~none
    # the colours follow the words, also in prompts of one sprite (a single video may leave it in the gap)
    words = ["a blue circle and a red square"] + ["a yellow cross"] * 3
    reps = [colour_report(v, w) for v, w in zip(generate_video(words, num_frames=12, seed=0), words)]
    assert max(r["shown"]["yellow"] for r in reps[1:]) >= 0.25, reps
    assert sum(r["other_pixels_per_frame"] for r in reps) <= 0.1 * sum(r["prompted_pixels_per_frame"] for r in reps)


@pytest.mark.slow
def test_toy_model_object_keeps_its_samplers_and_matches_generate_video(random_toy_weights):
    """ToyModel owns its graph, params and samplers (no module-level caches): the second video reuses the
    compiled step, and the one-call helper gives the same numbers."""
    from fkv_jax.toyworld.model import ToyModel, generate_video

    m = ToyModel.load(random_toy_weights)
    a = m.generate(["a red circle"], 6, seed=1)
    s = m.sampler(None, 1, 6)
    b = m.generate(["a red circle"], 6, seed=1)
    assert m.sampler(None, 1, 6) is s and s.trace_count == 1
    np.testing.assert_array_equal(a, b)
    np.testing.assert_array_equal(a, generate_video(["a red circle"], 6, seed=1, weights=random_toy_weights))
    assert a.shape == (1, 6, 3, *m.cfg.latent_hw) and np.abs(a).max() <= 1.0
    assert not np.array_equal(a, m.generate(["a red circle"], 6, seed=2))
