"""The timestep custom ops: ``transfusion_kernels::patch_timestep_embedding`` with its fake and its
autograd (dx = dy; the MLP weights' gradients through ``patch_timestep_segment_sum`` and
``timestep_mlp_backward``), each calling the backend module chosen by the public function."""

from __future__ import annotations

from typing import Optional

import torch

from transfusion_kernels.backends import Op
from transfusion_kernels.timestep.validation import check_index_range

_IMPLS = {
    "reference": "transfusion_kernels.timestep.reference",
    "triton": "transfusion_kernels.timestep.triton",
    "cuda": "transfusion_kernels.timestep.cuda",
}
TIMESTEP = Op("patch_timestep_embedding", _IMPLS)


def _cfg(freq_dim, flip_sin_to_cos, downscale_freq_shift, scale, max_period):
    return dict(
        freq_dim=freq_dim,
        flip_sin_to_cos=flip_sin_to_cos,
        downscale_freq_shift=downscale_freq_shift,
        scale=scale,
        max_period=max_period,
    )


def _c(t):
    return None if t is None else t.contiguous()


@torch.library.custom_op("transfusion_kernels::patch_timestep_embedding", mutates_args=())
def _patch_op(
    x: torch.Tensor,
    timesteps: torch.Tensor,
    image_index: torch.Tensor,
    w1: Optional[torch.Tensor],
    b1: Optional[torch.Tensor],
    w2: Optional[torch.Tensor],
    b2: Optional[torch.Tensor],
    freq_dim: int,
    flip_sin_to_cos: bool,
    downscale_freq_shift: float,
    scale: float,
    max_period: float,
    backend: str,
) -> torch.Tensor:
    check_index_range(image_index, timesteps.shape[0])
    if x.shape[0] == 0:
        return torch.empty_like(x)
    return TIMESTEP.module(backend).forward(
        x.contiguous(),
        timesteps.contiguous(),
        image_index.contiguous(),
        _c(w1),
        _c(b1),
        _c(w2),
        _c(b2),
        **_cfg(freq_dim, flip_sin_to_cos, downscale_freq_shift, scale, max_period),
    )


@_patch_op.register_fake
def _(
    x,
    timesteps,
    image_index,
    w1,
    b1,
    w2,
    b2,
    freq_dim,
    flip_sin_to_cos,
    downscale_freq_shift,
    scale,
    max_period,
    backend,
):
    return torch.empty_like(x, memory_format=torch.contiguous_format)


@torch.library.custom_op("transfusion_kernels::patch_timestep_segment_sum", mutates_args=())
def _segment_sum_op(dy: torch.Tensor, image_index: torch.Tensor, num_images: int, backend: str) -> torch.Tensor:
    if dy.shape[0] == 0:
        return dy.new_zeros(num_images, dy.shape[1], dtype=torch.float32)
    return TIMESTEP.module(backend).segment_sum(dy.contiguous(), image_index.contiguous(), num_images)


@_segment_sum_op.register_fake
def _(dy, image_index, num_images, backend):
    return dy.new_empty(num_images, dy.shape[1], dtype=torch.float32)


@torch.library.custom_op("transfusion_kernels::timestep_mlp_backward", mutates_args=())
def _mlp_backward_op(
    demb: torch.Tensor,
    timesteps: torch.Tensor,
    w1: torch.Tensor,
    b1: Optional[torch.Tensor],
    w2: torch.Tensor,
    freq_dim: int,
    flip_sin_to_cos: bool,
    downscale_freq_shift: float,
    scale: float,
    max_period: float,
    backend: str,
) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor, torch.Tensor]:
    grads = TIMESTEP.module(backend).mlp_backward(
        demb.contiguous(),
        timesteps.contiguous(),
        w1.contiguous(),
        _c(b1),
        w2.contiguous(),
        **_cfg(freq_dim, flip_sin_to_cos, downscale_freq_shift, scale, max_period),
    )
    return tuple(g.contiguous() for g in grads)


@_mlp_backward_op.register_fake
def _(demb, timesteps, w1, b1, w2, freq_dim, flip_sin_to_cos, downscale_freq_shift, scale, max_period, backend):
    f32 = dict(dtype=torch.float32)
    return (
        demb.new_empty(w1.shape, **f32),
        demb.new_empty(w1.shape[0], **f32),
        demb.new_empty(w2.shape, **f32),
        demb.new_empty(w2.shape[0], **f32),
    )


def _setup_context(ctx, inputs, output):
    x, timesteps, image_index, w1, b1, w2, b2, *cfg, backend = inputs
    ctx.save_for_backward(timesteps, image_index, w1, b1, w2)
    ctx.weight_dtypes = tuple(None if w is None else w.dtype for w in (w1, b1, w2, b2))
    ctx.cfg = cfg
    ctx.backend = backend


def _backward(ctx, dy):
    timesteps, image_index, w1, b1, w2 = ctx.saved_tensors
    need = ctx.needs_input_grad
    dx = dy if need[0] else None
    grads = [None] * 4
    if w1 is not None and any(need[3:7]):
        demb = _segment_sum_op(dy, image_index, timesteps.shape[0], ctx.backend)
        full = _mlp_backward_op(demb, timesteps, w1, b1, w2, *ctx.cfg, ctx.backend)
        for i, (g, n, dtype) in enumerate(zip(full, need[3:7], ctx.weight_dtypes)):
            if n:
                grads[i] = g.to(dtype)
    return (dx, None, None, *grads, None, None, None, None, None, None)


_patch_op.register_autograd(_backward, setup_context=_setup_context)
