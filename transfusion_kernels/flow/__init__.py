"""Flow matching (rectified flow) ops: forward noising with its velocity target, the Euler step
(deterministic, stochastic, with fused classifier-free guidance) and the velocity loss.

Public API::

    x_t, target = flow_add_noise(x0, sigmas, noise=None, seed=None, backend=None)
    x_prev = flow_euler_step(model_output, sigma, sigma_next, sample, *, stochastic_sampling=False,
                             noise=None, seed=None, guidance_scale=None, uncond_output=None, backend=None)
    loss = flow_loss(pred, x0, noise, image_index, backend=None)
    sched = FlowMatchSchedule(shift=3.0)                  # or FlowMatchSchedule.from_diffusers(s)
    timesteps, sigmas = sched.set_timesteps(28)

The path is x_t = (1 - sigma) x0 + sigma eps; the model predicts the velocity eps - x0. The ops
run on the diffusion ops' single dispatch path: the steps are the affine-step custom op
(``transfusion_kernels.diffusion``) with flow coefficients, and ``flow_add_noise`` writes the
target ``eps - x0`` in the same pass (the kernel's ``velocity`` output); the loss is the
diffusion loss op with its ``minus`` operand, so ``eps - x0`` is never materialised. Math in
fp32, results in the sample's dtype; the same seed gives the same noise on every backend
(``transfusion_kernels.philox``), and ``seed=None`` follows ``torch.manual_seed`` as the
diffusion ops do. A sigma is a python float (every row) or a float tensor ``[R]`` (per row),
in [0, 1]; a tensor is range-checked with one host sync per call (none for CPU tensors, none
under torch.compile). Results match diffusers' ``FlowMatchEulerDiscreteScheduler`` given the
same noise (``step``, ``scale_noise``).
"""

import numbers

import torch

from transfusion_kernels.backends import select
from transfusion_kernels.diffusion.ops import AFFINE_STEP, LOSS, loss_op, run_affine_step
from transfusion_kernels.diffusion.validation import check_like, check_loss_inputs, check_tensor
from transfusion_kernels.flow.coefficients import add_noise_coef, euler_coef
from transfusion_kernels.flow.schedule import FlowMatchSchedule

__all__ = ["FlowMatchSchedule", "flow_add_noise", "flow_euler_step", "flow_loss"]


def flow_add_noise(x0, sigmas, noise=None, seed=None, backend=None):
    """Forward process and training target in one pass: ``x_t = (1 - s) x0 + s eps`` and
    ``target = eps - x0``.

    ``eps`` is ``noise`` or, without it, drawn from ``seed`` in the kernel (then ``target + x0``
    is that noise up to rounding to x0's dtype). Returns ``(x_t, target)`` in x0's dtype.
    Matches diffusers' ``FlowMatchEulerDiscreteScheduler.scale_noise``."""
    check_tensor(x0, "x0")
    coef = add_noise_coef(sigmas, x0.shape[0], x0.device)
    name = select(AFFINE_STEP, backend, x0, caller="flow_add_noise")
    return run_affine_step(name, x0, None, coef, noise, seed, None, True, velocity=True)


def flow_euler_step(
    model_output,
    sigma,
    sigma_next,
    sample,
    *,
    stochastic_sampling=False,
    noise=None,
    seed=None,
    guidance_scale=None,
    uncond_output=None,
    backend=None,
):
    """One Euler step of the flow ODE from ``sigma`` to ``sigma_next``, as diffusers'
    ``FlowMatchEulerDiscreteScheduler.step``: ``prev = sample + (sigma_next - sigma) v`` with
    ``v = model_output``; with ``stochastic_sampling`` the clean sample ``x0 = sample - sigma v``
    is re-noised to ``sigma_next``: ``prev = (1 - sigma_next) x0 + sigma_next eps`` (``eps`` is
    ``noise``, or drawn from ``seed``; the deterministic step ignores both).

    ``guidance_scale=g`` with ``uncond_output=u``: classifier-free guidance,
    ``v = u + g (model_output - u)``. The deterministic step fuses it (the kernel reads both
    outputs; the combination is linear, see ``coefficients.euler_coef``); the stochastic step
    combines first with one ``torch.lerp`` (fp32 math, one rounding), then steps."""
    check_tensor(sample, "sample")
    check_like(model_output, "model_output", sample, "sample")
    if (guidance_scale is None) != (uncond_output is None):
        missing = "uncond_output (the unconditional model output)" if uncond_output is None else "guidance_scale"
        raise ValueError(f"classifier-free guidance needs both guidance_scale and uncond_output; pass {missing}")
    if guidance_scale is not None:
        if isinstance(guidance_scale, bool) or not isinstance(guidance_scale, numbers.Real):
            raise TypeError(f"guidance_scale must be a python float, got {type(guidance_scale).__name__}")
        guidance_scale = float(guidance_scale)
        check_like(uncond_output, "uncond_output", sample, "sample")
    if not isinstance(stochastic_sampling, bool):
        raise TypeError(f"stochastic_sampling must be a bool, got {type(stochastic_sampling).__name__}")
    if stochastic_sampling and guidance_scale is not None:
        model_output = torch.lerp(uncond_output, model_output, guidance_scale)
        guidance_scale = None
    coef = euler_coef(sigma, sigma_next, sample.shape[0], sample.device, stochastic_sampling, guidance_scale)
    name = select(AFFINE_STEP, backend, sample, caller="flow_euler_step")
    if guidance_scale is not None:  # the unconditional output rides in the noise slot
        return run_affine_step(name, sample, model_output, coef, uncond_output, None, None, True)
    return run_affine_step(name, sample, model_output, coef, noise, seed, None, stochastic_sampling)


def flow_loss(pred, x0, noise, image_index, backend=None):
    """Per-image flow-matching loss of a packed batch: the mean squared error of ``pred`` against
    the velocity ``noise - x0``, per image, averaged over the images (the semantics of
    ``diffusion_loss`` with ``target = noise - x0``, fused: the target is never written).

    ``pred``, ``x0``, ``noise``: ``[P, C]``; ``image_index``: int ``[P]``, -1 for rows that are
    not image patches. float32 loss; differentiable in pred, x0 and noise. The CUDA backend has
    no loss kernel: asked for by name it raises, as for ``diffusion_loss``; auto runs triton."""
    check_loss_inputs(pred, image_index, x0=x0, noise=noise)
    name = select(LOSS, backend, pred, caller="flow_loss")
    compute_grad = torch.is_grad_enabled() and any(t.requires_grad for t in (pred, x0, noise))
    loss, _ = loss_op(
        pred.contiguous(), noise.contiguous(), image_index.contiguous(), compute_grad, name, x0.contiguous()
    )
    return loss
