"""tk.hybrid_attention on every backend (reference, triton, cuda) against a float64 dense softmax,
under the 2x rule of tests/attention/common.py.

A backend that cannot run here, or whose kernels do not cover a case's inputs, is skipped with
the dispatcher's reason. On a CPU triton runs under the interpreter (small shapes); with CUDA the
same tests run on the GPU with more heads, the cuda backend with each forward kernel the device
has (mma.sync, and wgmma on compute capability 9.0), plus the larger GPU-only cases at the end.
Every buffer the kernels write is allocated NaN-filled, so an element they forget to write fails.
Backend internals are tested apart: the triton tile configs in test_triton_configs.py, the CUDA
C++ (host emulation, bindings, tile orders) in tests/cuda/test_cuda_attention.py.
"""

import threading

import pytest
import torch

import transfusion_kernels as tk
from transfusion_kernels.attention import reference
from tests.attention.common import (
    DEVICE,
    GPU,
    HKV,
    HQ,
    blocks,
    check,
    make_inputs,
    run,
    spans_mask,
    union_mask,
)
from tests.backend_params import poison, require, require_covered
from tests.layouts import LAYOUTS, naive_dense, random_layout
from tests.oracles import dense_attention

gpu_only = pytest.mark.skipif(not GPU, reason="needs CUDA")
# The cuda backend once per forward kernel (TRANSFUSION_CUDA_ATTENTION_FWD).
CUDA = [pytest.param(f"cuda-{k}", marks=pytest.mark.gpu) for k in ("mma", "wgmma")]


def _setup(name, monkeypatch):
    backend, _, fwd = name.partition("-")
    require(backend)
    if fwd:
        from transfusion_kernels.attention import cuda as tkc

        if fwd == "wgmma" and not tkc.sm90_supported(DEVICE):
            pytest.skip("the wgmma forward needs compute capability 9.0 and an sm_90a build")
        monkeypatch.setenv(tkc.FWD_ENV, fwd)
    poison("attention", backend, monkeypatch)
    return backend


@pytest.fixture(params=["reference", "triton", *CUDA])
def backend(request, monkeypatch):
    return _setup(request.param, monkeypatch)


@pytest.fixture(params=["triton", *CUDA])
def kernel_backend(request, monkeypatch):
    """The kernel backends, compared with the reference backend."""
    return _setup(request.param, monkeypatch)


# ----------------------------------------------------------------------------------------------
# docs/design.md §5 layouts (lengths 1, 17, 63, 64, 65, 127, 129, 130)
# ----------------------------------------------------------------------------------------------
HEADS = {"image_first": (HQ, 1), "several_documents": (HKV, HKV)}  # MQA and MHA; GQA elsewhere
# On the CPU every layout once (both head dims, every dtype over the layouts); on a GPU every
# layout in both head dims and both half dtypes, plus float32.
LAYOUT_CASES = (
    [
        ("text_only", 64, torch.bfloat16),
        ("single_token", 128, torch.float16),
        ("image_only", 128, torch.bfloat16),
        ("image_first", 64, torch.float16),
        ("image_last", 128, torch.float32),
        ("several_images", 64, torch.bfloat16),
        ("several_documents", 128, torch.bfloat16),
        ("spans_cross_tiles", 64, torch.float16),
    ]
    if not GPU
    else [(name, d, dtype) for name in LAYOUTS for d in (64, 128) for dtype in (torch.float16, torch.bfloat16)]
    + [("image_last", 128, torch.float32)]
)


@pytest.mark.parametrize("name,d,dtype", LAYOUT_CASES, ids=[f"{c[0]}-d{c[1]}-{str(c[2])[6:]}" for c in LAYOUT_CASES])
def test_layouts(backend, name, d, dtype, seed):
    cu, spans = LAYOUTS[name]
    hq, hkv = HEADS.get(name, (HQ, HKV))
    check(backend, spans_mask(cu, spans), hq=hq, hkv=hkv, d=d, dtype=dtype, allowed=naive_dense(cu, spans))


