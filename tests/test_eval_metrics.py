"""Metrics on constructed cases: a perfect rollout scores perfectly, a shifted one scores the shift."""

import numpy as np

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
