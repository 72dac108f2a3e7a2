"""Oracles, layouts and the comparison rule shared by the timestep tests.

The oracle is a float64 implementation written independently of the package (and checked
against diffusers in test_timestep_reference.py). Rule: a result's max error against the oracle
is at most twice that of a baseline PyTorch computation of the same thing (diffusers' eager
modules, or the fp32 reference backend) plus a small floor; NaN never passes.
"""
from __future__ import annotations

import math

import torch

GPU = torch.cuda.is_available()
DEVICE = "cuda" if GPU else "cpu"

# Absolute floors for outputs in these dtypes; gradients (fp32 math) use GRAD_FLOOR * max|oracle|.
FLOOR = {torch.float32: 1e-5, torch.float16: 1e-4, torch.bfloat16: 1e-3}
GRAD_FLOOR = 1e-6

CONFIGS = [  # (flip_sin_to_cos, downscale_freq_shift, scale, max_period)
    (True, 0.0, 1.0, 10000.0),
    (False, 1.0, 1.0, 10000.0),
    (True, 1.0, 1000.0, 10000.0),
    (False, 0.0, 0.5, 100.0),
]


def sinusoid64(t, dim, flip_sin_to_cos, downscale_freq_shift, scale, max_period):
    half = dim // 2
    k = torch.arange(half, dtype=torch.float64, device=t.device)
    freq = torch.exp(-math.log(max_period) * k / (half - downscale_freq_shift))
    arg = scale * t.double()[:, None] * freq[None, :]
    out = torch.zeros(t.shape[0], dim, dtype=torch.float64, device=t.device)
    first, second = (arg.cos(), arg.sin()) if flip_sin_to_cos else (arg.sin(), arg.cos())
    out[:, :half] = first
    out[:, half:2 * half] = second
    return out


def patch_oracle(x, t, idx, weights, freq_dim, cfg):
    """float64 y = x + emb[idx]; differentiable in x and the weights (pass float64 leaves)."""
    e = sinusoid64(t, freq_dim, *cfg)
    if weights is not None:
        w1, b1, w2, b2 = weights
        h = e @ w1.t() + (0 if b1 is None else b1)
        e = torch.nn.functional.silu(h) @ w2.t() + (0 if b2 is None else b2)
    rows = torch.where((idx >= 0)[:, None], e[idx.long().clamp(min=0)], torch.zeros((), dtype=e.dtype, device=e.device))
    return x + rows


def assert_rule(name, got, oracle, baseline, floor):
    got, oracle, baseline = got.double(), oracle.double(), baseline.double()
    assert got.shape == oracle.shape, f"{name}: shape {tuple(got.shape)} != {tuple(oracle.shape)}"
    assert torch.isfinite(got).all(), f"{name}: non-finite values (unwritten or NaN)"
    if got.numel() == 0:
        return
    err = (got - oracle).abs().max().item()
    base = (baseline - oracle).abs().max().item()
    assert err <= 2 * base + floor, f"{name}: error {err:.3g} > 2 x baseline error {base:.3g} + {floor:.3g}"


def grad_floor(oracle):
    return GRAD_FLOOR * max(1.0, oracle.abs().max().item())


# ----------------------------------------------------------------------------- layouts


def make_layout(kind: str, P: int, M: int, gen: torch.Generator) -> torch.Tensor:
    """int32 image_index [P] on the CPU.

    text:     no image tokens (all -1)
    image:    every token is a patch of image 0..M-1, contiguous runs of different sizes
    several:  text, then images of different sizes separated by text (BOI/EOI-like tokens)
    empty:    like several, but image 1 has no patches
    random:   arbitrary indices in [-1, M), no order
    """
    if kind == "text":
        return torch.full((P,), -1, dtype=torch.int32)
    if kind == "random":
        return torch.randint(-1, M, (P,), generator=gen, dtype=torch.int32)
    idx = torch.full((P,), -1, dtype=torch.int32)
    images = [m for m in range(M) if not (kind == "empty" and m == 1)]
    if kind == "image":
        cuts = sorted(torch.randperm(P - 1, generator=gen)[: len(images) - 1].add(1).tolist())
        bounds = [0, *cuts, P]
        for m, (a, b) in zip(images, zip(bounds, bounds[1:])):
            idx[a:b] = m
        return idx
    # several / empty: text gaps of 1-5 tokens, image sizes drawn to fill most of P
    weights = torch.rand(len(images), generator=gen) + 0.2
    budget = P - 6 * (len(images) + 1)
    sizes = (weights / weights.sum() * budget).long().clamp(min=1).tolist()
    pos = int(torch.randint(1, 6, (1,), generator=gen))
    for m, n in zip(images, sizes):
        idx[pos:pos + n] = m
        pos += n + int(torch.randint(1, 6, (1,), generator=gen))
    return idx


def make_mlp(freq_dim, hidden, out, dtype=torch.float32, bias=True, device=DEVICE):
    """(w1, b1, w2, b2) with diffusers-like init scales, never zero."""
    w1 = torch.randn(hidden, freq_dim, device=device) / math.sqrt(freq_dim)
    w2 = torch.randn(out, hidden, device=device) / math.sqrt(hidden)
    b1 = torch.randn(hidden, device=device) * 0.1 if bias else None
    b2 = torch.randn(out, device=device) * 0.1 if bias else None
    return tuple(None if w is None else w.to(dtype) for w in (w1, b1, w2, b2))
