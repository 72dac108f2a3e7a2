"""The diffusers drop-ins in a denoising loop with a tiny randomly initialised UNet2DModel:
stock scheduler with a generator vs the fused one fed the identical noise tensors."""

import warnings

import numpy as np
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
        sample_size=8,
        in_channels=3,
        out_channels=3,
        layers_per_block=1,
        block_out_channels=(8, 16),
        down_block_types=("DownBlock2D", "DownBlock2D"),
        up_block_types=("UpBlock2D", "UpBlock2D"),
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
        DDPMScheduler,
        FusedDDPMScheduler,
        dict(
            prediction_type="v_prediction",
            variance_type="fixed_large",
            timestep_spacing="trailing",
            beta_schedule="squaredcos_cap_v2",
        ),
        None,
    ),
    "ddim_eta0": (DDIMScheduler, FusedDDIMScheduler, dict(), 0.0),
    "ddim_eta_half_sample_noalpha1": (
        DDIMScheduler,
        FusedDDIMScheduler,
        dict(
            prediction_type="sample",
            set_alpha_to_one=False,
            beta_schedule="scaled_linear",
            beta_start=0.00085,
            beta_end=0.012,
        ),
        0.5,
    ),
    "ddim_eta1_v_noclip": (
        DDIMScheduler,
        FusedDDIMScheduler,
        dict(prediction_type="v_prediction", clip_sample=False),
        1.0,
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


def test_pipeline_save_load_and_construct(unet, tmp_path):
    """A pipeline with a fused scheduler: constructed, saved, loaded (with and without the
    scheduler passed explicitly) and run."""
    from diffusers import DDIMPipeline, DDPMPipeline

    pipe = DDPMPipeline(unet, FusedDDPMScheduler(num_train_timesteps=20))
    pipe.scheduler.backend = "reference"  # assigned after construction: saved with the config too
    pipe.save_pretrained(tmp_path)
    loaded = DDPMPipeline.from_pretrained(tmp_path)
    assert type(loaded.scheduler) is FusedDDPMScheduler and loaded.scheduler.backend == "reference"
    explicit = DDPMPipeline.from_pretrained(tmp_path, scheduler=FusedDDPMScheduler(num_train_timesteps=20))
    assert type(explicit.scheduler) is FusedDDPMScheduler
    reloaded_ddim = DDIMPipeline.from_pretrained(tmp_path, scheduler=FusedDDIMScheduler(num_train_timesteps=20))
    assert type(reloaded_ddim.scheduler) is DDIMScheduler  # as diffusers makes it from any scheduler
    stock = DDPMScheduler.from_config(loaded.scheduler.config)  # the saved config still loads a stock one
    gen = torch.Generator().manual_seed(0)
    with torch.no_grad():
        got = loaded(batch_size=1, generator=gen, num_inference_steps=3, output_type="np").images
        want_pipe = DDPMPipeline(unet, stock)
        want = want_pipe(
            batch_size=1, generator=torch.Generator().manual_seed(0), num_inference_steps=3, output_type="np"
        ).images
    assert got.shape == want.shape == (1, 8, 8, 3) and bool(torch.isfinite(torch.from_numpy(got)).all())


@pytest.mark.parametrize("backend", BACKENDS)
@pytest.mark.parametrize("cls", [FusedDDPMScheduler, FusedDDIMScheduler])
def test_zero_snr_epsilon_clipped_matches_diffusers(backend, cls):
    """alphas_cumprod = 0 at the last timestep: x0 = (sample - eps) / 0, clipped to the bound."""
    stock = cls.__bases__[1](rescale_betas_zero_snr=True, timestep_spacing="trailing", clip_sample=True)
    fused = cls.from_config(stock.config, backend=backend)
    for s in (stock, fused):
        s.set_timesteps(4)
    t = stock.timesteps[0]
    assert int(t) == 999 and float(stock.alphas_cumprod[t]) == 0.0
    gen = torch.Generator().manual_seed(3)
    x, m = torch.randn(2, 3, 4, 4, generator=gen).to(DEVICE), torch.randn(2, 3, 4, 4, generator=gen).to(DEVICE)
    noise = torch.randn(2, 3, 4, 4, generator=gen).to(DEVICE)
    kw = dict(variance_noise=noise) if cls is FusedDDIMScheduler else {}
    want = stock.step(m, t, x, **kw).prev_sample if cls is FusedDDIMScheduler else None
    if want is None:  # stock DDPM draws its own noise: give both the same draw
        want = stock.step(m, t, x, generator=torch.Generator(DEVICE).manual_seed(9)).prev_sample
        noise = randn_tensor(x.shape, generator=torch.Generator(DEVICE).manual_seed(9), device=x.device, dtype=x.dtype)
    got = fused.step(m, t, x, variance_noise=noise).prev_sample
    assert torch.isfinite(want).all() and torch.isfinite(got).all()
    torch.testing.assert_close(got, want, rtol=1e-5, atol=1e-5)


def test_stock_config_values_behave_as_in_diffusers():
    """An unknown variance_type acts as fixed_small; beta_end above 1 falls back to diffusers' step."""
    x, m = torch.randn(2, 3, 4, 4), torch.randn(2, 3, 4, 4)
    noise = torch.randn(2, 3, 4, 4)
    odd = FusedDDPMScheduler(variance_type="some_future_type")
    small = FusedDDPMScheduler()
    torch.testing.assert_close(
        odd.step(m, 500, x, variance_noise=noise).prev_sample,
        small.step(m, 500, x, variance_noise=noise).prev_sample,
        rtol=0,
        atol=0,
    )
    stock, fused = DDPMScheduler(beta_end=1.5), FusedDDPMScheduler(beta_end=1.5)
    with pytest.warns(UserWarning, match=r"betas outside \(0, 1\]"):
        got = fused.step(m, 1, x, generator=torch.Generator().manual_seed(0)).prev_sample
    want = stock.step(m, 1, x, generator=torch.Generator().manual_seed(0)).prev_sample
    torch.testing.assert_close(got, want, rtol=0, atol=0, equal_nan=True)


def test_reassigned_alphas_cumprod_takes_effect():
    x, m, noise = torch.randn(2, 3, 4, 4), torch.randn(2, 3, 4, 4), torch.randn(2, 3, 4, 4)
    stock, fused = DDPMScheduler(), FusedDDPMScheduler()
    fused.step(m, 500, x, variance_noise=noise)  # the first step builds the schedule
    other = DDPMScheduler(beta_schedule="scaled_linear")
    for s in (stock, fused):
        s.betas, s.alphas_cumprod = other.betas, other.alphas_cumprod
    want = stock.step(m, 500, x, generator=torch.Generator().manual_seed(0)).prev_sample
    noise = randn_tensor(x.shape, generator=torch.Generator().manual_seed(0), dtype=x.dtype)
    torch.testing.assert_close(fused.step(m, 500, x, variance_noise=noise).prev_sample, want, rtol=1e-5, atol=1e-6)
    other.alphas_cumprod.mul_(0.5)  # in place as well (the tensor both schedulers hold)
    want = stock.step(m, 500, x, generator=torch.Generator().manual_seed(0)).prev_sample
    torch.testing.assert_close(fused.step(m, 500, x, variance_noise=noise).prev_sample, want, rtol=1e-5, atol=1e-6)


@pytest.mark.parametrize(
    "make",
    [
        lambda: FusedDDPMScheduler(num_train_timesteps=20),
        lambda: FusedDDIMScheduler(num_train_timesteps=20, backend="reference"),
        lambda: DDPMScheduler(num_train_timesteps=20),
    ],
)
def test_ddim_pipeline_converts_any_scheduler_as_diffusers_does(unet, make):
    """DDIMPipeline(unet, scheduler) makes a stock DDIMScheduler from the scheduler's config (a
    fused one included, which once kept a DDPM step that died on eta=): the images are the stock
    pipeline's, bit for bit."""
    from diffusers import DDIMPipeline

    pipe = DDIMPipeline(unet, make())
    assert type(pipe.scheduler) is DDIMScheduler
    want_pipe = DDIMPipeline(unet, DDIMScheduler.from_config(DDPMScheduler(num_train_timesteps=20).config))
    with torch.no_grad():
        got = pipe(
            batch_size=2, generator=torch.Generator().manual_seed(3), num_inference_steps=4, eta=0.5, output_type="np"
        ).images
        want = want_pipe(
            batch_size=2, generator=torch.Generator().manual_seed(3), num_inference_steps=4, eta=0.5, output_type="np"
        ).images
    assert got.shape == (2, 8, 8, 3)
    np.testing.assert_array_equal(got, want)


def test_ddim_pipeline_runs_a_fused_scheduler_set_with_diffusers_idiom(unet):
    """pipe.scheduler = FusedDDIMScheduler.from_config(pipe.scheduler.config): the deterministic
    DDIM loop (eta = 0) gives the stock pipeline's images; assigning a stock one undoes it."""
    from diffusers import DDIMPipeline

    pipe = DDIMPipeline(unet, DDPMScheduler(num_train_timesteps=20))
    pipe.scheduler = FusedDDIMScheduler.from_config(pipe.scheduler.config, backend="reference")
    with torch.no_grad():
        got = pipe(
            batch_size=2, generator=torch.Generator().manual_seed(4), num_inference_steps=4, eta=0.0, output_type="np"
        ).images
        pipe.scheduler = DDIMScheduler.from_config(pipe.scheduler.config)
        assert type(pipe.scheduler) is DDIMScheduler
        want = pipe(
            batch_size=2, generator=torch.Generator().manual_seed(4), num_inference_steps=4, eta=0.0, output_type="np"
        ).images
    np.testing.assert_allclose(got, want, rtol=0, atol=2e-5)
