"""tk.flex_attention against torch's flex_attention, and batched [B, N, H, D] / [B, H, N, D]
inputs of tk.hybrid_attention against the packed call (reference backend: the same kernels'
inputs, so the layout handling is what is tested; the kernels themselves are tested per backend)."""

import gc

import pytest
import torch

import transfusion_kernels as tk
from transfusion_kernels.attention import _batched
from transfusion_kernels.attention import flex as tkf

flex = pytest.importorskip("torch.nn.attention.flex_attention")


def transfusion_mod(b, h, q_idx, kv_idx):
    """Causal plus a bidirectional image at tokens [10, 20), and, in sample 1, keys [3, 6) hidden
    from every later query (two intervals for those rows)."""
    image = (q_idx >= 10) & (q_idx < 20) & (kv_idx >= 10) & (kv_idx < 20)
    hidden = (b == 1) & (kv_idx >= 3) & (kv_idx < 6) & (q_idx >= 6)
    return ((kv_idx <= q_idx) | image) & ~hidden


@pytest.mark.parametrize("mask_batch", [None, 2])
@pytest.mark.parametrize("softcap", [None, 4.0])
def test_flex_attention_matches_torch(mask_batch, softcap, seed):
    b, hq, hkv, n, d = 2, 4, 2, 40, 16
    mod = transfusion_mod if mask_batch else (lambda b, h, q, k: k <= q)
    bm = flex.create_block_mask(mod, mask_batch, None, n, n, device="cpu", BLOCK_SIZE=16)
    q = torch.randn(b, hq, n, d)
    k, v = torch.randn(b, hkv, n, d), torch.randn(b, hkv, n, d)
    score_mod = None if softcap is None else (lambda s, *_: softcap * torch.tanh(s / softcap))
    want, want_lse = flex.flex_attention(q, k, v, block_mask=bm, score_mod=score_mod, enable_gqa=True, return_lse=True)
    got, lse = tk.flex_attention(q, k, v, block_mask=bm, softcap=softcap, enable_gqa=True, return_lse=True)
    assert got.shape == want.shape and lse.shape == want_lse.shape
    torch.testing.assert_close(got, want, rtol=1e-5, atol=1e-5)
    torch.testing.assert_close(lse, want_lse, rtol=1e-5, atol=1e-5)


def test_flex_attention_gradients_match_the_packed_call(seed):
    """Gradients through the [B, H, N, D] entry equal those of the same mask over B * N packed
    tokens (torch's flex_attention has no CPU backward to compare with)."""
    b, h, n, d = 2, 2, 24, 8
    bm = flex.create_block_mask(transfusion_mod, b, None, n, n, device="cpu", BLOCK_SIZE=16)
    q, k, v = (torch.randn(b, h, n, d, requires_grad=True) for _ in range(3))
    out = tk.flex_attention(q, k, v, block_mask=bm, softcap=3.0)
    mask = tkf._mask_for(bm, b, n, n, "cpu")
    assert mask.num_intervals == 2
    packed = [t.detach().transpose(1, 2).reshape(b * n, h, d).requires_grad_() for t in (q, k, v)]
    ref = tk.hybrid_attention(*packed, mask, softcap=3.0).view(b, n, h, d).transpose(1, 2)
    torch.testing.assert_close(out, ref, rtol=0, atol=0)
    dout = torch.randn_like(out)
    for g, r in zip(torch.autograd.grad(out, (q, k, v), dout), torch.autograd.grad(ref, packed, dout)):
        torch.testing.assert_close(g.transpose(1, 2).reshape(b * n, h, d), r, rtol=0, atol=0)


def test_flex_attention_no_mask_and_refusals():
    q = torch.randn(2, 2, 8, 4)
    want = flex.flex_attention(q, q, q)
    torch.testing.assert_close(tk.flex_attention(q, q, q), want, rtol=1e-5, atol=1e-5)
    with pytest.raises(ValueError, match="pass softcap=c instead"):
        tk.flex_attention(q, q, q, score_mod=lambda s, *_: s)
    with pytest.raises(ValueError, match="enable_gqa=True"):
        tk.flex_attention(q, q[:, :1], q[:, :1])
    with pytest.raises(ValueError, match="4-D tensor"):
        tk.flex_attention(q[0], q[0], q[0])
    bm = flex.create_block_mask(lambda b, h, qi, ki: ki <= qi, None, None, 16, 16, device="cpu", BLOCK_SIZE=16)
    with pytest.raises(ValueError, match="block_mask is for Q_LEN = 16"):
        tk.flex_attention(q, q, q, block_mask=bm)


