"""Reference backend of the timestep-embedding ops: plain PyTorch, fp32 math, runs anywhere.

This is the oracle the fast backends are tested against, and the readable statement of the math:

    freq[k]  = exp(-log(max_period) * k / (half - downscale_freq_shift)),  k < half = freq_dim // 2
    s[m]     = [cos(scale * t[m] * freq), sin(scale * t[m] * freq)]  (sin first if not flip_sin_to_cos;
               a zero column appended when freq_dim is odd)          == diffusers get_timestep_embedding
    emb[m]   = linear_2(silu(linear_1(s[m])))   (or s[m] itself without an MLP)
    y[p]     = x[p] + emb[image_index[p]]       (x[p] unchanged where image_index[p] == -1)

Backward: dx = dy; demb[m] = sum of dy[p] over the patches p of image m; then the MLP backward
on the M rows of demb.
"""

from __future__ import annotations

import math

import torch
import torch.nn.functional as F


def frequencies(half: int, downscale_freq_shift: float, max_period: float, device) -> torch.Tensor:
    """fp32 [half]: the angular frequencies, computed with diffusers' exact sequence of fp32 ops so
    that every backend that multiplies by this table reproduces diffusers' arguments bit for bit."""
    exponent = -math.log(max_period) * torch.arange(0, half, dtype=torch.float32, device=device)
    exponent = exponent / (half - downscale_freq_shift)
    return torch.exp(exponent)


def sinusoid(
    timesteps: torch.Tensor,
    dim: int,
    flip_sin_to_cos: bool,
    downscale_freq_shift: float,
    scale: float,
    max_period: float,
) -> torch.Tensor:
    """fp32 [len(timesteps), dim]; the same values as diffusers' get_timestep_embedding."""
    half = dim // 2
    freq = frequencies(half, downscale_freq_shift, max_period, timesteps.device)
    arg = timesteps[:, None].float() * freq[None, :]
    arg = scale * arg
    sin, cos = torch.sin(arg), torch.cos(arg)
    emb = torch.cat([cos, sin] if flip_sin_to_cos else [sin, cos], dim=-1)
    if dim % 2 == 1:
        emb = F.pad(emb, (0, 1))
    return emb


def _f32(t: torch.Tensor | None) -> torch.Tensor | None:
    return None if t is None else t.float()


def embed(timesteps, w1, b1, w2, b2, *, freq_dim, flip_sin_to_cos, downscale_freq_shift, scale, max_period):
    """fp32 [M, D]: one embedding row per image (the sinusoid, then the MLP when w1 is given)."""
    emb = sinusoid(timesteps, freq_dim, flip_sin_to_cos, downscale_freq_shift, scale, max_period)
    if w1 is None:
        return emb
    h = F.silu(F.linear(emb, w1.float(), _f32(b1)))
    return F.linear(h, w2.float(), _f32(b2))


def gather_rows(emb: torch.Tensor, image_index: torch.Tensor) -> torch.Tensor:
    """emb[image_index] with zero rows where image_index == -1 (an appended zero row, so M == 0 and
    an all -1 index need no special case)."""
    m = emb.shape[0]
    padded = torch.cat([emb, emb.new_zeros(1, emb.shape[1])])
    return padded[torch.where(image_index >= 0, image_index, m).long()]


def forward(
    x, timesteps, image_index, w1, b1, w2, b2, *, freq_dim, flip_sin_to_cos, downscale_freq_shift, scale, max_period
):
    emb = embed(
        timesteps,
        w1,
        b1,
        w2,
        b2,
        freq_dim=freq_dim,
        flip_sin_to_cos=flip_sin_to_cos,
        downscale_freq_shift=downscale_freq_shift,
        scale=scale,
        max_period=max_period,
    )
    return (x.float() + gather_rows(emb, image_index)).to(x.dtype)


def segment_sum(dy: torch.Tensor, image_index: torch.Tensor, num_images: int) -> torch.Tensor:
    """fp32 [num_images, D]: row m is the sum of dy over the patches of image m (-1 rows dropped
    into a spare row that is cut off)."""
    target = torch.where(image_index >= 0, image_index, num_images).long()
    out = torch.zeros(num_images + 1, dy.shape[1], dtype=torch.float32, device=dy.device)
    return out.index_add_(0, target, dy.float())[:num_images]


def mlp_backward(demb, timesteps, w1, b1, w2, *, freq_dim, flip_sin_to_cos, downscale_freq_shift, scale, max_period):
    """Gradients (fp32) of sum(demb * linear_2(silu(linear_1(s)))) in w1, b1, w2, b2."""
    s = sinusoid(timesteps, freq_dim, flip_sin_to_cos, downscale_freq_shift, scale, max_period)
    h = F.linear(s, w1.float(), _f32(b1))
    sig = torch.sigmoid(h)
    a = h * sig
    db2 = demb.sum(0)
    dw2 = demb.t() @ a
    da = demb @ w2.float()
    dh = da * (sig * (1 + h * (1 - sig)))  # silu'(h)
    dw1 = dh.t() @ s
    db1 = dh.sum(0)
    return dw1, db1, dw2, db2
