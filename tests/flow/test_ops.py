"""flow_add_noise, flow_euler_step and flow_loss against float64 oracles and diffusers'
FlowMatchEulerDiscreteScheduler, on every backend that runs here (Triton under the interpreter
on the CPU), in fp32 / fp16 / bf16. The 2x rule (tests/oracles.py) against diffusers run in the
input dtype, or against the same math in PyTorch in that dtype."""

import pytest
import torch

from tests.diffusion.common import (
    BACKENDS,
    DEVICE,
    DTYPES,
    LOSS_BACKENDS,
    assert_rule,
    poison_outputs,
    requires_diffusers,
)
from tests.flow.common import add_noise64, diffusers_step, euler64, flow_loss64, rows_of

import transfusion_kernels as tk
from transfusion_kernels import philox

SHAPE = (2, 3, 5)  # elements per row
SIGMAS = [0.0, 1e-3, 0.3, 0.5, 0.97, 1.0]


@pytest.fixture(autouse=True)
def _poison(monkeypatch):
    poison_outputs(monkeypatch)


def rand(R, dtype, scale=1.0):
    return (torch.randn(R, *SHAPE) * scale).to(dtype).to(DEVICE)


def in_dtype(f, dtype, *xs):
    """The same formula in PyTorch in the input dtype (the baseline of the 2x rule)."""
    return f(*(x.to(dtype) if isinstance(x, torch.Tensor) else x for x in xs))


# ---------------------------------------------------------------------------------------------
# against diffusers
# ---------------------------------------------------------------------------------------------


@requires_diffusers
@pytest.mark.parametrize("backend", BACKENDS)
@pytest.mark.parametrize("dtype", DTYPES, ids=str)
def test_add_noise_matches_scale_noise(seed, backend, dtype):
    from diffusers import FlowMatchEulerDiscreteScheduler

    stock = FlowMatchEulerDiscreteScheduler(shift=3.0)
    stock.set_timesteps(8)
    index = torch.tensor([0, 3, 7, 8, 5, 1])  # 8: the terminal sigma 0
    sig = stock.sigmas[index]  # float32, as diffusers reads them
    x0, noise = rand(len(index), dtype, 1.5), rand(len(index), dtype)
    x_t, target = tk.flow_add_noise(x0, sig.to(DEVICE), noise=noise, backend=backend)
    assert x_t.dtype == target.dtype == dtype and x_t.shape == target.shape == x0.shape
    same = torch.cat(
        [
            stock.scale_noise(x0[r : r + 1].cpu(), stock.timesteps[i : i + 1], noise[r : r + 1].cpu())
            for r, i in enumerate(index.clamp(max=7).tolist())
        ]
    )
    same[3] = x0[3].cpu()  # scale_noise has no timestep for the terminal sigma 0: x_t = x0 there
    want, want_target = add_noise64(x0, sig, noise)
    assert_rule(x_t, want, same, "x_t")
    assert_rule(target, want_target, noise.cpu() - x0.cpu(), "target")


@requires_diffusers
@pytest.mark.parametrize("backend", BACKENDS)
@pytest.mark.parametrize("dtype", DTYPES, ids=str)
@pytest.mark.parametrize("stochastic", [False, True], ids=["ode", "stochastic"])
def test_euler_step_matches_diffusers(seed, backend, dtype, stochastic):
    config = dict(shift=3.0, stochastic_sampling=stochastic)
    sample, v, noise = rand(3, dtype, 1.5), rand(3, dtype), rand(3, dtype)
    for index in (0, 4, 9):  # 9: the last step, to sigma 0
        want, s, s_next = diffusers_step(config, v.cpu(), sample.cpu(), index, noise.cpu(), oracle=True)
        same, _, _ = diffusers_step(config, v.cpu(), sample.cpu(), index, noise.cpu(), oracle=False)
        got = tk.flow_euler_step(v, s, s_next, sample, stochastic_sampling=stochastic, noise=noise, backend=backend)
        assert got.dtype == dtype
        assert_rule(got, want, same, f"step {index}")


