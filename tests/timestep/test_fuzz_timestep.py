"""patch_timestep_embedding on random layouts, widths, dtypes, timesteps and sinusoid/MLP
configurations: every kernel backend against a float64 oracle with the reference backend as the
PyTorch baseline of the 2x rule (as tests/timestep/test_timestep_triton.py), forward and the
gradients in x and the MLP weights; the reference itself against the oracle with diffusers'
eager modules as the baseline (as tests/timestep/test_timestep_reference.py)."""

from __future__ import annotations

import pytest
import torch
from hypothesis import given
from hypothesis import strategies as st

from tests.fuzzing import DEVICE, FAST_BACKENDS, budget, poisoned, small_tiles
from tests.timestep.common import FLOOR, assert_rule, grad_floor, patch_oracle, run, sinusoid64

X_DTYPES = [torch.float32, torch.float16, torch.bfloat16]
T_DTYPES = [torch.int64, torch.int32, torch.float32, torch.float64]


@st.composite
def cases(draw):
    P, M = draw(st.integers(1, 90)), draw(st.integers(0, 5))
    if M == 0 or draw(st.booleans()):  # unordered indices, text rows anywhere
        idx = draw(st.lists(st.integers(-1, M - 1), min_size=P, max_size=P))
    else:  # runs of patches, the text rows (-1) in one run somewhere, like a packed batch
        idx = sorted(draw(st.lists(st.integers(-1, M - 1), min_size=P, max_size=P)))
        shift = draw(st.integers(0, P - 1))
        idx = idx[shift:] + idx[:shift]
    with_mlp = draw(st.booleans())
    D = draw(st.integers(1, 96))
    # the sinusoid's parameters; downscale_freq_shift never equals freq_dim // 2 (refused)
    flip, shift = draw(st.booleans()), draw(st.sampled_from([0.0, 1.0]))
    scale, max_period = draw(st.sampled_from([(1.0, 10000.0), (1000.0, 10000.0), (0.5, 100.0)]))
    F = draw(st.integers(1, 48)) if with_mlp else D
    if F // 2 == shift and F // 2 > 0:
        shift = 0.0
    t_dtype = draw(st.sampled_from(T_DTYPES))
    t_max = 1.0 if scale > 1 else 1000.0  # scale=1000 configs take t in [0, 1)
    if t_dtype.is_floating_point:
        t = draw(st.lists(st.floats(0, t_max, allow_nan=False, width=32), min_size=M, max_size=M))
    else:
        t = draw(st.lists(st.integers(0, int(t_max) - 1 if t_max > 1 else 0), min_size=M, max_size=M))
    return dict(
        P=P,
        M=M,
        D=D,
        F=F,
        idx=idx,
        t=torch.tensor(t, dtype=t_dtype),
        cfg=(flip, shift, scale, max_period),
        H=draw(st.integers(1, 64)) if with_mlp else None,
        bias=draw(st.booleans()),
        x_dtype=draw(st.sampled_from(X_DTYPES)),
        w_dtype=draw(st.sampled_from(X_DTYPES)),
        seed=draw(st.integers(0, 2**31 - 1)),
    )


def weights_for(c, g):
    if c["H"] is None:
        return None
    F, H, D = c["F"], c["H"], c["D"]
    w1 = torch.randn(H, F, generator=g) / F**0.5
    w2 = torch.randn(D, H, generator=g) / H**0.5
    b1 = torch.randn(H, generator=g) * 0.1 if c["bias"] else None
    b2 = torch.randn(D, generator=g) * 0.1 if c["bias"] else None
    return tuple(None if w is None else w.to(DEVICE, c["w_dtype"]) for w in (w1, b1, w2, b2))


def oracle64(x, t, idx, w64, freq_dim, cfg):
    """float64 y (patch_oracle; with no image at all, y = x and zero weight gradients)."""
    if t.shape[0]:
        return patch_oracle(x.double(), t, idx, w64, freq_dim, cfg)
    return x.double() + sum((w * 0).sum() for w in (w64 or ()) if w is not None)


def weight_floor(oracle, w_dtype, bound=None):
    """The op tests' floor; at least one fp32 rounding of ``bound``, the same gradient computed
    on absolute values (the scale of an fp32 sum's error, whatever its order: with cancellation,
    as in demb @ w2, the reference and a kernel summing in another order differ by luck)."""
    floor = grad_floor(oracle) if w_dtype == torch.float32 else FLOOR[w_dtype] * max(1.0, oracle.abs().max().item())
    return floor if bound is None else max(floor, torch.finfo(torch.float32).eps * bound.abs().max().item())


def weight_grad_bounds(t, idx, weights, dy, freq_dim, cfg):
    """|dw1|, |db1|, |dw2|, |db2| summed term by term in float64 (absolute values throughout)."""
    w1, b1, w2, _ = (None if w is None else w.detach().double() for w in weights)
    s = sinusoid64(t, freq_dim, *cfg)
    h = s @ w1.t() + (0 if b1 is None else b1)
    sig = torch.sigmoid(h)
    dsilu, a = (sig * (1 + h * (1 - sig))).abs(), (h * sig).abs()
    rows = idx.long() >= 0
    demb = torch.zeros(t.shape[0], dy.shape[1], dtype=torch.float64, device=dy.device)
    demb.index_add_(0, idx.long()[rows], dy.double().abs()[rows])
    dh = (demb @ w2.abs()) * dsilu
    bounds = [dh.t() @ s.abs(), dh.sum(0), demb.t() @ a, demb.sum(0)]
    return [b for b, w in zip(bounds, weights) if w is not None]


