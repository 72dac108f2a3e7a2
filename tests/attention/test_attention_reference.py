"""The reference backend against a naive dense softmax whose mask comes from a double loop."""

import pytest
import torch

import transfusion_kernels as tk
from transfusion_kernels.attention import reference
from tests.layouts import LAYOUTS, naive_dense
from tests.oracles import dense_attention


def inputs(nq, nk, hq, hkv, d, dtype=torch.float32):
    q = torch.randn(nq, hq, d, dtype=dtype, requires_grad=True)
    k = torch.randn(nk, hkv, d, dtype=dtype, requires_grad=True)
    v = torch.randn(nk, hkv, d, dtype=dtype, requires_grad=True)
    return q, k, v


def check_against_dense(mask, allowed, hq=4, hkv=2, d=16, chunk_elems=None, monkeypatch=None):
    if chunk_elems is not None:
        monkeypatch.setattr(reference, "_CHUNK_ELEMS", chunk_elems)
    q, k, v = inputs(mask.num_queries, mask.num_keys, hq, hkv, d)
    out, lse = tk.hybrid_attention(q, k, v, mask, return_lse=True, backend="reference")
    q64, k64, v64 = (t.detach().double().requires_grad_() for t in (q, k, v))
    ref, ref_lse = dense_attention(q64, k64, v64, allowed, d**-0.5)
    torch.testing.assert_close(out.double(), ref, atol=2e-5, rtol=2e-5)
    torch.testing.assert_close(lse.double(), ref_lse, atol=2e-5, rtol=2e-5)
    dout = torch.randn_like(out)
    grads = torch.autograd.grad(out, (q, k, v), dout)
    ref_grads = torch.autograd.grad(ref, (q64, k64, v64), dout.double())
    for g, rg in zip(grads, ref_grads):
        torch.testing.assert_close(g.double(), rg, atol=5e-5, rtol=5e-5)


@pytest.mark.parametrize("name", LAYOUTS)
def test_layouts(name, seed):
    cu, spans = LAYOUTS[name]
    mask = tk.HybridMask.from_spans(
        torch.tensor(cu, dtype=torch.int32), torch.tensor(spans, dtype=torch.int32).reshape(-1, 2)
    )
    check_against_dense(mask, naive_dense(cu, spans))


def test_chunking_does_not_change_results(seed, monkeypatch):
    cu, spans = LAYOUTS["several_documents"]
    mask = tk.HybridMask.from_spans(torch.tensor(cu, dtype=torch.int32), torch.tensor(spans, dtype=torch.int32))
    check_against_dense(
        mask, naive_dense(cu, spans), chunk_elems=4 * 127 * 16, monkeypatch=monkeypatch
    )  # 16 queries a chunk


def test_cached_prefix_and_empty_rows(seed):
    mask = tk.HybridMask.cached([7, 0, 3], [4, 1, 2], bidirectional=True)
    check_against_dense(mask, mask.to_dense(), hq=6, hkv=3)
    s = torch.tensor([0, 2, 5, 5], dtype=torch.int32)
    e = torch.tensor([3, 2, 9, 6], dtype=torch.int32)  # row 1 sees nothing
    empty = tk.HybridMask.from_intervals(s, e, num_keys=10)
    check_against_dense(empty, empty.to_dense(), hq=2, hkv=1)


@pytest.mark.parametrize("dtype", [torch.float16, torch.bfloat16])
def test_low_precision_output_dtype(dtype, seed):
    mask = tk.HybridMask.causal(torch.tensor([0, 20], dtype=torch.int32))
    q, k, v = inputs(20, 20, 2, 2, 8, dtype)
    out, lse = tk.hybrid_attention(q, k, v, mask, return_lse=True, backend="reference")
    assert out.dtype == dtype and lse.dtype == torch.float32
    ref, _ = dense_attention(q.double(), k.double(), v.double(), mask.to_dense(), 8**-0.5)
    torch.testing.assert_close(out.double(), ref, atol=1e-2, rtol=1e-2)


