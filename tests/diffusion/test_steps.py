"""add_noise, ddpm_step and ddim_step against diffusers' schedulers, on every backend.

Inputs are fresh random tensors per test (seeded by the test id). Each step is checked per row
(per-row timesteps including t = 0, the last step, and skipped steps) against diffusers run in
float64 as the oracle, under the 2x rule against diffusers run in the input dtype.
"""

import pytest
import torch

from tests.diffusion.common import (
    BACKENDS,
    DEVICE,
    GPU,
    DTYPES,
    assert_rule,
    diffusers_ddim_rows,
    diffusers_ddpm_rows,
    poison_outputs,
    requires_diffusers,
    to_oracle,
)

import transfusion_kernels as tk  # noqa: E402
from transfusion_kernels.diffusion.schedule import BETA_SCHEDULES, PREDICTION_TYPES, VARIANCE_TYPES  # noqa: E402

# (t, prev): t = 0, the first skipped step, default spacing, skips, a jump to the end (prev < 0)
DDPM_ROWS = [(0, -1), (1, 0), (37, 36), (500, 480), (999, 949), (250, -1)]
# (t, spacing) with prev = t - spacing: as DDIMScheduler with T // num_inference_steps = spacing
DDIM_ROWS = [(0, 1), (1, 1), (5, 20), (500, 20), (999, 3), (250, 250)]
ROW_SHAPE = (2, 3, 5)  # 30 elements per row


try:
    import triton
    import triton.language as tl

    from transfusion_kernels.diffusion.triton import _philox_randn

    @triton.jit
    def _noise_at(out_ptr, base, seed_lo, seed_hi, ACCURATE: tl.constexpr, N: tl.constexpr):
        i = tl.arange(0, N)
        tl.store(out_ptr + i, _philox_randn(base + i.to(tl.int64), seed_lo, seed_hi, ACCURATE))

except ImportError:  # no triton: the test skips
    _noise_at = None


@pytest.fixture(autouse=True)
def _poison(monkeypatch):
    poison_outputs(monkeypatch)


def beta_kwargs(beta_schedule):
    if beta_schedule == "scaled_linear":
        return dict(beta_schedule=beta_schedule, beta_start=0.00085, beta_end=0.012)
    return dict(beta_schedule=beta_schedule)


def inputs(rows, dtype=torch.float32):
    shape = (len(rows), *ROW_SHAPE)
    sample = torch.randn(shape) * 1.5
    model_output = torch.randn(shape)
    noise = torch.randn(shape)
    return [x.to(dtype) for x in (sample, model_output, noise)]


def on_device(*xs):
    return [x.to(DEVICE) for x in xs]


# ---------------------------------------------------------------------------------------------
# against diffusers, every configuration, explicit noise
# ---------------------------------------------------------------------------------------------


@requires_diffusers
@pytest.mark.parametrize("backend", BACKENDS)
@pytest.mark.parametrize("beta_schedule", BETA_SCHEDULES)
def test_add_noise_matches_diffusers(seed, backend, beta_schedule):
    from diffusers import DDPMScheduler

    sched = tk.DiffusionSchedule(**beta_kwargs(beta_schedule))
    stock = DDPMScheduler(**beta_kwargs(beta_schedule))
    oracle = DDPMScheduler(**beta_kwargs(beta_schedule))
    oracle.alphas_cumprod = oracle.alphas_cumprod.double()
    x0, _, noise = inputs(DDPM_ROWS)
    t = torch.tensor([0, 1, 999, 500, 37, 998])
    x0_d, noise_d, t_d = on_device(x0, noise, t)
    out, returned = tk.add_noise(x0_d, t_d, sched, noise=noise_d, backend=backend)
    assert returned is noise_d
    assert_rule(out, oracle.add_noise(x0.double(), noise.double(), t), stock.add_noise(x0, noise, t), "add_noise")


