"""add_noise / ddpm_step / ddim_step and diffusion_loss on random schedules, prediction and
variance types, clipping, eta, per-row timesteps, shapes and dtypes: every backend against
diffusers run in float64 (the oracle) under the 2x rule against diffusers run in the input dtype
(tests/diffusion/common.py); seeded noise against the Philox definition; the loss against a
per-image loop."""

from __future__ import annotations

import torch
from hypothesis import given
from hypothesis import strategies as st

import transfusion_kernels as tk
from tests.diffusion.common import (
    diffusers_ddim_rows,
    diffusers_ddpm_rows,
    requires_diffusers,
    to_oracle,
)
from tests.diffusion.test_loss import loop_loss
from tests.fuzzing import DEVICE, FAST_BACKENDS, budget, poisoned, small_tiles
from transfusion_kernels import philox
from transfusion_kernels.diffusion import add_noise_coef, ddim_coef, ddpm_coef
from transfusion_kernels.diffusion.schedule import BETA_SCHEDULES, PREDICTION_TYPES, VARIANCE_TYPES

DTYPES = [torch.float32, torch.float16, torch.bfloat16]
STEP_BACKENDS = ["reference", *FAST_BACKENDS]
LOSS_BACKENDS = ["reference", *(b for b in FAST_BACKENDS if b == "triton")]  # no CUDA C++ loss kernel


@st.composite
def schedules(draw):
    """(num_train_timesteps, beta keyword arguments), as accepted by both tk and diffusers."""
    T = draw(st.sampled_from([2, 7, 50, 1000]))
    beta_schedule = draw(st.sampled_from(BETA_SCHEDULES))
    kw = dict(beta_schedule=beta_schedule)
    if beta_schedule == "scaled_linear":
        kw.update(beta_start=0.00085, beta_end=0.012)
    elif beta_schedule == "linear":
        # beta_end = 0.2 over 1000 steps underflows alphas_cumprod to 0 in float32 (diffusers too)
        kw.update(beta_start=draw(st.sampled_from([1e-4, 1e-3])), beta_end=0.2 if T <= 50 else 0.02)
    return T, kw


@st.composite
def tensors(draw):
    """(sample, model_output, noise) of a random row shape and dtype, and the seed they came from."""
    R = draw(st.integers(1, 6))
    row = draw(st.sampled_from([(1,), (7,), (3, 5), (2, 3, 4), (33,)]))
    dtype = draw(st.sampled_from(DTYPES))
    seed = draw(st.integers(0, 2**31 - 1))
    g = torch.Generator().manual_seed(seed)
    sample = torch.randn(R, *row, generator=g) * 1.5
    model_output, noise = torch.randn(R, *row, generator=g), torch.randn(R, *row, generator=g)
    return [x.to(dtype) for x in (sample, model_output, noise)]


def on_device(*xs):
    return [x.to(DEVICE) for x in xs]


def assert_rule(got, oracle, same, what, coef=None, terms=()):
    """tests/diffusion/common.py's rule: error <= 2 x the same-dtype diffusers error + a floor of
    one rounding of the largest result to the dtype; with ``coef`` (the fused step's [R, 6]) and
    ``terms`` (sample, model_output, noise), the floor is at least one fp32 rounding of the
    largest sum of |c_k x_k|: the step's own rounding scale, which exceeds one of the result
    where c0 sample and c1 model_output cancel (1 / sqrt(alphas_cumprod) large)."""
    eps = torch.finfo(same.dtype).eps
    got, oracle, same = (x.detach().cpu().double() for x in (got, oracle, same))
    assert got.shape == oracle.shape, (got.shape, oracle.shape)
    if not got.numel():
        return
    err, ref = (got - oracle).abs().max().item(), (same - oracle).abs().max().item()
    floor = eps * max(1.0, oracle.abs().max().item())
    if coef is not None:
        R = terms[0].shape[0]
        c = coef.detach().cpu().double().abs().reshape(R, 6, 1)
        s, m, n = (x.detach().cpu().double().abs().reshape(R, -1) for x in terms)
        size = c[:, 2] * (c[:, 0] * s + c[:, 1] * m) + c[:, 3] * s + c[:, 4] * m + c[:, 5] * n
        floor = max(floor, torch.finfo(torch.float32).eps * size.max().item())
    assert err <= 2 * ref + floor, f"{what}: error {err:.3g} > 2 x {ref:.3g} (same-dtype diffusers) + {floor:.3g}"