@pytest.mark.parametrize("dtype", [torch.float16, torch.bfloat16, torch.float32])
def test_dtypes_and_scale(backend, dtype, seed):
    cu, spans = LAYOUTS["several_images"]
    check(backend, spans_mask(cu, spans), d=64, dtype=dtype, scale=0.3)


@pytest.mark.parametrize("d", [32, 96, 256] if not GPU else [16, 32, 80, 96, 256])
def test_other_head_dims(backend, d, seed):
    """Head dims padded to a power of two inside the triton kernels (96 -> 128) and the 256 configs."""
    cu, spans = [0, 50, 83], [(10, 30), (60, 83)]
    check(backend, spans_mask(cu, spans), hq=2, hkv=1, d=d, dtype=torch.bfloat16, allowed=naive_dense(cu, spans))


# (heads, head dim, dtype): one case under the interpreter, GQA groups of 1, 4 and 8 on a GPU
LONG_CASES = (
    [((2, 1), 64, torch.bfloat16)]
    if not GPU
    else [(h, d, torch.float16) for h in ((8, 8), (8, 2), (4, 1)) for d in (64, 128)] + [((8, 2), 64, torch.bfloat16)]
)


@pytest.mark.parametrize(
    "heads,d,dtype", LONG_CASES, ids=[f"h{h[0]}x{h[1]}-d{d}-{str(t)[6:]}" for h, d, t in LONG_CASES]
)
def test_long_random_layout(backend, heads, d, dtype, seed):
    """~1000 tokens (4096 on a GPU), random documents and images, forward and backward. The
    oracle's mask is mask.to_dense() here (tests/test_masks.py holds it to the naive loop)."""
    gen = torch.Generator().manual_seed(seed)
    cu, spans = random_layout(gen, 1000 if not GPU else 4096, max_docs=4, max_images=5)
    config = None
    if backend == "triton" and not GPU:  # fewer interpreted steps
        config = blocks((64, 64), (32, 64), (64, 64))
    check(backend, spans_mask(cu, spans), hq=heads[0], hkv=heads[1], d=d, dtype=dtype, config=config)


# ----------------------------------------------------------------------------------------------
# unions of K intervals per query, logit softcap
# ----------------------------------------------------------------------------------------------
@pytest.mark.parametrize("k,d,dtype", [(2, 64, torch.bfloat16), (4, 32, torch.float16), (8, 64, torch.float32)])
def test_union_masks(backend, k, d, dtype, seed):
    """K = 2, 4, 8 against the float64 oracle of the union (the dense mask), forward and backward,
    several programs on each grid axis."""
    mask = union_mask(75, 90, k, torch.Generator().manual_seed(seed))
    check(backend, mask, d=d, dtype=dtype)


def test_union_mask_bagel_like(backend, seed):
    """Two samples; in each, a noise split hidden from the rest: later queries see the sample's
    prefix and themselves, around the hidden block (K = 2, FULL runs on both sides of the gap)."""
    cu = [0, 70, 130]
    rows = []
    for s0, ns, ne, s1 in ((0, 20, 45, 70), (70, 90, 100, 130)):
        for i in range(s0, s1):
            if i < ns:
                rows.append(([s0, i + 1], [i + 1, i + 1]))
            elif i < ne:
                rows.append(([s0, ne], [ne, ne]))
            else:
                rows.append(([s0, ne], [ns, i + 1]))
    starts = torch.tensor([r[0] for r in rows])
    ends = torch.tensor([r[1] for r in rows])
    mask = tk.HybridMask.from_intervals(starts.to(DEVICE), ends.to(DEVICE), cu[-1])
    assert mask.num_intervals == 2
    check(backend, mask, d=64, dtype=torch.bfloat16)


