"""Reference backend of the diffusion ops: plain PyTorch, fp32 math, the oracle for the kernels.

``affine_step`` is the kernel contract shared by every backend (see the package docstring):

    x0  = c[r,0] * sample + c[r,1] * model_output       # predicted clean sample
    x0  = clamp(x0, -clip_range, clip_range)             # only if clip_range is not None
    out = c[r,2] * x0 + c[r,3] * sample + c[r,4] * model_output + c[r,5] * noise

Drawn noise is ``philox.randn(seed, numel)`` rounded to ``sample.dtype`` *before* it is used, so
the noise returned with ``return_noise=True``, passed back in as ``noise``, gives the same output.
"""
from __future__ import annotations

import torch

from transfusion_kernels import philox


def affine_step(sample, model_output, coef, noise, seed, clip_range, return_noise, *, has_noise=True):
    """See the module docstring. ``has_noise=False`` (only meaningful with ``noise=None``) means
    every ``c[:, 5]`` is zero: nothing is drawn."""
    R = sample.shape[0]
    s = sample.reshape(R, -1).float()
    c = coef.float().reshape(R, 6, 1)
    m = model_output.reshape(R, -1).float() if model_output is not None else None

    x0 = c[:, 0] * s
    if m is not None:
        x0 = x0 + c[:, 1] * m
    if clip_range is not None:
        x0 = x0.clamp(-clip_range, clip_range)
    out = c[:, 2] * x0 + c[:, 3] * s
    if m is not None:
        out = out + c[:, 4] * m

    drawn = None
    if noise is None and has_noise:
        drawn = philox.randn(seed, sample.numel(), device=sample.device).to(sample.dtype).reshape(R, -1)
        noise = drawn
    if noise is not None:
        out = out + c[:, 5] * noise.reshape(R, -1).float()
    out = out.to(sample.dtype).reshape(sample.shape)
    if return_noise and drawn is not None:
        return out, drawn.reshape(sample.shape)
    return out, None


def diffusion_loss(pred, target, image_index, compute_grad):
    """Per-image mean squared error (over the image's patches and channels), averaged over the
    images that have at least one patch; rows with a negative ``image_index`` are ignored.

    Returns ``(loss, grad)``: loss a float32 scalar, grad = d loss / d pred in ``pred.dtype``
    (None unless ``compute_grad``); d loss / d target is ``-grad``."""
    P, C = pred.shape
    diff = pred.float() - target.float()
    valid = image_index >= 0
    ids, inverse, counts = torch.unique(image_index.long(), return_inverse=True, return_counts=True)
    sse = torch.zeros(ids.numel(), dtype=torch.float32, device=pred.device)
    sse.index_add_(0, inverse, (diff * diff).sum(dim=1))
    per_image = sse / (counts * C)
    keep = ids >= 0
    num_images = int(keep.sum())
    if num_images == 0:
        loss = torch.zeros((), dtype=torch.float32, device=pred.device)
        grad = torch.zeros_like(pred) if compute_grad else None
        return loss, grad
    loss = per_image[keep].sum() / num_images
    grad = None
    if compute_grad:
        scale = 2.0 / (counts[inverse] * C * num_images)
        # where, not a product with 0: an ignored row's NaN must not reach the gradient
        grad = torch.where(valid[:, None], diff * scale[:, None], 0.0).to(pred.dtype)
    return loss, grad
