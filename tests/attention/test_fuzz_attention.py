"""hybrid_attention on random masks, dtypes, head counts (GQA), head dims and layouts, every
backend against a float64 dense oracle, forward and backward, with the rule of the op tests
(tests/attention/common.py): error <= 2 x the same-dtype PyTorch error + floor.
Plus random malformed calls, which must raise ValueError / TypeError and nothing else."""

from __future__ import annotations

import contextlib
import warnings
from unittest import mock

import pytest
import torch
from hypothesis import event, given
from hypothesis import strategies as st

import transfusion_kernels as tk
from transfusion_kernels.attention import ATTENTION
from tests.attention.common import FLOOR, assert_rule
from tests.fuzzing import DEVICE, FAST_BACKENDS, GPU, budget, layouts, poisoned
from tests.layouts import naive_dense
from tests.oracles import dense_attention

DTYPES = [torch.float16, torch.bfloat16, torch.float32]
# inputs a backend does not cover run on the next one with a warning (tested in test_hardening.py)
pytestmark = pytest.mark.filterwarnings("ignore:transfusion_kernels fallback")


def small_attention_tiles():
    """16-row tiles under the interpreter, so the fuzzed lengths span up to 9 query tiles (and
    key tiles), many of them partial; a GPU runs its own configs."""
    if GPU or "triton" not in FAST_BACKENDS:
        return contextlib.nullcontext()
    from transfusion_kernels.attention import triton as tkt

    small = tkt.AttentionConfig(
        fwd=tkt.KernelConfig(16, 16, 1, 1), dkdv=tkt.KernelConfig(16, 16, 1, 1), dq=tkt.KernelConfig(16, 16, 1, 1)
    )
    return mock.patch.object(tkt, "INTERPRET_CONFIG", small)


@st.composite
def masks(draw):
    """(mask, dense bool [Nq, Nk] from an independent construction, self-attention?)"""
    kind = draw(st.sampled_from(["spans", "spans", "causal", "intervals", "union", "cached"]))
    if kind in ("spans", "causal"):
        cu, spans = draw(layouts(max_tokens=130))
        spans = spans if kind == "spans" else []
        mask = tk.HybridMask.from_spans(
            torch.tensor(cu, dtype=torch.int32, device=DEVICE),
            torch.tensor(spans, dtype=torch.int32, device=DEVICE).reshape(-1, 2),
        )
        return mask, naive_dense(cu, spans), True
    if kind == "cached":
        b = draw(st.integers(1, 3))
        cache = draw(st.lists(st.integers(0, 40), min_size=b, max_size=b))
        new = draw(st.lists(st.integers(0, 24), min_size=b, max_size=b))
        mask = tk.HybridMask.cached(cache, new, bidirectional=draw(st.booleans()), device=DEVICE)
        return mask, mask.to_dense().cpu(), False
    nq, nk = draw(st.integers(1, 100)), draw(st.integers(1, 100))
    if kind == "union":  # K sorted, disjoint intervals per row: 2K sorted endpoints
        k = draw(st.integers(2, 8))
        pts = [sorted(draw(st.lists(st.integers(0, nk), min_size=2 * k, max_size=2 * k))) for _ in range(nq)]
        s = torch.tensor([p[0::2] for p in pts], dtype=torch.int32)
        e = torch.tensor([p[1::2] for p in pts], dtype=torch.int32)
        j = torch.arange(nk)[None, :, None]
        dense = ((j >= s[:, None, :]) & (j < e[:, None, :])).any(-1)
        event(f"union of {k}")
        return tk.HybridMask.from_intervals(s.to(DEVICE), e.to(DEVICE), num_keys=nk), dense, False
    ends = [sorted(draw(st.tuples(st.integers(0, nk), st.integers(0, nk)))) for _ in range(nq)]
    s = torch.tensor([a for a, _ in ends], dtype=torch.int32)
    e = torch.tensor([b for _, b in ends], dtype=torch.int32)
    dense = (torch.arange(nk)[None, :] >= s[:, None]) & (torch.arange(nk)[None, :] < e[:, None])
    return tk.HybridMask.from_intervals(s.to(DEVICE), e.to(DEVICE), num_keys=nk), dense, False