@requires_diffusers
@pytest.mark.parametrize("backend", BACKENDS)
@pytest.mark.parametrize("dtype", DTYPES, ids=str)
def test_fused_guidance_equals_combine_then_step(seed, backend, dtype):
    """v = u + g (c - u) through the noise slot, against diffusers stepping the combined output."""
    cond, uncond, sample = rand(4, dtype), rand(4, dtype), rand(4, dtype, 1.5)
    g = 4.5
    for index in (0, 6):
        want, s, s_next = diffusers_step(
            {"shift": 3.0},
            uncond.cpu().double() + g * (cond.cpu().double() - uncond.cpu().double()),
            sample.cpu(),
            index,
            None,
            oracle=True,
        )
        same, _, _ = diffusers_step(
            {"shift": 3.0}, uncond.cpu() + g * (cond.cpu() - uncond.cpu()), sample.cpu(), index, None, oracle=False
        )
        got = tk.flow_euler_step(cond, s, s_next, sample, guidance_scale=g, uncond_output=uncond, backend=backend)
        assert_rule(got, want, same, f"guided step {index}")
    # stochastic: combined with one lerp, then the stochastic step, exactly
    noise = rand(4, dtype)
    got = tk.flow_euler_step(
        cond,
        0.6,
        0.4,
        sample,
        stochastic_sampling=True,
        noise=noise,
        guidance_scale=g,
        uncond_output=uncond,
        backend=backend,
    )
    combined = torch.lerp(uncond, cond, g)
    want = tk.flow_euler_step(combined, 0.6, 0.4, sample, stochastic_sampling=True, noise=noise, backend=backend)
    assert torch.equal(got, want)


# ---------------------------------------------------------------------------------------------
# per-row sigmas, edge shapes, float64 oracle
# ---------------------------------------------------------------------------------------------


@pytest.mark.parametrize("backend", BACKENDS)
@pytest.mark.parametrize("dtype", DTYPES, ids=str)
@pytest.mark.parametrize("R", [0, 1, 6])
def test_per_row_sigmas_against_float64(seed, backend, dtype, R):
    sample, v, noise, u = rand(R, dtype, 1.5), rand(R, dtype), rand(R, dtype), rand(R, dtype)
    s = torch.tensor(SIGMAS[:R] if R > 1 else [0.42] * R, dtype=torch.float32)
    s_next = (s * 0.7).clamp(min=0)
    dev = lambda t: t.to(DEVICE)  # noqa: E731

    x_t, target = tk.flow_add_noise(sample, dev(s), noise=noise, backend=backend)
    want, want_t = add_noise64(sample, s, noise)
    assert_rule(
        x_t,
        want,
        in_dtype(
            lambda x, n: (1 - rows_of(s, x).to(dtype)) * x + rows_of(s, x).to(dtype) * n,
            dtype,
            sample.cpu(),
            noise.cpu(),
        ),
        "x_t",
    )
    assert_rule(target, want_t, noise.cpu() - sample.cpu(), "target")

    sd, snd = rows_of(s, sample).to(dtype), rows_of(s_next, sample).to(dtype)
    got = tk.flow_euler_step(v, dev(s), dev(s_next), sample, backend=backend)
    assert_rule(got, euler64(v, s, s_next, sample), sample.cpu() + (snd - sd) * v.cpu(), "ode")
    got = tk.flow_euler_step(v, dev(s), dev(s_next), sample, stochastic_sampling=True, noise=noise, backend=backend)
    same = (1 - snd) * (sample.cpu() - sd * v.cpu()) + snd * noise.cpu()
    assert_rule(got, euler64(v, s, s_next, sample, True, noise), same, "stochastic")
    got = tk.flow_euler_step(v, dev(s), dev(s_next), sample, guidance_scale=2.0, uncond_output=u, backend=backend)
    guided = u.cpu().double() + 2.0 * (v.cpu().double() - u.cpu().double())
    assert_rule(
        got, euler64(guided, s, s_next, sample), sample.cpu() + (snd - sd) * (u.cpu() + 2 * (v.cpu() - u.cpu())), "cfg"
    )


