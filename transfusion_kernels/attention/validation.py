"""Argument checks of hybrid attention, done once by the public function before the custom ops
run: a backend trusts what reaches it (the contract in the package docstring)."""

from __future__ import annotations

import math
import numbers

import torch

from transfusion_kernels.attention.ops import _tokens
from transfusion_kernels.masks import HybridMask

_DTYPES = (torch.float16, torch.bfloat16, torch.float32)


def _check_inputs(q, k, v, mask) -> None:
    """q, k, v: [tokens, heads, head_dim] alike, or (batched, read through their strides) [B, N,
    heads, head_dim] alike."""
    if not isinstance(mask, HybridMask):
        raise TypeError(f"mask must be a tk.HybridMask, got {type(mask).__name__}")
    dims = q.dim() if isinstance(q, torch.Tensor) and q.dim() in (3, 4) else 3
    for name, t in (("q", q), ("k", k), ("v", v)):
        if not isinstance(t, torch.Tensor) or t.dim() != dims:
            raise ValueError(
                f"{name} must be a 3-D tensor [tokens, heads, head_dim], got {getattr(t, 'shape', type(t))}"
            )
        if t.shape[-2] < 1 or t.shape[-1] < 1:
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
    if dims == 4 and q.shape[0] != k.shape[0]:
        raise ValueError(f"q and k must have the same batch size, got {q.shape[0]} and {k.shape[0]}")
    if q.shape[-1] != k.shape[-1]:
        raise ValueError(f"q and k must have the same head_dim, got {q.shape[-1]} and {k.shape[-1]}")
    if q.shape[-2] % k.shape[-2]:
        raise ValueError(f"query heads ({q.shape[-2]}) must be a multiple of key/value heads ({k.shape[-2]})")
    if _tokens(q) != mask.num_queries:
        raise ValueError(f"q has {_tokens(q)} tokens but the mask has {mask.num_queries} queries")
    if _tokens(k) != mask.num_keys:
        raise ValueError(f"k has {_tokens(k)} tokens but the mask has {mask.num_keys} keys")


def _check_scale(softmax_scale, head_dim: int) -> float:
    if softmax_scale is None:
        return head_dim**-0.5
    if isinstance(softmax_scale, torch.Tensor) and softmax_scale.numel() == 1 and not softmax_scale.is_complex():
        softmax_scale = softmax_scale.item()
    real = isinstance(softmax_scale, numbers.Real) and not isinstance(softmax_scale, bool)
    if not real or not math.isfinite(softmax_scale):
        raise ValueError(f"softmax_scale must be a finite real number or None, got {softmax_scale!r}")
    return float(softmax_scale)


def _check_softcap(softcap) -> float:
    """0.0 for no cap (None or 0, as FlashAttention), else the positive cap."""
    if softcap is None:
        return 0.0
    if isinstance(softcap, torch.Tensor) and softcap.numel() == 1 and not softcap.is_complex():
        softcap = softcap.item()
    real = isinstance(softcap, numbers.Real) and not isinstance(softcap, bool)
    if not real or not math.isfinite(softcap) or softcap < 0:
        raise ValueError(
            f"softcap must be None or a finite real number >= 0 (scores -> softcap * tanh(scores / "
            f"softcap); 0 or None: no cap), got {softcap!r}"
        )
    return float(softcap)


_LAYOUTS = ("bnhd", "bhnd")


def _batched(q, k, v, layout: str):
    """4-D [B, N, H, D] ("bnhd") or [B, H, N, D] ("bhnd") tensors as [B * N, H, D] views when the
    strides of all three allow it, else as [B, N, H, D] views that the kernels read through their
    strides (the triton kernels; the other backends flatten them with one copy)."""
    views = []
    for name, x in (("q", q), ("k", k), ("v", v)):
        if not isinstance(x, torch.Tensor) or x.dim() != 4:
            raise ValueError(
                f"{name} must be 4-D like q, got shape {tuple(getattr(x, 'shape', ())) or type(x).__name__}"
            )
        views.append(x if layout == "bnhd" else x.transpose(1, 2))
    try:
        return [y.view(-1, *y.shape[2:]) for y in views]
    except RuntimeError:
        return views