@requires_diffusers
@pytest.mark.parametrize("backend", BACKENDS)
@pytest.mark.parametrize("clip", [False, True], ids=["noclip", "clip"])
@pytest.mark.parametrize("variance_type", VARIANCE_TYPES)
@pytest.mark.parametrize("prediction_type", PREDICTION_TYPES)
@pytest.mark.parametrize("beta_schedule", BETA_SCHEDULES)
def test_ddpm_matches_diffusers(seed, backend, beta_schedule, prediction_type, variance_type, clip):
    sched = tk.DiffusionSchedule(**beta_kwargs(beta_schedule))
    # diffusers 0.42 takes sqrt(log(beta)) for fixed_large_log (NaN); the intended sigma is
    # sqrt(beta_t), which is what diffusers' fixed_large computes: use it as the formula.
    ref_variance = "fixed_large" if variance_type == "fixed_large_log" else variance_type
    config = dict(
        **beta_kwargs(beta_schedule),
        prediction_type=prediction_type,
        variance_type=ref_variance,
        clip_sample=clip,
        clip_sample_range=1.5,
    )
    sample, model_output, noise = inputs(DDPM_ROWS)
    t = torch.tensor([r[0] for r in DDPM_ROWS])
    prev = torch.tensor([r[1] for r in DDPM_ROWS])
    s_d, m_d, n_d, t_d, p_d = on_device(sample, model_output, noise, t, prev)
    out = tk.ddpm_step(
        m_d,
        t_d,
        s_d,
        sched,
        prev_timestep=p_d,
        prediction_type=prediction_type,
        variance_type=variance_type,
        clip_sample=clip,
        clip_sample_range=1.5,
        noise=n_d,
        backend=backend,
    )
    oracle = diffusers_ddpm_rows(config, model_output, sample, DDPM_ROWS, noise, oracle=True)
    same = diffusers_ddpm_rows(config, model_output, sample, DDPM_ROWS, noise, oracle=False)
    assert_rule(out, oracle, same, "ddpm_step")


@requires_diffusers
@pytest.mark.parametrize("backend", BACKENDS)
@pytest.mark.parametrize("eta,use_clipped", [(0.0, False), (0.5, False), (1.0, True)])
@pytest.mark.parametrize("clip", [False, True], ids=["noclip", "clip"])
@pytest.mark.parametrize("prediction_type", PREDICTION_TYPES)
@pytest.mark.parametrize("beta_schedule", BETA_SCHEDULES)
def test_ddim_matches_diffusers(seed, backend, beta_schedule, prediction_type, clip, eta, use_clipped):
    sched = tk.DiffusionSchedule(**beta_kwargs(beta_schedule))
    config = dict(
        **beta_kwargs(beta_schedule),
        prediction_type=prediction_type,
        clip_sample=clip,
        clip_sample_range=1.5,
    )
    sample, model_output, noise = inputs(DDIM_ROWS)
    t = torch.tensor([r[0] for r in DDIM_ROWS])
    prev = t - torch.tensor([r[1] for r in DDIM_ROWS])
    s_d, m_d, n_d, t_d, p_d = on_device(sample, model_output, noise, t, prev)
    out = tk.ddim_step(
        m_d,
        t_d,
        s_d,
        sched,
        prev_timestep=p_d,
        eta=eta,
        prediction_type=prediction_type,
        clip_sample=clip,
        clip_sample_range=1.5,
        use_clipped_model_output=use_clipped,
        noise=n_d,
        backend=backend,
    )
    oracle = diffusers_ddim_rows(config, model_output, sample, DDIM_ROWS, noise, eta, use_clipped, oracle=True)
    same = diffusers_ddim_rows(config, model_output, sample, DDIM_ROWS, noise, eta, use_clipped, oracle=False)
    assert_rule(out, oracle, same, "ddim_step")