@pytest.mark.parametrize("backend", BACKENDS)
def test_scalar_sigma_is_every_row(seed, backend):
    """A python float (or 0-d tensor) applies to every row (values exact in float32, so a float32
    tensor holds the same numbers)."""
    sample, v, noise = rand(5, torch.float32), rand(5, torch.float32), rand(5, torch.float32)
    rows = torch.full((5,), 0.375, device=DEVICE)
    want = tk.flow_add_noise(sample, rows, noise=noise, backend=backend)
    for sigma in (0.375, torch.tensor(0.375, device=DEVICE), rows.double()):
        got = tk.flow_add_noise(sample, sigma, noise=noise, backend=backend)
        assert torch.equal(got[0], want[0]) and torch.equal(got[1], want[1])
    assert torch.equal(
        tk.flow_euler_step(v, 0.375, 0.125, sample, backend=backend),
        tk.flow_euler_step(v, rows, rows / 3, sample, backend=backend),
    )


@pytest.mark.parametrize("backend", BACKENDS)
def test_nan_stays_where_it_is(seed, backend):
    """A NaN input element gives NaN in exactly the outputs that read it, nowhere else."""
    sample, v, noise, u = (rand(3, torch.float16) for _ in range(4))
    sample.view(3, -1)[0, 4] = float("nan")
    v.view(3, -1)[1, 7] = float("nan")
    noise.view(3, -1)[2, 1] = float("nan")
    nan_at = torch.zeros(3, 30, dtype=torch.bool)
    nan_at[0, 4] = nan_at[1, 7] = True
    outs = {
        "ode": tk.flow_euler_step(v, 0.5, 0.25, sample, backend=backend),
        "cfg": tk.flow_euler_step(v, 0.5, 0.25, sample, guidance_scale=3.0, uncond_output=u, backend=backend),
    }
    x_t, target = tk.flow_add_noise(sample, 0.5, noise=noise, backend=backend)
    stoch = tk.flow_euler_step(v, 0.5, 0.25, sample, stochastic_sampling=True, noise=noise, backend=backend)
    with_noise = nan_at.clone()
    with_noise[2, 1] = True
    for name, out in outs.items():
        assert torch.equal(out.view(3, -1).isnan().cpu(), nan_at), name
    assert torch.equal(stoch.view(3, -1).isnan().cpu(), with_noise)
    x_nan = with_noise.clone()
    x_nan[1, 7] = False  # flow_add_noise does not read v
    assert torch.equal(x_t.view(3, -1).isnan().cpu(), x_nan) and torch.equal(target.view(3, -1).isnan().cpu(), x_nan)


# ---------------------------------------------------------------------------------------------
# in-kernel noise
# ---------------------------------------------------------------------------------------------


@pytest.mark.parametrize("dtype", DTYPES, ids=str)
def test_seeded_noise_across_backends_and_target(seed, dtype):
    """The same seed: the Philox noise on every backend, x_t and the target built from that noise."""
    names = [n for n, info in tk.available_backends(DEVICE).items() if info.available]
    x0 = rand(3, dtype, 1.5)
    s = torch.tensor([0.1, 0.5, 1.0], device=DEVICE)
    key = 2**64 - 999
    eps = torch.finfo(dtype).eps
    noise = philox.randn(key, x0.numel(), device=DEVICE).to(dtype).reshape(x0.shape)
    tol = dict(
        rtol=2 * eps, atol=2e-5 if dtype == torch.float32 else 2 * eps
    )  # float32 noise may differ in the last bits
    for name in names:
        x_t, target = tk.flow_add_noise(x0, s, seed=key, backend=name)
        # x_t and the target of the noise the seed defines (exactly so on the reference)
        given = tk.flow_add_noise(x0, s, noise=noise, backend=name)
        for got, want in zip((x_t, target), given):
            if name == "reference":
                assert torch.equal(got, want)
            else:
                torch.testing.assert_close(got, want, **tol)
        # target + x0 is the drawn noise, up to the rounding of the target to the dtype
        torch.testing.assert_close(target.double() + x0.double(), noise.double(), rtol=eps, atol=tol["atol"])
        stoch = tk.flow_euler_step(x0, 0.7, 0.5, x0 * 2, stochastic_sampling=True, seed=key, backend=name)
        want = tk.flow_euler_step(x0, 0.7, 0.5, x0 * 2, stochastic_sampling=True, noise=noise, backend="reference")
        torch.testing.assert_close(stoch, want, **tol)


