"""The CUDA interval-attention forward (csrc/attention/) against a float64 dense softmax, with
the same computation in the input dtype as the baseline of the 2x rule (as in FlashAttention's
tests). Needs a CUDA device and the built extension; kernel outputs start NaN-filled."""
from __future__ import annotations

import pytest
import torch

import transfusion_kernels as tk
from transfusion_kernels.backends import load_extension
from tests.layouts import LAYOUTS, naive_dense, random_layout

pytestmark = [
    pytest.mark.gpu,
    pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA device"),
    pytest.mark.skipif(load_extension()[0] is None, reason="transfusion_kernels._C is not built"),
]

FLOOR = {torch.float32: 1e-5, torch.float16: 1e-4, torch.bfloat16: 1e-3}


@pytest.fixture(autouse=True)
def poison(monkeypatch):
    from transfusion_kernels.attention import cuda as tkc

    monkeypatch.setattr(tkc, "_empty", lambda shape, dtype, device: torch.full(shape, float("nan"), dtype=dtype, device=device))


def dense_attention(q, k, v, allowed, scale):
    """Softmax attention in the inputs' dtype, GQA by head repetition; empty rows give 0."""
    g = q.shape[1] // k.shape[1]
    k, v = k.repeat_interleave(g, 1), v.repeat_interleave(g, 1)
    s = torch.einsum("ihd,jhd->hij", q, k) * scale
    s = s.masked_fill(~allowed, float("-inf"))
    lse = torch.logsumexp(s.float(), -1)
    p = torch.softmax(s, -1).nan_to_num(0.0)
    return torch.einsum("hij,jhd->ihd", p, v), lse


def assert_rule(name, got, oracle, same_dtype, floor):
    got, oracle, same = got.double(), oracle.double(), same_dtype.double()
    if name == "lse":  # -inf exactly where the oracle's row is empty
        empty = oracle == float("-inf")
        assert torch.equal(got == float("-inf"), empty), "lse: -inf rows differ from the empty rows"
        got, oracle, same = got[~empty], oracle[~empty], same[~empty]
    assert torch.isfinite(got).all(), f"{name}: non-finite values (unwritten or NaN)"
    if got.numel() == 0:
        return
    err = (got - oracle).abs().max().item()
    base = (same - oracle).abs().max().item()
    assert err <= 2 * base + floor, f"{name}: kernel error {err:.3g} > 2 x torch error {base:.3g} + {floor:g}"


def run_cuda(q, k, v, mask, scale):
    from transfusion_kernels.attention import cuda as tkc

    tables, blocks = tkc.prepare(mask, q, k)
    return tkc.forward(q, k, v, mask.kv_start, mask.kv_end, tables, blocks, scale)


def check(mask, *, hq=8, hkv=2, d=64, dtype=torch.bfloat16, allowed=None, scale=None, inputs=None):
    allowed = (mask.to_dense() if allowed is None else allowed).cuda()
    scale = d ** -0.5 if scale is None else scale
    if inputs is None:
        inputs = tuple(torch.randn(n, h, d, device="cuda").to(dtype)
                       for n, h in ((mask.num_queries, hq), (mask.num_keys, hkv), (mask.num_keys, hkv)))
    q, k, v = inputs
    out, lse = run_cuda(q, k, v, mask, scale)
    assert out.shape == q.shape and out.dtype == q.dtype and out.is_contiguous()
    assert lse.shape == (q.shape[1], q.shape[0]) and lse.dtype == torch.float32
    ref_out, ref_lse = dense_attention(*(t.double() for t in (q, k, v)), allowed, scale)
    low_out, low_lse = dense_attention(q, k, v, allowed, scale)
    assert_rule("out", out, ref_out, low_out, FLOOR[q.dtype])
    assert_rule("lse", lse, ref_lse, low_lse, FLOOR[q.dtype])
    return out, lse


def spans_mask(cu, spans):
    return tk.HybridMask.from_spans(torch.tensor(cu, dtype=torch.int32, device="cuda"),
                                    torch.tensor(spans, dtype=torch.int32, device="cuda").reshape(-1, 2))


@pytest.mark.parametrize("d", [64, 128])
@pytest.mark.parametrize("dtype", [torch.float16, torch.bfloat16], ids=str)
@pytest.mark.parametrize("name", list(LAYOUTS))
def test_layouts(name, dtype, d, seed):
    cu, spans = LAYOUTS[name]
    check(spans_mask(cu, spans), d=d, dtype=dtype, allowed=naive_dense(cu, spans))


@pytest.mark.parametrize("heads", [(8, 8), (8, 2), (4, 1)])
@pytest.mark.parametrize("d", [64, 128])
def test_long_random_layouts_and_gqa(heads, d, seed):
    gen = torch.Generator().manual_seed(seed)
    cu, spans = random_layout(gen, 3000, max_docs=4, max_images=5)
    check(spans_mask(cu, spans), hq=heads[0], hkv=heads[1], d=d, dtype=torch.float16)