@requires_diffusers
@pytest.mark.parametrize("backend", BACKENDS)
@pytest.mark.parametrize("dtype", DTYPES, ids=str)
def test_dtypes_against_float64(seed, backend, dtype):
    """fp16 / bf16 / fp32 inputs: fp32 math inside, one rounding at the end."""
    from diffusers import DDPMScheduler

    sched = tk.DiffusionSchedule(beta_schedule="squaredcos_cap_v2")
    sample, model_output, noise = inputs(DDPM_ROWS, dtype)
    t = torch.tensor([r[0] for r in DDPM_ROWS])
    s_d, m_d, n_d, t_d = on_device(sample, model_output, noise, t)

    stock, oracle = DDPMScheduler(beta_schedule="squaredcos_cap_v2"), DDPMScheduler(beta_schedule="squaredcos_cap_v2")
    oracle.alphas_cumprod = oracle.alphas_cumprod.double()
    out, _ = tk.add_noise(s_d, t_d, sched, noise=n_d, backend=backend)
    assert out.dtype == dtype
    assert_rule(
        out, oracle.add_noise(sample.double(), noise.double(), t), stock.add_noise(sample, noise, t), "add_noise"
    )

    config = dict(beta_schedule="squaredcos_cap_v2", prediction_type="v_prediction", clip_sample=True)
    rows = [(r[0], r[0] - 1) for r in DDPM_ROWS]
    out = tk.ddpm_step(
        m_d, t_d, s_d, sched, prediction_type="v_prediction", clip_sample=True, noise=n_d, backend=backend
    )
    assert out.dtype == dtype
    oracle_out = diffusers_ddpm_rows(config, model_output, sample, rows, noise, oracle=True)
    same_out = diffusers_ddpm_rows(config, model_output, sample, rows, noise, oracle=False)
    assert_rule(out, oracle_out, same_out, "ddpm_step")

    config = dict(beta_schedule="squaredcos_cap_v2", prediction_type="epsilon", clip_sample=False)
    rows = [(r[0], 20) for r in DDPM_ROWS]
    out = tk.ddim_step(m_d, t_d, s_d, sched, prev_timestep=t_d - 20, eta=0.7, noise=n_d, backend=backend)
    oracle_out = diffusers_ddim_rows(config, model_output, sample, rows, noise, 0.7, False, oracle=True)
    same_out = diffusers_ddim_rows(config, model_output, sample, rows, noise, 0.7, False, oracle=False)
    assert_rule(out, oracle_out, same_out, "ddim_step")


@pytest.mark.parametrize("backend", BACKENDS)
def test_scalar_timesteps_and_defaults(seed, backend):
    """A python int (or 0-d tensor) applies to every row; DDPM's prev defaults to t - 1."""
    sched = tk.DiffusionSchedule()
    sample, model_output, noise = on_device(*inputs(range(4)))
    for t in (0, 1, 640):
        rows = torch.full((4,), t, device=DEVICE)
        kw = dict(noise=noise, backend=backend, variance_type="fixed_large")
        base = tk.ddpm_step(model_output, rows, sample, sched, prev_timestep=rows - 1, **kw)
        torch.testing.assert_close(tk.ddpm_step(model_output, t, sample, sched, **kw), base, rtol=0, atol=0)
        torch.testing.assert_close(
            tk.ddpm_step(model_output, torch.tensor(t), sample, sched, **kw), base, rtol=0, atol=0
        )
    x = tk.ddim_step(model_output, 640, sample, sched, prev_timestep=620, backend=backend)
    y = tk.ddim_step(model_output, torch.full((4,), 640), sample, sched, prev_timestep=620, backend=backend)
    torch.testing.assert_close(x, y, rtol=0, atol=0)


@requires_diffusers
def test_ddim_set_alpha_to_one_false_is_prev_zero(seed):
    from diffusers import DDIMScheduler

    stock = DDIMScheduler(set_alpha_to_one=False, clip_sample=False)
    stock.set_timesteps(50)
    sched = tk.DiffusionSchedule.from_diffusers(stock)
    sample, model_output, _ = inputs(range(2))
    out = tk.ddim_step(model_output, 0, sample, sched, prev_timestep=0)
    torch.testing.assert_close(out, stock.step(model_output, 0, sample).prev_sample, rtol=1e-5, atol=1e-5)


# ---------------------------------------------------------------------------------------------
# in-kernel noise
# ---------------------------------------------------------------------------------------------


@pytest.mark.parametrize("backend", BACKENDS)
@pytest.mark.parametrize("dtype", DTYPES, ids=str)
def test_seeded_noise_is_the_philox_definition(seed, backend, dtype):
    from transfusion_kernels import philox

    sched = tk.DiffusionSchedule()
    x0 = torch.randn(3, 4, 7, 9, device=DEVICE).to(dtype)  # 252 elements per row, not a block multiple
    t = torch.tensor([3, 500, 999], device=DEVICE)
    s = 2**64 - 12345  # both halves of the key in use
    out, noise = tk.add_noise(x0, t, sched, seed=s, backend=backend)
    expected = philox.randn(s, x0.numel(), device=DEVICE).to(dtype).reshape(x0.shape)
    eps = torch.finfo(dtype).eps
    torch.testing.assert_close(noise, expected, rtol=eps, atol=2e-5 if dtype == torch.float32 else eps)
    # the returned noise reproduces the output when passed back in
    again, _ = tk.add_noise(x0, t, sched, noise=noise, backend=backend)
    torch.testing.assert_close(out, again, rtol=0, atol=0)