@pytest.mark.parametrize(
    "cap,k,d,dtypes",
    [
        (2.0, 1, 32, (torch.float32, torch.bfloat16)),
        (0.5, 3, 32, (torch.float32, torch.bfloat16)),
        (1.5, 2, 64, (torch.bfloat16,)),
    ],  # the last one a shape the cuda kernels cover
)
def test_softcap(backend, cap, k, d, dtypes, seed):
    """scores -> cap * tanh(scores / cap): a cap the scores reach (they are larger than it) in
    forward and backward, with one interval per query and with unions."""
    gen = torch.Generator().manual_seed(seed)
    if k == 1:
        cu, spans = LAYOUTS["several_images"]
        mask = spans_mask(cu, spans)
    else:
        mask = union_mask(70, 70, k, gen)
    for dtype in dtypes:
        check(backend, mask, d=d, dtype=dtype, softcap=cap, scale=0.5)


def test_softcap_through_dispatcher_and_reference(kernel_backend, seed):
    """softcap= through tk.hybrid_attention: the kernel backend and the reference agree (fp32)."""
    mask = union_mask(40, 50, 2, torch.Generator().manual_seed(seed))
    q, k, v = (t.requires_grad_() for t in make_inputs(40, 50, HQ, HKV, 32, torch.float32))
    require_covered("attention", kernel_backend, q, 1.0, 1.5, mask.num_intervals)
    dout = torch.randn(q.shape, device=DEVICE)
    got = [tk.hybrid_attention(q, k, v, mask, softcap=1.5, backend=b) for b in (kernel_backend, "reference")]
    grads = [torch.autograd.grad(o, (q, k, v), dout) for o in got]
    torch.testing.assert_close(got[0], got[1], rtol=1e-5, atol=1e-5)
    for g, r in zip(*grads):
        torch.testing.assert_close(g, r, rtol=1e-4, atol=1e-4)


@pytest.mark.parametrize("layout", ["bhnd", "bnhd_padded"])
def test_batched_strided_inputs(backend, layout, seed):
    """[B, H, N, D] with B > 1 (and [B, N, H, D] inside a larger buffer) cannot be viewed as
    [B * N, H, D]: the kernels read them through their batch strides, and give exactly what they
    give on the packed copy; padded tokens (sample 1 is 20 tokens of 37) see nothing."""
    b, n, d = 3, 37, 32
    rows = []
    for i, length in enumerate((37, 20, 37)):
        for t in range(n):
            rows.append((i * n, i * n + (t + 1 if t < length else 0)))
    mask = tk.HybridMask.from_intervals([r[0] for r in rows], [r[1] for r in rows], b * n).to(DEVICE)
    if layout == "bhnd":
        q, k, v = (torch.randn(b, h, n, d, device=DEVICE).to(torch.bfloat16) for h in (HQ, HKV, HKV))
        flat = [x.transpose(1, 2).reshape(b * n, x.shape[1], d) for x in (q, k, v)]
    else:  # every sample's rows sit in a buffer with room for 40 tokens
        q, k, v = (torch.randn(b, 40, h, d, device=DEVICE).to(torch.bfloat16)[:, :n] for h in (HQ, HKV, HKV))
        flat = [x.reshape(b * n, x.shape[2], d) for x in (q, k, v)]
    require_covered("attention", backend, flat[0], d**-0.5, 0.0, mask.num_intervals)
    kind = "bhnd" if layout == "bhnd" else "bnhd"
    ins = [x.clone().requires_grad_() for x in (q, k, v)]
    out, lse = tk.hybrid_attention(*ins, mask, return_lse=True, backend=backend, layout=kind)
    flat_ins = [x.clone().requires_grad_() for x in flat]
    want, want_lse = tk.hybrid_attention(*flat_ins, mask, return_lse=True, backend=backend)
    to_flat = (
        (lambda t: t.transpose(1, 2).reshape(b * n, *t.shape[1:2], d))
        if kind == "bhnd"
        else (lambda t: t.reshape(b * n, t.shape[2], d))
    )
    torch.testing.assert_close(to_flat(out), want, rtol=0, atol=0)
    torch.testing.assert_close(lse.transpose(0, 1).reshape(HQ, b * n), want_lse, rtol=0, atol=0)
    dout = torch.randn(out.shape, device=DEVICE).to(out.dtype)
    grads = torch.autograd.grad(out, ins, dout)
    want_grads = torch.autograd.grad(want, flat_ins, to_flat(dout))
    for g, w in zip(grads, want_grads):
        torch.testing.assert_close(to_flat(g), w, rtol=0, atol=0)
    check(backend, mask, d=d, dtype=torch.bfloat16, inputs=[x.detach() for x in flat])  # the packed call is right


