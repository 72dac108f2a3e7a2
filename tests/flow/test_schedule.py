"""FlowMatchSchedule against diffusers' FlowMatchEulerDiscreteScheduler.set_timesteps on a grid
of configurations (SD3's and Flux's among them) and every set_timesteps variant.

diffusers computes in float32 (and numpy float64 from float32 inputs); the schedule is float64.
They agree to a few float32 ulps of each value: rtol 1e-6 (about 8 ulps), and an absolute floor
of one float32 ulp of 1 for sigmas near 0 (1000x that for timesteps, which are sigma * 1000).
"""

import logging

import pytest
import torch

from tests.diffusion.common import requires_diffusers

import transfusion_kernels as tk

pytestmark = requires_diffusers

EPS32 = torch.finfo(torch.float32).eps
SD3 = dict(shift=3.0)
FLUX = dict(use_dynamic_shifting=True, base_shift=0.5, max_shift=1.15, base_image_seq_len=256, max_image_seq_len=4096)
CONFIGS = {
    "default": {},
    "sd3": SD3,
    "flux": FLUX,
    "flux_linear": dict(FLUX, time_shift_type="linear"),
    "shift_terminal": dict(shift=2.0, shift_terminal=0.1),
    "invert": dict(shift=1.5, invert_sigmas=True),
    "karras": dict(SD3, use_karras_sigmas=True),
    "exponential": dict(FLUX, use_exponential_sigmas=True),
    "beta": dict(shift=2.0, use_beta_sigmas=True),
    "terminal_dynamic": dict(FLUX, shift_terminal=0.05),
    "train_500": dict(num_train_timesteps=500, shift=0.7),
}
# set_timesteps variants: (num_inference_steps, keyword arguments)
VARIANTS = {
    "steps": (28, {}),
    "one_step": (1, {}),
    "sigmas": (None, dict(sigmas=[1.0, 0.8, 0.55, 0.3, 0.1])),
    "timesteps": (None, dict(timesteps=[999.0, 750.0, 500.0, 120.0])),
    "both": (3, dict(sigmas=[0.9, 0.6, 0.2], timesteps=[900.0, 500.0, 100.0])),
}


def stock(config):
    from diffusers import FlowMatchEulerDiscreteScheduler

    return FlowMatchEulerDiscreteScheduler(**config)


def assert_same(ours, theirs, scale, what):
    assert ours.dtype == torch.float64 and ours.shape == theirs.shape, what
    torch.testing.assert_close(ours, theirs.double(), rtol=1e-6, atol=EPS32 * scale, msg=what)


@pytest.mark.parametrize("variant", VARIANTS)
@pytest.mark.parametrize("name", CONFIGS)
def test_matches_diffusers(name, variant):
    config = CONFIGS[name]
    n, kwargs = VARIANTS[variant]
    mu = tk.FlowMatchSchedule(**config).mu_for(1024) if config.get("use_dynamic_shifting") else None
    if variant == "one_step" and config.get("shift_terminal"):
        with pytest.raises(ValueError, match="shift_terminal cannot stretch"):  # diffusers: NaN sigmas
            tk.FlowMatchSchedule(**config).set_timesteps(1, mu=mu)
        return
    theirs = stock(config)
    logging.getLogger("diffusers").setLevel(logging.ERROR)  # its warning about timesteps without sigmas
    theirs.set_timesteps(n, mu=mu, **kwargs)
    ours = tk.FlowMatchSchedule.from_diffusers(theirs)
    timesteps, sigmas = ours.set_timesteps(n, mu=mu, **kwargs)
    T = config.get("num_train_timesteps", 1000)
    assert_same(sigmas, theirs.sigmas, 1.0, f"{name}/{variant} sigmas")
    assert_same(timesteps, theirs.timesteps, T, f"{name}/{variant} timesteps")
    assert sigmas[-1] == (1.0 if config.get("invert_sigmas") else 0.0)


@pytest.mark.parametrize("image_seq_len", [256, 1024, 4096, 6000])
def test_flux_mu_matches_the_pipeline(image_seq_len):
    from diffusers.pipelines.flux.pipeline_flux import calculate_shift

    want = calculate_shift(image_seq_len, 256, 4096, 0.5, 1.15)
    assert tk.FlowMatchSchedule(**FLUX).mu_for(image_seq_len) == pytest.approx(want, rel=1e-12)


def test_from_config_and_set_shift():
    theirs = stock(SD3)
    assert tk.FlowMatchSchedule.from_diffusers(theirs.config).shift == 3.0
    theirs.set_shift(5.0)  # diffusers reads self.shift in set_timesteps
    assert tk.FlowMatchSchedule.from_diffusers(theirs).shift == 5.0
    with pytest.raises(TypeError, match="FlowMatchEulerDiscreteScheduler"):
        tk.FlowMatchSchedule.from_diffusers(3.0)


def test_bad_arguments():
    cases = [
        (dict(use_karras_sigmas=True, use_beta_sigmas=True), "at most one"),
        (dict(time_shift_type="cubic"), "time_shift_type"),
        (dict(shift=0.0), "shift must be positive"),
        (dict(shift_terminal=1.0), r"shift_terminal must be in \[0, 1\)"),
        (dict(num_train_timesteps=0), "num_train_timesteps"),
    ]
    for kwargs, match in cases:
        with pytest.raises(ValueError, match=match):
            tk.FlowMatchSchedule(**kwargs)
    with pytest.raises(ValueError, match="needs mu"):
        tk.FlowMatchSchedule(**FLUX).set_timesteps(10)
    s = tk.FlowMatchSchedule()
    with pytest.raises(ValueError, match="same length"):
        s.set_timesteps(sigmas=[0.5, 0.2], timesteps=[500.0])
    with pytest.raises(ValueError, match="num_inference_steps=3"):
        s.set_timesteps(3, sigmas=[0.5, 0.2])
    with pytest.raises(ValueError, match="pass num_inference_steps"):
        s.set_timesteps()
    with pytest.raises(ValueError, match="positive int"):
        s.set_timesteps(0)
