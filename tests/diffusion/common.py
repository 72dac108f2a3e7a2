"""Shared helpers of the diffusion tests: backends, the error rule, diffusers oracles.

Error rule (docs/design.md §5, tests/oracles.py): a kernel's max error against a float64 oracle must be at most
twice the error of the same computation done by PyTorch (here: diffusers' own scheduler) in the
input dtype, plus a small floor relative to the output's magnitude. NaN never passes.
"""

from __future__ import annotations

import contextlib
import importlib.util
from unittest import mock

import pytest
import torch

from tests.oracles import assert_2x

import transfusion_kernels as tk  # tests/conftest.py has set TRITON_INTERPRET=1 without a GPU

GPU = torch.cuda.is_available()
DEVICE = torch.device("cuda" if GPU else "cpu")
DTYPES = (torch.float32, torch.float16, torch.bfloat16)


def _can_run(name: str) -> bool:
    return tk.available_backends(DEVICE)[name].available


BACKENDS = [
    "reference",
    pytest.param("triton", marks=pytest.mark.skipif(not _can_run("triton"), reason="triton cannot run here")),
    pytest.param("cuda", marks=pytest.mark.skipif(not _can_run("cuda"), reason="cuda backend cannot run here")),
]
LOSS_BACKENDS = BACKENDS[:2]  # diffusion_loss has no CUDA C++ kernel
requires_diffusers = pytest.mark.skipif(importlib.util.find_spec("diffusers") is None, reason="needs diffusers")


def poison_outputs(monkeypatch) -> None:
    """Every buffer the kernel backends (triton, cuda) allocate starts as NaN."""
    import importlib

    def nan_empty(shape, dtype, device):
        return torch.full(shape, float("nan"), dtype=dtype, device=device)

    for name in ("triton", "cuda"):
        try:
            module = importlib.import_module(f"transfusion_kernels.diffusion.{name}")
        except ImportError:
            continue
        if hasattr(module, "_empty"):
            monkeypatch.setattr(module, "_empty", nan_empty)


def assert_rule(got, oracle, same_dtype, what: str = "") -> None:
    """The 2x rule with a floor of one ulp of the output dtype at the oracle's magnitude."""
    floor = torch.finfo(same_dtype.dtype).eps * max(1.0, oracle.detach().abs().max().item() if oracle.numel() else 0.0)
    assert_2x(what, got, oracle, same_dtype, floor)


# ---------------------------------------------------------------------------------------------
# diffusers oracles: run diffusers' own step per row; as the oracle in float64 (its float32
# alphas_cumprod promoted, so the schedule is the same numbers), or as the same-dtype baseline.
# ---------------------------------------------------------------------------------------------


def to_oracle(sched):
    sched.alphas_cumprod = sched.alphas_cumprod.double()
    if hasattr(sched, "one"):
        sched.one = sched.one.double()
    if hasattr(sched, "final_alpha_cumprod"):
        sched.final_alpha_cumprod = sched.final_alpha_cumprod.double()
    return sched


@contextlib.contextmanager
def ddpm_noise(noise):
    """Make DDPMScheduler.step use ``noise`` for its variance draw (it has no variance_noise)."""

    def fake_randn(shape, generator=None, device=None, dtype=None, layout=None):
        assert tuple(shape) == tuple(noise.shape)
        return noise.to(dtype)

    with mock.patch("diffusers.schedulers.scheduling_ddpm.randn_tensor", fake_randn):
        yield


def inference_steps_for(T: int, spacing: int) -> int:
    """num_inference_steps n with T // n == spacing (DDIM's prev = t - T // n)."""
    for n in range(1, T + 1):
        if T // n == spacing:
            return n
    raise ValueError(f"no num_inference_steps gives spacing {spacing}")


def diffusers_ddpm_rows(config: dict, model_output, sample, rows, noise, oracle: bool):
    """diffusers DDPMScheduler.step per row; rows = [(t, prev)], prev < 0: last step."""
    from diffusers import DDPMScheduler

    sched = DDPMScheduler(**config)
    if oracle:
        to_oracle(sched)
        model_output, sample, noise = model_output.double(), sample.double(), noise.double()
    outs = []
    for r, (t, prev) in enumerate(rows):
        sched.set_timesteps(timesteps=[t, prev] if prev >= 0 else [t])
        with ddpm_noise(noise[r : r + 1]):
            outs.append(sched.step(model_output[r : r + 1], t, sample[r : r + 1]).prev_sample)
    return torch.cat(outs)


def diffusers_ddim_rows(config: dict, model_output, sample, rows, noise, eta, use_clipped, oracle: bool):
    """diffusers DDIMScheduler.step per row; rows = [(t, spacing)]: prev = t - spacing."""
    from diffusers import DDIMScheduler

    sched = DDIMScheduler(**config)
    if oracle:
        to_oracle(sched)
        model_output, sample, noise = model_output.double(), sample.double(), noise.double()
    outs = []
    for r, (t, spacing) in enumerate(rows):
        sched.num_inference_steps = inference_steps_for(sched.config.num_train_timesteps, spacing)
        out = sched.step(
            model_output[r : r + 1],
            t,
            sample[r : r + 1],
            eta=eta,
            use_clipped_model_output=use_clipped,
            variance_noise=noise[r : r + 1],
        ).prev_sample
        outs.append(out)
    return torch.cat(outs)