@pytest.mark.parametrize("dtype", DTYPES, ids=str)
def test_same_seed_same_output_across_backends(seed, dtype):
    """Every backend that can run here, same seed: the same result up to float rounding."""
    sched = tk.DiffusionSchedule()
    names = [n for n, info in tk.available_backends(DEVICE).items() if info.available]
    sample, model_output, _ = on_device(*inputs(range(5), dtype))
    t = torch.tensor([0, 1, 10, 500, 999], device=DEVICE)
    runs = {
        "add_noise": lambda b: tk.add_noise(sample, t, sched, seed=77, backend=b)[0],
        "ddpm": lambda b: tk.ddpm_step(model_output, t, sample, sched, seed=77, clip_sample=True, backend=b),
        "ddim": lambda b: tk.ddim_step(
            model_output, t, sample, sched, prev_timestep=t - 10, eta=1.0, seed=77, backend=b
        ),
    }
    eps = torch.finfo(dtype).eps
    for what, run in runs.items():
        ref = run("reference")
        assert torch.equal(run("reference"), ref), f"{what}: reference not deterministic"
        for name in names:
            got = run(name)
            assert torch.equal(run(name), got), f"{what}: {name} not deterministic"
            torch.testing.assert_close(got, ref, rtol=2 * eps, atol=2e-5 if dtype == torch.float32 else 2 * eps)


@pytest.mark.parametrize("backend", BACKENDS)
def test_seed_none_follows_torch_manual_seed(backend):
    sched = tk.DiffusionSchedule()
    x0 = torch.randn(2, 64, device=DEVICE)
    torch.manual_seed(5)
    a = tk.add_noise(x0, 500, sched, backend=backend)[1]
    b = tk.add_noise(x0, 500, sched, backend=backend)[1]
    torch.manual_seed(5)
    c = tk.add_noise(x0, 500, sched, backend=backend)[1]
    assert torch.equal(a, c) and not torch.equal(a, b)


