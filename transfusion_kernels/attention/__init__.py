"""Hybrid-mask attention: dispatch, torch.library custom ops and autograd.

Backend modules (reference.py, triton.py, cuda.py) each define (the kernel backends also
``supports(q, scale, softcap, num_intervals) -> reason or None``, what their kernels cover, for
``backends.select``):

    Plan: a dataclass (plan.KernelPlan) of what the kernels read of a mask, with named fields;
    prepare(mask, q, k) -> Plan
        built from the mask's tile plans (plan.py, cached on the mask);
    forward(q, k, v, starts, ends, plan, scale, softcap) -> (out [Nq, Hq, D], lse [Hq, Nq] fp32)
    backward(dout, q, k, v, out, lse, starts, ends, plan, scale, softcap) -> (dq, dk, dv)

starts and ends are the mask's int32 [Nq, K] intervals; softcap is 0.0 for none. The custom ops
take plain tensors (the plan as ``plan.op_args()``), so ``torch.compile`` traces them without
graph breaks.
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


def _tokens(x: torch.Tensor) -> int:
    """Tokens of a [tokens, H, D] or batched [B, N, H, D] tensor."""
    return x.shape[0] * x.shape[1] if x.dim() == 4 else x.shape[0]


def _flat(x: torch.Tensor) -> torch.Tensor:
    """[B, N, H, D] as [B * N, H, D] (a copy when the strides do not allow a view)."""
    return x.reshape(-1, *x.shape[2:]) if x.dim() == 4 else x


def _module(backend: str, q: torch.Tensor):
    """The backend's module, and whether it takes batched [B, N, H, D] inputs as they are."""
    module = ATTENTION.module(backend)
    return module, q.dim() == 3 or getattr(module, "BATCHED_INPUTS", False)


@torch.library.custom_op("transfusion_kernels::hybrid_attention_fwd", mutates_args=())
def _attention_fwd(
    q: torch.Tensor,
    k: torch.Tensor,
    v: torch.Tensor,
    starts: torch.Tensor,
    ends: torch.Tensor,
    plan_tensors: list[torch.Tensor],
    plan_ints: list[int],
    scale: float,
    softcap: float,
    backend: str,
) -> tuple[torch.Tensor, torch.Tensor]:
    if _tokens(q) == 0:  # no queries (an empty batch, or no new tokens against a cache): no launch
        return q.new_empty(q.shape[:-1] + v.shape[-1:]), q.new_empty((q.shape[-2], 0), dtype=torch.float32)
    module, takes_batched = _module(backend, q)
    plan = module.Plan.from_op_args(plan_tensors, plan_ints)
    if takes_batched:
        return module.forward(q, k, v, starts, ends, plan, scale, softcap)
    out, lse = module.forward(_flat(q), _flat(k), _flat(v), starts, ends, plan, scale, softcap)
    return out.view(q.shape[:-1] + v.shape[-1:]), lse


@_attention_fwd.register_fake
def _(q, k, v, starts, ends, plan_tensors, plan_ints, scale, softcap, backend):
    return q.new_empty(q.shape[:-1] + v.shape[-1:]), q.new_empty((q.shape[-2], _tokens(q)), dtype=torch.float32)


@torch.library.custom_op("transfusion_kernels::hybrid_attention_bwd", mutates_args=())
def _attention_bwd(
    dout: torch.Tensor,
    q: torch.Tensor,
    k: torch.Tensor,
    v: torch.Tensor,
    out: torch.Tensor,
    lse: torch.Tensor,
    starts: torch.Tensor,
    ends: torch.Tensor,
    plan_tensors: list[torch.Tensor],
    plan_ints: list[int],
    scale: float,
    softcap: float,
    backend: str,
) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    if _tokens(q) == 0:  # no query sees any key
        return torch.empty_like(q), torch.zeros_like(k), torch.zeros_like(v)
    module, takes_batched = _module(backend, q)
    plan = module.Plan.from_op_args(plan_tensors, plan_ints)
    if takes_batched:
        return module.backward(dout, q, k, v, out, lse, starts, ends, plan, scale, softcap)
    grads = module.backward(
        _flat(dout), _flat(q), _flat(k), _flat(v), _flat(out), lse, starts, ends, plan, scale, softcap
    )
    # laid out as the fake implementation promises (empty_like of each input)
    return tuple(torch.empty_like(x).copy_(g.view(x.shape)) for x, g in zip((q, k, v), grads))


@_attention_bwd.register_fake
def _(dout, q, k, v, out, lse, starts, ends, plan_tensors, plan_ints, scale, softcap, backend):
    return torch.empty_like(q), torch.empty_like(k), torch.empty_like(v)


