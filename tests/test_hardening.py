"""Hardening of the public ops: bad input, non-finite input, and what runs where.

1. Bad input: one test per kind of mistake the op folders' tests do not already cover; each
   must raise ValueError / TypeError naming the argument and what was expected.
2. NaN / inf: they propagate (as NaN, or inf where that is the mathematical value) to exactly
   the outputs they contribute to, on every backend that can run here, and nothing else changes.
3. The fallback policy (README, "Supported shapes and dtypes"): inputs a backend's kernels do not
   cover run on the next backend with one warning per (op, backend, reason).
"""

import math

import pytest
import torch

import transfusion_kernels as tk
from transfusion_kernels.attention import plan
from transfusion_kernels import backends as tk_backends

# numpy under the Triton interpreter notes the NaN these tests make on purpose
pytestmark = [
    pytest.mark.filterwarnings("ignore:All-NaN slice encountered:RuntimeWarning"),
    pytest.mark.filterwarnings("ignore:invalid value encountered:RuntimeWarning"),
]

GPU = torch.cuda.is_available()
DEVICE = torch.device("cuda" if GPU else "cpu")
NAN, INF = float("nan"), float("inf")


def _can_run(name: str) -> bool:
    return tk.available_backends(DEVICE)[name].available


def backends(xfail_reference: str | None = None, xfail_triton: str | None = None, xfail_cuda: str | None = None):
    """Every backend, each skipped where it cannot run; cuda ones are marked gpu. ``xfail_*``:
    a known bug of that backend (strict: the test fails once it is fixed, so the mark goes)."""

    def marks(name, reason):
        m = [pytest.mark.skipif(not _can_run(name), reason=f"{name} cannot run here")]
        return m + ([pytest.mark.xfail(strict=True, reason=reason)] if reason else [])

    return [
        pytest.param("reference", marks=marks("reference", xfail_reference)),
        pytest.param("triton", marks=marks("triton", xfail_triton)),
        pytest.param("cuda", marks=[pytest.mark.gpu, *marks("cuda", xfail_cuda)]),
    ]


@pytest.fixture(autouse=True)
def fresh_warnings(monkeypatch):
    """Each test sees the once-per-process fallback warnings anew."""
    monkeypatch.setattr(tk_backends, "WARNED", set())


# ==============================================================================================
# 1. bad input
# ==============================================================================================
I32 = torch.int32
META = torch.device("meta")
MASK8 = tk.HybridMask.causal(torch.tensor([0, 8], dtype=I32))
Q = torch.randn(8, 2, 16)
KV = torch.randn(8, 1, 16)
SCHED = tk.DiffusionSchedule(num_train_timesteps=100)
X4 = torch.randn(4, 6)
IDX10 = torch.tensor([-1, 0, 0, 1, 1, 1, -1, 2, 2, -1], dtype=I32)


def attn(**kw):
    args = dict(q=Q, k=KV, v=KV, mask=MASK8, backend="reference") | kw
    return lambda: tk.hybrid_attention(args.pop("q"), args.pop("k"), args.pop("v"), args.pop("mask"), **args)


def patch(**kw):
    args = (
        dict(
            x=torch.randn(10, 16),
            timesteps=torch.tensor([1, 50, 999]),
            image_index=IDX10,
            mlp=None,
            freq_dim=16,
            backend="reference",
        )
        | kw
    )
    return lambda: tk.patch_timestep_embedding(
        args.pop("x"), args.pop("timesteps"), args.pop("image_index"), args.pop("mlp"), **args
    )


