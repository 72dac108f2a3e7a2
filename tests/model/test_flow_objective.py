"""The flow-matching objective of the model: its training inputs, its sampler, and training."""

import pytest
import torch

from transfusion.data import load_digits_split
from transfusion.objective import check_sampler, denoise, sampling_steps, training_inputs
from transfusion.sample import SampleConfig, caption, generate

from conftest import FixedBatches, digit_trainer, tiny_config, tiny_model_config


def test_training_inputs_are_the_rectified_flow_path():
    cfg = tiny_model_config(64, objective="flow", num_train_timesteps=1000)
    x0 = torch.randn(7, 4, dtype=torch.float64).float()
    t = torch.tensor([0, 499, 999])
    patch_img = torch.tensor([0, 0, 1, 1, 1, 2, 2], dtype=torch.int32)
    x_t, target, model_t = training_inputs(cfg, x0, t, patch_img, seed=1234, sched=None, backend="reference")
    sigma = ((t.double() + 1) / 1000)[patch_img.long()][:, None]  # diffusers' training sigmas
    noise = target.double() + x0.double()  # the target is noise - x0
    torch.testing.assert_close(x_t.double(), (1 - sigma) * x0.double() + sigma * noise, rtol=0, atol=1e-6)
    assert torch.equal(model_t, torch.tensor([1.0, 500.0, 1000.0]))
    # the noise is standard normal and a function of the seed
    again = training_inputs(cfg, x0, t, patch_img, seed=1234, sched=None, backend="reference")
    assert torch.equal(again[0], x_t) and torch.equal(again[1], target)
    assert not torch.equal(training_inputs(cfg, x0, t, patch_img, seed=1, sched=None, backend="reference")[1], target)


def test_flow_sampling_steps_match_diffusers():
    from diffusers import FlowMatchEulerDiscreteScheduler

    cfg = tiny_model_config(64, objective="flow")
    for n in (1, 4, 25):
        steps = sampling_steps(cfg, n)
        ref = FlowMatchEulerDiscreteScheduler(num_train_timesteps=1000)
        ref.set_timesteps(n)
        assert len(steps) == n
        torch.testing.assert_close(
            torch.tensor([s for _, s, _ in steps] + [steps[-1][2]], dtype=torch.float64),
            ref.sigmas.double(),
            rtol=0,
            atol=1e-6,
        )
        torch.testing.assert_close(
            torch.tensor([m for m, _, _ in steps], dtype=torch.float64), ref.timesteps.double(), rtol=0, atol=1e-3
        )
    assert steps[0][1] == 1.0 and steps[-1][2] == 0.0


def test_guided_euler_step_is_combine_then_step():
    cfg = tiny_model_config(64, objective="flow")
    rows, cond, unc = torch.randn(3, 5, 8).unbind(0)
    scfg = SampleConfig(sampler="euler", cfg_scale=3.0)
    out = denoise(cfg, scfg, None, rows, cond, unc, 0.75, 0.5, seed=0, backend="reference")
    v = unc.double() + 3.0 * (cond.double() - unc.double())
    torch.testing.assert_close(out.double(), rows.double() + (0.5 - 0.75) * v, rtol=0, atol=1e-5)
    plain = denoise(cfg, scfg, None, rows, cond, None, 0.75, 0.5, seed=0, backend="reference")
    torch.testing.assert_close(plain.double(), rows.double() - 0.25 * cond.double(), rtol=0, atol=1e-6)


def test_samplers_must_fit_the_objective():
    flow, ddpm = tiny_model_config(64, objective="flow"), tiny_model_config(64)
    check_sampler(flow, "euler")
    for s in ("ddim", "ddpm"):
        check_sampler(ddpm, s)
        with pytest.raises(ValueError, match="objective 'flow'.*'euler'"):
            check_sampler(flow, s)
    with pytest.raises(ValueError, match="objective 'ddpm'"):
        check_sampler(ddpm, "euler")


def test_flow_model_trains_and_samples(tok):
    """The loss falls when overfitting one batch; the Euler sampler (guided) gives finite images
    of the requested size, and captioning runs on the same model."""
    digits = load_digits_split(0.2, 0, 8)
    cfg = tiny_config(tok.vocab_size, steps=40, objective="flow")
    cfg.train.warmup_steps = 1
    tr = digit_trainer(cfg, tok, digits)
    tr.batches = FixedBatches(tr.batches.batch(0))
    hist = tr.fit(progress=False)
    model = tr.model
    assert hist[-1]["ddpm_loss"] < 0.7 * hist[0]["ddpm_loss"]
    assert hist[-1]["lm_loss"] < 0.5 * hist[0]["lm_loss"]
    model.eval()
    res = generate(
        model,
        tok,
        ["two", "a handwritten seven"],
        SampleConfig(sampler="euler", steps=3, cfg_scale=2.0, image_size=(4, 6), max_new_tokens=2),
        open_image=True,
    )
    assert [r["images"][0].shape for r in res] == [(1, 4, 6)] * 2
    assert all(torch.isfinite(r["images"][0]).all() for r in res)
    assert len(caption(model, tok, torch.zeros(2, 1, 4, 4), SampleConfig(max_new_tokens=2))) == 2
