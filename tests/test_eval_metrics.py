"""Metrics on constructed cases: a perfect rollout scores perfectly, a shifted one scores the shift."""

import numpy as np
import pytest

from fkv_jax.eval.metrics import (
    chunk_discontinuity,
    identity_after_occlusion,
    position_error,
    prompt_alignment,
    psnr,
    ssim,
)
from fkv_jax.toyworld.world import make_episode


def find_episode(pred, frames=24):
    for seed in range(200):
        ep = make_episode(seed, frames)
        if pred(ep):
            return ep
    raise AssertionError("no episode found")


def test_perfect_rollout_scores_perfectly():
    ep = find_episode(lambda e: e.visible_frac.max(0).min() > 0.95)
    f = ep.frames
    assert psnr(f, f) == float("inf") and abs(ssim(f, f) - 1) < 1e-9
    assert position_error(f, ep) < 0.6  # centroid of the drawn (anti-aliased, clipped) sprite vs its centre
    pa = prompt_alignment(f, ep)
    # the shape classifier is right on ~90 % of true frames (8-pixel anti-aliased sprites): its ceiling
    assert pa["colour"] == 1.0 and pa["shape"] > 0.85 and pa["extra_colour_pixels"] == 0


def test_shifted_rollout_scores_the_shift():
    ep = find_episode(lambda e: (e.visible_frac[:, :] > 0.9).sum() > 30 and e.scene.pillar is None)
    f = ep.frames
    shifted = np.roll(f, 3, axis=-1)  # 3 pixels to the right (background wraps in from the edge)
    base = position_error(f, ep)
    err = position_error(shifted, ep)
    assert 2.5 < err - base < 3.5  # 3 px, give or take sprites clipped at the edge
    assert psnr(shifted, f) < 30 and ssim(shifted, f) < 0.99


def test_missing_sprite_and_wrong_colour_are_caught():
    ep = find_episode(lambda e: len(e.colour_ids) >= 2 and e.visible_frac.max(0).min() > 0.95)
    blank = np.full_like(ep.frames, -1.0)  # black background only
    assert prompt_alignment(blank, ep)["colour"] == 0.0
    assert position_error(blank, ep) > 40  # missing sprites count the frame diagonal


def test_chunk_discontinuity():
    t = np.arange(12, dtype=np.float32)
    smooth = np.broadcast_to((t / 12)[:, None, None, None], (12, 3, 4, 4)).copy()
    assert abs(chunk_discontinuity(smooth) - 1.0) < 1e-6
    jumpy = smooth.copy()
    for k in range(3, 12, 3):
        jumpy[k:] += 0.5  # a jump at every chunk boundary
    assert chunk_discontinuity(jumpy) > 5


def test_identity_after_occlusion_on_truth_and_on_a_colour_swap():
    ep = find_episode(lambda e: not np.isnan(identity_after_occlusion(e.frames, e)), frames=48)
    assert identity_after_occlusion(ep.frames, ep) > 0.6  # bounded by the shape classifier's accuracy
    blank = np.full_like(ep.frames, -1.0)
    assert identity_after_occlusion(blank, ep) == 0.0


def test_memory_family_hides_a_sprite_longer_than_a_short_window():
    from fkv_jax.toyworld.world import hidden_runs, make_memory_episode

    for seed in range(4):
        ep = make_memory_episode(seed, 48, context_frames=6, min_hidden=8)
        runs = [r for r in hidden_runs(ep.visible) if r[0] == 1 and r[2] >= 8]
        assert runs, ep.prompt
        _, s, n = runs[0]
        assert s > 6 and s + n < 48
        assert (ep.visible_frac[:s, 1] >= 0.9).any() and (ep.visible_frac[s + n :, 1] >= 0.9).any()
        assert ep.scene.pillar is None and len(ep.scene.sprites) == 2
    assert make_memory_episode(3, 48).prompt == make_memory_episode(3, 48).prompt  # deterministic
    with pytest.raises(ValueError, match="hides at most"):
        make_memory_episode(0, 48, min_hidden=20)


def test_reappearance_and_tracking_on_truth_and_on_a_wrong_identity():
    from fkv_jax.eval.metrics import reappearance, tracking_error
    from fkv_jax.toyworld.world import make_memory_episode

    ep = make_memory_episode(1, 48, context_frames=6)
    f = ep.frames
    truth = reappearance(f, ep, start=6, min_hidden=8)
    assert truth["identity"] >= 2 / 3 and truth["position_px"] < 1.0
    tr = tracking_error(f, ep, 6)
    assert tr["track_24_px"] < 1.0 and np.isnan(tr["track_48_px"])  # 6 + 48 > 48 frames
    blank = np.full_like(f, -1.0)
    gone = reappearance(blank, ep, start=6, min_hidden=8)
    assert gone["identity"] == 0.0 and gone["position_px"] > 40
    assert tracking_error(blank, ep, 6)["track_24_px"] > 40


def test_mean_ci_brackets_the_mean():
    from fkv_jax.eval.metrics import mean_ci

    m, lo, hi = mean_ci([1.0, 2.0, 3.0, 4.0, float("nan")])
    assert m == 2.5 and lo < m < hi and 1.0 <= lo and hi <= 4.0
    assert np.isnan(mean_ci([5.0])[1]) and np.isnan(mean_ci([])[0])


@pytest.mark.parametrize("size, floor", [(32, 0.9), (24, 0.85)])
def test_shape_classifier_agrees_with_the_simulator_and_catches_a_wrong_shape(size, floor):
    """The template classifier on the simulator's own frames (text-only videos have no truth to compare): it
    must read most judged blobs as their prompted shape, and a prompt naming other shapes must disagree. At
    24x24 (sprites of 6 px) it reads the frame size off the mask and still works."""
    from fkv_jax.eval.metrics import prompt_sprites, shape_agreement
    from fkv_jax.toyworld.world import WorldConfig

    assert prompt_sprites("a red circle and a blue square with a pillar") == [("red", "circle"), ("blue", "square")]
    agree = judged = wrong = 0
    for i in range(6):
        ep = make_episode(70_000 + i, 24, WorldConfig.for_size(size))
        a, j = shape_agreement(ep.frames, ep.prompt)
        agree, judged = agree + a, judged + j
        swap = {"circle": "cross", "cross": "circle", "square": "triangle", "triangle": "square"}
        lie = " and ".join(f"a {c} {swap[s]}" for c, s in prompt_sprites(ep.prompt))
        wrong += shape_agreement(ep.frames, lie)[0]
    assert judged > 100
    assert agree / judged >= floor, agree / judged  # the triangle's centroid is not its centre: aligned, ~0.95
    assert wrong / judged <= 0.1, wrong / judged