BAD_INPUT = {
    # HybridMask
    "mask: float token positions are not truncated": (
        lambda: tk.HybridMask.from_spans([0, 4.5], []),
        ValueError,
        "cu_seqlens must hold integers",
    ),
    "mask: python ints beyond int32": (
        lambda: tk.HybridMask.from_intervals([0], [2**31]),
        ValueError,
        "kv_end values must fit in int32",
    ),
    "mask: no integers at all": (lambda: tk.HybridMask.causal(None), ValueError, "cu_seqlens must be integers"),
    "mask: num_keys not an int": (
        lambda: tk.HybridMask.from_intervals([0], [1], num_keys=1.0),
        ValueError,
        "num_keys must be an int",
    ),
    "mask: num_keys negative": (
        lambda: tk.HybridMask.from_intervals([], [], num_keys=-1),
        ValueError,
        "num_keys must be an int in",
    ),
    "mask: 3-D intervals": (
        lambda: tk.HybridMask.from_intervals([[[0]]], [[[1]]]),
        ValueError,
        r"kv_start must be an int32 tensor \[Nq\] or \[Nq, K\]",
    ),
    "mask: constructor checks the intervals": (
        lambda: tk.HybridMask(torch.tensor([0, 2], dtype=I32), torch.tensor([1, 5], dtype=I32), 4),
        ValueError,
        r"query 1: interval \[2, 5\) is invalid: kv_end > num_keys = 4",
    ),
    "mask: constructor checks a monotone claim": (
        lambda: tk.HybridMask(torch.tensor([1, 0], dtype=I32), torch.tensor([2, 2], dtype=I32), 2, monotone=True),
        ValueError,
        "monotone=True, but",
    ),
    "mask: cached lengths are not floats": (
        lambda: tk.HybridMask.cached([2.5], [1]),
        ValueError,
        "cache_lens must hold integers",
    ),
    "mask: cached total beyond int32": (
        lambda: tk.HybridMask.cached([2**31 - 1], [1]),
        ValueError,
        "does not fit in int32",
    ),
    "mask: tile block size": (lambda: plan.query_runs(MASK8, 0), ValueError, "block_m must be a positive int"),
    "mask: key tile block size": (lambda: plan.key_tiles(MASK8, 16.0), ValueError, "block_n must be a positive int"),
    # hybrid_attention
    "attention: no key/value heads": (
        attn(k=torch.randn(8, 0, 16), v=torch.randn(8, 0, 16)),
        ValueError,
        "k must have at least one head",
    ),
    "attention: empty head dim": (
        attn(q=torch.randn(8, 2, 0), k=torch.randn(8, 1, 0), v=torch.randn(8, 1, 0)),
        ValueError,
        "head_dim >= 1",
    ),
    "attention: v head dim differs from k": (
        attn(v=torch.randn(8, 1, 8)),
        ValueError,
        "k and v must have the same shape",
    ),
    "attention: NaN softmax_scale": (attn(softmax_scale=NAN), ValueError, "softmax_scale must be a finite real"),
    "attention: softmax_scale not a number": (attn(softmax_scale="1/8"), ValueError, "softmax_scale must be"),
    "attention: tensors on another device than the mask": (
        attn(q=Q.to(META), k=KV.to(META), v=KV.to(META)),
        ValueError,
        "q is on meta but the mask is on cpu",
    ),
    "attention: not a tensor": (attn(q=Q.tolist()), ValueError, "q must be a 3-D tensor"),
    # timestep
    "timestep_embedding: max_period <= 0": (
        lambda: tk.timestep_embedding(torch.tensor([3]), 8, max_period=0.0),
        ValueError,
        "max_period must be positive",
    ),
    "timestep_embedding: non-finite scale": (
        lambda: tk.timestep_embedding(torch.tensor([3]), 8, scale=INF),
        ValueError,
        "scale must be a finite real",
    ),
    "timestep_embedding: frequency exponent divides by zero": (
        lambda: tk.timestep_embedding(torch.tensor([3]), 8, downscale_freq_shift=4),
        ValueError,
        "downscale_freq_shift must differ from dim // 2 = 4",
    ),
    "patch_timestep_embedding: config": (patch(max_period="1e4"), ValueError, "max_period must be a finite real"),
    "patch_timestep_embedding: timesteps on another device": (
        patch(timesteps=torch.tensor([1, 50, 999], device=META)),
        ValueError,
        "timesteps is on meta but x is on cpu",
    ),
    "patch_timestep_embedding: image_index of a float dtype": (
        patch(image_index=IDX10.float()),
        ValueError,
        "image_index must be an int32 tensor",
    ),
    "TimestepMLP: dims": (lambda: tk.TimestepMLP(16, 0), ValueError, "hidden_dim must be a positive int"),
    "TimestepMLP: input width": (
        lambda: tk.TimestepMLP(16, 8)(torch.randn(3, 15)),
        ValueError,
        r"sample must be a tensor \[\.\.\., freq_dim = 16\]",
    ),
    # diffusion
    "DiffusionSchedule: beta_end": (
        lambda: tk.DiffusionSchedule(beta_end=1.5),
        ValueError,
        r"betas must lie in \(0, 1\]: beta_end = 1.5",
    ),
    "DiffusionSchedule: beta_start not a number": (
        lambda: tk.DiffusionSchedule(beta_start="1e-4"),
        ValueError,
        "beta_start must be a real number",
    ),
    "DiffusionSchedule: trained_betas of complex numbers": (
        lambda: tk.DiffusionSchedule(trained_betas=torch.full((4,), 0.1j)),
        ValueError,
        "trained_betas must hold real",
    ),
    "DiffusionSchedule: zero-SNR rescale of one step": (
        lambda: tk.DiffusionSchedule(1, rescale_betas_zero_snr=True),
        ValueError,
        "num_train_timesteps >= 2",
    ),
    "ddpm_step: clip_sample_range not a number": (
        lambda: tk.ddpm_step(X4, 5, X4, SCHED, clip_sample=True, clip_sample_range="1"),
        ValueError,
        "clip_sample_range must be a positive real number",
    ),
    "ddim_step: eta NaN": (
        lambda: tk.ddim_step(X4, 5, X4, SCHED, prev_timestep=4, eta=NAN),
        ValueError,
        r"eta must be a float in \[0, 1\]",
    ),
    "add_noise: timesteps of a float dtype": (
        lambda: tk.add_noise(X4, torch.full((4,), 5.0), SCHED),
        TypeError,
        "timesteps must be an integer tensor",
    ),
    "add_noise: noise on another device": (
        lambda: tk.add_noise(X4, 5, SCHED, noise=X4.to(META)),
        ValueError,
        "noise must be on the device of sample",
    ),
    "diffusion_loss: image_index on another device": (
        lambda: tk.diffusion_loss(X4, X4, torch.zeros(4, dtype=I32, device=META)),
        ValueError,
        "image_index must be on the device of pred",
    ),
}


