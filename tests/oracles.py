"""Float64 oracles of every op, written independently of the package, and the 2x rule
(docs/design.md §5) that compares a kernel against them.

The 2x rule: a result's max error against the float64 oracle is at most twice the error of the
same computation done by PyTorch in the same dtype (the baseline) plus a small floor; NaN, inf
where the oracle is finite, and unwritten (NaN-poisoned) elements never pass.
"""

from __future__ import annotations

import math

import torch


def assert_2x(name, got, oracle, baseline, floor, *, neg_inf_exact=False):
    """The 2x rule. ``neg_inf_exact``: -inf must appear exactly where the oracle has it (a log-sum-exp
    of an empty row); those positions are then left out of the error."""
    got, oracle, baseline = (
        got.detach().cpu().double(),
        oracle.detach().cpu().double(),
        baseline.detach().cpu().double(),
    )
    assert got.shape == oracle.shape, f"{name}: shape {tuple(got.shape)} != {tuple(oracle.shape)}"
    if neg_inf_exact:
        empty = oracle == float("-inf")
        assert torch.equal(got == float("-inf"), empty), f"{name}: -inf rows differ from the empty rows"
        got, oracle, baseline = got[~empty], oracle[~empty], baseline[~empty]
    assert torch.isfinite(got).all(), f"{name}: non-finite values (unwritten or NaN)"
    if got.numel() == 0:
        return
    err = (got - oracle).abs().max().item()
    base = (baseline - oracle).abs().max().item()
    assert err <= 2 * base + floor, f"{name}: error {err:.3g} > 2 x baseline error {base:.3g} + {floor:.3g}"


# ---------------------------------------------------------------------------------- attention
def dense_attention(q, k, v, allowed, scale, softcap=None, lse_dtype=None):
    """Plain softmax attention in the inputs' dtype (float64 inputs: the oracle), GQA by head
    repetition; ``allowed`` bool [Nq, Nk]; ``softcap`` c maps scores s to c * tanh(s / c);
    ``lse_dtype``: the log-sum-exp's dtype when not the inputs' (kernels keep it in float32).
    Returns (out [Nq, Hq, D], lse [Hq, Nq]); empty rows give 0 and -inf."""
    g = q.shape[1] // k.shape[1]
    k, v = k.repeat_interleave(g, 1), v.repeat_interleave(g, 1)
    s = torch.einsum("ihd,jhd->hij", q, k) * scale
    if softcap:
        s = softcap * torch.tanh(s / softcap)
    s = s.masked_fill(~allowed, float("-inf"))
    lse = torch.logsumexp(s if lse_dtype is None else s.to(lse_dtype), -1)
    p = torch.softmax(s, -1).nan_to_num(0.0)
    return torch.einsum("hij,jhd->ihd", p, v), lse


# ---------------------------------------------------------------------------------- timestep
def sinusoid64(t, dim, flip_sin_to_cos, downscale_freq_shift, scale, max_period):
    """float64 [len(t), dim]: diffusers' get_timestep_embedding written from its definition."""
    half = dim // 2
    k = torch.arange(half, dtype=torch.float64, device=t.device)
    freq = torch.exp(-math.log(max_period) * k / (half - downscale_freq_shift))
    arg = scale * t.double()[:, None] * freq[None, :]
    out = torch.zeros(t.shape[0], dim, dtype=torch.float64, device=t.device)
    first, second = (arg.cos(), arg.sin()) if flip_sin_to_cos else (arg.sin(), arg.cos())
    out[:, :half] = first
    out[:, half : 2 * half] = second
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


def segment_sum64(dy, idx, num_images):
    """float64 [num_images, D]: row m sums dy over the rows with idx == m (a plain loop)."""
    out = torch.zeros(num_images, dy.shape[1], dtype=torch.float64, device=dy.device)
    for m in range(num_images):
        out[m] = dy[idx == m].double().sum(0)
    return out


# ---------------------------------------------------------------------------------- diffusion
def affine_step64(sample, model_output, coef, noise, clip_range):
    """float64 fused step of the diffusion kernel contract, per row r of ``coef`` [R, 6]:
    x0 = clamp(c0 s + c1 m), out = c2 x0 + c3 s + c4 m + c5 noise."""
    R = sample.shape[0]
    c = coef.detach().cpu().double().reshape(R, 6, *([1] * (sample.dim() - 1)))
    s = sample.detach().cpu().double()
    m = model_output.detach().cpu().double() if model_output is not None else torch.zeros_like(s)
    n = noise.detach().cpu().double() if noise is not None else torch.zeros_like(s)
    x0 = c[:, 0] * s + c[:, 1] * m
    if clip_range is not None:
        x0 = x0.clamp(-clip_range, clip_range)
    return c[:, 2] * x0 + c[:, 3] * s + c[:, 4] * m + c[:, 5] * n


def diffusion_loss64(pred, target, image_index):
    """(loss, d loss / d pred) in float64: the mean squared error of each image (idx >= 0),
    averaged over the images, one image at a time."""
    p = pred.detach().cpu().double().requires_grad_()
    t = target.detach().cpu().double()
    idx = image_index.cpu()
    losses = [((p[idx == m] - t[idx == m]) ** 2).mean() for m in sorted(set(idx.tolist()) - {-1})]
    loss = torch.stack(losses).mean() if losses else p.sum() * 0
    (grad,) = torch.autograd.grad(loss, p)
    return loss.detach(), grad
