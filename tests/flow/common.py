"""Shared helpers of the flow tests: float64 oracles written from the definitions, and diffusers'
FlowMatchEulerDiscreteScheduler run as oracle (float64) or as the same-dtype baseline."""

from __future__ import annotations

import contextlib
from unittest import mock

import torch


def rows_of(sigma, x):
    """A float or a per-row tensor as float64, broadcast over x's trailing dims."""
    s = torch.as_tensor(sigma, dtype=torch.float64).detach().cpu()
    return s.reshape(-1, *([1] * (x.dim() - 1))) if s.dim() else s


def add_noise64(x0, sigma, noise):
    s, x, n = rows_of(sigma, x0), x0.detach().cpu().double(), noise.detach().cpu().double()
    return (1 - s) * x + s * n, n - x


def euler64(v, sigma, sigma_next, sample, stochastic=False, noise=None):
    s, sn = rows_of(sigma, sample), rows_of(sigma_next, sample)
    x, v = sample.detach().cpu().double(), v.detach().cpu().double()
    if stochastic:
        return (1 - sn) * (x - s * v) + sn * noise.detach().cpu().double()
    return x + (sn - s) * v


def flow_loss64(pred, x0, noise, image_index):
    """float64 loss and its gradients in (pred, x0, noise): per-image MSE against noise - x0."""
    p, x, n = (t.detach().cpu().double().requires_grad_() for t in (pred, x0, noise))
    idx = image_index.cpu()
    per = [((p[idx == m] - (n[idx == m] - x[idx == m])) ** 2).mean() for m in sorted(set(idx.tolist()) - {-1})]
    loss = torch.stack(per).mean() if per else (p.sum() + x.sum() + n.sum()) * 0
    return (loss.detach(), *torch.autograd.grad(loss, (p, x, n)))


@contextlib.contextmanager
def flow_noise(noise):
    """Make FlowMatchEulerDiscreteScheduler.step draw ``noise`` for its stochastic step."""

    def fake_randn(shape, generator=None, device=None, dtype=None, layout=None):
        assert tuple(shape) == tuple(noise.shape)
        return noise.to(dtype)

    with mock.patch("diffusers.schedulers.scheduling_flow_match_euler_discrete.randn_tensor", fake_randn):
        yield


def diffusers_step(config, model_output, sample, index, noise, oracle: bool, num_inference_steps=10):
    """diffusers' step from sigmas[index] to sigmas[index + 1] of set_timesteps(n); float64 with
    ``oracle`` (its float32 sigmas promoted: the same numbers). Returns (prev, sigma, sigma_next)."""
    from diffusers import FlowMatchEulerDiscreteScheduler

    sched = FlowMatchEulerDiscreteScheduler(**config)
    sched.set_timesteps(num_inference_steps)
    if oracle:
        sched.sigmas = sched.sigmas.double()
        model_output, sample = model_output.double(), sample.double()
        noise = noise.double() if noise is not None else None
    sched.set_begin_index(index)
    t = sched.timesteps[index]
    with flow_noise(noise) if noise is not None else contextlib.nullcontext():
        prev = sched.step(model_output, t, sample).prev_sample
    return prev, float(sched.sigmas[index]), float(sched.sigmas[index + 1])