def stored_out_effect(q, k, v, dout, stored_out, allowed, scale):
    """float64 (dq, dk, dv) with delta = rowsum(dout * stored_out), minus the same with the exact
    out: how far the backward's algorithm lands from the oracle when out is stored rounded."""
    g = q.shape[1] // k.shape[1]
    kr, vr = k.detach().repeat_interleave(g, 1), v.detach().repeat_interleave(g, 1)
    q = q.detach()
    s = torch.einsum("ihd,jhd->hij", q, kr) * scale
    p = torch.softmax(s.masked_fill(~allowed, float("-inf")), -1).nan_to_num(0.0)
    exact_out = torch.einsum("hij,jhd->ihd", p, vr)
    dp = torch.einsum("ihd,jhd->hij", dout, vr)

    def grads(out):
        ds = p * (dp - (dout * out).sum(-1).t()[..., None])
        dq = torch.einsum("hij,jhd->ihd", ds, kr) * scale
        dk = (torch.einsum("hij,ihd->jhd", ds, q) * scale).unflatten(1, (-1, g)).sum(2)
        return dq, dk, torch.zeros_like(v)  # dv = p^T dout does not use delta

    return [a - b for a, b in zip(grads(stored_out), grads(exact_out))]


def fp32_bounds(q, k, v, dout, allowed, scale):
    """float64 scale of the fp32 math's error in (out, lse, dq, dk, dv). The softmax weights carry
    a relative error of a few roundings of their exponent, eps * (|s| + |lse|), growing with the
    logits (the Triton kernels round it up to four times: scale * log2(e), lse to base 2 and
    back), and the backward multiplies it, with one rounding of dp - delta, into every gradient."""
    g = q.shape[1] // k.shape[1]
    kr, vr = k.repeat_interleave(g, 1), v.repeat_interleave(g, 1)
    s = (torch.einsum("ihd,jhd->hij", q, kr) * scale).masked_fill(~allowed, float("-inf"))
    lse = torch.logsumexp(s, -1)
    p = torch.softmax(s, -1).nan_to_num(0.0)
    out = torch.einsum("hij,jhd->ihd", p, vr)
    dp = torch.einsum("ihd,jhd->hij", dout, vr)
    delta = (dout * out).sum(-1).t()[..., None]
    eps = 4 * torch.finfo(torch.float32).eps
    rel_p = eps * (s.abs().nan_to_num(0.0, posinf=0.0) + lse.abs().nan_to_num(0.0, posinf=0.0)[..., None] + 1)
    ds = p * (
        rel_p * (dp - delta).abs()
        + eps * (torch.einsum("ihd,jhd->hij", dout.abs(), vr.abs()) + (dout.abs() * out.abs()).sum(-1).t()[..., None])
    )
    return (
        torch.einsum("hij,jhd->ihd", p * rel_p, vr.abs()),
        (rel_p.amax(-1) if rel_p.shape[-1] else rel_p.sum(-1)) * allowed.any(-1),
        abs(scale) * torch.einsum("hij,jhd->ihd", ds, kr.abs()),
        (abs(scale) * torch.einsum("hij,ihd->jhd", ds, q.abs())).unflatten(1, (-1, g)).sum(2),
        torch.einsum("hij,ihd->jhd", p * rel_p, dout.abs()).unflatten(1, (-1, g)).sum(2),
    )


def inputs(mask, hq, hkv, d, dtype, packed, seed):
    g = torch.Generator().manual_seed(seed)
    if packed:  # views into one qkv projection: row stride (hq + 2 hkv) * d
        qkv = torch.randn(mask.num_queries, hq + 2 * hkv, d, generator=g).to(DEVICE, dtype)
        return qkv.split([hq, hkv, hkv], dim=1)
    q = torch.randn(mask.num_queries, hq, d, generator=g).to(DEVICE, dtype)
    k = torch.randn(mask.num_keys, hkv, d, generator=g).to(DEVICE, dtype)
    v = torch.randn(mask.num_keys, hkv, d, generator=g).to(DEVICE, dtype)
    return q, k, v


COMMON = dict(
    case=masks(),
    dtype=st.sampled_from(DTYPES),
    hkv=st.integers(1, 2),
    group=st.integers(1, 3),
    d=st.sampled_from([8, 16, 24, 32, 64, 80, 128]),
    packed=st.booleans(),
    seed=st.integers(0, 2**31 - 1),
)


@budget(20)
@given(scale=st.one_of(st.none(), st.floats(0.05, 1.0)), **COMMON)
def test_backends_against_float64(case, dtype, hkv, group, d, scale, packed, seed):
    """Positive scales: every kernel backend covers them, so each runs its own kernels."""
    check_backends(case, dtype, hkv, group, d, scale, packed, seed)


