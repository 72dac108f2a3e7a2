"""Diffusion ops: forward noising, DDPM and DDIM updates, and the per-image diffusion loss.

Public API::

    sched = DiffusionSchedule(1000, "linear")             # or DiffusionSchedule.from_diffusers(s)
    x_t, noise = add_noise(x0, timesteps, sched, noise=None, seed=None, backend=None)
    x_prev = ddpm_step(model_output, timestep, sample, sched, *, prev_timestep=None, ...)
    x_prev = ddim_step(model_output, timestep, sample, sched, *, prev_timestep, eta=0.0, ...)
    loss = diffusion_loss(pred, target, image_index, backend=None)

Rows: ``sample`` has shape ``[R, ...]``; a timestep is a python int (every row) or an integer
tensor of shape ``[R]`` (one per row: per image, or per patch of a packed batch; a 0-d tensor
counts for every row). Given ``noise``, the results match diffusers' ``DDPMScheduler`` /
``DDIMScheduler`` ``.step`` / ``.add_noise`` for the same configuration. Without it, noise is a
function of ``(seed, element index)`` (``transfusion_kernels.philox``), drawn inside the kernel:
the same seed gives the same output on every backend, up to float rounding. ``seed=None`` draws
a fresh seed from torch's default generator, so results follow ``torch.manual_seed``. (Under
``torch.compile`` with ``seed=None`` the noise comes from ``torch.randn_like`` instead, which
traces; pass a seed for Philox noise there.) Tensor timesteps are range-checked with one host
sync per call (not under torch.compile). Coefficients that depend on t alone come from a
per-schedule table built once per device, and python-int steps are memoised, so a sampling loop
pays a lookup, not a dozen small tensor ops, per step.

Kernel contract (every backend module ``reference``, ``triton``, ``cuda`` implements it).
All three ops are ONE fused elementwise pass with per-row coefficients ``coef`` (float32
``[R, 6]``, computed here in float64 from the schedule with plain torch ops, so they trace)::

    x0  = c[r,0] * sample + c[r,1] * model_output      # predicted clean sample
    x0  = clamp(x0, -clip_range, clip_range)            # only if clip_range is not None
    out = c[r,2] * x0 + c[r,3] * sample + c[r,4] * model_output + c[r,5] * noise

``affine_step(sample, model_output, coef, noise, seed, clip_range, return_noise)
-> (out, drawn_noise_or_None)``; row r covers the flat elements ``[r*L, (r+1)*L)``. Every
backend also takes the keywords ``has_noise=False`` (every ``c[:, 5]`` is zero, draw nothing)
and ``velocity=True`` (the second output is ``noise - sample``, the flow-matching target, for
given and drawn noise alike).

Loss backends: ``diffusion_loss(pred, target, image_index, compute_grad, minus=None) -> (loss,
dloss/dpred)`` (reference and triton; the backward is that saved gradient times the upstream
scalar); with ``minus`` the error is ``pred - (target - minus)`` (flow_loss: noise - x0, never
materialised).

The flow-matching ops (``transfusion_kernels.flow``) run on these same two ops and kernels.

Layout: ``ops.py`` the custom ops and their backends, ``coefficients.py`` the per-row
coefficients, ``validation.py`` the argument checks, ``schedule.py`` the schedule; this module
is the public API.
"""

import torch

from transfusion_kernels.backends import select
from transfusion_kernels.diffusion.coefficients import add_noise_coef, ddim_coef, ddpm_coef
from transfusion_kernels.diffusion.ops import AFFINE_STEP, LOSS, loss_op, run_affine_step
from transfusion_kernels.diffusion.schedule import DiffusionSchedule
from transfusion_kernels.diffusion.validation import (
    check_like,
    check_loss_inputs,
    check_schedule,
    check_tensor,
    clip_range_of,
)

__all__ = [
    "AFFINE_STEP",
    "LOSS",
    "DiffusionSchedule",
    "add_noise",
    "add_noise_coef",
    "ddim_coef",
    "ddim_step",
    "ddpm_coef",
    "ddpm_step",
    "diffusion_loss",
]


def add_noise(x0, timesteps, schedule, noise=None, seed=None, backend=None):
    """Forward diffusion: ``x_t = sqrt(abar_t) x0 + sqrt(1 - abar_t) noise``.

    Returns ``(x_t, noise)``: the noise given, or the noise drawn from ``seed`` (in x0's dtype;
    passing it back as ``noise`` reproduces x_t exactly). Matches diffusers' ``add_noise``."""
    check_tensor(x0, "x0")
    check_schedule(schedule)
    coef, _ = add_noise_coef(timesteps, x0.shape[0], schedule, x0.device)
    return run_affine_step(
        select(AFFINE_STEP, backend, x0, caller="add_noise"), x0, None, coef, noise, seed, None, True, return_noise=True
    )


