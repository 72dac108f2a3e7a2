"""Layouts, inputs and floors shared by the timestep tests; the oracles (checked against diffusers
in test_timestep_reference.py) and the 2x rule are in tests/oracles.py. The baseline of the rule
is diffusers' eager modules or the fp32 reference backend."""

from __future__ import annotations

import math

import torch

import transfusion_kernels as tk
from tests.oracles import assert_2x as assert_rule  # noqa: F401  (the rule, as the timestep tests name it)
from tests.oracles import patch_oracle, sinusoid64  # noqa: F401

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


def grad_floor(oracle):
    return GRAD_FLOOR * max(1.0, oracle.abs().max().item())


def run(backend, x, t, idx, weights, freq_dim, cfg, dy):
    """y and the gradients in x and the weights, through the public op."""
    x = x.detach().clone().requires_grad_()
    ws = None if weights is None else tuple(None if w is None else w.detach().clone().requires_grad_() for w in weights)
    y = tk.patch_timestep_embedding(
        x,
        t,
        idx,
        ws,
        freq_dim=freq_dim,
        flip_sin_to_cos=cfg[0],
        downscale_freq_shift=cfg[1],
        scale=cfg[2],
        max_period=cfg[3],
        backend=backend,
    )
    leaves = [x, *(w for w in (ws or ()) if w is not None)]
    return y, torch.autograd.grad(y, leaves, dy)


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
        idx[pos : pos + n] = m
        pos += n + int(torch.randint(1, 6, (1,), generator=gen))
    return idx


def make_mlp(freq_dim, hidden, out, dtype=torch.float32, bias=True, device=DEVICE):
    """(w1, b1, w2, b2) with diffusers-like init scales, never zero."""
    w1 = torch.randn(hidden, freq_dim, device=device) / math.sqrt(freq_dim)
    w2 = torch.randn(out, hidden, device=device) / math.sqrt(hidden)
    b1 = torch.randn(hidden, device=device) * 0.1 if bias else None
    b2 = torch.randn(out, device=device) * 0.1 if bias else None
    return tuple(None if w is None else w.to(dtype) for w in (w1, b1, w2, b2))