@pytest.mark.parametrize("case", list(BAD_INPUT))
def test_bad_input_names_the_argument(case):
    call, error, message = BAD_INPUT[case]
    with pytest.raises(error, match=message):
        call()


def test_python_ints_and_strided_tensors_are_accepted():
    """The other side of the checks: python ints, numpy scalars and non-contiguous int32 tensors
    build the same masks and run the same ops (no copy warnings, no truncation)."""
    import numpy as np
    import warnings

    cu = torch.tensor([0, 0, 5, 0, 12, 0], dtype=I32)[::2]
    assert not cu.is_contiguous()
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        strided = tk.HybridMask.from_spans(cu, torch.tensor([[1, 3], [6, 9]], dtype=I32).t().contiguous().t())
    listed = tk.HybridMask.from_spans([0, 5, 12], [(1, 3), (6, 9)])
    assert torch.equal(strided.to_dense(), listed.to_dense())
    direct = tk.HybridMask(listed.kv_start, listed.kv_end, np.int64(12))
    assert direct.monotone and torch.equal(direct.to_dense(), listed.to_dense())
    assert torch.equal(
        tk.HybridMask.cached(np.array([3]), torch.tensor([2], dtype=torch.int16)).to_dense(),
        tk.HybridMask.cached([3], [2]).to_dense(),
    )
    out = tk.hybrid_attention(Q, KV, KV, MASK8, softmax_scale=np.float32(0.25), backend="reference")
    torch.testing.assert_close(
        out, tk.hybrid_attention(Q, KV, KV, MASK8, softmax_scale=0.25, backend="reference"), rtol=0, atol=0
    )
    x = tk.ddim_step(X4, 5, X4, SCHED, prev_timestep=4, eta=np.float32(0.5), seed=3)
    torch.testing.assert_close(x, tk.ddim_step(X4, 5, X4, SCHED, prev_timestep=4, eta=0.5, seed=3), rtol=0, atol=0)