# ----------------------------------------------------------------------------------------------
# sampling masks (Nq != Nk), empty rows, general intervals
# ----------------------------------------------------------------------------------------------
SAMPLING_CASES = [
    pytest.param([37], [16], True, id="image_chunk"),  # an image chunk against a cached prefix plus itself
    pytest.param([50], [1], False, id="single_query"),  # one text query against its cache
    pytest.param([7, 0, 33, 64], [4, 1, 2, 40], True, id="batch_bidirectional"),  # different cache lengths
    pytest.param([7, 0, 33, 64], [4, 1, 2, 40], False, id="batch_causal"),
]
if GPU:  # query and key tables of several tiles per sample
    SAMPLING_CASES.append(pytest.param([300, 5, 129], [64, 65, 1], False, id="batch_long_cache"))


@pytest.mark.parametrize("cache_lens,query_lens,bidirectional", SAMPLING_CASES)
def test_sampling_masks(backend, cache_lens, query_lens, bidirectional, seed):
    mask = tk.HybridMask.cached(cache_lens, query_lens, bidirectional=bidirectional, device=DEVICE)
    assert mask.num_queries != mask.num_keys
    check(backend, mask, d=128 if GPU else 64, dtype=torch.bfloat16)


def test_empty_rows_and_unsorted_intervals(backend, seed):
    """Rows that see nothing (a whole query tile of them too), intervals that are not monotone
    (the key tables are conservative there), and keys nobody sees (their dk, dv must be exactly 0)."""
    gen = torch.Generator().manual_seed(seed)
    n, nk, empty = (90, 100, slice(40, 72)) if not GPU else (200, 230, slice(64, 128))
    s = torch.randint(0, nk, (n,), generator=gen)
    e = torch.maximum(
        torch.minimum(s + torch.randint(0, 40 if not GPU else 90, (n,), generator=gen), torch.tensor(nk - 20)), s
    )
    s[empty] = 5
    e[empty] = 5  # one full 32-query tile (64 on a GPU) of empty rows
    s[3], e[3] = 17, 17
    mask = tk.HybridMask.from_intervals(s.int().to(DEVICE), e.int().to(DEVICE), num_keys=nk)
    out, lse, (dq, dk, dv) = check(backend, mask, d=64, dtype=torch.bfloat16 if not GPU else torch.float16)
    assert torch.all(out[empty] == 0) and torch.all(lse[:, empty] == float("-inf"))
    assert torch.all(dq[empty] == 0) and torch.all(dq[3] == 0)
    unseen = ~mask.to_dense().any(0)
    assert unseen[nk - 20 :].all()
    assert torch.all(dk[unseen] == 0) and torch.all(dv[unseen] == 0)


