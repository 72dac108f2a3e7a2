"""The diffusion custom ops and their backends.

``transfusion_kernels::diffusion_affine_step`` (add_noise, ddpm_step, ddim_step) and
``transfusion_kernels::diffusion_loss``: plain-tensor ``torch.library`` ops with fake
implementations and autograd, so ``torch.compile(fullgraph=True)`` traces the public functions.
The kernel contract every backend implements is in the package docstring.
"""
from typing import Optional

import torch

from transfusion_kernels.backends import Op

_IMPLS = {
    "reference": "transfusion_kernels.diffusion.reference",
    "triton": "transfusion_kernels.diffusion.triton",
    "cuda": "transfusion_kernels.diffusion.cuda",
}
AFFINE_STEP = Op("diffusion_affine_step", _IMPLS)  # add_noise, ddpm_step and ddim_step
LOSS = Op("diffusion_loss", _IMPLS, covers="supports_loss")


@torch.library.custom_op("transfusion_kernels::diffusion_affine_step", mutates_args=())
def affine_step_op(
    sample: torch.Tensor,
    model_output: Optional[torch.Tensor],
    coef: torch.Tensor,
    noise: Optional[torch.Tensor],
    seed: int,
    clip_range: Optional[float],
    return_noise: bool,
    has_noise: bool,
    backend: str,
) -> tuple[torch.Tensor, torch.Tensor]:
    seed = seed % 2**64  # carried as a signed int64 through the op schema
    out, drawn = AFFINE_STEP.module(backend).affine_step(
        sample, model_output, coef, noise, seed, clip_range, return_noise, has_noise=has_noise
    )
    return out, (drawn if drawn is not None else sample.new_empty(0))


@affine_step_op.register_fake
def _(sample, model_output, coef, noise, seed, clip_range, return_noise, has_noise, backend):
    drawn = return_noise and noise is None and has_noise
    return torch.empty_like(sample), (torch.empty_like(sample) if drawn else sample.new_empty(0))


def _affine_setup_context(ctx, inputs, output):
    sample, model_output, coef, noise, _seed, clip_range = inputs[:6]
    ctx.save_for_backward(sample, model_output, coef)
    ctx.clip_range = clip_range
    ctx.noise_given = noise is not None


def _affine_backward(ctx, grad_out, _grad_drawn):
    # The step is linear in (sample, model_output, noise) except for the clamp of x0.
    sample, model_output, coef = ctx.saved_tensors
    R = sample.shape[0]
    g = grad_out.reshape(R, -1).float()
    c = coef.reshape(R, 6, 1)
    grad_x0 = c[:, 2] * g
    if ctx.clip_range is not None:
        x0 = c[:, 0] * sample.reshape(R, -1).float()
        if model_output is not None:
            x0 = x0 + c[:, 1] * model_output.reshape(R, -1).float()
        grad_x0 = grad_x0 * (x0.abs() <= ctx.clip_range)
    grad_sample = (c[:, 0] * grad_x0 + c[:, 3] * g).to(sample.dtype).reshape(sample.shape)
    grad_mo = None
    if model_output is not None:
        grad_mo = (c[:, 1] * grad_x0 + c[:, 4] * g).to(sample.dtype).reshape(sample.shape)
    grad_noise = (c[:, 5] * g).to(sample.dtype).reshape(sample.shape) if ctx.noise_given else None
    return grad_sample, grad_mo, None, grad_noise, None, None, None, None, None


affine_step_op.register_autograd(_affine_backward, setup_context=_affine_setup_context)


@torch.library.custom_op("transfusion_kernels::diffusion_loss", mutates_args=())
def loss_op(
    pred: torch.Tensor, target: torch.Tensor, image_index: torch.Tensor, compute_grad: bool, backend: str
) -> tuple[torch.Tensor, torch.Tensor]:
    loss, grad = LOSS.module(backend).diffusion_loss(pred, target, image_index, compute_grad)
    return loss, (grad if grad is not None else pred.new_empty(0))


@loss_op.register_fake
def _(pred, target, image_index, compute_grad, backend):
    grad = torch.empty_like(pred) if compute_grad else pred.new_empty(0)
    return pred.new_empty((), dtype=torch.float32), grad


def _loss_setup_context(ctx, inputs, output):
    ctx.save_for_backward(output[1])
    ctx.has_grad = inputs[3]  # compute_grad: the public function asks for it whenever autograd needs it


def _loss_backward(ctx, grad_loss, _grad_grad):
    if not ctx.has_grad:
        return None, None, None, None, None
    (unit,) = ctx.saved_tensors  # d loss / d pred, written by the forward pass
    grad_pred = (unit.float() * grad_loss).to(unit.dtype)
    return grad_pred, -grad_pred, None, None, None


loss_op.register_autograd(_loss_backward, setup_context=_loss_setup_context)
