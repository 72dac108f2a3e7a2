"""The attention custom ops: ``transfusion_kernels::hybrid_attention_fwd`` and ``_bwd`` with their
fakes and the autograd that links them, each calling the backend module the public function chose.
They take plain tensors (the plan as ``KernelPlan.op_args()``), so ``torch.compile`` traces them
without graph breaks."""

from __future__ import annotations

import torch

from transfusion_kernels.backends import Op

ATTENTION = Op(
    "hybrid_attention",
    {
        "reference": "transfusion_kernels.attention.reference",
        "triton": "transfusion_kernels.attention.triton",
        "cuda": "transfusion_kernels.attention.cuda",
    },
)


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
