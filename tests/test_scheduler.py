import dataclasses

import numpy as np
import pytest

from fkv_jax.config import sampler_preset
from fkv_jax.sampling.scheduler import make_schedule


def test_self_forcing_warped_steps_and_sigmas_match_upstream(ref):
    s = make_schedule(sampler_preset("self_forcing"))
    np.testing.assert_array_equal(s.timesteps[:-1], ref["global/denoising_timesteps"])
    np.testing.assert_array_equal(s.timesteps, np.float32([1000.0, 937.5, 833.3333129882812, 625.0, 0.0]))
    np.testing.assert_allclose(s.sigmas, ref["global/call_sigma"][:5], rtol=0, atol=1e-7)
    np.testing.assert_array_equal(s.renoise_sigmas, ref["global/renoise_sigma"][:3])


def test_causvid_is_not_warped():
    s = make_schedule(sampler_preset("causvid"))
    np.testing.assert_array_equal(s.timesteps, np.float32([1000, 757, 522, 0]))
    assert s.sigmas[0] == 1.0 and 0.75 < s.sigmas[1] < 1.0


def test_warped_causvid_4step_matches_reference_values():
    # reference 4.4: shift 8 warps [1000, 750, 500, 250] to [1000, 960, 888.9, 727.3]
    cfg = dataclasses.replace(
        sampler_preset("causvid"), denoising_steps=(1000, 750, 500, 250), warp_denoising_step=True
    )
    np.testing.assert_allclose(make_schedule(cfg).timesteps[:-1], [1000, 960, 888.9, 727.3], atol=0.05)


def test_bad_warped_steps():
    cfg = dataclasses.replace(sampler_preset("self_forcing"), denoising_steps=(1000, 750.5))
    with pytest.raises(ValueError, match="integers"):
        make_schedule(cfg)
