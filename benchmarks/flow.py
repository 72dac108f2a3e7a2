"""Benchmark: the flow-matching ops (flow_add_noise, flow_euler_step plain and with fused
classifier-free guidance, flow_loss forward + gradient).

Compared on each case:
  diffusers   diffusers' eager FlowMatchEulerDiscreteScheduler: scale_noise after torch.randn_like
              (and the target noise - x0 as a training loop computes it), step (guidance combined
              first as a pipeline does: u + g (c - u)); the loss has no diffusers counterpart, so
              there it is the eager reference (``eager``)
  compiled    torch.compile of the reference with the same coefficients (its noise from
              torch.randn_like inside the compiled function, as in benchmarks/diffusion.py)
  tk:<name>   the public op on each backend, coefficient preparation included

Every op is one memory-bound pass. Bytes moved: add_noise reads x0, writes x_t and the target
(3 tensors); a step reads sample and model_output and writes prev (3; 4 with guidance: the
unconditional output too); the loss reads pred, x0 and noise and writes d loss / d pred (4).
Achieved bandwidth = bytes / median time, next to a device copy (read + write) as the ceiling.

    python -m benchmarks.flow            # GPU: latents and 64 MB+ tensors, JSON in benchmarks/results/
    python -m benchmarks.flow --smoke    # CPU: tiny shapes, checks the harness, no speed claims
"""

from __future__ import annotations

import os
import sys

import torch

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
if ROOT not in sys.path:
    sys.path.insert(0, ROOT)

import transfusion_kernels as tk  # noqa: E402
from .common import compile_fn  # noqa: E402
from .diffusion import SEED, case_row, first, run_suite, time_impls  # noqa: E402
from transfusion_kernels.diffusion import reference  # noqa: E402
from transfusion_kernels.flow.coefficients import add_noise_coef, euler_coef  # noqa: E402

# (name, shape, dtype): the loss views a case as [rows, last dim] patches of 16 images
GPU_CASES = [
    ("latents 16x16x64x64", (16, 16, 64, 64), torch.bfloat16),
    ("latents 16x16x64x64", (16, 16, 64, 64), torch.float32),
    ("64 MB", (128, 4, 256, 256), torch.bfloat16),
    ("256 MB", (256, 4, 256, 256), torch.float32),
    ("packed patches 1M x 64 (128 MB)", (1 << 20, 64), torch.bfloat16),
]
SMOKE_CASES = [
    ("latents 2x4x8x8", (2, 4, 8, 8), torch.float32),
    ("packed patches 64 x 16", (64, 16), torch.bfloat16),
]
GUIDANCE = 4.5
STEP = 3  # the step of SD3's 28-step schedule (shift 3) every step call takes
SIGMA, SIGMA_NEXT = (float(s) for s in tk.FlowMatchSchedule(shift=3.0).set_timesteps(28)[1][STEP : STEP + 2].float())


def diffusers_baselines(x, v, u, noise_like):
    """{op: fn} with diffusers' eager scheduler, or {} where diffusers is missing."""
    try:
        from diffusers import FlowMatchEulerDiscreteScheduler
    except ImportError:
        return {}
    sched = FlowMatchEulerDiscreteScheduler(shift=3.0)
    sched.set_timesteps(28)
    t = sched.timesteps[STEP : STEP + 1].to(x.device)  # one timestep for the batch, as pipelines call it

    def scale_noise():
        noise = noise_like(x)
        return sched.scale_noise(x, t, noise), noise - x

    def step(model_output):
        sched._step_index = STEP  # the same step every call
        return sched.step(model_output, sched.timesteps[STEP], x).prev_sample

    return {
        "add_noise": scale_noise,
        "euler_step": lambda: step(v),
        "euler_cfg": lambda: step(u + GUIDANCE * (v - u)),
    }


def compiled_add_noise(x0, coef):
    """The reference forward process with its velocity target, torch's RNG drawn inside, for torch.compile."""
    return reference.affine_step(x0, None, coef, torch.randn_like(x0), 0, None, False, velocity=True)


def compiled_step(sample, model_output, coef, uncond):
    """The reference Euler step (guided: the unconditional output in the noise slot), for torch.compile."""
    return reference.affine_step(sample, model_output, coef, uncond, 0, None, False, has_noise=uncond is not None)[0]


def compiled_loss(pred, x0, noise, image_index):
    return reference.diffusion_loss(pred, noise, image_index, True, minus=x0)


def run_case(name, shape, dtype, device, backends, compile_, bench, gen):
    x = torch.randn(shape, generator=gen).to(device, dtype)
    v, u = (torch.randn(shape, generator=gen).to(device, dtype) for _ in range(2))
    R, n, item = shape[0], x.numel(), x.element_size()
    sigmas = torch.rand(R, generator=gen).to(device)
    pred, x0, noise = (t.reshape(-1, shape[-1]) for t in (v, x, u))
    image_index = torch.arange(pred.shape[0], device=device) * 16 // pred.shape[0]
    pred_g = pred.detach().requires_grad_()

    def loss(b):
        out = tk.flow_loss(pred_g, x0, noise, image_index, backend=b)
        out.backward()
        return out

    # op: (public call on backend b, bytes moved)
    ops = {
        "add_noise": (lambda b: tk.flow_add_noise(x, sigmas, seed=SEED, backend=b), 3 * n * item),
        "euler_step": (lambda b: tk.flow_euler_step(v, SIGMA, SIGMA_NEXT, x, backend=b), 3 * n * item),
        "euler_cfg": (
            lambda b: tk.flow_euler_step(v, SIGMA, SIGMA_NEXT, x, guidance_scale=GUIDANCE, uncond_output=u, backend=b),
            4 * n * item,
        ),
        "loss": (loss, 4 * n * item),
    }
    baselines = diffusers_baselines(x, v, u, torch.randn_like)
    baselines["loss"] = lambda: loss("reference")
    if compile_:
        noise_c, step_c = compile_fn(compiled_add_noise, dynamic=False), compile_fn(compiled_step, dynamic=False)
        loss_c = compile_fn(compiled_loss, dynamic=False)
        noise_coef = add_noise_coef(sigmas, R, device)
        step_coef = euler_coef(SIGMA, SIGMA_NEXT, R, device, False, None)
        cfg_coef = euler_coef(SIGMA, SIGMA_NEXT, R, device, False, GUIDANCE)
        compiled = {
            "add_noise": lambda: noise_c(x, noise_coef),
            "euler_step": lambda: step_c(x, v, step_coef, None),
            "euler_cfg": lambda: step_c(x, v, cfg_coef, u),
            "loss": lambda: loss_c(pred, x0, noise, image_index),
        }

    row = case_row(name, x, bench, MB_per_tensor=n * item / 2**20)
    for op, (public, nbytes) in ops.items():
        impls = {}
        if op in baselines:
            impls["eager" if op == "loss" else "diffusers"] = baselines[op]
        if compile_:
            impls["compiled"] = compiled[op]
        for label, b in backends.items():
            impls[f"tk:{label}"] = lambda b=b: public(b)
        # the tk rows draw the reference's noise (same seed); the baselines their own
        time_impls(
            row,
            op,
            impls,
            first(public("reference")),
            nbytes,
            backends,
            bench,
            comparable=lambda impl: impl.startswith("tk:") or op != "add_noise",
        )
    return row


def main(argv=None):
    return run_suite(
        "flow",
        __doc__,
        argv,
        SMOKE_CASES,
        GPU_CASES,
        run_case,
        {"guidance_scale": GUIDANCE, "sigma": SIGMA, "sigma_next": SIGMA_NEXT},
    )


if __name__ == "__main__":
    main()