# ==============================================================================================
# 2. NaN and inf
# ==============================================================================================
def nan_rows(x: torch.Tensor) -> torch.Tensor:
    """bool [N]: the token rows of a [N, ...] tensor that hold a NaN."""
    return torch.isnan(x.float()).reshape(x.shape[0], -1).any(1)


def assert_same_where_finite(got, clean, what):
    """Entries without NaN are exactly the NaN-free run's: a NaN changes nothing else."""
    fin = ~torch.isnan(got)
    assert torch.equal(got[fin], clean[fin]), f"{what}: values away from the NaN differ from the clean run"


def attention_case(backend, poison: str, where: int):
    """Run a two-document Transfusion mask with one NaN element in q, k, v or dout at token
    ``where``, and the same inputs without it; returns (mask, dirty, clean) results."""
    mask = tk.HybridMask.from_spans(
        torch.tensor([0, 40, 70], dtype=I32, device=DEVICE), torch.tensor([[5, 21], [45, 60]], dtype=I32, device=DEVICE)
    )
    g = torch.Generator().manual_seed(7)
    q, k, v, dout = (torch.randn(70, h, 64, generator=g).to(DEVICE, torch.float16) for h in (2, 1, 1, 2))

    def run(q, k, v, dout):
        qq, kk, vv = (t.clone().requires_grad_() for t in (q, k, v))
        out, lse = tk.hybrid_attention(qq, kk, vv, mask, return_lse=True, backend=backend)
        return (out, lse.t(), *torch.autograd.grad(out, (qq, kk, vv), dout))

    clean = run(q, k, v, dout)
    tensors = dict(q=q, k=k, v=v, dout=dout)
    tensors[poison] = tensors[poison].clone()
    tensors[poison][where, 0, 3] = NAN
    return mask.to_dense().cpu(), run(**tensors), clean


@pytest.mark.parametrize("backend", backends())
def test_attention_nan_query_row(backend):
    """NaN in query row 10: out[10] and lse[10] are NaN, every other row is as without it;
    in the gradients it reaches dq[10] and the dk / dv of every key row 10 sees."""
    dense, (out, lse, dq, dk, dv), clean = attention_case(backend, "q", 10)
    only = torch.zeros(70, dtype=torch.bool)
    only[10] = True
    assert torch.equal(nan_rows(out).cpu(), only) and torch.equal(nan_rows(lse).cpu(), only)
    assert nan_rows(dq).cpu()[10] and nan_rows(dk).cpu()[dense[10]].all() and nan_rows(dv).cpu()[dense[10]].all()
    for name, got, c in zip(("out", "lse", "dq", "dk", "dv"), (out, lse, dq, dk, dv), clean):
        assert_same_where_finite(got, c, name)


@pytest.mark.parametrize("backend", backends())
def test_attention_nan_key_row(backend):
    """NaN in key 50: exactly the queries that see key 50 (its image and the later tokens of
    document 2, not tokens 40-44 of the same tile) become NaN."""
    dense, (out, lse, dq, dk, dv), clean = attention_case(backend, "k", 50)
    sees = dense[:, 50]
    assert sees.sum() == 25 and not sees[40:45].any()
    assert torch.equal(nan_rows(out).cpu(), sees) and torch.equal(nan_rows(lse).cpu(), sees)
    assert nan_rows(dq).cpu()[sees].all() and nan_rows(dk).cpu()[50]
    for name, got, c in zip(("out", "lse", "dq", "dk", "dv"), (out, lse, dq, dk, dv), clean):
        assert_same_where_finite(got, c, name)