@budget(50)
@given(c=cases())
def test_kernels_against_float64(c):
    g = torch.Generator().manual_seed(c["seed"])
    x = torch.randn(c["P"], c["D"], generator=g).to(DEVICE, c["x_dtype"])
    dy = torch.randn(c["P"], c["D"], generator=g).to(DEVICE, c["x_dtype"])
    t, idx = c["t"].to(DEVICE), torch.tensor(c["idx"], dtype=torch.int32, device=DEVICE)
    weights = weights_for(c, g)
    y_ref, grads_ref = run("reference", x, t, idx, weights, c["F"], c["cfg"], dy)
    w64 = None if weights is None else [None if w is None else w.double().requires_grad_() for w in weights]
    y64 = oracle64(x, t, idx, w64, c["F"], c["cfg"])
    live = [w for w in (w64 or ()) if w is not None]
    oracle_grads = torch.autograd.grad(y64, live, dy.double()) if live else ()
    bounds = weight_grad_bounds(t, idx, weights, dy, c["F"], c["cfg"]) if live and c["M"] else [None] * 4
    for backend in FAST_BACKENDS:
        with poisoned("timestep"), small_tiles("timestep"):
            y, grads = run(backend, x, t, idx, weights, c["F"], c["cfg"], dy)
        assert y.dtype == x.dtype and y.shape == x.shape
        assert_rule(f"{backend} y", y, y64, y_ref, FLOOR[c["x_dtype"]])
        assert torch.equal(grads[0], dy), "dx must be dy"
        for i, (gr, r, o, bound) in enumerate(zip(grads[1:], grads_ref[1:], oracle_grads, bounds)):
            assert gr.dtype == c["w_dtype"] and gr.shape == live[i].shape
            assert_rule(f"{backend} weight grad {i}", gr, o, r, weight_floor(o, c["w_dtype"], bound))


try:
    from diffusers.models.embeddings import get_timestep_embedding
except ImportError:  # the GPU images ship without diffusers
    get_timestep_embedding = None


@pytest.mark.skipif(get_timestep_embedding is None, reason="the reference's baseline is diffusers")
@budget(50)
@given(c=cases())
def test_reference_against_float64(c):
    """The reference vs the oracle, with diffusers' modules run in the inputs' dtypes as the
    baseline: what a diffusers-based model computes eagerly."""
    g = torch.Generator().manual_seed(c["seed"])
    x = torch.randn(c["P"], c["D"], generator=g).to(DEVICE, c["x_dtype"])
    dy = torch.randn(c["P"], c["D"], generator=g).to(DEVICE, c["x_dtype"])
    t, idx = c["t"].to(DEVICE), torch.tensor(c["idx"], dtype=torch.int32, device=DEVICE)
    weights = weights_for(c, g)
    y, grads = run("reference", x, t, idx, weights, c["F"], c["cfg"], dy)
    w64 = None if weights is None else [None if w is None else w.double().requires_grad_() for w in weights]
    y64 = oracle64(x, t, idx, w64, c["F"], c["cfg"])

    # baseline: diffusers' sinusoid (fp32), the MLP in the weights' dtype, the add in x's dtype
    wl = None if weights is None else [None if w is None else w.detach().clone().requires_grad_() for w in weights]
    e = get_timestep_embedding(t, c["F"], *c["cfg"])
    if wl is not None:
        w1, b1, w2, b2 = wl
        e = torch.nn.functional.linear(
            torch.nn.functional.silu(torch.nn.functional.linear(e.to(w1.dtype), w1, b1)), w2, b2
        )
    rows = e.to(x.dtype)[idx.long().clamp(min=0)] if c["M"] else torch.zeros_like(x)
    y_base = x + torch.where((idx >= 0)[:, None], rows, torch.zeros((), dtype=x.dtype, device=DEVICE))
    assert_rule("y", y, y64, y_base, FLOOR[c["x_dtype"]])
    live = [w for w in (w64 or ()) if w is not None]
    if live and not c["M"]:  # no image: nothing reaches the weights
        assert all(torch.count_nonzero(gr) == 0 for gr in grads[1:])
    elif live:
        oracle = torch.autograd.grad(y64, live, dy.double())
        leaves = [w for w in wl if w is not None]
        base = torch.autograd.grad(y_base, leaves, dy)
        bounds = weight_grad_bounds(t, idx, weights, dy, c["F"], c["cfg"])
        for i, (gr, o, b, bound) in enumerate(zip(grads[1:], oracle, base, bounds)):
            assert_rule(f"weight grad {i}", gr, o, b, weight_floor(o, c["w_dtype"], bound))