def _setup_context(ctx, inputs, output):
    q, k, v, starts, ends, plan_tensors, plan_ints, scale, softcap, backend = inputs
    out, lse = output
    ctx.save_for_backward(q, k, v, out, lse, starts, ends, *plan_tensors)
    ctx.plan_ints, ctx.scale, ctx.softcap, ctx.backend = plan_ints, scale, softcap, backend


def _backward(ctx, dout, dlse):
    # lse is returned for inspection and merging partial results; it is not differentiated.
    q, k, v, out, lse, starts, ends, *plan_tensors = ctx.saved_tensors
    dq, dk, dv = _attention_bwd(
        dout.contiguous(),
        q,
        k,
        v,
        out,
        lse,
        starts,
        ends,
        plan_tensors,
        ctx.plan_ints,
        ctx.scale,
        ctx.softcap,
        ctx.backend,
    )
    # One entry per input, nested like the inputs: a list of Nones for the tensor list; the int
    # list is a single leaf, except when empty (then an empty list).
    return (dq, dk, dv, None, None, [None] * len(plan_tensors), None if ctx.plan_ints else [], None, None, None)


_attention_fwd.register_autograd(_backward, setup_context=_setup_context)


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


def hybrid_attention(
    q, k, v, mask: HybridMask, softmax_scale=None, return_lse=False, backend=None, *, softcap=None, layout=None
):
    """Attention where query i sees the keys of its intervals: ``[mask.kv_start[i], mask.kv_end[i])``,
    or their union over k for a mask of K > 1 intervals per query.

    q: [Nq, Hq, D]; k, v: [Nk, Hkv, D] with Hq a multiple of Hkv (grouped-query attention);
    float16, bfloat16 or float32, all three alike, unit stride in the head dim. Or batched
    tensors with one mask over the B * N tokens: ``layout="bnhd"`` (the default for 4-D, as
    FlashAttention: [B, N, H, D]) or ``"bhnd"`` (as SDPA: [B, H, N, D]); these are read as
    strided views where their strides allow (contiguous [B, N, H, D], or B = 1), else copied once.
    Padding is part of the mask: a padded query that sees nothing gets output 0.
    ``softcap=c`` maps scores s to ``c * tanh(s / c)`` before the softmax (Gemma 2, FlashAttention).
    Returns out shaped like q (and lse [Hq, Nq] fp32, natural log, if ``return_lse``; [B, Hq, N]
    for 4-D inputs). Differentiable in q, k and v; lse is not differentiated. A query that sees no
    key gets output 0 and lse -inf.

    Inputs a backend's kernels do not cover (see README, "Supported shapes and dtypes") run on
    the next backend (cuda -> triton -> reference) with one warning per reason.

    Non-finite inputs: a NaN/inf in query row i or in a key that row i sees makes out[i] and
    lse[i] NaN, and leaves every other row as it would be without it. A non-finite value in v
    reaches every query that sees its key, and may also reach queries computed in the same tile
    (a zero probability times inf/NaN); the same holds for q, k, v and dout in the gradients.
    """
    batched = isinstance(q, torch.Tensor) and q.dim() == 4
    if batched or layout is not None:
        layout = "bnhd" if layout is None else layout
        if layout not in _LAYOUTS:
            raise ValueError(f"layout must be 'bnhd' ([B, N, H, D]) or 'bhnd' ([B, H, N, D]), got {layout!r}")
        shape = q.shape
        q, k, v = _batched(q, k, v, layout)
    _check_inputs(q, k, v, mask)
    scale = _check_scale(softmax_scale, q.shape[-1])
    cap = _check_softcap(softcap)
    name = select(ATTENTION, backend, q, scale, cap, mask.num_intervals)
    plan_tensors, plan_ints = ATTENTION.module(name).prepare(mask, q, k).op_args()
    out, lse = _attention_fwd(q, k, v, mask.starts, mask.ends, plan_tensors, plan_ints, scale, cap, name)
    if batched:
        b, n = (shape[0], shape[1]) if layout == "bnhd" else (shape[0], shape[2])
        out = out.view(b, n, *out.shape[-2:])
        out = out if layout == "bnhd" else out.transpose(1, 2)
        lse = lse.view(lse.shape[0], b, n).transpose(0, 1)
    return (out, lse) if return_lse else out


from transfusion_kernels.attention.flex import flex_attention  # noqa: E402  (it calls hybrid_attention)

__all__ = ["ATTENTION", "flex_attention", "hybrid_attention"]