def test_seed_none_follows_torch_manual_seed():
    x0 = rand(2, torch.float32)
    torch.manual_seed(5)
    a = tk.flow_add_noise(x0, 0.5)[1]
    torch.manual_seed(5)
    assert torch.equal(a, tk.flow_add_noise(x0, 0.5)[1])
    assert not torch.equal(a, tk.flow_add_noise(x0, 0.5)[1])


# ---------------------------------------------------------------------------------------------
# loss
# ---------------------------------------------------------------------------------------------


@pytest.mark.parametrize("backend", LOSS_BACKENDS)
@pytest.mark.parametrize("dtype", DTYPES, ids=str)
def test_loss_and_gradients_against_float64(seed, backend, dtype):
    P, C = 11, 6
    idx = torch.tensor([0, 0, -1, 2, 2, 2, -1, 5, 0, 2, -1])
    pred, x0, noise = (torch.randn(P, C).to(dtype) for _ in range(3))
    noise[2] = float("nan")  # an ignored row: its NaN must reach neither the loss nor a gradient
    leaves = [t.to(DEVICE).requires_grad_() for t in (pred, x0, noise)]
    loss = tk.flow_loss(*leaves, idx.to(DEVICE), backend=backend)
    loss.backward()
    want = flow_loss64(pred, x0, noise, idx)
    assert loss.dtype == torch.float32
    same = [t.to(dtype).requires_grad_() for t in (pred, x0, noise)]
    keep = idx >= 0
    d = same[0][keep] - (same[2][keep] - same[1][keep])
    base = torch.stack([(d[idx[keep] == m].float() ** 2).mean() for m in (0, 2, 5)]).mean()
    base.backward()
    assert_rule(loss, want[0], base, "loss")
    for got, w, b, name in zip(leaves, want[1:], same, ("pred", "x0", "noise")):
        assert_rule(got.grad, w, torch.where(keep[:, None], b.grad, 0.0), f"d loss / d {name}")


@pytest.mark.parametrize("backend", LOSS_BACKENDS)
def test_loss_edge_cases(backend):
    empty = torch.zeros(0, 3, device=DEVICE)
    assert tk.flow_loss(empty, empty, empty, torch.zeros(0, dtype=torch.long, device=DEVICE), backend=backend) == 0
    x = torch.randn(1, 3, device=DEVICE, requires_grad=True)
    loss = tk.flow_loss(
        x,
        torch.ones(1, 3, device=DEVICE),
        torch.zeros(1, 3, device=DEVICE),
        torch.tensor([7], device=DEVICE),
        backend=backend,
    )
    loss.backward()
    torch.testing.assert_close(loss, ((x.detach() + 1) ** 2).mean())
    torch.testing.assert_close(x.grad, 2 * (x.detach() + 1) / 3)
    no_image = tk.flow_loss(x, x, x, torch.tensor([-1], device=DEVICE), backend=backend)
    assert no_image == 0


def test_loss_equals_diffusion_loss_of_the_target(seed):
    pred, x0, noise = torch.randn(3, 7, 4).unbind(0)
    idx = torch.tensor([0, 1, 1, -1, 0, 2, 2])
    torch.testing.assert_close(tk.flow_loss(pred, x0, noise, idx), tk.diffusion_loss(pred, noise - x0, idx))


# ---------------------------------------------------------------------------------------------
# autograd, torch.compile, errors
# ---------------------------------------------------------------------------------------------


