"""Inputs, the backend runner and the check of the attention tests.

Tolerance rule (as in FlashAttention's tests): a backend's max error against the float64 oracle
must be at most twice the error of the same computation done by PyTorch in the input dtype
(dense softmax attention; its log-sum-exp taken in float32), plus a small absolute floor.
"""

from __future__ import annotations

import torch

import transfusion_kernels as tk
from tests.backend_params import DEVICE, GPU, kernels, require_covered
from tests.oracles import assert_2x, dense_attention

HQ, HKV = (8, 2) if GPU else (4, 2)  # GQA 2:1 on the CPU, 4:1 on a GPU
FLOOR = {torch.float32: 1e-5, torch.float16: 1e-4, torch.bfloat16: 1e-3}


def assert_rule(name, got, oracle, same_dtype, floor):
    assert_2x(name, got, oracle, same_dtype, floor, neg_inf_exact=name == "lse")


def make_inputs(nq, nk, hq, hkv, d, dtype):
    q = torch.randn(nq, hq, d, device=DEVICE).to(dtype)
    k = torch.randn(nk, hkv, d, device=DEVICE).to(dtype)
    v = torch.randn(nk, hkv, d, device=DEVICE).to(dtype)
    return q, k, v


def spans_mask(cu, spans):
    return tk.HybridMask.from_spans(
        torch.tensor(cu, dtype=torch.int32, device=DEVICE),
        torch.tensor(spans, dtype=torch.int32, device=DEVICE).reshape(-1, 2),
    )


def run(backend, q, k, v, mask, dout, scale, config=None, softcap=0.0):
    """Outputs and gradients straight through the backend's functions (prepare, forward,
    backward); ``config`` overrides the triton block sizes."""
    mod = kernels("attention", backend)
    plan = mod.prepare(mask, q, k) if config is None else mod.prepare(mask, q, k, config)
    args = (mask.starts, mask.ends, plan, scale, softcap)
    out, lse = mod.forward(q, k, v, *args)
    grads = None if dout is None else mod.backward(dout, q, k, v, out, lse, *args)
    return out, lse, grads


def blocks(fwd, dkdv, dq, warps=1, stages=1):
    """A triton AttentionConfig from (block_m, block_n) per kernel: fwd, dk/dv, dq."""
    from transfusion_kernels.attention import triton as tkt

    return tkt.AttentionConfig(*(tkt.KernelConfig(m, n, warps, stages) for m, n in (fwd, dkdv, dq)))


def check(
    backend,
    mask,
    *,
    hq=HQ,
    hkv=HKV,
    d=64,
    dtype=torch.bfloat16,
    allowed=None,
    grads=True,
    config=None,
    scale=None,
    inputs=None,
    softcap=None,
):
    """Backend vs float64 oracle vs same-dtype PyTorch: out, lse and (optionally) dq, dk, dv.
    Skips when the backend's kernels do not cover the inputs."""
    allowed = mask.to_dense() if allowed is None else allowed.to(DEVICE)
    scale = d**-0.5 if scale is None else scale
    q, k, v = inputs if inputs is not None else make_inputs(mask.num_queries, mask.num_keys, hq, hkv, d, dtype)
    require_covered("attention", backend, q, scale, softcap or 0.0, mask.num_intervals)
    dout = torch.randn(q.shape, device=DEVICE).to(q.dtype) if grads else None
    out, lse, kgrads = run(backend, q, k, v, mask, dout, scale, config, softcap or 0.0)
    assert out.shape == q.shape and out.dtype == q.dtype and out.is_contiguous()
    assert lse.shape == (q.shape[1], q.shape[0]) and lse.dtype == torch.float32

    ref_in = [t.detach().double().requires_grad_() for t in (q, k, v)]
    low_in = [t.detach().clone().requires_grad_() for t in (q, k, v)]
    ref_out, ref_lse = dense_attention(*ref_in, allowed, scale, softcap)
    low_out, low_lse = dense_attention(*low_in, allowed, scale, softcap, lse_dtype=torch.float32)
    floor = FLOOR[q.dtype]
    assert_rule("out", out, ref_out, low_out, floor)
    assert_rule("lse", lse, ref_lse, low_lse, floor)
    if grads:
        ref_g = torch.autograd.grad(ref_out, ref_in, dout.double())
        low_g = torch.autograd.grad(low_out, low_in, dout)
        for name, g, rg, lg, x in zip(("dq", "dk", "dv"), kgrads, ref_g, low_g, (q, k, v)):
            assert g.shape == x.shape and g.dtype == x.dtype and g.is_contiguous(), name
            assert_rule(name, g, rg, lg, floor)
    return out, lse, kgrads


def union_mask(nq, nk, k, gen, empty_rows=True):
    """K sorted, disjoint intervals per row from 2K sorted endpoints: gaps, empty slots, rows
    whose slots are numbered differently from their neighbours', and (optionally) empty rows."""
    pts = torch.randint(0, nk + 1, (nq, 2 * k), generator=gen).sort(1).values
    if empty_rows:
        pts[nq // 3 : nq // 3 + 5] = pts[nq // 3 : nq // 3 + 5, :1]  # five rows that see nothing
    return tk.HybridMask.from_intervals(pts[:, 0::2].to(DEVICE), pts[:, 1::2].to(DEVICE), nk)
