"""FusedFlowMatchEulerDiscreteScheduler against diffusers' FlowMatchEulerDiscreteScheduler: full
sampling loops (deterministic and stochastic with the same noise) through the set_timesteps
variants, scale_noise, generators, the fallback, and save/load alone and inside a pipeline."""

import contextlib
import warnings

import pytest
import torch

from tests.diffusion.common import BACKENDS, DEVICE, poison_outputs
from tests.flow.common import flow_noise

pytest.importorskip("diffusers")

from diffusers import DiffusionPipeline, FlowMatchEulerDiscreteScheduler  # noqa: E402

from transfusion_kernels.integrations.diffusers import FusedFlowMatchEulerDiscreteScheduler  # noqa: E402

FLUX = dict(use_dynamic_shifting=True, base_shift=0.5, max_shift=1.15, base_image_seq_len=256, max_image_seq_len=4096)
CONFIGS = {
    "sd3": (dict(shift=3.0), dict(num_inference_steps=6)),
    "flux_mu": (FLUX, dict(num_inference_steps=5, mu=0.9)),
    "stochastic_sigmas": (dict(shift=2.0, stochastic_sampling=True), dict(sigmas=[1.0, 0.75, 0.5, 0.2, 0.05])),
    "invert_timesteps": (dict(invert_sigmas=True), dict(timesteps=[900.0, 600.0, 300.0, 50.0])),
    "karras_terminal": (dict(shift=3.0, use_karras_sigmas=True, shift_terminal=0.02), dict(num_inference_steps=4)),
}


@pytest.fixture(autouse=True)
def _poison(monkeypatch):
    poison_outputs(monkeypatch)


def velocity(x, t):
    """A fixed smooth stand-in for a model: depends on the sample and the timestep."""
    return torch.tanh(1.3 * x.roll(1, -1) - 0.4 * x) + t.float() / 1000.0


def sample_loop(scheduler, x, set_kw, noises=None, **step_kw):
    scheduler.set_timesteps(**set_kw)
    for i, t in enumerate(scheduler.timesteps):
        noise_ctx = (
            flow_noise(noises[i])
            if noises is not None and not isinstance(scheduler, FusedFlowMatchEulerDiscreteScheduler)
            else contextlib.nullcontext()
        )
        extra = (
            dict(variance_noise=noises[i])
            if noises is not None and isinstance(scheduler, FusedFlowMatchEulerDiscreteScheduler)
            else {}
        )
        with noise_ctx:
            x = scheduler.step(velocity(x, t), t, x, **extra, **step_kw).prev_sample
    return x


@pytest.mark.parametrize("backend", BACKENDS)
@pytest.mark.parametrize("name", CONFIGS)
def test_sampling_loop_matches_stock(seed, backend, name):
    config, set_kw = CONFIGS[name]
    x = torch.randn(2, 4, 3, 3, device=DEVICE)
    stochastic = config.get("stochastic_sampling", False)
    noises = [torch.randn_like(x) for _ in range(8)] if stochastic else None
    ours = sample_loop(FusedFlowMatchEulerDiscreteScheduler(**config, backend=backend), x, set_kw, noises)
    theirs = sample_loop(FlowMatchEulerDiscreteScheduler(**config), x, set_kw, noises)
    assert ours.dtype == theirs.dtype and torch.isfinite(ours).all()
    torch.testing.assert_close(ours, theirs, rtol=1e-5, atol=1e-5)


@pytest.mark.parametrize("dtype", [torch.float16, torch.bfloat16])
def test_low_precision_loop_is_closer_to_float64_than_stock(seed, dtype):
    """fp32 math with one rounding per step: at least as close to a float64 run as diffusers."""
    x = torch.randn(2, 4, 3, 3)
    ours = sample_loop(FusedFlowMatchEulerDiscreteScheduler(shift=3.0), x.to(dtype), dict(num_inference_steps=6))
    theirs = sample_loop(FlowMatchEulerDiscreteScheduler(shift=3.0), x.to(dtype), dict(num_inference_steps=6))
    exact = FlowMatchEulerDiscreteScheduler(shift=3.0)
    exact.set_timesteps(6)
    exact.sigmas = exact.sigmas.double()
    want = x.to(dtype).double()
    for t in exact.timesteps:
        want = exact.step(velocity(want, t), t, want).prev_sample
    assert ours.dtype == dtype
    err, stock_err = ((r.double() - want).abs().max().item() for r in (ours, theirs))
    assert err <= 2 * stock_err + torch.finfo(dtype).eps, (err, stock_err)


