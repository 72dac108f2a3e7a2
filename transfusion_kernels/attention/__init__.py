"""Hybrid-mask attention. The op's folder, as every op's: this public function (checks, then
dispatch), ``ops.py`` (the custom ops, their fakes and autograd), ``validation.py`` (the one layer
of argument checks), and the backends ``reference.py``, ``triton.py``, ``cuda.py``; ``plan.py``
builds the tile plans the kernels read and ``flex.py`` is the FlexAttention-style entry point.

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

import torch

from transfusion_kernels.attention.ops import ATTENTION, _attention_fwd
from transfusion_kernels.attention.validation import _LAYOUTS, _batched, _check_inputs, _check_scale, _check_softcap
from transfusion_kernels.backends import select
from transfusion_kernels.masks import HybridMask


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

    ``backend``: None or "auto" picks on a GPU the first of triton, cuda whose kernels cover the
    inputs, else the reference, and on the CPU the reference (``tk.explain`` says which and why). A named backend whose kernels do not cover
    the inputs (README, "Supported shapes and dtypes") raises ``BackendUnavailableError`` naming
    the reason.

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