def test_block_mask_conversion_is_cached_and_not_kept_alive():
    q = torch.randn(1, 2, 32, 4)
    bm = flex.create_block_mask(lambda b, h, qi, ki: ki <= qi, None, None, 32, 32, device="cpu", BLOCK_SIZE=16)
    tk.flex_attention(q, q, q, block_mask=bm)
    first = tkf._CONVERTED[bm][(1, 32, 32, "cpu")]
    tk.flex_attention(q, q, q, block_mask=bm)
    assert tkf._CONVERTED[bm][(1, 32, 32, "cpu")] is first
    n = len(tkf._CONVERTED)
    del bm
    gc.collect()
    assert len(tkf._CONVERTED) == n - 1


@pytest.mark.parametrize("layout", ["bnhd", "bhnd"])
def test_batched_layouts_equal_the_packed_call(layout, seed):
    """One mask over B * N tokens, padding included: padded tokens see nothing and are seen by
    nothing, their outputs are 0; out, lse and gradients equal the packed [B * N, H, D] call."""
    b, n, h, d = 3, 12, 2, 8
    lengths = [12, 7, 1]
    s, e = [], []
    for i, length in enumerate(lengths):
        for t in range(n):
            base = i * n
            s.append(base if t < length else base)
            e.append(base + t + 1 if t < length else base)
    mask = tk.HybridMask.from_intervals(s, e, b * n)
    shape = (b, n, h, d) if layout == "bnhd" else (b, h, n, d)
    q, k, v = (torch.randn(shape, requires_grad=True) for _ in range(3))
    out, lse = tk.hybrid_attention(q, k, v, mask, return_lse=True, layout=layout)
    to_packed = (
        (lambda t: t.reshape(b * n, h, d)) if layout == "bnhd" else (lambda t: t.transpose(1, 2).reshape(b * n, h, d))
    )
    packed = [to_packed(t.detach()).requires_grad_() for t in (q, k, v)]
    ref, ref_lse = tk.hybrid_attention(*packed, mask, return_lse=True)
    assert out.shape == shape and lse.shape == (b, h, n)
    torch.testing.assert_close(to_packed(out), ref, rtol=0, atol=0)
    torch.testing.assert_close(lse, ref_lse.view(h, b, n).transpose(0, 1), rtol=0, atol=0)
    pad = torch.tensor([t >= length for length in lengths for t in range(n)])
    assert torch.all(to_packed(out)[pad] == 0)
    dout = torch.randn_like(out)
    for g, r in zip(torch.autograd.grad(out, (q, k, v), dout), torch.autograd.grad(ref, packed, to_packed(dout))):
        torch.testing.assert_close(to_packed(g), r, rtol=0, atol=0)
        assert torch.all(to_packed(g)[pad] == 0)


def test_batched_views_are_not_copied():
    """Contiguous [B, N, H, D], and [B, H, N, D] with B = 1, become [B * N, H, D] views; [B, H, N,
    D] with B > 1 stays a [B, N, H, D] view that the triton kernels read through its strides."""
    x = torch.randn(3, 5, 2, 4)
    assert all(y._base is x and y.shape == (15, 2, 4) for y in _batched(x, x, x, "bnhd"))
    y = torch.randn(1, 2, 5, 4)
    assert all(z._base is y and z.shape == (5, 2, 4) for z in _batched(y, y, y, "bhnd"))
    z = torch.randn(3, 2, 5, 4)
    assert all(w._base is z and w.shape == (3, 5, 2, 4) for w in _batched(z, z, z, "bhnd"))
    with pytest.raises(ValueError, match="layout must be 'bnhd'"):
        tk.hybrid_attention(x, x, x, tk.HybridMask.causal([0, 15]), layout="nhd")


def test_explicit_cuda_with_more_intervals_than_its_kernels_names_the_reason(monkeypatch):
    """The cuda kernels take up to 4 intervals per query: an explicit request with more is an
    error that says so, never a silent run elsewhere (here the backend is faked available)."""
    from transfusion_kernels import backends

    real = backends.backend_info
    monkeypatch.setattr(
        backends,
        "backend_info",
        lambda name, device: backends.BackendInfo(name, True, "faked") if name == "cuda" else real(name, device),
    )
    q = torch.randn(10, 2, 64, dtype=torch.float16)
    mask = tk.HybridMask.from_intervals([[0, 2, 4, 6, 8]] * 10, [[1, 3, 5, 7, 9]] * 10, num_keys=10)
    with pytest.raises(tk.BackendUnavailableError, match="5 intervals per query"):
        tk.hybrid_attention(q, q, q, mask, backend="cuda", softcap=2.0)