@pytest.mark.parametrize("backend", BACKENDS)
def test_gradients_against_autograd_of_the_oracle(seed, backend):
    sample, v, noise, u = (rand(3, torch.float32) for _ in range(4))
    s, s_next = torch.tensor([0.9, 0.5, 0.2]), torch.tensor([0.6, 0.3, 0.0])
    w1, w2 = torch.randn(3, *SHAPE), torch.randn(3, *SHAPE)
    cases = {
        "add_noise": (
            lambda a, b, c, d: tk.flow_add_noise(a, s.to(DEVICE), noise=c, backend=backend),
            lambda a, b, c, d: add_noise64_autograd(a, s, c),
        ),
        "ode": (
            lambda a, b, c, d: (tk.flow_euler_step(b, s.to(DEVICE), s_next.to(DEVICE), a, backend=backend),),
            lambda a, b, c, d: (a + rows_of(s_next - s, a) * b,),
        ),
        "stochastic": (
            lambda a, b, c, d: (
                tk.flow_euler_step(b, 0.7, 0.4, a, stochastic_sampling=True, noise=c, backend=backend),
            ),
            lambda a, b, c, d: (0.6 * (a - 0.7 * b) + 0.4 * c,),
        ),
        "cfg": (
            lambda a, b, c, d: (
                tk.flow_euler_step(b, 0.7, 0.4, a, guidance_scale=3.0, uncond_output=d, backend=backend),
            ),
            lambda a, b, c, d: (a - 0.3 * (d + 3.0 * (b - d)),),
        ),
    }
    for name, (ours, oracle) in cases.items():
        mine = [x.clone().requires_grad_() for x in (sample, v, noise, u)]
        theirs = [x.detach().cpu().double().requires_grad_() for x in (sample, v, noise, u)]
        outs, refs = ours(*mine), oracle(*theirs)
        sum(((o.cpu() * w).sum() for o, w in zip(outs, (w1, w2)))).backward()
        sum(((o * w.double()).sum() for o, w in zip(refs, (w1, w2)))).backward()
        for a, b, what in zip(mine, theirs, ("sample", "model_output", "noise", "uncond")):
            if b.grad is None:
                assert a.grad is None or not a.grad.any(), f"{name}: d/d {what}"
                continue
            torch.testing.assert_close(a.grad.cpu().double(), b.grad, rtol=1e-5, atol=1e-6, msg=f"{name}: d/d {what}")


def add_noise64_autograd(x0, sigma, noise):
    s = rows_of(sigma, x0)
    return (1 - s) * x0 + s * noise, noise - x0


def test_torch_compile_fullgraph_reference(seed):
    def f(x0, s, v, noise, u, idx):
        x_t, target = tk.flow_add_noise(x0, s, noise=noise, backend="reference")
        a = tk.flow_euler_step(v, s, s * 0.5, x_t, backend="reference")
        b = tk.flow_euler_step(v, 0.8, 0.5, x_t, stochastic_sampling=True, seed=9, backend="reference")
        c = tk.flow_euler_step(v, 0.8, 0.5, x_t, guidance_scale=5.0, uncond_output=u, backend="reference")
        d, _ = tk.flow_add_noise(x0, 0.25, seed=3, backend="reference")
        loss = tk.flow_loss(v.flatten(1), x0.flatten(1), noise.flatten(1), idx, backend="reference")
        return x_t, target, a, b, c, d, loss

    x0, v, noise, u = (torch.randn(4, 3, 2) for _ in range(4))
    s = torch.tensor([0.1, 0.4, 0.7, 1.0])
    idx = torch.tensor([0, 0, 1, -1])
    compiled = torch.compile(f, fullgraph=True)
    for got, want in zip(compiled(x0, s, v, noise, u, idx), f(x0, s, v, noise, u, idx)):
        torch.testing.assert_close(got, want, rtol=1e-6, atol=1e-6)