@pytest.mark.parametrize(
    "cache_lens,query_lens,bidirectional",
    [([37], [16], True), ([50], [1], False), ([7, 0, 33, 64], [4, 1, 2, 40], True),
     ([300, 5, 129], [64, 65, 1], False)],
)
def test_sampling_masks(cache_lens, query_lens, bidirectional, seed):
    mask = tk.HybridMask.cached(cache_lens, query_lens, bidirectional=bidirectional, device="cuda")
    check(mask, d=128, dtype=torch.bfloat16)


def test_empty_rows_and_unsorted_intervals(seed):
    gen = torch.Generator().manual_seed(seed)
    n, nk = 200, 230
    s = torch.randint(0, nk, (n,), generator=gen)
    e = torch.maximum(torch.minimum(s + torch.randint(0, 90, (n,), generator=gen), torch.tensor(nk - 20)), s)
    s[64:128] = 5
    e[64:128] = 5  # one whole 64-query tile of empty rows
    s[3], e[3] = 17, 17
    mask = tk.HybridMask.from_intervals(s.int().cuda(), e.int().cuda(), num_keys=nk)
    out, lse = check(mask, d=64, dtype=torch.float16)
    assert torch.all(out[64:128] == 0) and torch.all(lse[:, 64:128] == float("-inf"))


def test_keys_outside_the_intervals_are_never_used(seed):
    """K/V rows nobody sees are NaN: they must not reach out or lse (zero-filled or skipped)."""
    nq, nk, d = 150, 300, 64
    s = 100 + torch.arange(nq) * 60 // nq
    e = torch.clamp(s + 1 + torch.arange(nq) % 70, max=200)
    mask = tk.HybridMask.from_intervals(s.int().cuda(), e.int().cuda(), num_keys=nk)
    q = torch.randn(nq, 4, d, device="cuda").half()
    k, v = torch.randn(nk, 2, d, device="cuda").half(), torch.randn(nk, 2, d, device="cuda").half()
    clean = run_cuda(q, k, v, mask, d ** -0.5)
    for t in (k, v):
        t[:100] = float("nan")
        t[200:] = float("nan")
    dirty = run_cuda(q, k, v, mask, d ** -0.5)
    for got, want in zip(dirty, clean):
        assert torch.isfinite(want).all()
        torch.testing.assert_close(got, want, rtol=0, atol=0)


def test_strided_and_misaligned_inputs(seed):
    cu, spans = LAYOUTS["several_documents"]
    mask = spans_mask(cu, spans)
    n, d = mask.num_queries, 64
    qkv = torch.randn(n, 8 + 2 * 2, d, device="cuda").to(torch.float16)
    q, k, v = qkv.split([8, 2, 2], dim=1)  # views: row stride 12 * D
    out, _ = check(mask, d=d, inputs=(q, k, v), allowed=naive_dense(cu, spans))
    out_c, _ = run_cuda(q.contiguous(), k.contiguous(), v.contiguous(), mask, d ** -0.5)
    torch.testing.assert_close(out, out_c, rtol=0, atol=0)
    flat = torch.randn(1 + n * 8 * d, device="cuda").half()
    q_odd = flat[1:].view(n, 8, d)  # 2 bytes past a 16-byte boundary: copied before the kernel
    check(mask, d=d, inputs=(q_odd, k, v), allowed=naive_dense(cu, spans))


def test_public_op_forward_and_backward(seed):
    """Through tk.hybrid_attention: the CUDA forward composes with the backward it delegates to."""
    cu, spans = LAYOUTS["spans_cross_tiles"]
    mask = spans_mask(cu, spans)
    q, k, v = (torch.randn(mask.num_queries, h, 64, device="cuda").bfloat16().requires_grad_() for h in (8, 2, 2))
    out = tk.hybrid_attention(q, k, v, mask, backend="cuda")
    dout = torch.randn_like(out)
    grads = torch.autograd.grad(out, (q, k, v), dout)
    ref_in = [t.detach().double().requires_grad_() for t in (q, k, v)]
    low_in = [t.detach().clone().requires_grad_() for t in (q, k, v)]
    allowed = naive_dense(cu, spans).cuda()
    ref_out, _ = dense_attention(*ref_in, allowed, 64 ** -0.5)
    low_out, _ = dense_attention(*low_in, allowed, 64 ** -0.5)
    assert_rule("out", out.detach(), ref_out, low_out, FLOOR[torch.bfloat16])
    ref_g = torch.autograd.grad(ref_out, ref_in, dout.double())
    low_g = torch.autograd.grad(low_out, low_in, dout)
    for name, g, rg, lg in zip(("dq", "dk", "dv"), grads, ref_g, low_g):
        assert_rule(name, g, rg, lg, FLOOR[torch.bfloat16])


@pytest.mark.parametrize("dtype,d", [(torch.float32, 64), (torch.float16, 96)])
def test_shapes_the_kernel_does_not_cover_still_run(dtype, d, seed):
    cu, spans = LAYOUTS["several_images"]
    check(spans_mask(cu, spans), d=d, dtype=dtype, allowed=naive_dense(cu, spans))
