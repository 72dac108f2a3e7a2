"""DiffusionSchedule against diffusers' own tables."""

import pytest
import torch

from tests.diffusion.common import requires_diffusers

import transfusion_kernels as tk  # noqa: E402
from transfusion_kernels.diffusion.schedule import BETA_SCHEDULES  # noqa: E402


@requires_diffusers
@pytest.mark.parametrize("rescale", [False, True], ids=["plain", "zero_snr"])
@pytest.mark.parametrize("beta_schedule", BETA_SCHEDULES)
@pytest.mark.parametrize("num_train_timesteps", [1000, 37])
def test_tables_equal_diffusers(beta_schedule, num_train_timesteps, rescale):
    from diffusers import DDIMScheduler, DDPMScheduler

    kw = dict(num_train_timesteps=num_train_timesteps, beta_schedule=beta_schedule, beta_start=0.00085, beta_end=0.012)
    ours = tk.DiffusionSchedule(**kw, rescale_betas_zero_snr=rescale)
    for cls in (DDPMScheduler, DDIMScheduler):
        stock = cls(**kw, rescale_betas_zero_snr=rescale)
        assert torch.equal(ours.betas, stock.betas.double())
        assert torch.equal(ours.alphas_cumprod, stock.alphas_cumprod.double())
        for src in (stock, stock.config, dict(stock.config)):
            assert torch.equal(tk.DiffusionSchedule.from_diffusers(src).alphas_cumprod, ours.alphas_cumprod)


@requires_diffusers
def test_from_diffusers_takes_any_betas():
    from diffusers import DDPMScheduler

    stock = DDPMScheduler(beta_schedule="sigmoid")  # not one of ours: the scheduler's betas are used
    assert torch.equal(tk.DiffusionSchedule.from_diffusers(stock).alphas_cumprod, stock.alphas_cumprod.double())
    with pytest.raises(ValueError, match="beta_schedule must be one of"):
        tk.DiffusionSchedule.from_diffusers(stock.config)
    betas = torch.linspace(1e-3, 0.05, 50)
    trained = DDPMScheduler(num_train_timesteps=50, trained_betas=betas.tolist())
    ours = tk.DiffusionSchedule.from_diffusers(trained.config)
    assert ours.num_train_timesteps == 50
    assert torch.equal(ours.alphas_cumprod, trained.alphas_cumprod.double())


def test_schedule_errors():
    with pytest.raises(ValueError, match="num_train_timesteps must be a positive int"):
        tk.DiffusionSchedule(0)
    with pytest.raises(ValueError, match="beta_schedule must be one of"):
        tk.DiffusionSchedule(beta_schedule="cosine")
    with pytest.raises(ValueError, match="betas must lie in"):
        tk.DiffusionSchedule(beta_start=0.0)
    with pytest.raises(TypeError, match="from_diffusers expects"):
        tk.DiffusionSchedule.from_diffusers(3)