@pytest.mark.parametrize("backend", backends())
def test_attention_nan_value_row(backend):
    """NaN in value 10 reaches at least every query that sees key 10 (it may reach more, see
    hybrid_attention's docstring); lse does not depend on v."""
    dense, (out, lse, dq, dk, dv), clean = attention_case(backend, "v", 10)
    assert nan_rows(out).cpu()[dense[:, 10]].all()
    assert not nan_rows(lse).any()
    for name, got, c in zip(("out", "lse", "dq", "dk", "dv"), (out, lse, dq, dk, dv), clean):
        assert_same_where_finite(got, c, name)


@pytest.mark.parametrize("backend", backends())
def test_attention_nan_output_gradient(backend):
    """NaN in dout row 10: dq[10] and the dk / dv of the keys row 10 sees; the forward is clean."""
    dense, (out, lse, dq, dk, dv), clean = attention_case(backend, "dout", 10)
    assert not nan_rows(out).any() and not nan_rows(lse).any()
    assert nan_rows(dq).cpu()[10] and nan_rows(dk).cpu()[dense[10]].all() and nan_rows(dv).cpu()[dense[10]].all()
    for name, got, c in zip(("dq", "dk", "dv"), (dq, dk, dv), clean[2:]):
        assert_same_where_finite(got, c, name)


@pytest.mark.parametrize("backend", backends())
def test_attention_inf_query_row(backend):
    """q[30] = inf: its scores are inf - inf = NaN (keys of both signs), so out[30] is NaN; the
    other rows are exact."""
    mask = tk.HybridMask.causal(torch.tensor([0, 20, 48], dtype=I32, device=DEVICE))
    q = torch.randn(48, 2, 64, device=DEVICE, dtype=torch.float16)
    k = torch.randn(48, 1, 64, device=DEVICE, dtype=torch.float16)
    clean = tk.hybrid_attention(q, k, k, mask, backend=backend)
    q[30] = INF
    out = tk.hybrid_attention(q, k, k, mask, backend=backend)
    others = torch.arange(48, device=DEVICE) != 30
    assert torch.equal(out[others], clean[others])
    assert torch.isnan(out[30]).all()


@pytest.mark.parametrize("backend", backends())
def test_attention_without_queries(backend):
    """No queries (an empty batch, no new tokens against a cache): empty out and lse, zero dk/dv."""
    mask = tk.HybridMask.cached([5, 2], [0, 0], device=DEVICE)
    q = torch.randn(0, 2, 64, device=DEVICE, dtype=torch.float16, requires_grad=True)
    k = torch.randn(7, 1, 64, device=DEVICE, dtype=torch.float16, requires_grad=True)
    out, lse = tk.hybrid_attention(q, k, k, mask, return_lse=True, backend=backend)
    assert out.shape == (0, 2, 64) and lse.shape == (2, 0)
    dq, dk = torch.autograd.grad(out, (q, k), torch.zeros_like(out))
    assert dq.shape == q.shape and torch.equal(dk, torch.zeros_like(k))


@pytest.mark.parametrize("backend", backends())
@pytest.mark.parametrize("scale", [0.0, -0.3])
@pytest.mark.filterwarnings("ignore:transfusion_kernels fallback")
def test_attention_scale_zero_or_negative(backend, scale):
    """softmax_scale 0 (uniform weights over the visible keys) and < 0 are plain math: masked
    keys stay out, on every backend."""
    q, k, mask = _attention_inputs(64, torch.float32)
    out, lse = tk.hybrid_attention(q, k, k, mask, softmax_scale=scale, return_lse=True, backend=backend)
    allowed = mask.to_dense()
    s = torch.einsum("ihd,jd->hij", q.double(), k[:, 0].double()) * scale
    s = s.masked_fill(~allowed, float("-inf"))
    torch.testing.assert_close(lse.double(), torch.logsumexp(s, -1), rtol=1e-5, atol=1e-5)
    ref = torch.einsum("hij,jd->ihd", torch.softmax(s, -1), k[:, 0].double())
    torch.testing.assert_close(out.double(), ref, rtol=1e-5, atol=1e-5)