@pytest.mark.parametrize("backend", BACKENDS)
def test_noise_statistics(backend):
    """~1e5 draws: mean 0, variance 1, no lag-1 correlation, none across seeds, normal tails;
    each within 4 standard errors."""
    sched = tk.DiffusionSchedule()
    n = 1 << 17
    x0 = torch.zeros(2, n // 2, device=DEVICE)
    z = tk.add_noise(x0, 999, sched, seed=2024, backend=backend)[1].flatten().double().cpu()
    z2 = tk.add_noise(x0, 999, sched, seed=2025, backend=backend)[1].flatten().double().cpu()
    se = n**-0.5
    assert abs(z.mean().item()) < 4 * se
    assert abs(z.var().item() - 1) < 4 * (2 / n) ** 0.5
    assert abs(torch.corrcoef(torch.stack([z[:-1], z[1:]]))[0, 1].item()) < 4 * se
    assert abs(torch.corrcoef(torch.stack([z, z2]))[0, 1].item()) < 4 * se
    p = 0.04550026389635842  # P(|z| > 2)
    assert abs((z.abs() > 2).double().mean().item() - p) < 4 * (p * (1 - p) / n) ** 0.5
    assert abs((z**4).mean().item() - 3) < 4 * (96 / n) ** 0.5  # kurtosis: var(z^4) = 105 - 9
    assert torch.equal(tk.add_noise(x0, 999, sched, seed=2024, backend=backend)[1].flatten().double().cpu(), z)


def test_triton_philox_high_counter_word():
    """Element indices past 2**32 use the counter's second word (too big to allocate in a test:
    run the kernel's noise function on offsets directly)."""
    if _noise_at is None or not tk.available_backends(DEVICE)["triton"].available:
        pytest.skip("triton cannot run here")
    from transfusion_kernels import philox
    from transfusion_kernels.backends import triton_interpret

    base, s = 2**32 - 16, 0x1234_5678_9ABC_DEF0
    out = torch.full((64,), float("nan"), device=DEVICE)
    _noise_at[(1,)](out, base, s & 0xFFFFFFFF, s >> 32, ACCURATE=not triton_interpret(), N=64)
    torch.testing.assert_close(out.cpu(), philox.randn(s, 64, offset=base), rtol=1e-5, atol=2e-5)


# ---------------------------------------------------------------------------------------------
# autograd, torch.compile, errors
# ---------------------------------------------------------------------------------------------


@requires_diffusers
@pytest.mark.parametrize("backend", BACKENDS)
def test_gradients_match_diffusers(seed, backend):
    """The steps are differentiable in sample, model_output and the given noise (clip included)."""
    from diffusers import DDIMScheduler

    sched = tk.DiffusionSchedule()
    stock = to_oracle(DDIMScheduler(clip_sample=True, clip_sample_range=1.0, prediction_type="v_prediction"))
    stock.num_inference_steps = 50
    sample, model_output, noise = inputs(range(1))
    w = torch.randn_like(sample)
    ours = [x.clone().to(DEVICE).requires_grad_() for x in (sample, model_output, noise)]
    out = tk.ddim_step(
        ours[1],
        500,
        ours[0],
        sched,
        prev_timestep=480,
        eta=0.8,
        prediction_type="v_prediction",
        clip_sample=True,
        noise=ours[2],
        backend=backend,
    )
    (out * w.to(DEVICE)).sum().backward()
    theirs = [x.double().requires_grad_() for x in (sample, model_output, noise)]  # not ours: fresh leaves
    ref = stock.step(theirs[1], 500, theirs[0], eta=0.8, variance_noise=theirs[2]).prev_sample
    (ref * w.double()).sum().backward()
    for a, b, name in zip(ours, theirs, ("sample", "model_output", "noise")):
        torch.testing.assert_close(a.grad.cpu().double(), b.grad, rtol=1e-5, atol=1e-5, msg=name)


def test_torch_compile_fullgraph_reference(seed):
    sched = tk.DiffusionSchedule(beta_schedule="squaredcos_cap_v2")

    def f(x0, t, model_output, s):
        x_t, noise = tk.add_noise(x0, t, sched, seed=s, backend="reference")
        a = tk.ddpm_step(model_output, t, x_t, sched, seed=s + 1, clip_sample=True, backend="reference")
        b = tk.ddim_step(model_output, t, x_t, sched, prev_timestep=t - 10, eta=0.5, seed=s + 2, backend="reference")
        return x_t, noise, a, b

    compiled = torch.compile(f, fullgraph=True)  # inductor: the coefficient math is compiled
    x0 = torch.randn(4, 3, 4, 4)
    t = torch.tensor([10, 20, 999, 500])
    m = torch.randn_like(x0)
    for s in (3, 2**63 + 5):
        for got, want in zip(compiled(x0, t, m, s), f(x0, t, m, s)):
            torch.testing.assert_close(got, want, rtol=0, atol=0)


def test_torch_compile_traces_custom_op_without_graph_breaks():
    """aot_eager: the fake implementations and the autograd formula are traced, no graph break."""
    sched = tk.DiffusionSchedule()

    def f(x0, t, m):
        x_t, _ = tk.add_noise(x0, t, sched, seed=11, backend="reference")
        return tk.ddpm_step(m, t, x_t, sched, seed=12, backend="reference").square().sum()

    x0, m = torch.randn(3, 8, requires_grad=True), torch.randn(3, 8)
    t = torch.tensor([5, 50, 500])
    compiled = torch.compile(f, fullgraph=True, backend="aot_eager")
    got = compiled(x0, t, m)
    (g,) = torch.autograd.grad(got, x0)
    want = f(x0, t, m)
    (g_ref,) = torch.autograd.grad(want, x0)
    torch.testing.assert_close(got, want)
    torch.testing.assert_close(g, g_ref)


def test_bad_inputs_raise_clear_errors():
    sched = tk.DiffusionSchedule()
    x = torch.randn(4, 8)
    m = torch.randn(4, 8)
    with pytest.raises(ValueError, match="model_output must have the shape"):
        tk.ddpm_step(torch.randn(4, 9), 10, x, sched)
    with pytest.raises(TypeError, match="model_output must have the dtype"):
        tk.ddpm_step(m.half(), 10, x, sched)
    with pytest.raises(TypeError, match="sample must be float16, bfloat16 or float32"):
        tk.ddpm_step(m.double(), 10, x.double(), sched)
    with pytest.raises(TypeError, match="x0 must be float16"):
        tk.add_noise(torch.ones(4, 8, dtype=torch.int64), 10, sched)
    with pytest.raises(ValueError, match="noise must have the shape"):
        tk.add_noise(x, 10, sched, noise=torch.randn(4, 7))
    with pytest.raises(ValueError, match="timestep must satisfy 0 <= timestep < num_train_timesteps=1000"):
        tk.ddpm_step(m, 1000, x, sched)
    with pytest.raises(ValueError, match="timesteps must satisfy"):
        tk.add_noise(x, torch.tensor([0, 1, -1, 3]), sched)
    with pytest.raises(ValueError, match=r"integer tensor of shape \[4\]"):
        tk.add_noise(x, torch.tensor([0, 1, 2]), sched)
    with pytest.raises(TypeError, match="timesteps must be an integer tensor"):
        tk.add_noise(x, torch.tensor([0.0, 1, 2, 3]), sched)
    with pytest.raises(ValueError, match="prev_timestep must not be larger than timestep"):
        tk.ddim_step(m, 10, x, sched, prev_timestep=20)
    with pytest.raises(ValueError, match="prediction_type must be one of"):
        tk.ddpm_step(m, 10, x, sched, prediction_type="x0")
    with pytest.raises(ValueError, match="variance_type must be one of"):
        tk.ddpm_step(m, 10, x, sched, variance_type="learned")
    with pytest.raises(ValueError, match="beta_schedule must be one of"):
        tk.DiffusionSchedule(beta_schedule="quadratic")
    with pytest.raises(ValueError, match=r"seed must be in \[0, 2\*\*64\)"):
        tk.add_noise(x, 10, sched, seed=2**64)
    with pytest.raises(ValueError, match="seed must be in"):
        tk.add_noise(x, 10, sched, seed=-1)
    with pytest.raises(TypeError, match="seed must be a python int"):
        tk.add_noise(x, 10, sched, seed=1.5)
    with pytest.raises(ValueError, match="eta must be a float in"):
        tk.ddim_step(m, 10, x, sched, prev_timestep=5, eta=1.5)
    with pytest.raises(ValueError, match="clip_sample_range must be positive"):
        tk.ddpm_step(m, 10, x, sched, clip_sample=True, clip_sample_range=0.0)
    with pytest.raises(TypeError, match="schedule must be a DiffusionSchedule"):
        tk.add_noise(x, 10, None)


# ---------------------------------------------------------------------------------------------
# GPU only: large tensors on every kernel backend against the reference, same seed
# ---------------------------------------------------------------------------------------------


@pytest.mark.gpu
@pytest.mark.skipif(not GPU, reason="needs CUDA")
@pytest.mark.parametrize(
    "shape,dtype,per_row",
    [
        ((16, 4, 64, 64), torch.bfloat16, False),
        ((64, 4, 256, 256), torch.float32, False),
        ((1 << 20, 64), torch.bfloat16, True),
        ((3, 1000003), torch.float16, True),
    ],
    ids=["latents-bf16", "64MB-fp32", "packed-bf16", "odd-rows-fp16"],
)
def test_gpu_large_against_reference(seed, shape, dtype, per_row):
    sched = tk.DiffusionSchedule(beta_schedule="scaled_linear", beta_start=0.00085, beta_end=0.012)
    sample = torch.randn(shape, device=DEVICE).to(dtype)
    model_output = torch.randn(shape, device=DEVICE).to(dtype)
    t = torch.randint(0, 1000, (shape[0],), device=DEVICE) if per_row else 613
    prev = (t - 37) if per_row else 576
    runs = {
        "add_noise": lambda b: tk.add_noise(sample, t, sched, seed=seed, backend=b),
        "ddpm": lambda b: tk.ddpm_step(
            model_output,
            t,
            sample,
            sched,
            prev_timestep=prev,
            clip_sample=True,
            variance_type="fixed_small_log",
            seed=seed,
            backend=b,
        ),
        "ddim": lambda b: tk.ddim_step(
            model_output,
            t,
            sample,
            sched,
            prev_timestep=prev,
            eta=0.3,
            prediction_type="v_prediction",
            seed=seed,
            backend=b,
        ),
    }
    eps = torch.finfo(dtype).eps
    names = [n for n, info in tk.available_backends(DEVICE).items() if info.available and n != "reference"]
    for what, run in runs.items():
        ref = run("reference")
        for name in names:
            got = run(name)
            for g, r in zip(got if isinstance(got, tuple) else (got,), ref if isinstance(ref, tuple) else (ref,)):
                torch.testing.assert_close(
                    g,
                    r,
                    rtol=2 * eps,
                    atol=2e-5 if dtype == torch.float32 else 2 * eps,
                    msg=lambda m: f"{what} on {name}: {m}",
                )