def test_scale_noise_matches_stock(seed):
    fused, stock = FusedFlowMatchEulerDiscreteScheduler(shift=3.0), FlowMatchEulerDiscreteScheduler(shift=3.0)
    x0, noise = torch.randn(3, 2, 4), torch.randn(3, 2, 4)
    for s in (fused, stock):
        s.set_timesteps(10)
    t = stock.timesteps[[0, 4, 9]]
    torch.testing.assert_close(fused.scale_noise(x0, t, noise), stock.scale_noise(x0, t, noise), rtol=1e-6, atol=1e-6)
    torch.testing.assert_close(
        fused.scale_noise(x0, t[1:2], noise), stock.scale_noise(x0, t[1:2], noise), rtol=1e-6, atol=1e-6
    )
    for s in (fused, stock):  # img2img: the begin index decides
        s.set_begin_index(3)
    torch.testing.assert_close(
        fused.scale_noise(x0, t[:1], noise), stock.scale_noise(x0, t[:1], noise), rtol=1e-6, atol=1e-6
    )
    fused.step(noise, stock.timesteps[3], x0)  # after a step: the current index
    stock.step(noise, stock.timesteps[3], x0)
    torch.testing.assert_close(fused.scale_noise(x0, t, noise), stock.scale_noise(x0, t, noise), rtol=1e-6, atol=1e-6)


def test_generator_seeds_the_kernel_noise(seed):
    def run(generator):
        s = FusedFlowMatchEulerDiscreteScheduler(stochastic_sampling=True)
        s.set_timesteps(4)
        return s.step(torch.ones(2, 8), s.timesteps[1], torch.zeros(2, 8), generator=generator).prev_sample

    a, b = run(torch.Generator().manual_seed(3)), run(torch.Generator().manual_seed(3))
    assert torch.equal(a, b) and not torch.equal(a, run(torch.Generator().manual_seed(4)))
    # a list of generators draws as diffusers does: the stock result exactly
    stock = FlowMatchEulerDiscreteScheduler(stochastic_sampling=True)
    stock.set_timesteps(4)
    gens = lambda: [torch.Generator().manual_seed(i) for i in (5, 6)]  # noqa: E731
    want = stock.step(torch.ones(2, 8), stock.timesteps[1], torch.zeros(2, 8), generator=gens()).prev_sample
    torch.testing.assert_close(run(gens()), want, rtol=1e-6, atol=1e-6)


def test_unsupported_falls_back_with_one_warning(seed):
    fused, stock = FusedFlowMatchEulerDiscreteScheduler(), FlowMatchEulerDiscreteScheduler()
    x = torch.randn(1, 4, 2)
    per_token = torch.full((1, 4), 700.0)
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        for s in (fused, stock):
            s.set_timesteps(5)
        got = [fused.step(x, fused.timesteps[i], x, per_token_timesteps=per_token).prev_sample for i in (0, 1)]
    want = [stock.step(x, stock.timesteps[i], x, per_token_timesteps=per_token).prev_sample for i in (0, 1)]
    assert [str(w.message) for w in caught if "fused kernels" in str(w.message)] == [
        "FusedFlowMatchEulerDiscreteScheduler: the fused kernels do not support per_token_timesteps; using diffusers' step"
    ]
    for g, w in zip(got, want):
        assert torch.equal(g, w)
    with pytest.raises(ValueError, match="integer indices"):
        fused.step(x, 3, x)
    with pytest.raises(ValueError, match="variance_noise needs the fused step"):
        fused.step(x.double(), fused.timesteps[2], x.double(), variance_noise=x.double())


def public(config):
    return {k: v for k, v in config.items() if not k.startswith("_")}


class TinyFlowPipeline(DiffusionPipeline):
    """A pipeline holding only a scheduler: enough to save and load it through model_index.json."""

    def __init__(self, scheduler):
        super().__init__()
        self.register_modules(scheduler=scheduler)


def test_save_load_round_trip_alone_and_in_a_pipeline(tmp_path, seed):
    fused = FusedFlowMatchEulerDiscreteScheduler(**FLUX, stochastic_sampling=True, backend="reference")
    fused.save_pretrained(tmp_path / "scheduler_only")
    loaded = FusedFlowMatchEulerDiscreteScheduler.from_pretrained(tmp_path / "scheduler_only")
    assert public(loaded.config) == public(fused.config) and loaded.backend == "reference"
    stock = FlowMatchEulerDiscreteScheduler.from_config(fused.config)  # the stock one reads the same config
    assert stock.config.use_dynamic_shifting

    TinyFlowPipeline(fused).save_pretrained(tmp_path / "pipe")
    pipe = TinyFlowPipeline.from_pretrained(tmp_path / "pipe")
    assert type(pipe.scheduler) is FusedFlowMatchEulerDiscreteScheduler
    assert public(pipe.scheduler.config) == public(fused.config)
    x = torch.randn(2, 3, 4)
    noises = [torch.randn_like(x) for _ in range(3)]
    set_kw = dict(num_inference_steps=3, mu=1.0)
    theirs = sample_loop(FlowMatchEulerDiscreteScheduler.from_config(pipe.scheduler.config), x, set_kw, noises)
    torch.testing.assert_close(sample_loop(pipe.scheduler, x, set_kw, noises), theirs, rtol=1e-5, atol=1e-5)