def test_softmax_scale(seed):
    mask = tk.HybridMask.causal(torch.tensor([0, 9], dtype=torch.int32))
    q, k, v = inputs(9, 9, 2, 1, 8)
    out = tk.hybrid_attention(q, k, v, mask, softmax_scale=0.3, backend="reference")
    ref, _ = dense_attention(q.double(), k.double(), v.double(), mask.to_dense(), 0.3)
    torch.testing.assert_close(out.double(), ref, atol=2e-5, rtol=2e-5)


def test_bad_inputs():
    mask = tk.HybridMask.causal(torch.tensor([0, 8], dtype=torch.int32))
    q, k, v = inputs(8, 8, 4, 2, 16)
    with pytest.raises(ValueError, match="multiple of key/value heads"):
        tk.hybrid_attention(q, k[:, :1].expand(8, 3, 16), v[:, :1].expand(8, 3, 16), mask)
    with pytest.raises(ValueError, match="q has 7 tokens but the mask has 8"):
        tk.hybrid_attention(q[:7], k, v, mask)
    with pytest.raises(ValueError, match="k has 9 tokens"):
        tk.hybrid_attention(q, torch.randn(9, 2, 16), torch.randn(9, 2, 16), mask)
    with pytest.raises(ValueError, match="share a dtype"):
        tk.hybrid_attention(q, k.half(), v.half(), mask)
    with pytest.raises(ValueError, match="same head_dim"):
        tk.hybrid_attention(q, torch.randn(8, 2, 8), torch.randn(8, 2, 8), mask)
    with pytest.raises(TypeError, match="tk.HybridMask"):
        tk.hybrid_attention(q, k, v, mask.to_dense())
    with pytest.raises(ValueError, match="unit stride"):
        tk.hybrid_attention(q.transpose(0, 2).contiguous().transpose(0, 2), k, v, mask)


def test_torch_compile_fullgraph(seed):
    mask = tk.HybridMask.from_spans(
        torch.tensor([0, 24], dtype=torch.int32), torch.tensor([[4, 12]], dtype=torch.int32)
    )
    q, k, v = inputs(24, 24, 2, 2, 8)

    def f(q, k, v):
        return tk.hybrid_attention(q, k, v, mask, backend="reference").square().sum()

    compiled = torch.compile(f, fullgraph=True, backend="aot_eager")
    loss = compiled(q, k, v)
    grads = torch.autograd.grad(loss, (q, k, v))
    loss_e = f(q, k, v)
    grads_e = torch.autograd.grad(loss_e, (q, k, v))
    torch.testing.assert_close(loss, loss_e)
    for a, b in zip(grads, grads_e):
        torch.testing.assert_close(a, b)


def test_score_workspace_is_per_thread(seed):
    """Score blocks come from a per-thread workspace: two threads running the reference at once
    on different masks and inputs get what each gets alone."""
    import threading

    cases = []
    for n, cu in ((96, [0, 40, 96]), (130, [0, 130])):
        mask = tk.HybridMask.causal(torch.tensor(cu, dtype=torch.int32))
        q, k, v = inputs(n, n, 4, 2, 16)
        alone = torch.autograd.grad(tk.hybrid_attention(q, k, v, mask, backend="reference").sum(), (q, k, v))
        cases.append((mask, (q, k, v), alone))
    results = [None, None]

    def run(i):
        mask, (q, k, v), _ = cases[i]
        got = []
        for _ in range(20):
            got = torch.autograd.grad(tk.hybrid_attention(q, k, v, mask, backend="reference").sum(), (q, k, v))
        results[i] = got

    threads = [threading.Thread(target=run, args=(i,)) for i in range(2)]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    for (_, _, alone), got in zip(cases, results):
        for a, b in zip(alone, got):
            torch.testing.assert_close(a, b, rtol=0, atol=0)
