"""The image objective: what the image head learns to predict, and how samples are denoised.

``ddpm`` (the paper, section 2.2): ``x_t = sqrt(abar_t) x0 + sqrt(1 - abar_t) eps`` at an integer
timestep t; the head predicts ``ModelConfig.prediction_type`` (eps, x0 or v); sampling runs DDIM or
DDPM steps.

``flow`` (rectified flow / flow matching, as in Stable Diffusion 3 and Flux):
``x_s = (1 - s) x0 + s eps``; the head predicts the velocity ``eps - x0``; sampling runs Euler
steps from s = 1 to 0. Training draws the same integer t as ``ddpm`` (so the data pipeline and
the image-first noise cap are shared) and uses ``s = (t + 1) / T``: the T training sigmas of
diffusers' ``FlowMatchEulerDiscreteScheduler``, and a cap of t <= 500 is s <= 0.501. The model
sees the timestep ``s * T`` (diffusers' convention); a clean image written into the KV cache
is at timestep 0 (s = 0) for both objectives.

All noising, steps and losses run on the fused ops of ``transfusion_kernels`` (one dispatch path
per op: ``backend=`` picks the implementation).
"""

from __future__ import annotations

import torch

import transfusion_kernels as tk

SAMPLERS = {"ddpm": ("ddim", "ddpm"), "flow": ("euler",)}


def diffusion_target(prediction_type: str, x0, noise, t_rows, sched):
    """What a ``ddpm`` image head predicts: the noise (the paper), the clean latent, or v."""
    if prediction_type == "epsilon":
        return noise
    if prediction_type == "sample":
        return x0
    ab = sched.alphas_cumprod_on(x0.device)[t_rows.long()].to(torch.float32)[:, None]
    return ab.sqrt() * noise - (1 - ab).sqrt() * x0


def training_inputs(cfg, x0, t, patch_img, seed: int, sched, backend=None):
    """Noise the clean patch rows ``x0`` ``[P, D]`` of images drawn at integer timesteps ``t``
    ``[M]`` (``patch_img`` ``[P]``: each row's image). Returns ``(x_t, target, model_t)``: the
    noisy rows, what the head should predict for them, and the ``[M]`` timesteps the model sees."""
    t_rows = t[patch_img.long()]
    if cfg.objective == "flow":
        sigmas = (t.double() + 1) / cfg.num_train_timesteps
        x_t, target = tk.flow_add_noise(x0, sigmas[patch_img.long()].float(), seed=seed, backend=backend)
        return x_t, target, (sigmas * cfg.num_train_timesteps).float()
    x_t, noise = tk.add_noise(x0, t_rows, sched, seed=seed, backend=backend)
    return x_t, diffusion_target(cfg.prediction_type, x0, noise, t_rows, sched), t


def check_sampler(cfg, sampler: str, name: str = "sampler") -> None:
    """ValueError unless ``sampler`` samples a model trained with ``cfg.objective``; ``name`` is
    the setting as its user spells it (an option, a config field)."""
    fits = SAMPLERS[cfg.objective]
    if sampler not in fits:
        raise ValueError(
            f"{name} {sampler!r} does not fit objective {cfg.objective!r}; use {' or '.join(map(repr, fits))}"
        )


def sampling_steps(cfg, steps: int):
    """``[(model_t, t, t_next), ...]`` from pure noise to the clean image: integer timesteps
    (trailing spacing, the last step ends at -1) for ``ddpm``; sigmas from 1 to 0 (diffusers'
    flow-matching schedule, shift 1) for ``flow``, the model seeing ``sigma * T``."""
    T = cfg.num_train_timesteps
    if steps > T:
        raise ValueError(f"steps ({steps}) cannot exceed num_train_timesteps ({T})")
    if cfg.objective == "flow":
        ts, sig = tk.FlowMatchSchedule(num_train_timesteps=T).set_timesteps(steps)
        return [(float(m), float(s), float(s_next)) for m, s, s_next in zip(ts, sig[:-1], sig[1:])]
    ts = [round(T - i * T / steps) - 1 for i in range(steps)]
    return [(t, t, tp) for t, tp in zip(ts, ts[1:] + [-1])]


def denoise(cfg, sample_cfg, sched, rows, pred, uncond, t, t_next, seed: int, backend=None):
    """One sampling step of the patch rows ``rows`` given the head's conditional prediction
    ``pred`` and, under classifier-free guidance, its unconditional one ``uncond`` (else None)."""
    g = sample_cfg.cfg_scale
    if cfg.objective == "flow":  # the guidance combine runs inside the fused Euler step
        return tk.flow_euler_step(
            pred,
            t,
            t_next,
            rows,
            guidance_scale=g if uncond is not None else None,
            uncond_output=uncond,
            backend=backend,
        )
    if uncond is not None:
        pred = uncond + g * (pred - uncond)
    common = dict(
        prev_timestep=t_next,
        clip_sample=sample_cfg.clip_sample,
        prediction_type=cfg.prediction_type,
        seed=seed,
        backend=backend,
    )
    if sample_cfg.sampler == "ddim":
        return tk.ddim_step(pred, t, rows, sched, eta=sample_cfg.eta, **common)
    return tk.ddpm_step(pred, t, rows, sched, **common)
