"""Counter-based Gaussian noise shared by every backend.

Element ``e`` of a noise tensor drawn with ``seed`` is a pure function of ``(seed, e)``:

    (c0, c1, _, _) = Philox4x32-10(counter=(e_lo, e_hi, 0, 0), key=(seed_lo, seed_hi))
    u1 = ((c0 >> 8) + 0.5) / 2**24          # in (0, 1): safe for log
    u2 =  (c1 >> 8)        / 2**24          # in [0, 1)
    z  = sqrt(-2 log u1) * cos(2 pi u2)     # Box-Muller

The Triton and CUDA kernels implement the same function (csrc/common/philox.cuh), so the same
seed gives the same noise on every backend up to the rounding of log/cos/sqrt. This module is
the readable reference: int64 tensors hold the uint32 lanes.
"""

from __future__ import annotations

import math

import torch

PHILOX_M0 = 0xD2511F53
PHILOX_M1 = 0xCD9E8D57
PHILOX_W0 = 0x9E3779B9
PHILOX_W1 = 0xBB67AE85
MASK32 = 0xFFFFFFFF


def _mulhilo(a: int, b: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    # a < 2^32 and b < 2^32: the product can exceed int64, so split b into 16-bit halves.
    b_lo, b_hi = b & 0xFFFF, b >> 16
    p_lo = a * b_lo  # < 2^48
    p_hi = a * b_hi  # < 2^48
    lo = (p_lo + ((p_hi & 0xFFFF) << 16)) & MASK32
    hi = (p_hi + (p_lo >> 16)) >> 16
    return hi & MASK32, lo


def philox4x32(counter: tuple[torch.Tensor, ...], seed: int, rounds: int = 10):
    """Philox4x32 on int64 tensors holding uint32 values; returns the four output lanes."""
    c0, c1, c2, c3 = counter
    k0, k1 = seed & MASK32, (seed >> 32) & MASK32
    for _ in range(rounds):
        hi0, lo0 = _mulhilo(PHILOX_M0, c0)
        hi1, lo1 = _mulhilo(PHILOX_M1, c2)
        c0, c1, c2, c3 = hi1 ^ c1 ^ k0, lo1, hi0 ^ c3 ^ k1, lo0
        k0, k1 = (k0 + PHILOX_W0) & MASK32, (k1 + PHILOX_W1) & MASK32
    return c0, c1, c2, c3


def randn(seed: int, numel: int, device: torch.device | str = "cpu", offset: int = 0) -> torch.Tensor:
    """Standard normal float32 noise for flat element indices ``offset .. offset + numel - 1``."""
    if not 0 <= seed < 2**64:
        raise ValueError(f"seed must be in [0, 2**64), got {seed}")
    e = torch.arange(offset, offset + numel, dtype=torch.int64, device=device)
    zero = torch.zeros_like(e)
    c0, c1, _, _ = philox4x32((e & MASK32, (e >> 32) & MASK32, zero, zero), seed)
    u1 = ((c0 >> 8).to(torch.float64) + 0.5) / 2**24
    u2 = (c1 >> 8).to(torch.float64) / 2**24
    z = torch.sqrt(-2.0 * torch.log(u1)) * torch.cos(2.0 * math.pi * u2)
    return z.to(torch.float32)