def test_keys_outside_the_intervals_are_never_read(backend, seed):
    """Queries see only keys [lo, hi): K/V rows outside are NaN and must not reach out, lse, dq,
    nor the dk/dv of the keys that are seen (a key tile's program may load its own unseen rows)."""
    nq, nk, lo, hi, spread, width = (70, 120, 40, 80, 30, 25) if not GPU else (150, 300, 100, 200, 60, 70)
    d = 64
    s = lo + torch.arange(nq) * spread // nq
    e = torch.clamp(s + 1 + torch.arange(nq) % width, max=hi)
    mask = tk.HybridMask.from_intervals(s.int().to(DEVICE), e.int().to(DEVICE), num_keys=nk)
    q, k, v = make_inputs(nq, nk, HQ, HKV, d, torch.float16)
    require_covered("attention", backend, q, d**-0.5, 0.0, mask.num_intervals)
    dirty_k, dirty_v = k.clone(), v.clone()
    for t in (dirty_k, dirty_v):
        t[:lo] = float("nan")
        t[hi:] = float("nan")
    dout = torch.randn(q.shape, device=DEVICE).to(q.dtype)
    out, lse, (dq, dk, dv) = run(backend, q, dirty_k, dirty_v, mask, dout, d**-0.5)
    c_out, c_lse, (c_dq, c_dk, c_dv) = run(backend, q, k, v, mask, dout, d**-0.5)
    seen = slice(lo, hi)
    for got, want in ((out, c_out), (lse, c_lse), (dq, c_dq), (dk[seen], c_dk[seen]), (dv[seen], c_dv[seen])):
        assert torch.isfinite(want).all()
        torch.testing.assert_close(got, want, rtol=0, atol=0)


def test_strided_and_misaligned_inputs(backend, seed):
    """q, k, v as views into one packed qkv projection (row stride != heads * D) and a transposed
    dout: strides are passed to the kernels (same bits as contiguous copies); a base 2 bytes past
    a 16-byte boundary is right too (on a GPU)."""
    cu, spans = LAYOUTS["several_documents"]
    mask = spans_mask(cu, spans)
    n, d = mask.num_queries, 64
    qkv = torch.randn(n, HQ + 2 * HKV, d, device=DEVICE).to(torch.float16)
    q, k, v = qkv.split([HQ, HKV, HKV], dim=1)
    assert not q.is_contiguous() and not k.is_contiguous()
    check(backend, mask, d=d, dtype=torch.float16, inputs=(q, k, v), allowed=naive_dense(cu, spans))
    dout = torch.randn(HQ, n, d, device=DEVICE).to(torch.float16).transpose(0, 1)
    got = run(backend, q, k, v, mask, dout, d**-0.5)
    want = run(backend, q.contiguous(), k.contiguous(), v.contiguous(), mask, dout.contiguous(), d**-0.5)
    for g, w in zip((got[0], got[1], *got[2]), (want[0], want[1], *want[2])):
        torch.testing.assert_close(g, w, rtol=0, atol=0)
    if GPU:  # where loads are vectorised
        flat = torch.randn(1 + n * HQ * d, device=DEVICE).half()
        q_odd = flat[1:].view(n, HQ, d)  # 2 bytes past a 16-byte boundary
        check(backend, mask, d=d, dtype=torch.float16, inputs=(q_odd, k, v), allowed=naive_dense(cu, spans))


def test_deterministic(backend, seed):
    """Two runs give the same bits (no atomics in any backward)."""
    if backend == "triton" and not GPU:
        pytest.skip("the triton interpreter runs one program at a time: only a GPU can show a race")
    gen = torch.Generator().manual_seed(seed)
    cu, spans = random_layout(gen, 1500 if GPU else 200, max_docs=3, max_images=4)
    mask = spans_mask(cu, spans)
    d = 128 if GPU else 64
    q, k, v = make_inputs(mask.num_queries, mask.num_keys, HQ, HKV, d, torch.bfloat16)
    require_covered("attention", backend, q, 0.1, 0.0, mask.num_intervals)
    dout = torch.randn_like(q)
    first = run(backend, q, k, v, mask, dout, 0.1)
    second = run(backend, q, k, v, mask, dout, 0.1)
    for a, b in zip((first[0], first[1], *first[2]), (second[0], second[1], *second[2])):
        assert torch.equal(a, b)


