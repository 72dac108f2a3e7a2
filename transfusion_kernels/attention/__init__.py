"""Hybrid-mask attention: dispatch, torch.library custom ops and autograd.

Backend modules (reference.py, triton.py, cuda.py) each define (the kernel backends also
``supports(q, scale) -> reason or None``, what their kernels cover, for ``backends.select``):

    prepare(mask, q, k) -> (tables: list[Tensor], blocks: list[int])
        the mask's tile tables and the block sizes their kernels use (cached on the mask);
    forward(q, k, v, kv_start, kv_end, tables, blocks, scale) -> (out [Nq, Hq, D], lse [Hq, Nq] fp32)
    backward(dout, q, k, v, out, lse, kv_start, kv_end, tables, blocks, scale) -> (dq, dk, dv)

The custom ops take plain tensors, so ``torch.compile`` traces them without graph breaks.
"""
from __future__ import annotations

import math
import numbers

import torch

from transfusion_kernels.backends import Op, select
from transfusion_kernels.masks import HybridMask

ATTENTION = Op(
    "hybrid_attention",
    {
        "reference": "transfusion_kernels.attention.reference",
        "triton": "transfusion_kernels.attention.triton",
        "cuda": "transfusion_kernels.attention.cuda",
    },
)

_DTYPES = (torch.float16, torch.bfloat16, torch.float32)


@torch.library.custom_op("transfusion_kernels::hybrid_attention_fwd", mutates_args=())
def _attention_fwd(
    q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, kv_start: torch.Tensor, kv_end: torch.Tensor,
    tables: list[torch.Tensor], blocks: list[int], scale: float, backend: str,
) -> tuple[torch.Tensor, torch.Tensor]:
    if q.shape[0] == 0:  # no queries (an empty batch, or no new tokens against a cache): no launch
        return q.new_empty(q.shape[:2] + v.shape[2:]), q.new_empty((q.shape[1], 0), dtype=torch.float32)
    return ATTENTION.module(backend).forward(q, k, v, kv_start, kv_end, tables, blocks, scale)


@_attention_fwd.register_fake
def _(q, k, v, kv_start, kv_end, tables, blocks, scale, backend):
    return q.new_empty(q.shape[:2] + v.shape[2:]), q.new_empty((q.shape[1], q.shape[0]), dtype=torch.float32)


@torch.library.custom_op("transfusion_kernels::hybrid_attention_bwd", mutates_args=())
def _attention_bwd(
    dout: torch.Tensor, q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, out: torch.Tensor,
    lse: torch.Tensor, kv_start: torch.Tensor, kv_end: torch.Tensor, tables: list[torch.Tensor],
    blocks: list[int], scale: float, backend: str,
) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    if q.shape[0] == 0:  # no query sees any key
        return torch.empty_like(q), torch.zeros_like(k), torch.zeros_like(v)
    return ATTENTION.module(backend).backward(dout, q, k, v, out, lse, kv_start, kv_end, tables, blocks, scale)


@_attention_bwd.register_fake
def _(dout, q, k, v, out, lse, kv_start, kv_end, tables, blocks, scale, backend):
    return torch.empty_like(q), torch.empty_like(k), torch.empty_like(v)


def _setup_context(ctx, inputs, output):
    q, k, v, kv_start, kv_end, tables, blocks, scale, backend = inputs
    out, lse = output
    ctx.save_for_backward(q, k, v, out, lse, kv_start, kv_end, *tables)
    ctx.blocks, ctx.scale, ctx.backend = blocks, scale, backend


def _backward(ctx, dout, dlse):
    # lse is returned for inspection and merging partial results; it is not differentiated.
    q, k, v, out, lse, kv_start, kv_end, *tables = ctx.saved_tensors
    dq, dk, dv = _attention_bwd(
        dout.contiguous(), q, k, v, out, lse, kv_start, kv_end, tables, ctx.blocks, ctx.scale, ctx.backend
    )
    # One entry per input, nested like the inputs: a list of Nones for the tensor list; the int
    # list is a single leaf, except when empty (then an empty list).
    return dq, dk, dv, None, None, [None] * len(tables), None if ctx.blocks else [], None, None


_attention_fwd.register_autograd(_backward, setup_context=_setup_context)