@budget(4)
@given(scale=st.sampled_from([0.0, -0.3]), **COMMON)
def test_nonpositive_scales(case, dtype, hkv, group, d, scale, packed, seed):
    """softmax_scale <= 0: every backend runs them (triton masks after scaling then)."""
    check_backends(case, dtype, hkv, group, d, scale, packed, seed)


def check_backends(case, dtype, hkv, group, d, scale, packed, seed):
    mask, allowed, self_attention = case
    hq = hkv * group
    q, k, v = inputs(mask, hq, hkv, d, dtype, packed and self_attention, seed)
    dout = torch.randn(q.shape, generator=torch.Generator().manual_seed(seed + 1)).to(DEVICE, dtype)
    s = d**-0.5 if scale is None else scale

    ref_in = [t.detach().double().requires_grad_() for t in (q, k, v)]
    low_in = [t.detach().clone().requires_grad_() for t in (q, k, v)]
    allowed = allowed.to(DEVICE)
    ref_out, ref_lse = dense_attention(*ref_in, allowed, s)
    low_out, low_lse = dense_attention(*low_in, allowed, s)
    ref_grads = torch.autograd.grad(ref_out, ref_in, dout.double())
    low_grads = torch.autograd.grad(low_out, low_in, dout)
    # Floors: the op tests' absolute one, or one rounding of the largest result to the dtype;
    # plus the fp32 math's own error scale (fp32_bounds: large logits, e.g. softmax_scale = 1 at
    # head dim 128, cost fp32 inputs far more than the op tests' absolute floor);
    # for the gradients plus what the backward's algorithm costs by design: every backend forms
    # delta = rowsum(dout * out) from the out it returned (rounded to the dtype), as
    # FlashAttention does, which under cancellation (few keys, peaked softmax) moves a gradient
    # by many of its ulps. That cost is computed exactly, in float64, from the backend's out.
    eps = torch.finfo(dtype).eps
    math = [
        b.max().item() if b.numel() else 0.0
        for b in fp32_bounds(*(t.detach() for t in ref_in), dout.double(), allowed, s)
    ]

    def floor(oracle, extra=0.0):
        finite = oracle[torch.isfinite(oracle)]
        return max(FLOOR[dtype], eps * finite.abs().max().item() if finite.numel() else 0.0) + extra

    for backend in ["reference", *FAST_BACKENDS]:
        leaves = [t.detach().clone().requires_grad_() for t in (q, k, v)]
        uncovered = ATTENTION.not_covered(backend, q, s, 0.0, mask.num_intervals)
        if uncovered:  # a named backend runs what its kernels cover, or says why not
            with pytest.raises(tk.BackendUnavailableError, match="does not cover these inputs"):
                tk.hybrid_attention(*leaves, mask, softmax_scale=scale, backend=backend)
            event(f"{backend} refuses: {uncovered}")
            continue
        with poisoned("attention"), small_attention_tiles():
            out, lse = tk.hybrid_attention(*leaves, mask, softmax_scale=scale, return_lse=True, backend=backend)
            grads = torch.autograd.grad(out, leaves, dout)
        stored = stored_out_effect(*ref_in, dout.double(), out.detach().double(), allowed, s)
        assert out.shape == q.shape and out.dtype == dtype and lse.shape == (hq, mask.num_queries), backend
        checks = [("out", out, ref_out, low_out, math[0]), ("lse", lse, ref_lse, low_lse, math[1])]
        checks += [
            (n, g, o, lo, m + (e.abs().max().item() if e.numel() else 0.0))
            for n, g, o, lo, e, m in zip(("dq", "dk", "dv"), grads, ref_grads, low_grads, stored, math[2:])
        ]
        for name, got, oracle, same, extra in checks:
            assert got.shape == oracle.shape and got.dtype in (dtype, torch.float32), f"{backend} {name}"
            try:
                assert_rule(name, got, oracle, same, floor(oracle, extra))
            except AssertionError as e:
                raise AssertionError(f"backend {backend}: {e}") from None


