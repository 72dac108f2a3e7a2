"""Reference backend of the diffusion ops: plain PyTorch, fp32 math, the oracle for the kernels.

``affine_step`` is the kernel contract shared by every backend (see the package docstring):

    x0  = c[r,0] * sample + c[r,1] * model_output       # predicted clean sample
    x0  = clamp(x0, -clip_range, clip_range)             # only if clip_range is not None
    out = c[r,2] * x0 + c[r,3] * sample + c[r,4] * model_output + c[r,5] * noise

Drawn noise is ``philox.randn(seed, numel)`` rounded to ``sample.dtype`` *before* it is used, so
the noise returned with ``return_noise=True``, passed back in as ``noise``, gives the same output.
With ``velocity=True`` the second output is instead the flow-matching target ``noise - sample``
(fp32 math, rounded to ``sample.dtype``), for given and drawn noise alike.
"""

from __future__ import annotations

import torch

from transfusion_kernels import philox


def affine_step(sample, model_output, coef, noise, seed, clip_range, return_noise, *, has_noise=True, velocity=False):
    """See the module docstring. ``has_noise=False`` (only meaningful with ``noise=None``) means
    every ``c[:, 5]`` is zero: nothing is drawn (a velocity is then ``-sample``)."""
    R = sample.shape[0]
    L = sample[0].numel() if R else 0  # not reshape(R, -1): ambiguous for zero rows
    s = sample.reshape(R, L).float()
    c = coef.float().reshape(R, 6, 1)
    m = model_output.reshape(R, L).float() if model_output is not None else None

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
        drawn = philox.randn(seed, sample.numel(), device=sample.device).to(sample.dtype).reshape(R, L)
        noise = drawn
    if noise is not None:
        out = out + c[:, 5] * noise.reshape(R, L).float()
    out = out.to(sample.dtype).reshape(sample.shape)
    if velocity:
        target = -s if noise is None else noise.reshape(R, L).float() - s
        return out, target.to(sample.dtype).reshape(sample.shape)
    if return_noise and drawn is not None:
        return out, drawn.reshape(sample.shape)
    return out, None


def diffusion_loss(pred, target, image_index, compute_grad, minus=None):
    """Per-image mean squared error (over the image's patches and channels), averaged over the
    images that have at least one patch; rows with a negative ``image_index`` are ignored.
    With ``minus`` the error is ``pred - (target - minus)`` (the flow-matching velocity target
    ``noise - x0`` without materialising it).

    Returns ``(loss, grad)``: loss a float32 scalar, grad = d loss / d pred in ``pred.dtype``
    (None unless ``compute_grad``); d loss / d target is ``-grad``, d loss / d minus ``grad``."""
    P, C = pred.shape
    target = target.float() if minus is None else target.float() - minus.float()
    diff = pred.float() - target
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