def timestep_case(backend, dtype=torch.float32):
    g = torch.Generator().manual_seed(3)
    P, D, F = 12, 16, 8
    idx = torch.tensor([-1, 0, 0, 0, -1, 1, 1, 1, 2, 2, -1, -1], dtype=I32, device=DEVICE)
    mlp = tk.TimestepMLP(F, 24, D).to(DEVICE)
    x = torch.randn(P, D, generator=g).to(DEVICE, dtype)
    t = torch.tensor([5.0, 300.0, 999.0], device=DEVICE)
    return x, t, idx, mlp, F


@pytest.mark.parametrize("backend", backends())
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16], ids=str)
def test_timestep_non_finite_x(backend, dtype):
    x, t, idx, _, _ = timestep_case(backend, dtype)
    D = x.shape[1]
    clean = tk.patch_timestep_embedding(x, t, idx, None, freq_dim=D, backend=backend)
    x = x.clone()
    x[2, 3], x[4, 0], x[6, 5] = NAN, INF, -INF  # an image row, two text rows
    y = tk.patch_timestep_embedding(x, t, idx, None, freq_dim=D, backend=backend)
    assert torch.isnan(y).nonzero().tolist() == [[2, 3]]
    assert y[4, 0] == INF and y[6, 5] == -INF
    poisoned = torch.zeros_like(y, dtype=torch.bool)
    poisoned[2, 3] = poisoned[4, 0] = poisoned[6, 5] = True
    assert torch.equal(y[~poisoned], clean[~poisoned])


@pytest.mark.parametrize("backend", backends())
def test_timestep_non_finite_timesteps_and_weights(backend):
    """A NaN or inf timestep makes its image's rows NaN (sin(inf) is NaN), nothing else; a NaN
    MLP weight reaches every patch but never a text row."""
    x, t, idx, mlp, F = timestep_case(backend)
    clean = tk.patch_timestep_embedding(x, t, idx, mlp, freq_dim=F, backend=backend)
    y = tk.patch_timestep_embedding(
        x, torch.tensor([5.0, NAN, INF], device=DEVICE), idx, mlp, freq_dim=F, backend=backend
    )
    bad = (idx == 1) | (idx == 2)
    assert torch.equal(nan_rows(y), bad) and torch.isnan(y[bad]).all()
    assert torch.equal(y[~bad], clean[~bad])
    with torch.no_grad():
        mlp.linear_1.weight[0, 0] = NAN
    y = tk.patch_timestep_embedding(x, t, idx, mlp, freq_dim=F, backend=backend)
    assert torch.equal(nan_rows(y), idx >= 0)
    assert torch.equal(y[idx < 0], x[idx < 0])


@pytest.mark.parametrize("backend", backends())
def test_timestep_nan_gradient(backend):
    """dx = dy, NaN included; a NaN in the gradient of a text row never reaches the weights,
    one in an image row reaches each weight through that image."""
    x, t, idx, mlp, F = timestep_case(backend)
    x = x.requires_grad_()
    y = tk.patch_timestep_embedding(x, t, idx, mlp, freq_dim=F, backend=backend)
    for row, reaches in ((0, False), (5, True)):
        dy = torch.randn_like(y)
        dy[row, 1] = NAN
        dx, *dw = torch.autograd.grad(y, [x, *mlp.parameters()], dy, retain_graph=True)
        assert torch.equal(torch.isnan(dx), torch.isnan(dy))
        assert [bool(torch.isnan(g).any()) for g in dw] == [reaches] * 4


def diffusion_inputs(dtype=torch.float32):
    g = torch.Generator().manual_seed(11)
    s, m, n = (torch.randn(4, 6, generator=g).to(DEVICE, dtype) for _ in range(3))
    return s, m, n, torch.tensor([3, 10, 50, 99], device=DEVICE)