def ddpm_step(
    model_output,
    timestep,
    sample,
    schedule,
    *,
    prev_timestep=None,
    prediction_type="epsilon",
    variance_type="fixed_small",
    clip_sample=False,
    clip_sample_range=1.0,
    noise=None,
    seed=None,
    backend=None,
):
    """One ancestral DDPM step x_t -> x_prev (Ho et al. 2020), as diffusers' ``DDPMScheduler.step``.

    ``prev_timestep`` defaults to ``timestep - 1``: diffusers' default spacing
    ``t - num_train_timesteps // num_inference_steps`` with one-step spacing. For skipped steps
    pass the next timestep of the inference schedule (the posterior then uses its
    ``alphas_cumprod``, as diffusers does with ``num_inference_steps < num_train_timesteps``);
    a negative value means ``alpha_prod_prev = 1``. No noise is added on rows with ``t = 0``.

    ``variance_type``: ``fixed_small`` / ``fixed_small_log`` (posterior variance, clamped at 1e-20
    as diffusers), ``fixed_large`` / ``fixed_large_log`` (beta_t). ``fixed_large_log`` uses the
    intended sigma = sqrt(beta_t) (GLIDE's max log-variance); diffusers 0.42's own
    ``DDPMScheduler.step`` returns NaN for it because it takes the square root of log(beta_t).
    """
    check_tensor(sample, "sample")
    check_like(model_output, "model_output", sample, "sample")
    check_schedule(schedule)
    clip_range = clip_range_of(clip_sample, clip_sample_range)
    coef, has_noise = ddpm_coef(
        timestep, sample.shape[0], schedule, sample.device, prev_timestep, prediction_type, variance_type
    )
    name = select(AFFINE_STEP, backend, sample, caller="ddpm_step")
    return run_affine_step(name, sample, model_output, coef, noise, seed, clip_range, has_noise)


def ddim_step(
    model_output,
    timestep,
    sample,
    schedule,
    *,
    prev_timestep,
    eta=0.0,
    prediction_type="epsilon",
    clip_sample=False,
    clip_sample_range=1.0,
    use_clipped_model_output=False,
    noise=None,
    seed=None,
    backend=None,
):
    """One DDIM step x_t -> x_prev (Song et al. 2021, eq. 12), as diffusers' ``DDIMScheduler.step``.

    ``prev_timestep``: diffusers uses ``t - num_train_timesteps // num_inference_steps``; negative
    means ``alpha_prod_prev = 1`` (``final_alpha_cumprod`` with ``set_alpha_to_one=True``; pass 0
    to get ``set_alpha_to_one=False``). ``eta`` in [0, 1] scales the noise (sigma from
    diffusers' ``_get_variance``); ``eta = 0`` is deterministic and ignores ``noise``/``seed``.
    ``use_clipped_model_output`` re-derives the noise estimate from the clipped x0 (GLIDE)."""
    check_tensor(sample, "sample")
    check_like(model_output, "model_output", sample, "sample")
    check_schedule(schedule)
    clip_range = clip_range_of(clip_sample, clip_sample_range)
    coef, has_noise = ddim_coef(
        timestep,
        sample.shape[0],
        schedule,
        sample.device,
        prev_timestep,
        eta,
        prediction_type,
        use_clipped_model_output,
    )
    name = select(AFFINE_STEP, backend, sample, caller="ddim_step")
    return run_affine_step(name, sample, model_output, coef, noise, seed, clip_range, has_noise)


def diffusion_loss(pred, target, image_index, backend=None):
    """Per-image diffusion loss of a packed batch.

    ``pred``, ``target``: ``[P, C]`` patch rows; ``image_index``: int ``[P]``, the image of each
    row, -1 for rows that are not image patches (ignored). The loss is the mean squared error of
    each image (over its patches and channels), averaged over the images with at least one patch;
    float32; 0 (with zero gradient) when there is no image. Differentiable in pred and target."""
    check_loss_inputs(pred, image_index, target=target)
    name = select(LOSS, backend, pred)
    compute_grad = torch.is_grad_enabled() and (pred.requires_grad or target.requires_grad)
    loss, _ = loss_op(pred.contiguous(), target.contiguous(), image_index.contiguous(), compute_grad, name)
    return loss