# ----------------------------------------------------------------------------------------------
# the public op: dispatcher, custom op, torch.compile, validation
# ----------------------------------------------------------------------------------------------
def test_matches_reference_backend(kernel_backend, seed):
    """Same answers as the package's reference backend (fp32 inputs, fp32 math in both)."""
    cu, spans = LAYOUTS["spans_cross_tiles"]
    mask = spans_mask(cu, spans)
    q, k, v = make_inputs(mask.num_queries, mask.num_keys, HQ, HKV, 64, torch.float32)
    require_covered("attention", kernel_backend, q, 0.125, 0.0, mask.num_intervals)
    dout = torch.randn(q.shape, device=DEVICE)
    out, lse, grads = run(kernel_backend, q, k, v, mask, dout, 0.125)
    r_out, r_lse, r_grads = run("reference", q, k, v, mask, dout, 0.125)
    torch.testing.assert_close(out, r_out, rtol=1e-5, atol=1e-5)
    torch.testing.assert_close(lse, r_lse, rtol=1e-5, atol=1e-5)
    for g, rg in zip(grads, r_grads):
        torch.testing.assert_close(g, rg, rtol=1e-4, atol=1e-4)


def test_through_dispatcher(backend, seed):
    """tk.hybrid_attention(..., backend=...): same results as the backend functions, and autograd
    through the registered custom op gives the backend's gradients."""
    cu, spans = LAYOUTS["image_first"]
    mask = spans_mask(cu, spans)
    q, k, v = make_inputs(mask.num_queries, mask.num_keys, HQ, HKV, 64, torch.bfloat16)
    dout = torch.randn(q.shape, device=DEVICE).to(q.dtype)
    out, lse, grads = run(backend, q, k, v, mask, dout, 64**-0.5)
    qg, kg, vg = (t.clone().requires_grad_() for t in (q, k, v))
    d_out, d_lse = tk.hybrid_attention(qg, kg, vg, mask, return_lse=True, backend=backend)
    torch.testing.assert_close(d_out, out, rtol=0, atol=0)
    torch.testing.assert_close(d_lse, lse, rtol=0, atol=0)
    with tk.use_backend(backend):
        d_grads = torch.autograd.grad(tk.hybrid_attention(qg, kg, vg, mask), (qg, kg, vg), dout)
    for g, dg in zip(grads, d_grads):
        torch.testing.assert_close(dg, g, rtol=0, atol=0)


def test_torch_compile_fullgraph(backend, seed):
    """torch.compile traces tk.hybrid_attention (prepare included) without graph breaks; values
    and gradients match eager."""
    cu, spans = LAYOUTS["image_first"]
    mask = spans_mask(cu, spans)
    # the cuda kernels take half dtypes with head dim 64 or 128 only
    d, dtype = (64, torch.bfloat16) if backend == "cuda" else (32, torch.float32)
    q, k, v = (t.requires_grad_() for t in make_inputs(mask.num_queries, mask.num_keys, 2, 1, d, dtype))

    def f(q, k, v):
        return tk.hybrid_attention(q, k, v, mask, backend=backend).square().sum()

    loss = torch.compile(f, fullgraph=True, backend="aot_eager")(q, k, v)
    grads = torch.autograd.grad(loss, (q, k, v))
    loss_e = f(q, k, v)
    grads_e = torch.autograd.grad(loss_e, (q, k, v))
    torch.testing.assert_close(loss, loss_e, rtol=0, atol=0)
    for g, ge in zip(grads, grads_e):
        torch.testing.assert_close(g, ge, rtol=0, atol=0)


def test_bad_inputs():
    mask = tk.HybridMask.causal(torch.tensor([0, 8], dtype=torch.int32))
    q, k, v = (torch.randn(8, h, 16) for h in (4, 2, 2))
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