@pytest.mark.parametrize("backend", backends())
@pytest.mark.parametrize("clip", [False, True], ids=["noclip", "clip"])
@pytest.mark.parametrize("op", ["add_noise", "ddpm", "ddim"])
def test_diffusion_nan_stays_in_its_element(backend, clip, op):
    """The updates are elementwise: a NaN in sample, model_output or noise gives NaN in that
    element only, also through the clamp of x0 (clamp(NaN) is NaN)."""
    s, m, n, t = diffusion_inputs()

    def run(s, m, n):
        if op == "add_noise":
            return tk.add_noise(s, t, SCHED, noise=n, backend=backend)[0]
        if op == "ddpm":
            return tk.ddpm_step(m, t, s, SCHED, noise=n, clip_sample=clip, backend=backend)
        return tk.ddim_step(m, t, s, SCHED, prev_timestep=t - 3, eta=0.5, noise=n, clip_sample=clip, backend=backend)

    clean = run(s, m, n)
    s, m, n = s.clone(), m.clone(), n.clone()
    s[0, 1], n[3, 4] = NAN, NAN
    expect = [[0, 1], [3, 4]]
    if op != "add_noise":
        m[2, 5] = NAN
        expect = [[0, 1], [2, 5], [3, 4]]
    out = run(s, m, n)
    assert torch.isnan(out).nonzero().tolist() == expect
    assert_same_where_finite(out, clean, op)


ZERO_TIMES_INF = (
    "the fused step adds every term of c0..c5 even where a coefficient is 0 "
    "(add_noise: c3 * sample with c3 = 0), so inf in x0 gives 0 * inf = NaN, not inf"
)


@pytest.mark.parametrize("backend", backends(ZERO_TIMES_INF, ZERO_TIMES_INF, ZERO_TIMES_INF))
def test_diffusion_inf_sample(backend):
    """inf in x0 is inf in x_t (sqrt(abar) > 0), in that element only, as in diffusers."""
    s, m, n, t = diffusion_inputs()
    s[1, 2] = INF
    x_t, _ = tk.add_noise(s, t, SCHED, noise=n, backend=backend)
    assert x_t[1, 2] == INF
    x_t[1, 2] = 0
    assert torch.isfinite(x_t).all()


def loss_case(backend, row):
    g = torch.Generator().manual_seed(5)
    pred, target = torch.randn(6, 3, generator=g).to(DEVICE), torch.randn(6, 3, generator=g).to(DEVICE)
    idx = torch.tensor([-1, 0, 0, 1, -1, 1], dtype=I32, device=DEVICE)
    clean = tk.diffusion_loss(pred, target, idx, backend=backend)
    pred = pred.clone()
    pred[row, 1] = NAN
    p = pred.requires_grad_()
    loss = tk.diffusion_loss(p, target, idx, backend=backend)
    loss.backward()
    return clean, loss, p.grad


@pytest.mark.parametrize("backend", backends()[:2])  # no CUDA C++ kernel
def test_loss_nan_in_an_image_row(backend):
    clean, loss, grad = loss_case(backend, 3)
    assert math.isnan(loss.item()) and math.isfinite(clean.item())
    assert nan_rows(grad).nonzero().flatten().tolist() == [3]


@pytest.mark.parametrize("backend", backends()[:2])
def test_loss_ignores_nan_in_a_row_that_is_not_an_image(backend):
    clean, loss, _ = loss_case(backend, 4)
    assert loss.item() == clean.item()


@pytest.mark.parametrize("backend", backends()[:2])
def test_loss_gradient_of_an_ignored_nan_row_is_zero(backend):
    _, _, grad = loss_case(backend, 4)
    assert torch.equal(grad[4], torch.zeros(3, device=DEVICE))


# ==============================================================================================
# 3. fallback policy
# ==============================================================================================
def _attention_inputs(d, dtype, n=24):
    mask = tk.HybridMask.from_spans(
        torch.tensor([0, n], dtype=I32, device=DEVICE), torch.tensor([[3, 11]], dtype=I32, device=DEVICE)
    )
    q = torch.randn(n, 2, d, device=DEVICE).to(dtype)
    k = torch.randn(n, 1, d, device=DEVICE).to(dtype)
    return q, k, mask