@budget(4)
@given(d=st.integers(257, 300), seed=st.integers(0, 2**31 - 1))
def test_head_dims_no_kernel_covers(d, seed):
    """Beyond every kernel (head dim > 256): a kernel backend asked by name says so in one error;
    auto runs the reference."""
    mask = tk.HybridMask.causal(torch.tensor([0, 9, 20], dtype=torch.int32, device=DEVICE))
    q, k, v = inputs(mask, 2, 1, d, torch.float32, False, seed)
    expected = tk.hybrid_attention(q, k, v, mask, backend="reference")
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")  # auto on a GPU warns when it ends on the reference
        torch.testing.assert_close(tk.hybrid_attention(q, k, v, mask, backend="auto"), expected, rtol=0, atol=0)
    for backend in FAST_BACKENDS:
        with pytest.raises(tk.BackendUnavailableError, match=f"head dim {d}"):
            tk.hybrid_attention(q, k, v, mask, backend=backend)


# ----------------------------------------------------------------------------------------------
# malformed calls
# ----------------------------------------------------------------------------------------------
@st.composite
def calls(draw):
    """A valid call's shapes and dtypes, then up to two random mistakes."""
    nq, nk, hkv, group, d = (draw(st.integers(lo, hi)) for lo, hi in ((0, 6), (0, 6), (1, 2), (1, 3), (1, 8)))
    shapes = [[nq, hkv * group, d], [nk, hkv, d], [nk, hkv, d]]
    dtypes = [draw(st.sampled_from([torch.float16, torch.bfloat16, torch.float32]))] * 3
    scale = draw(st.sampled_from([None, 0.5, 0.0, -1.0]))
    for _ in range(draw(st.integers(0, 2))):
        i = draw(st.integers(0, 2))
        kind = draw(st.sampled_from(["size", "dims", "dtype", "scale"]))
        if kind == "size":
            j = draw(st.integers(0, len(shapes[i]) - 1)) if shapes[i] else 0
            if shapes[i]:
                shapes[i][j] = max(0, shapes[i][j] + draw(st.sampled_from([-1, 1, -9])))
        elif kind == "dims":
            shapes[i] = shapes[i][:-1] if draw(st.booleans()) else shapes[i] + [1]
        elif kind == "dtype":
            dtypes[i] = draw(st.sampled_from([*DTYPES, torch.float64, torch.int32]))
        else:
            scale = draw(st.sampled_from([float("nan"), float("inf"), "x", True]))
    return nq, nk, shapes, dtypes, scale


@budget(150)
@given(call=calls(), backend=st.sampled_from(["reference", *FAST_BACKENDS]))
def test_malformed_calls_raise_value_or_type_errors(call, backend):
    """Shapes, dtypes and scales around a valid call: it runs when the inputs make sense (and
    then gives out of q's shape) and raises ValueError or TypeError otherwise, never anything else."""
    nq, nk, (q_shape, k_shape, v_shape), dtypes, scale = call
    mask = tk.HybridMask.from_intervals(
        torch.zeros(nq, dtype=torch.int32, device=DEVICE),
        torch.full((nq,), nk, dtype=torch.int32, device=DEVICE),
        num_keys=nk,
    )
    q, k, v = (torch.ones(shape, device=DEVICE).to(dt) for shape, dt in zip((q_shape, k_shape, v_shape), dtypes))
    valid = (
        len(q_shape) == len(k_shape) == len(v_shape) == 3
        and dtypes[0] == dtypes[1] == dtypes[2]
        and dtypes[0] in (torch.float16, torch.bfloat16, torch.float32)
        and k_shape == v_shape
        and q_shape[0] == nq
        and k_shape[0] == nk
        and min(q_shape[1:] + k_shape[1:]) >= 1
        and q_shape[2] == k_shape[2]
        and q_shape[1] % k_shape[1] == 0
        and (scale is None or type(scale) is float and abs(scale) < float("inf"))
    )
    event(f"valid call: {valid}")
    if not valid:
        with pytest.raises((ValueError, TypeError)):
            tk.hybrid_attention(q, k, v, mask, softmax_scale=scale, backend=backend)
        return
    s = q_shape[2] ** -0.5 if scale is None else scale
    if ATTENTION.not_covered(backend, q, s, 0.0, 1):  # valid, but not for this backend's kernels
        with pytest.raises(tk.BackendUnavailableError, match="does not cover these inputs"):
            tk.hybrid_attention(q, k, v, mask, softmax_scale=scale, backend=backend)
        return
    out = tk.hybrid_attention(q, k, v, mask, softmax_scale=scale, backend=backend)
    assert out.shape == q.shape and out.dtype == q.dtype
