"""The diffusion custom ops and their backends.

``transfusion_kernels::diffusion_affine_step`` (add_noise, ddpm_step, ddim_step and the flow ops
flow_add_noise, flow_euler_step) and ``transfusion_kernels::diffusion_loss`` (diffusion_loss and
flow_loss): plain-tensor ``torch.library`` ops with fake
implementations and autograd, so ``torch.compile(fullgraph=True)`` traces the public functions.
The kernel contract every backend implements is in the package docstring, plus two operands of
the flow-matching ops (``transfusion_kernels.flow``): ``velocity`` (affine step: the second output
is ``noise - sample``, fp32 math rounded to the dtype, for given and drawn noise alike) and
``minus`` (loss: the error is ``pred - (target - minus)``). Both default to off, so the diffusion
ops call the same schema as before.
"""

from typing import Optional

import torch

from transfusion_kernels.backends import Op
from transfusion_kernels.diffusion.validation import check_like, check_seed, fresh_seed

_IMPLS = {
    "reference": "transfusion_kernels.diffusion.reference",
    "triton": "transfusion_kernels.diffusion.triton",
    "cuda": "transfusion_kernels.diffusion.cuda",
}
AFFINE_STEP = Op("diffusion_affine_step", _IMPLS)  # add_noise, ddpm_step, ddim_step and the flow steps
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
    velocity: bool = False,
) -> tuple[torch.Tensor, torch.Tensor]:
    """Second output: the drawn noise (if asked for), or ``noise - sample`` with ``velocity``."""
    seed = seed % 2**64  # carried as a signed int64 through the op schema
    out, second = AFFINE_STEP.module(backend).affine_step(
        sample, model_output, coef, noise, seed, clip_range, return_noise, has_noise=has_noise, velocity=velocity
    )
    return out, (second if second is not None else sample.new_empty(0))


@affine_step_op.register_fake
def _(sample, model_output, coef, noise, seed, clip_range, return_noise, has_noise, backend, velocity=False):
    second = velocity or (return_noise and noise is None and has_noise)
    return torch.empty_like(sample), (torch.empty_like(sample) if second else sample.new_empty(0))


def _affine_setup_context(ctx, inputs, output):
    sample, model_output, coef, noise, _seed, clip_range = inputs[:6]
    ctx.save_for_backward(sample, model_output, coef)
    ctx.clip_range = clip_range
    ctx.noise_given = noise is not None
    ctx.velocity = inputs[9]  # defaults are filled in: inputs has every argument


def _affine_backward(ctx, grad_out, grad_second):
    # The step is linear in (sample, model_output, noise) except for the clamp of x0; the
    # velocity noise - sample adds +grad to noise and -grad to sample (drawn noise has none).
    sample, model_output, coef = ctx.saved_tensors
    R = sample.shape[0]
    L = sample[0].numel() if R else 0  # not reshape(R, -1): ambiguous for zero rows
    g = grad_out.reshape(R, L).float()
    c = coef.reshape(R, 6, 1)
    grad_x0 = c[:, 2] * g
    if ctx.clip_range is not None:
        x0 = c[:, 0] * sample.reshape(R, L).float()
        if model_output is not None:
            x0 = x0 + c[:, 1] * model_output.reshape(R, L).float()
        grad_x0 = grad_x0 * (x0.abs() <= ctx.clip_range)
    grad_sample = (c[:, 0] * grad_x0 + c[:, 3] * g).reshape(sample.shape)
    grad_mo = None
    if model_output is not None:
        grad_mo = (c[:, 1] * grad_x0 + c[:, 4] * g).to(sample.dtype).reshape(sample.shape)
    grad_noise = (c[:, 5] * g).reshape(sample.shape) if ctx.noise_given else None
    if ctx.velocity and grad_second is not None and grad_second.numel():
        v = grad_second.float()
        grad_sample = grad_sample - v
        grad_noise = grad_noise + v if grad_noise is not None else None
    grad_sample = grad_sample.to(sample.dtype).reshape(sample.shape)
    grad_noise = grad_noise.to(sample.dtype) if grad_noise is not None else None
    return grad_sample, grad_mo, None, grad_noise, None, None, None, None, None, None


affine_step_op.register_autograd(_affine_backward, setup_context=_affine_setup_context)


def run_affine_step(
    name, sample, model_output, coef, noise, seed, clip_range, has_noise, *, velocity=False, return_noise=False
):
    """The affine-step op with the public functions' noise rules (every diffusion and flow op
    runs through it): a given ``noise`` is checked against ``sample``; without it a seed is drawn
    from torch's default generator (under torch.compile, ``torch.randn_like`` noise, which
    traces); ``has_noise=False`` draws nothing. Returns ``out``; ``(out, noise - sample)`` with
    ``velocity``; ``(out, the noise given or drawn)`` with ``return_noise``."""
    if noise is not None:
        check_like(noise, "noise", sample, "sample")
        noise = noise.contiguous()
    seed = check_seed(seed)
    if not has_noise:
        noise, seed = None, 0
    elif noise is None and seed is None:
        if torch.compiler.is_compiling():
            noise = torch.randn_like(sample)  # a traced draw; Philox needs a concrete seed
        else:
            seed = fresh_seed()
    seed = 0 if seed is None else seed
    out, second = affine_step_op(
        sample.contiguous(),
        model_output.contiguous() if model_output is not None else None,
        coef,
        noise,
        seed - 2**64 if seed >= 2**63 else seed,
        clip_range,
        return_noise and noise is None,
        has_noise,
        name,
        velocity,
    )
    if velocity:
        return out, second
    if return_noise:
        return out, (noise if noise is not None else (second if has_noise else None))
    return out


@torch.library.custom_op("transfusion_kernels::diffusion_loss", mutates_args=())
def loss_op(
    pred: torch.Tensor,
    target: torch.Tensor,
    image_index: torch.Tensor,
    compute_grad: bool,
    backend: str,
    minus: Optional[torch.Tensor] = None,
) -> tuple[torch.Tensor, torch.Tensor]:
    """Error ``pred - target``, or ``pred - (target - minus)`` when ``minus`` is given."""
    loss, grad = LOSS.module(backend).diffusion_loss(pred, target, image_index, compute_grad, minus=minus)
    return loss, (grad if grad is not None else pred.new_empty(0))


@loss_op.register_fake
def _(pred, target, image_index, compute_grad, backend, minus=None):
    grad = torch.empty_like(pred) if compute_grad else pred.new_empty(0)
    return pred.new_empty((), dtype=torch.float32), grad


def _loss_setup_context(ctx, inputs, output):
    ctx.save_for_backward(output[1])
    ctx.has_grad = inputs[3]  # compute_grad: the public function asks for it whenever autograd needs it
    ctx.has_minus = inputs[5] is not None


def _loss_backward(ctx, grad_loss, _grad_grad):
    if not ctx.has_grad:
        return None, None, None, None, None, None
    (unit,) = ctx.saved_tensors  # d loss / d pred, written by the forward pass
    grad_pred = (unit.float() * grad_loss).to(unit.dtype)
    return grad_pred, -grad_pred, None, None, None, (grad_pred if ctx.has_minus else None)


loss_op.register_autograd(_loss_backward, setup_context=_loss_setup_context)