# ----------------------------------------------------------------------------------------------
# reference backend: chunks of queries, a per-thread score workspace
# ----------------------------------------------------------------------------------------------
def test_reference_chunking_does_not_change_results(seed, monkeypatch):
    """16 queries a chunk: the same answers as the float64 oracle in fp32."""
    monkeypatch.setattr(reference, "_CHUNK_ELEMS", 4 * 127 * 16)
    cu, spans = LAYOUTS["several_documents"]
    mask = tk.HybridMask.from_spans(torch.tensor(cu, dtype=torch.int32), torch.tensor(spans, dtype=torch.int32))
    q, k, v = (torch.randn(n, h, 16, requires_grad=True) for n, h in ((127, 4), (127, 2), (127, 2)))
    out, lse = tk.hybrid_attention(q, k, v, mask, return_lse=True, backend="reference")
    q64, k64, v64 = (t.detach().double().requires_grad_() for t in (q, k, v))
    ref, ref_lse = dense_attention(q64, k64, v64, naive_dense(cu, spans), 16**-0.5)
    torch.testing.assert_close(out.double(), ref, atol=2e-5, rtol=2e-5)
    torch.testing.assert_close(lse.double(), ref_lse, atol=2e-5, rtol=2e-5)
    dout = torch.randn_like(out)
    grads = torch.autograd.grad(out, (q, k, v), dout)
    ref_grads = torch.autograd.grad(ref, (q64, k64, v64), dout.double())
    for g, rg in zip(grads, ref_grads):
        torch.testing.assert_close(g.double(), rg, atol=5e-5, rtol=5e-5)


def test_reference_score_workspace_is_per_thread(seed):
    """Score blocks come from a per-thread workspace: two threads running the reference at once
    on different masks and inputs get what each gets alone."""
    cases = []
    for n, cu in ((96, [0, 40, 96]), (130, [0, 130])):
        mask = tk.HybridMask.causal(torch.tensor(cu, dtype=torch.int32))
        q, k, v = (torch.randn(n, h, 16, requires_grad=True) for h in (4, 2, 2))
        alone = torch.autograd.grad(tk.hybrid_attention(q, k, v, mask, backend="reference").sum(), (q, k, v))
        cases.append((mask, (q, k, v), alone))
    results = [None, None]

    def work(i):
        mask, (q, k, v), _ = cases[i]
        got = []
        for _ in range(20):
            got = torch.autograd.grad(tk.hybrid_attention(q, k, v, mask, backend="reference").sum(), (q, k, v))
        results[i] = got

    threads = [threading.Thread(target=work, args=(i,)) for i in range(2)]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    for (_, _, alone), got in zip(cases, results):
        for a, b in zip(alone, got):
            torch.testing.assert_close(a, b, rtol=0, atol=0)


# ----------------------------------------------------------------------------------------------
# GPU only: large shapes, every supported head dim and dtype
# ----------------------------------------------------------------------------------------------
@pytest.mark.gpu
@gpu_only
@pytest.mark.parametrize("d", [64, 128, 256])
@pytest.mark.parametrize("dtype", [torch.float16, torch.bfloat16], ids=str)
def test_gpu_transfusion_mix(backend, d, dtype, seed):
    """4k tokens: two 2k documents with images of 256 and 1024 patches at odd offsets."""
    cu = [0, 2048, 4096]
    spans = [(5, 261), (300, 1324), (2048 + 77, 2048 + 333), (2048 + 900, 2048 + 1924)]
    check(backend, spans_mask(cu, spans), hq=16, hkv=4, d=d, dtype=dtype)


@pytest.mark.gpu
@gpu_only
def test_gpu_sampling_batch(backend, seed):
    mask = tk.HybridMask.cached([1000, 4097, 17, 2500], [256, 1, 300, 1024], bidirectional=True, device=DEVICE)
    check(backend, mask, hq=16, hkv=4, d=128, dtype=torch.bfloat16)
