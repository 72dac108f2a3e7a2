"""The diffusers drop-ins in a denoising loop with a tiny randomly initialised UNet2DModel:
stock scheduler with a generator vs the fused one fed the identical noise tensors."""
import warnings

import pytest
import torch

from tests.diffusion.common import BACKENDS, DEVICE, poison_outputs

pytest.importorskip("diffusers")

from diffusers import DDIMScheduler, DDPMScheduler, UNet2DModel  # noqa: E402
from diffusers.utils.torch_utils import randn_tensor  # noqa: E402

from transfusion_kernels.integrations.diffusers import FusedDDIMScheduler, FusedDDPMScheduler  # noqa: E402


@pytest.fixture(autouse=True)
def _poison(monkeypatch):
    poison_outputs(monkeypatch)


@pytest.fixture(scope="module")
def unet():
    # One thread: the tiny convolutions gain nothing from more, and OpenMP threads stall badly
    # when the CI cores are shared.
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    torch.manual_seed(0)
    model = UNet2DModel(
        sample_size=8, in_channels=3, out_channels=3, layers_per_block=1, block_out_channels=(8, 16),
        down_block_types=("DownBlock2D", "DownBlock2D"), up_block_types=("UpBlock2D", "UpBlock2D"),
        norm_num_groups=4,
    )
    yield model.to(DEVICE).eval()
    torch.set_num_threads(threads)


def denoise(unet, scheduler, x, steps, step_kw):
    """Run the loop; ``step_kw(t)`` gives the step's extra arguments."""
    scheduler.set_timesteps(steps)
    x0s = []
    with torch.no_grad():
        for t in scheduler.timesteps:
            out = scheduler.step(unet(x, t).sample, t, x, **step_kw(int(t)))
            x = out.prev_sample
            x0s.append(out.pred_original_sample)
    return x, x0s


CONFIGS = {
    "ddpm_eps_clip": (DDPMScheduler, FusedDDPMScheduler, dict(), None),
    "ddpm_v_large_trailing": (
        DDPMScheduler, FusedDDPMScheduler,
        dict(prediction_type="v_prediction", variance_type="fixed_large", timestep_spacing="trailing",
             beta_schedule="squaredcos_cap_v2"),
        None,
    ),
    "ddim_eta0": (DDIMScheduler, FusedDDIMScheduler, dict(), 0.0),
    "ddim_eta_half_sample_noalpha1": (
        DDIMScheduler, FusedDDIMScheduler,
        dict(prediction_type="sample", set_alpha_to_one=False, beta_schedule="scaled_linear",
             beta_start=0.00085, beta_end=0.012),
        0.5,
    ),
    "ddim_eta1_v_noclip": (
        DDIMScheduler, FusedDDIMScheduler, dict(prediction_type="v_prediction", clip_sample=False), 1.0
    ),
}


@pytest.mark.parametrize("backend", BACKENDS)
@pytest.mark.parametrize("name", list(CONFIGS))
def test_denoising_loop_matches_stock(unet, backend, name):
    stock_cls, fused_cls, config, eta = CONFIGS[name]
    stock = stock_cls(**config)
    fused = fused_cls.from_config(stock.config)
    fused.backend = backend
    fused.compute_pred_original_sample = True
    x = torch.randn(2, 3, 8, 8, generator=torch.Generator().manual_seed(1)).to(DEVICE)
    ddim = eta is not None

    g_stock = torch.Generator(DEVICE).manual_seed(123)
    g_ours = torch.Generator(DEVICE).manual_seed(123)

    def stock_kw(t):
        return dict(eta=eta, generator=g_stock) if ddim else dict(generator=g_stock)

    def fused_kw(t):
        draws = eta > 0 if ddim else t > 0  # exactly when the stock step draws its noise
        noise = randn_tensor(x.shape, generator=g_ours, device=x.device, dtype=x.dtype) if draws else None
        return dict(eta=eta, variance_noise=noise) if ddim else dict(variance_noise=noise)

    want, want_x0 = denoise(unet, stock, x, 10, stock_kw)
    got, got_x0 = denoise(unet, fused, x, 10, fused_kw)
    assert not torch.isnan(got).any()
    # float32 end to end; the stock step rounds its coefficients in float32, ours in float64
    torch.testing.assert_close(got, want, rtol=1e-4, atol=1e-4)
    for a, b in zip(got_x0, want_x0):
        torch.testing.assert_close(a, b, rtol=1e-4, atol=1e-4)


@pytest.mark.parametrize("cls", [FusedDDPMScheduler, FusedDDIMScheduler])
def test_generator_seeds_the_kernel_noise(cls):
    sched = cls()
    sched.set_timesteps(10)
    x, m = torch.randn(2, 3, 4, 4), torch.randn(2, 3, 4, 4)
    kw = dict(eta=1.0) if cls is FusedDDIMScheduler else {}
    t = sched.timesteps[3]
    a = sched.step(m, t, x, generator=torch.Generator().manual_seed(5), **kw).prev_sample
    b = sched.step(m, t, x, generator=torch.Generator().manual_seed(5), **kw).prev_sample
    c = sched.step(m, t, x, generator=torch.Generator().manual_seed(6), **kw).prev_sample
    assert torch.equal(a, b) and not torch.equal(a, c)
    assert sched.step(m, t, x, generator=torch.Generator().manual_seed(5), **kw).pred_original_sample is None


def test_add_noise_matches_stock():
    stock, fused = DDPMScheduler(beta_schedule="scaled_linear"), FusedDDIMScheduler(beta_schedule="scaled_linear")
    x0, noise = torch.randn(4, 3, 8, 8), torch.randn(4, 3, 8, 8)
    t = torch.tensor([0, 10, 500, 999])
    torch.testing.assert_close(fused.add_noise(x0, noise, t), stock.add_noise(x0, noise, t), rtol=1e-6, atol=1e-6)
    t1 = torch.tensor([250])
    torch.testing.assert_close(fused.add_noise(x0, noise, t1), stock.add_noise(x0, noise, t1), rtol=1e-6, atol=1e-6)
    x64 = x0.double()  # not a kernel dtype: diffusers' own add_noise
    torch.testing.assert_close(fused.add_noise(x64, noise.double(), t), stock.add_noise(x64, noise.double(), t))


def test_unsupported_config_falls_back_with_one_warning():
    stock = DDPMScheduler(thresholding=True, variance_type="learned_range")
    fused = FusedDDPMScheduler.from_config(stock.config)
    x, m = torch.randn(2, 3, 4, 4), torch.randn(2, 6, 4, 4)  # learned variance: 2x channels
    with pytest.warns(UserWarning, match="thresholding=True"):
        got = fused.step(m, 500, x, generator=torch.Generator().manual_seed(0)).prev_sample
    want = stock.step(m, 500, x, generator=torch.Generator().manual_seed(0)).prev_sample
    torch.testing.assert_close(got, want, rtol=0, atol=0)
    with warnings.catch_warnings():
        warnings.simplefilter("error")  # the second call does not warn again
        fused.step(m, 500, x)