def test_torch_compile_traces_autograd_without_graph_breaks():
    def f(x0, noise, pred, idx):
        x_t, target = tk.flow_add_noise(x0, 0.3, noise=noise, backend="reference")
        return x_t.square().sum() + target.sum() + tk.flow_loss(pred, x0, noise, idx, backend="reference")

    x0, noise, pred = (torch.randn(4, 6, requires_grad=True) for _ in range(3))
    idx = torch.tensor([0, 1, 1, -1])
    compiled = torch.compile(f, fullgraph=True, backend="aot_eager")
    got = compiled(x0, noise, pred, idx)
    want = f(x0, noise, pred, idx)
    torch.testing.assert_close(got, want)
    for a, b in zip(torch.autograd.grad(got, (x0, noise, pred)), torch.autograd.grad(want, (x0, noise, pred))):
        torch.testing.assert_close(a, b)


def test_bad_inputs_raise_clear_errors():
    x = torch.randn(3, 4)
    idx = torch.tensor([0, 0, 1])
    cases = [
        (lambda: tk.flow_add_noise(x, 1.5), ValueError, r"sigmas must be in \[0, 1\], got 1.5"),
        (lambda: tk.flow_add_noise(x, torch.tensor([0.1, -0.2, 0.3])), ValueError, r"sigmas must be in \[0, 1\]"),
        (
            lambda: tk.flow_add_noise(x, torch.tensor([0.1, float("nan"), 0.3])),
            ValueError,
            r"sigmas must be in \[0, 1\]",
        ),
        (lambda: tk.flow_add_noise(x, torch.tensor([0.1, 0.2])), ValueError, r"shape \[3\]"),
        (lambda: tk.flow_add_noise(x, torch.tensor([1, 0, 1])), TypeError, "floating-point"),
        (lambda: tk.flow_add_noise(x, "0.5"), TypeError, "python float"),
        (lambda: tk.flow_add_noise(x.double(), 0.5), TypeError, "float16, bfloat16 or float32"),
        (lambda: tk.flow_add_noise(x, 0.5, noise=x.half()), TypeError, "dtype of sample"),
        (lambda: tk.flow_add_noise(x, 0.5, seed=-1), ValueError, "seed"),
        (lambda: tk.flow_euler_step(x, 0.5, 0.3, x[:2]), ValueError, "shape of sample"),
        (lambda: tk.flow_euler_step(x, 0.5, 1.3, x), ValueError, r"sigma_next must be in \[0, 1\]"),
        (
            lambda: tk.flow_euler_step(x, torch.tensor([0.5, 2.0, 0.1]), 0.3, x),
            ValueError,
            r"sigma must be in \[0, 1\] in every row",
        ),
        (lambda: tk.flow_euler_step(x, 0.5, 0.3, x, guidance_scale=3.0), ValueError, "pass uncond_output"),
        (lambda: tk.flow_euler_step(x, 0.5, 0.3, x, uncond_output=x), ValueError, "pass guidance_scale"),
        (lambda: tk.flow_euler_step(x, 0.5, 0.3, x, guidance_scale="7", uncond_output=x), TypeError, "guidance_scale"),
        (
            lambda: tk.flow_euler_step(x, 0.5, 0.3, x, guidance_scale=2.0, uncond_output=x[:, :2]),
            ValueError,
            "uncond_output",
        ),
        (lambda: tk.flow_euler_step(x, 0.5, 0.3, x, stochastic_sampling=1), TypeError, "stochastic_sampling"),
        (lambda: tk.flow_loss(x, x, x[:, :2], idx), ValueError, "noise must have the shape of pred"),
        (lambda: tk.flow_loss(x, x.half(), x, idx), TypeError, "x0 must have the dtype of pred"),
        (lambda: tk.flow_loss(x, x, x, idx.float()), TypeError, "image_index"),
        (lambda: tk.flow_loss(x, x, x, torch.tensor([0, -2, 1])), ValueError, ">= -1"),
        (lambda: tk.flow_loss(x[None], x[None], x[None], idx), ValueError, r"\[P, C\]"),
    ]
    for call, exc, match in cases:
        with pytest.raises(exc, match=match):
            call()