@requires_diffusers
@budget(40)
@given(sched=schedules(), xs=tensors(), data=st.data())
def test_add_noise(sched, xs, data):
    from diffusers import DDPMScheduler

    T, kw = sched
    x0, _, noise = xs
    R = x0.shape[0]
    t = torch.tensor(data.draw(st.lists(st.integers(0, T - 1), min_size=R, max_size=R)))
    as_int = data.draw(st.booleans())
    if as_int:
        t[:] = t[0]
    oracle = to_oracle(DDPMScheduler(num_train_timesteps=T, **kw)).add_noise(x0.double(), noise.double(), t)
    same = DDPMScheduler(num_train_timesteps=T, **kw).add_noise(x0, noise, t)
    x0_d, noise_d = on_device(x0, noise)
    schedule, t_arg = tk.DiffusionSchedule(T, **kw), int(t[0]) if as_int else t.to(DEVICE)
    coef, _ = add_noise_coef(t_arg, R, schedule, DEVICE)
    for backend in STEP_BACKENDS:
        with poisoned("diffusion"), small_tiles("diffusion"):
            out, _ = tk.add_noise(x0_d, t_arg, schedule, noise=noise_d, backend=backend)
        assert out.dtype == x0.dtype
        assert_rule(out, oracle, same, f"add_noise on {backend}", coef, (x0, x0 * 0, noise))


@st.composite
def ddpm_rows(draw, T, R):
    """(t, prev) per row; prev < 0 is the last step; all rows alike when given as python ints."""
    rows = []
    for _ in range(R):
        t = draw(st.integers(0, T - 1))
        prev = draw(st.one_of(st.just(t - 1), st.integers(-1, t - 1))) if t else -1
        rows.append((t, prev))
    form = draw(st.sampled_from(["tensors", "default_prev", "ints"]))
    if form == "default_prev":
        rows = [(t, t - 1) for t, _ in rows]
    if form == "ints":
        rows = [rows[0]] * R
    return rows, form


@requires_diffusers
@budget(80)
@given(
    sched=schedules(),
    xs=tensors(),
    data=st.data(),
    prediction_type=st.sampled_from(PREDICTION_TYPES),
    variance_type=st.sampled_from(VARIANCE_TYPES),
    clip=st.booleans(),
    clip_range=st.sampled_from([0.5, 1.0, 3.0]),
)
def test_ddpm_step(sched, xs, data, prediction_type, variance_type, clip, clip_range):
    T, kw = sched
    sample, model_output, noise = xs
    rows, form = data.draw(ddpm_rows(T, sample.shape[0]))
    # diffusers 0.42 takes sqrt(log(beta)) for fixed_large_log (NaN); the intended sigma is
    # sqrt(beta_t), diffusers' fixed_large (as tests/diffusion/test_steps.py)
    config = dict(
        num_train_timesteps=T,
        **kw,
        prediction_type=prediction_type,
        clip_sample=clip,
        clip_sample_range=clip_range,
        variance_type="fixed_large" if variance_type == "fixed_large_log" else variance_type,
    )
    oracle = diffusers_ddpm_rows(config, model_output, sample, rows, noise, oracle=True)
    same = diffusers_ddpm_rows(config, model_output, sample, rows, noise, oracle=False)
    if form == "ints":
        t, prev = rows[0]
    else:
        t = torch.tensor([r[0] for r in rows], device=DEVICE)
        prev = None if form == "default_prev" else torch.tensor([r[1] for r in rows], device=DEVICE)
    s_d, m_d, n_d = on_device(sample, model_output, noise)
    schedule = tk.DiffusionSchedule(T, **kw)
    coef, _ = ddpm_coef(t, sample.shape[0], schedule, DEVICE, prev, prediction_type, variance_type)
    for backend in STEP_BACKENDS:
        with poisoned("diffusion"), small_tiles("diffusion"):
            out = tk.ddpm_step(
                m_d,
                t,
                s_d,
                schedule,
                prev_timestep=prev,
                prediction_type=prediction_type,
                variance_type=variance_type,
                clip_sample=clip,
                clip_sample_range=clip_range,
                noise=n_d,
                backend=backend,
            )
        assert out.dtype == sample.dtype
        assert_rule(out, oracle, same, f"ddpm_step on {backend} (rows {rows})", coef, xs)