def _check_inputs(q, k, v, mask) -> None:
    if not isinstance(mask, HybridMask):
        raise TypeError(f"mask must be a tk.HybridMask, got {type(mask).__name__}")
    for name, t in (("q", q), ("k", k), ("v", v)):
        if not isinstance(t, torch.Tensor) or t.dim() != 3:
            raise ValueError(f"{name} must be a 3-D tensor [tokens, heads, head_dim], got {getattr(t, 'shape', type(t))}")
        if t.shape[1] < 1 or t.shape[2] < 1:
            raise ValueError(f"{name} must have at least one head and head_dim >= 1, got shape {tuple(t.shape)}")
        if t.dtype not in _DTYPES:
            raise ValueError(f"{name} must be float16, bfloat16 or float32, got {t.dtype}")
        if t.stride(-1) != 1:
            raise ValueError(f"{name} must have unit stride in its last (head_dim) dimension, got strides {t.stride()}")
        if t.device != mask.device:
            raise ValueError(f"{name} is on {t.device} but the mask is on {mask.device}")
    if not (q.dtype == k.dtype == v.dtype):
        raise ValueError(f"q, k, v must share a dtype, got {q.dtype}, {k.dtype}, {v.dtype}")
    if k.shape != v.shape:
        raise ValueError(f"k and v must have the same shape, got {tuple(k.shape)} and {tuple(v.shape)}")
    if q.shape[2] != k.shape[2]:
        raise ValueError(f"q and k must have the same head_dim, got {q.shape[2]} and {k.shape[2]}")
    if q.shape[1] % k.shape[1]:
        raise ValueError(f"query heads ({q.shape[1]}) must be a multiple of key/value heads ({k.shape[1]})")
    if q.shape[0] != mask.num_queries:
        raise ValueError(f"q has {q.shape[0]} tokens but the mask has {mask.num_queries} queries")
    if k.shape[0] != mask.num_keys:
        raise ValueError(f"k has {k.shape[0]} tokens but the mask has {mask.num_keys} keys")


def _check_scale(softmax_scale, head_dim: int) -> float:
    if softmax_scale is None:
        return head_dim ** -0.5
    if isinstance(softmax_scale, torch.Tensor) and softmax_scale.numel() == 1 and not softmax_scale.is_complex():
        softmax_scale = softmax_scale.item()
    real = isinstance(softmax_scale, numbers.Real) and not isinstance(softmax_scale, bool)
    if not real or not math.isfinite(softmax_scale):
        raise ValueError(f"softmax_scale must be a finite real number or None, got {softmax_scale!r}")
    return float(softmax_scale)


def hybrid_attention(q, k, v, mask: HybridMask, softmax_scale=None, return_lse=False, backend=None):
    """Attention where query i sees keys ``[mask.kv_start[i], mask.kv_end[i])``.

    q: [Nq, Hq, D]; k, v: [Nk, Hkv, D] with Hq a multiple of Hkv (grouped-query attention);
    float16, bfloat16 or float32, all three alike, unit stride in the head dim.
    Returns out [Nq, Hq, D] (and lse [Hq, Nq] fp32, natural log, if ``return_lse``).
    Differentiable in q, k and v; lse is not differentiated. A query with an empty interval gets
    output 0 and lse -inf.

    Inputs a backend's kernels do not cover (see README, "Supported shapes and dtypes") run on
    the next backend (cuda -> triton -> reference) with one warning per reason.

    Non-finite inputs: a NaN/inf in query row i or in a key that row i sees makes out[i] and
    lse[i] NaN, and leaves every other row as it would be without it. A non-finite value in v
    reaches every query that sees its key, and may also reach queries computed in the same tile
    (a zero probability times inf/NaN); the same holds for q, k, v and dout in the gradients.
    """
    _check_inputs(q, k, v, mask)
    scale = _check_scale(softmax_scale, q.shape[-1])
    name = select(ATTENTION, backend, q, scale)
    tables, blocks = ATTENTION.module(name).prepare(mask, q, k)
    out, lse = _attention_fwd(q, k, v, mask.kv_start, mask.kv_end, tables, blocks, scale, name)
    return (out, lse) if return_lse else out


__all__ = ["ATTENTION", "hybrid_attention"]