@pytest.mark.skipif(not _can_run("triton"), reason="triton cannot run here")
def test_triton_head_dim_beyond_256_is_refused_by_name_and_runs_under_auto():
    q, k, mask = _attention_inputs(264, torch.float16)
    with pytest.raises(
        tk.BackendUnavailableError,
        match=r"backend 'triton' does not cover these inputs: "
        r"torch.float16 with head dim 264",
    ):
        tk.hybrid_attention(q, k, k, mask, backend="triton")
    import warnings

    with warnings.catch_warnings():
        warnings.simplefilter("ignore")  # auto on a GPU warns when it ends on the reference
        out = tk.hybrid_attention(q, k, k, mask, backend="auto")
    torch.testing.assert_close(out, tk.hybrid_attention(q, k, k, mask, backend="reference"), rtol=0, atol=0)


@pytest.mark.skipif(GPU, reason="auto picks the reference only on a CPU")
def test_auto_on_the_cpu_never_warns():
    import warnings

    q, k, mask = _attention_inputs(264, torch.float32)
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        tk.hybrid_attention(q, k, k, mask)
        tk.diffusion_loss(X4, X4, torch.zeros(4, dtype=I32))


@pytest.mark.parametrize("dtype,d", [(torch.float32, 64), (torch.float16, 96)], ids=["fp32", "d96"])
def test_cuda_attention_refuses_what_its_kernels_do_not_cover(dtype, d, monkeypatch):
    """Asked by name, the cuda backend refuses a dtype or head dim its kernels do not cover in one
    error naming it (here with the backend faked available; no GPU needed); with
    TRANSFUSION_CUDA_ATTENTION_FALLBACK=0 that is a ValueError."""
    from transfusion_kernels.attention import cuda as tkc

    real = tk_backends.backend_info
    monkeypatch.setattr(
        tk_backends,
        "backend_info",
        lambda name, device: tk_backends.BackendInfo(name, True, "faked") if name == "cuda" else real(name, device),
    )
    q, k, mask = _attention_inputs(d, dtype)
    with pytest.raises(
        tk.BackendUnavailableError, match=f"backend 'cuda' does not cover these inputs: {dtype} with head dim {d}"
    ):
        tk.hybrid_attention(q, k, k, mask, backend="cuda")
    monkeypatch.setenv(tkc.FALLBACK_ENV, "0")
    with pytest.raises(ValueError, match=f"head dim {d}"):
        tk.hybrid_attention(q, k, k, mask, backend="cuda")


def test_diffusion_loss_has_no_cuda_kernel(monkeypatch):
    """diffusion_loss has no CUDA C++ kernel: asked for by name (argument or use_backend), the
    cuda backend raises saying so, wherever it could run; auto runs it."""
    pred, target = torch.randn(6, 3, device=DEVICE), torch.randn(6, 3, device=DEVICE)
    idx = torch.tensor([-1, 0, 0, 1, -1, 1], dtype=I32, device=DEVICE)
    real = tk_backends.backend_info
    monkeypatch.setattr(
        tk_backends,
        "backend_info",
        lambda name, device: tk_backends.BackendInfo(name, True, "faked") if name == "cuda" else real(name, device),
    )
    with pytest.raises(tk.BackendUnavailableError, match="diffusion_loss: backend 'cuda'.*no CUDA C\\+\\+ kernel"):
        tk.diffusion_loss(pred, target, idx, backend="cuda")
    with tk.use_backend("cuda"), pytest.raises(tk.BackendUnavailableError, match="no CUDA"):
        tk.diffusion_loss(pred, target, idx)
    auto = tk.diffusion_loss(pred, target, idx, backend="auto")
    assert auto.item() == tk.diffusion_loss(pred, target, idx, backend="reference").item()


@pytest.mark.gpu
@pytest.mark.skipif(not _can_run("cuda"), reason="cuda cannot run here")
def test_gpu_auto_beyond_every_kernel_warns_and_runs_the_reference():
    q, k, mask = _attention_inputs(320, torch.bfloat16)
    with pytest.warns(UserWarning, match="running on 'reference'"):
        out = tk.hybrid_attention(q, k, k, mask)
    torch.testing.assert_close(out, tk.hybrid_attention(q, k, k, mask, backend="reference"), rtol=0, atol=0)