@requires_diffusers
@budget(80)
@given(
    sched=schedules(),
    xs=tensors(),
    data=st.data(),
    prediction_type=st.sampled_from(PREDICTION_TYPES),
    eta=st.sampled_from([0.0, 0.3, 1.0]),
    use_clipped=st.booleans(),
    clip=st.booleans(),
    clip_range=st.sampled_from([0.5, 1.0, 3.0]),
)
def test_ddim_step(sched, xs, data, prediction_type, eta, use_clipped, clip, clip_range):
    T, kw = sched
    sample, model_output, noise = xs
    R = sample.shape[0]
    # (t, spacing): diffusers' prev = t - T // num_inference_steps
    rows = [(data.draw(st.integers(0, T - 1)), T // data.draw(st.integers(1, T))) for _ in range(R)]
    config = dict(
        num_train_timesteps=T, **kw, prediction_type=prediction_type, clip_sample=clip, clip_sample_range=clip_range
    )
    oracle = diffusers_ddim_rows(config, model_output, sample, rows, noise, eta, use_clipped, oracle=True)
    same = diffusers_ddim_rows(config, model_output, sample, rows, noise, eta, use_clipped, oracle=False)
    t = torch.tensor([r[0] for r in rows], device=DEVICE)
    prev = t - torch.tensor([r[1] for r in rows], device=DEVICE)
    s_d, m_d, n_d = on_device(sample, model_output, noise)
    schedule = tk.DiffusionSchedule(T, **kw)
    coef, _ = ddim_coef(t, R, schedule, DEVICE, prev, eta, prediction_type, use_clipped)
    for backend in STEP_BACKENDS:
        with poisoned("diffusion"), small_tiles("diffusion"):
            out = tk.ddim_step(
                m_d,
                t,
                s_d,
                schedule,
                prev_timestep=prev,
                eta=eta,
                prediction_type=prediction_type,
                clip_sample=clip,
                clip_sample_range=clip_range,
                use_clipped_model_output=use_clipped,
                noise=n_d,
                backend=backend,
            )
        assert_rule(out, oracle, same, f"ddim_step on {backend} (rows {rows})", coef, xs)


@budget(30)
@given(sched=schedules(), xs=tensors(), seed=st.integers(0, 2**64 - 1), data=st.data())
def test_seeded_noise(sched, xs, seed, data):
    """add_noise with a seed returns the Philox noise of (seed, element index) rounded to the
    dtype, and passing it back reproduces x_t; ddpm/ddim with the seed equal the same step fed
    that noise, on every backend."""
    T, kw = sched
    schedule = tk.DiffusionSchedule(T, **kw)
    sample, model_output, _ = on_device(*xs)
    R, dtype = sample.shape[0], sample.dtype
    t = torch.tensor(data.draw(st.lists(st.integers(0, T - 1), min_size=R, max_size=R)), device=DEVICE)
    expected = philox.randn(seed, sample.numel(), device=DEVICE).to(dtype).reshape(sample.shape)
    eps = torch.finfo(dtype).eps
    for backend in STEP_BACKENDS:
        with poisoned("diffusion"), small_tiles("diffusion"):
            x_t, z = tk.add_noise(sample, t, schedule, seed=seed, backend=backend)
            again, _ = tk.add_noise(sample, t, schedule, noise=z, backend=backend)
            torch.testing.assert_close(z, expected, rtol=eps, atol=2e-5 if dtype == torch.float32 else eps)
            assert torch.equal(x_t, again), backend
            seeded = tk.ddpm_step(model_output, t, sample, schedule, seed=seed, clip_sample=True, backend=backend)
            fed = tk.ddpm_step(model_output, t, sample, schedule, noise=z, clip_sample=True, backend=backend)
            assert torch.equal(seeded, fed), backend
            kw_ddim = dict(prev_timestep=t - 1, eta=0.6, backend=backend)
            seeded = tk.ddim_step(model_output, t, sample, schedule, seed=seed, **kw_ddim)
            assert torch.equal(seeded, tk.ddim_step(model_output, t, sample, schedule, noise=z, **kw_ddim)), backend


@st.composite
def loss_cases(draw):
    P, C = draw(st.integers(0, 100)), draw(st.integers(1, 40))
    ids = draw(st.sampled_from([[-1, 0, 1, 2], [-1, 7, 100, 3], [0, 1], [-1]]))
    idx = draw(st.lists(st.sampled_from(ids), min_size=P, max_size=P))
    if draw(st.booleans()):
        idx = sorted(idx)
    return (
        P,
        C,
        idx,
        draw(st.sampled_from([torch.int32, torch.int64])),
        draw(st.sampled_from(DTYPES)),
        draw(st.integers(0, 2**31 - 1)),
    )


@budget(80)
@given(case=loss_cases())
def test_diffusion_loss(case):
    P, C, idx, idx_dtype, dtype, seed = case
    g = torch.Generator().manual_seed(seed)
    pred, target = torch.randn(P, C, generator=g).to(dtype), torch.randn(P, C, generator=g).to(dtype)
    index = torch.tensor(idx, dtype=idx_dtype).reshape(P)
    p64 = pred.double().requires_grad_()
    oracle = loop_loss(p64, target.double(), index)
    p_same = pred.clone().requires_grad_()
    same = loop_loss(p_same, target, index)  # PyTorch in the input dtype
    (oracle_grad,) = torch.autograd.grad(oracle, p64)
    (same_grad,) = torch.autograd.grad(same, p_same)
    for backend in LOSS_BACKENDS:
        p = pred.clone().to(DEVICE).requires_grad_()
        with poisoned("diffusion"), small_tiles("diffusion"):
            loss = tk.diffusion_loss(p, target.to(DEVICE), index.to(DEVICE), backend=backend)
            (grad,) = torch.autograd.grad(loss, p)
        assert loss.dtype == torch.float32 and loss.shape == () and grad.dtype == dtype
        if dtype == torch.float32:  # as tests/diffusion/test_loss.py: a few fp32 roundings, in any order
            torch.testing.assert_close(loss.cpu().double(), oracle.detach(), rtol=1e-5, atol=1e-7)
            torch.testing.assert_close(grad.cpu().double(), oracle_grad, rtol=1e-5, atol=1e-9)
        else:
            assert_rule(loss, oracle, same, f"loss on {backend}")
            assert_rule(grad, oracle_grad, same_grad, f"grad on {backend}")
