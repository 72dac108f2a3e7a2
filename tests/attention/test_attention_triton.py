"""The Triton interval-attention kernels against a float64 dense softmax.

On a CPU the kernels run under the Triton interpreter (small shapes, small blocks); with CUDA
the same tests run on the GPU with more heads, plus the larger GPU-only cases at the end.

Tolerance rule (as in FlashAttention's tests): the kernel's max error against the float64 oracle
must be at most twice the error of the same computation done by PyTorch in the input dtype
(dense softmax attention), plus a small absolute floor. Every buffer the kernels write is
allocated NaN-filled, so an element they forget to write fails the test.
"""

import dataclasses
import json
import os

import torch

if not torch.cuda.is_available():
    # must precede the kernels' import: triton.jit picks the interpreter at decoration time
    os.environ.setdefault("TRITON_INTERPRET", "1")

import pytest

pytest.importorskip("triton")

import transfusion_kernels as tk  # noqa: E402
from transfusion_kernels.attention import reference  # noqa: E402
from transfusion_kernels.attention import triton as tkt  # noqa: E402
from transfusion_kernels.attention.plan import query_runs  # noqa: E402
from tests.layouts import LAYOUTS, naive_dense, random_layout  # noqa: E402
from tests.oracles import assert_2x, dense_attention  # noqa: E402

GPU = torch.cuda.is_available()
DEVICE = "cuda" if GPU else "cpu"
HQ, HKV = (8, 2) if GPU else (4, 2)  # GQA 2:1 on the CPU, 4:1 on a GPU
FLOOR = {torch.float32: 1e-5, torch.float16: 1e-4, torch.bfloat16: 1e-3}


@pytest.fixture(autouse=True)
def poison(monkeypatch):
    """Every kernel output starts as NaN."""

    def nan_empty(shape, dtype, device):
        return torch.full(shape, float("nan"), dtype=dtype, device=device)

    monkeypatch.setattr(tkt, "_empty", nan_empty)


# ----------------------------------------------------------------------------------------------
# oracle and comparison
# ----------------------------------------------------------------------------------------------
def assert_rule(name, got, oracle, same_dtype, floor):
    assert_2x(name, got, oracle, same_dtype, floor, neg_inf_exact=name == "lse")


def make_inputs(nq, nk, hq, hkv, d, dtype):
    q = torch.randn(nq, hq, d, device=DEVICE).to(dtype)
    k = torch.randn(nk, hkv, d, device=DEVICE).to(dtype)
    v = torch.randn(nk, hkv, d, device=DEVICE).to(dtype)
    return q, k, v


def blocks(fwd, dkdv, dq, warps=1, stages=1):
    """An AttentionConfig from (block_m, block_n) per kernel: fwd, dk/dv, dq."""
    return tkt.AttentionConfig(*(tkt.KernelConfig(m, n, warps, stages) for m, n in (fwd, dkdv, dq)))


def run_triton(q, k, v, mask, dout, scale, config=None, softcap=0.0):
    """Kernel outputs and gradients straight through the backend functions (prepare, forward,
    backward); ``config`` overrides the block sizes."""
    plan = tkt.prepare(mask, q, k, config)
    args = (mask.starts, mask.ends, plan, scale, softcap)
    out, lse = tkt.forward(q, k, v, *args)
    grads = None if dout is None else tkt.backward(dout, q, k, v, out, lse, *args)
    return out, lse, grads


def check(
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
    """Kernel vs float64 oracle vs same-dtype PyTorch: out, lse and (optionally) dq, dk, dv."""
    allowed = mask.to_dense() if allowed is None else allowed.to(DEVICE)
    scale = d**-0.5 if scale is None else scale
    q, k, v = inputs if inputs is not None else make_inputs(mask.num_queries, mask.num_keys, hq, hkv, d, dtype)
    dout = torch.randn(q.shape, device=DEVICE).to(dtype) if grads else None
    out, lse, kgrads = run_triton(q, k, v, mask, dout, scale, config, softcap or 0.0)
    assert out.shape == q.shape and out.dtype == dtype
    assert lse.shape == (q.shape[1], q.shape[0]) and lse.dtype == torch.float32

    ref_in = [t.detach().double().requires_grad_() for t in (q, k, v)]
    low_in = [t.detach().clone().requires_grad_() for t in (q, k, v)]
    ref_out, ref_lse = dense_attention(*ref_in, allowed, scale, softcap)
    low_out, low_lse = dense_attention(*low_in, allowed, scale, softcap)
    floor = FLOOR[dtype]
    assert_rule("out", out, ref_out, low_out, floor)
    assert_rule("lse", lse, ref_lse, low_lse, floor)
    if grads:
        ref_g = torch.autograd.grad(ref_out, ref_in, dout.double())
        low_g = torch.autograd.grad(low_out, low_in, dout)
        for name, g, rg, lg, x in zip(("dq", "dk", "dv"), kgrads, ref_g, low_g, (q, k, v)):
            assert g.shape == x.shape and g.dtype == x.dtype, name
            assert_rule(name, g, rg, lg, floor)
    return out, lse, kgrads


def spans_mask(cu, spans):
    return tk.HybridMask.from_spans(
        torch.tensor(cu, dtype=torch.int32, device=DEVICE),
        torch.tensor(spans, dtype=torch.int32, device=DEVICE).reshape(-1, 2),
    )


# ----------------------------------------------------------------------------------------------
# docs/design.md §5 layouts (lengths 1, 17, 63, 64, 65, 127, 129, 130)
# ----------------------------------------------------------------------------------------------
LAYOUT_CASES = [  # (layout, head dim, dtype, (hq, hkv)): every layout, both head dims, all dtypes
    ("text_only", 64, torch.bfloat16, (HQ, HKV)),
    ("single_token", 128, torch.float16, (HQ, HKV)),
    ("image_only", 128, torch.bfloat16, (HQ, HKV)),
    ("image_first", 64, torch.float16, (HQ, 1)),
    ("image_last", 128, torch.float32, (HQ, HKV)),
    ("several_images", 64, torch.bfloat16, (HQ, HKV)),
    ("several_documents", 128, torch.bfloat16, (HKV, HKV)),
    ("spans_cross_tiles", 64, torch.float16, (HQ, HKV)),
]


@pytest.mark.parametrize("name,d,dtype,heads", LAYOUT_CASES, ids=[c[0] for c in LAYOUT_CASES])
def test_layouts(name, d, dtype, heads, seed):
    cu, spans = LAYOUTS[name]
    check(spans_mask(cu, spans), hq=heads[0], hkv=heads[1], d=d, dtype=dtype, allowed=naive_dense(cu, spans))


@pytest.mark.parametrize("dtype", [torch.float16, torch.bfloat16, torch.float32])
def test_dtypes_and_scale(dtype, seed):
    cu, spans = LAYOUTS["several_images"]
    check(spans_mask(cu, spans), d=64, dtype=dtype, scale=0.3)


@pytest.mark.parametrize("d", [32, 96, 256] if not GPU else [16, 32, 80, 96, 256])
def test_other_head_dims(d, seed):
    """Head dims padded to a power of two inside the kernel (96 -> 128) and the 256 configs."""
    cu, spans = [0, 50, 83], [(10, 30), (60, 83)]
    check(spans_mask(cu, spans), hq=2, hkv=1, d=d, dtype=torch.bfloat16, allowed=naive_dense(cu, spans))


def test_long_random_layout(seed):
    """~1000 tokens (4096 on a GPU), random documents and images, forward and backward. The
    oracle's mask is mask.to_dense() here (tests/test_masks.py holds it to the naive loop)."""
    gen = torch.Generator().manual_seed(seed)
    cu, spans = random_layout(gen, 1000 if not GPU else 4096, max_docs=4, max_images=5)
    config = None if GPU else blocks((64, 64), (32, 64), (64, 64))  # fewer interpreted steps
    check(
        spans_mask(cu, spans),
        hq=2 if not GPU else HQ,
        hkv=1 if not GPU else HKV,
        d=64,
        dtype=torch.bfloat16,
        config=config,
    )


# ----------------------------------------------------------------------------------------------
# unions of K intervals per query, logit softcap
# ----------------------------------------------------------------------------------------------
def union_mask(nq, nk, k, gen, empty_rows=True):
    """K sorted, disjoint intervals per row from 2K sorted endpoints: gaps, empty slots, rows
    whose slots are numbered differently from their neighbours', and (optionally) empty rows."""
    pts = torch.randint(0, nk + 1, (nq, 2 * k), generator=gen).sort(1).values
    if empty_rows:
        pts[nq // 3 : nq // 3 + 5] = pts[nq // 3 : nq // 3 + 5, :1]  # five rows that see nothing
    return tk.HybridMask.from_intervals(pts[:, 0::2].to(DEVICE), pts[:, 1::2].to(DEVICE), nk)


@pytest.mark.parametrize("k,d,dtype", [(2, 64, torch.bfloat16), (4, 32, torch.float16), (8, 64, torch.float32)])
def test_union_masks(k, d, dtype, seed):
    """K = 2, 4, 8 against the float64 oracle of the union (the dense mask), forward and backward,
    several programs on each grid axis."""
    mask = union_mask(75, 90, k, torch.Generator().manual_seed(seed))
    check(mask, d=d, dtype=dtype)


def test_union_mask_bagel_like(seed):
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
    check(mask, d=64, dtype=torch.bfloat16)


@pytest.mark.parametrize("cap,k", [(2.0, 1), (0.5, 3)])
def test_softcap(cap, k, seed):
    """scores -> cap * tanh(scores / cap): a cap the scores reach (they are larger than it) in
    forward and backward, with one interval per query and with unions."""
    gen = torch.Generator().manual_seed(seed)
    if k == 1:
        cu, spans = LAYOUTS["several_images"]
        mask = spans_mask(cu, spans)
    else:
        mask = union_mask(70, 70, k, gen)
    for dtype in (torch.float32, torch.bfloat16):
        check(mask, d=32, dtype=dtype, softcap=cap, scale=0.5)


def test_softcap_through_dispatcher_and_reference(seed):
    """softcap= through tk.hybrid_attention: triton and the reference agree (fp32)."""
    mask = union_mask(40, 50, 2, torch.Generator().manual_seed(seed))
    q, k, v = (t.requires_grad_() for t in make_inputs(40, 50, HQ, HKV, 32, torch.float32))
    dout = torch.randn(q.shape, device=DEVICE)
    got = [tk.hybrid_attention(q, k, v, mask, softcap=1.5, backend=b) for b in ("triton", "reference")]
    grads = [torch.autograd.grad(o, (q, k, v), dout) for o in got]
    torch.testing.assert_close(got[0], got[1], rtol=1e-5, atol=1e-5)
    for g, r in zip(*grads):
        torch.testing.assert_close(g, r, rtol=1e-4, atol=1e-4)


@pytest.mark.parametrize("layout", ["bhnd", "bnhd_padded"])
def test_batched_strided_inputs(layout, seed):
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
    kind = "bhnd" if layout == "bhnd" else "bnhd"
    ins = [x.clone().requires_grad_() for x in (q, k, v)]
    out, lse = tk.hybrid_attention(*ins, mask, return_lse=True, backend="triton", layout=kind)
    flat_ins = [x.clone().requires_grad_() for x in flat]
    want, want_lse = tk.hybrid_attention(*flat_ins, mask, return_lse=True, backend="triton")
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
    check(mask, d=d, dtype=torch.bfloat16, inputs=[x.detach() for x in flat])  # and the packed call is right


# ----------------------------------------------------------------------------------------------
# block configurations: the same masks through other tile sizes (tables change with them)
# ----------------------------------------------------------------------------------------------
CONFIGS = [
    blocks((64, 64), (64, 64), (64, 64)),  # tile edges at 63 / 64 / 65
    blocks((16, 32), (32, 16), (64, 16)),  # BN > BM, dk/dv key tile below its query step
    blocks((32, 32), (16, 128), (16, 64)),  # one dk/dv key tile spans the whole layout
]


def config_id(c):
    return "-".join(f"{k}{getattr(c, k).block_m}x{getattr(c, k).block_n}" for k in ("fwd", "dkdv", "dq"))


@pytest.mark.parametrize("config", CONFIGS, ids=config_id)
def test_block_configs(config, seed):
    cu, spans = LAYOUTS["spans_cross_tiles"]
    check(spans_mask(cu, spans), d=64, dtype=torch.float16, allowed=naive_dense(cu, spans), config=config)


# ----------------------------------------------------------------------------------------------
# sampling masks (Nq != Nk), empty rows, general intervals
# ----------------------------------------------------------------------------------------------
@pytest.mark.parametrize(
    "cache_lens,query_lens,bidirectional",
    [
        ([37], [16], True),  # an image chunk against a cached prefix plus itself
        ([50], [1], False),  # one text query against its cache
        ([7, 0, 33, 64], [4, 1, 2, 40], True),  # a batch with different cache lengths
        ([7, 0, 33, 64], [4, 1, 2, 40], False),
    ],
    ids=["image_chunk", "single_query", "batch_bidirectional", "batch_causal"],
)
def test_sampling_masks(cache_lens, query_lens, bidirectional, seed):
    mask = tk.HybridMask.cached(cache_lens, query_lens, bidirectional=bidirectional, device=DEVICE)
    assert mask.num_queries != mask.num_keys
    check(mask, d=64, dtype=torch.bfloat16)


def test_empty_rows_and_unsorted_intervals(seed):
    """Rows that see nothing (a whole tile of them too), intervals that are not monotone (the key
    table is conservative there), and keys nobody sees (their dk, dv must be exactly 0)."""
    n, nk = 90, 100
    s = torch.randint(0, nk, (n,))
    e = torch.minimum(s + torch.randint(0, 40, (n,)), torch.tensor(nk - 20))
    e = torch.maximum(e, s)
    s[40:72] = 5
    e[40:72] = 5  # one full 32-query tile of empty rows
    s[3], e[3] = 17, 17
    mask = tk.HybridMask.from_intervals(s.int().to(DEVICE), e.int().to(DEVICE), num_keys=nk)
    out, lse, (dq, dk, dv) = check(mask, d=64, dtype=torch.bfloat16)
    assert torch.all(out[40:72] == 0) and torch.all(lse[:, 40:72] == float("-inf"))
    assert torch.all(dq[40:72] == 0)
    unseen = ~mask.to_dense().any(0)
    assert unseen[nk - 20 :].all()
    assert torch.all(dk[unseen] == 0) and torch.all(dv[unseen] == 0)


def test_keys_outside_the_tables_are_never_read(seed):
    """Queries see only keys [40, 80): K/V rows outside are NaN and must not reach out, lse, dq,
    nor the dk/dv of the keys that are seen (a key tile's program may load its own unseen rows)."""
    nq, nk, d = 70, 120, 64
    s = 40 + torch.arange(nq) * 30 // nq
    e = torch.clamp(s + 1 + torch.arange(nq) % 25, max=80)
    mask = tk.HybridMask.from_intervals(s.int().to(DEVICE), e.int().to(DEVICE), num_keys=nk)
    q, k, v = make_inputs(nq, nk, HQ, HKV, d, torch.float16)
    dirty_k, dirty_v = k.clone(), v.clone()
    for t in (dirty_k, dirty_v):
        t[:40] = float("nan")
        t[80:] = float("nan")
    dout = torch.randn(q.shape, device=DEVICE).to(q.dtype)
    out, lse, (dq, dk, dv) = run_triton(q, dirty_k, dirty_v, mask, dout, d**-0.5)
    c_out, c_lse, (c_dq, c_dk, c_dv) = run_triton(q, k, v, mask, dout, d**-0.5)
    for got, want in ((out, c_out), (lse, c_lse), (dq, c_dq), (dk[40:80], c_dk[40:80]), (dv[40:80], c_dv[40:80])):
        assert torch.isfinite(want).all()
        torch.testing.assert_close(got, want, rtol=0, atol=0)


def test_strided_inputs(seed):
    """q, k, v as views into one packed qkv projection (row stride != heads * D), and a
    non-contiguous dout: strides are passed to the kernels, not copied away."""
    cu, spans = LAYOUTS["several_documents"]
    mask = spans_mask(cu, spans)
    n, d = mask.num_queries, 64
    qkv = torch.randn(n, HQ + 2 * HKV, d, device=DEVICE).to(torch.float16)
    q, k, v = qkv.split([HQ, HKV, HKV], dim=1)
    assert not q.is_contiguous() and not k.is_contiguous()
    out, lse, _ = check(mask, d=d, dtype=torch.float16, inputs=(q, k, v), allowed=naive_dense(cu, spans))
    dout = torch.randn(HQ, n, d, device=DEVICE).to(torch.float16).transpose(0, 1)
    grads = run_triton(q, k, v, mask, dout, d**-0.5)[2]
    grads_c = run_triton(q.contiguous(), k.contiguous(), v.contiguous(), mask, dout.contiguous(), d**-0.5)[2]
    for g, gc in zip(grads, grads_c):
        torch.testing.assert_close(g, gc, rtol=0, atol=0)


def test_int64_row_offsets(seed, monkeypatch):
    """The int64 addressing used past 2**31 elements, forced on a small case."""
    monkeypatch.setattr(tkt, "_needs_i64", lambda *tensors: True)
    cu, spans = LAYOUTS["image_first"]
    check(spans_mask(cu, spans), d=64, dtype=torch.float16, allowed=naive_dense(cu, spans))


def test_matches_reference_backend(seed):
    """Same answers as the package's reference backend (fp32 inputs, fp32 math in both)."""
    cu, spans = LAYOUTS["spans_cross_tiles"]
    mask = spans_mask(cu, spans)
    q, k, v = make_inputs(mask.num_queries, mask.num_keys, HQ, HKV, 64, torch.float32)
    dout = torch.randn(q.shape, device=DEVICE)
    out, lse, grads = run_triton(q, k, v, mask, dout, 0.125)
    args = (mask.starts, mask.ends, reference.prepare(mask, q, k), 0.125)
    r_out, r_lse = reference.forward(q, k, v, *args)
    r_grads = reference.backward(dout, q, k, v, r_out, r_lse, *args)
    torch.testing.assert_close(out, r_out, rtol=1e-5, atol=1e-5)
    torch.testing.assert_close(lse, r_lse, rtol=1e-5, atol=1e-5)
    for g, rg in zip(grads, r_grads):
        torch.testing.assert_close(g, rg, rtol=1e-4, atol=1e-4)


def test_through_dispatcher(seed):
    """tk.hybrid_attention(..., backend="triton"): same results as the backend functions, and
    autograd through the registered custom op gives the kernels' gradients."""
    cu, spans = LAYOUTS["image_first"]
    mask = spans_mask(cu, spans)
    q, k, v = make_inputs(mask.num_queries, mask.num_keys, HQ, HKV, 64, torch.bfloat16)
    dout = torch.randn(q.shape, device=DEVICE).to(q.dtype)
    out, lse, grads = run_triton(q, k, v, mask, dout, 64**-0.5)
    qg, kg, vg = (t.clone().requires_grad_() for t in (q, k, v))
    d_out, d_lse = tk.hybrid_attention(qg, kg, vg, mask, return_lse=True, backend="triton")
    torch.testing.assert_close(d_out, out, rtol=0, atol=0)
    torch.testing.assert_close(d_lse, lse, rtol=0, atol=0)
    with tk.use_backend("triton"):
        d_grads = torch.autograd.grad(tk.hybrid_attention(qg, kg, vg, mask), (qg, kg, vg), dout)
    for g, dg in zip(grads, d_grads):
        torch.testing.assert_close(dg, g, rtol=0, atol=0)


def test_torch_compile_fullgraph(seed):
    """torch.compile traces tk.hybrid_attention on the triton backend (prepare included) without
    graph breaks; values and gradients match eager."""
    cu, spans = LAYOUTS["image_first"]
    mask = spans_mask(cu, spans)
    q, k, v = (t.requires_grad_() for t in make_inputs(mask.num_queries, mask.num_keys, 2, 1, 32, torch.float32))

    def f(q, k, v):
        return tk.hybrid_attention(q, k, v, mask, backend="triton").square().sum()

    loss = torch.compile(f, fullgraph=True, backend="aot_eager")(q, k, v)
    grads = torch.autograd.grad(loss, (q, k, v))
    loss_e = f(q, k, v)
    grads_e = torch.autograd.grad(loss_e, (q, k, v))
    torch.testing.assert_close(loss, loss_e, rtol=0, atol=0)
    for g, ge in zip(grads, grads_e):
        torch.testing.assert_close(g, ge, rtol=0, atol=0)


def test_bad_tables_are_rejected():
    mask = tk.HybridMask.causal(torch.tensor([0, 40], dtype=torch.int32, device=DEVICE))
    q, k, v = make_inputs(40, 40, 2, 1, 64, torch.float16)
    plan = tkt.prepare(mask, q, k)
    wrong = dataclasses.replace(plan, fwd_runs=query_runs(mask, plan.config.fwd.block_m * 2))
    with pytest.raises(ValueError, match="plan.fwd_runs must be contiguous int32"):
        tkt.forward(q, k, v, mask.starts, mask.ends, wrong, 0.125)
    with pytest.raises(ValueError, match="has 6 tensors"):
        tkt.Plan.from_op_args(plan.op_args()[0][:5], plan.op_args()[1])
    with pytest.raises(ValueError, match="head dim"):
        tkt.pick_config(512, torch.float16, torch.device(DEVICE))
    with pytest.raises(TypeError, match="float16"):
        tkt.pick_config(64, torch.int8, torch.device(DEVICE))


# ----------------------------------------------------------------------------------------------
# configs: named fields, the shipped and tuned config files, the tuning script
# ----------------------------------------------------------------------------------------------
def test_config_list_round_trip_and_validation():
    cfg = blocks((128, 64), (32, 128), (128, 64), warps=8, stages=3)
    assert cfg.to_list() == [128, 64, 8, 3, 32, 128, 8, 3, 128, 64, 8, 3]
    assert tkt.AttentionConfig.from_list(cfg.to_list()) == cfg
    with pytest.raises(ValueError, match="12 ints"):
        tkt.AttentionConfig.from_list([128, 64, 8, 3])
    with pytest.raises(ValueError, match="block_n must be a power of two"):
        tkt.KernelConfig(64, 48, 4, 2)
    with pytest.raises(ValueError, match="warps"):
        tkt.KernelConfig(64, 64, 3, 2)


def test_shipped_configs_cover_every_gpu_case_and_are_marked_untimed():
    with open(tkt.SHIPPED_CONFIGS) as f:
        data = json.load(f)
    assert data["measured"] is False and "not measured" in data["source"]
    table = tkt.load_configs(tkt.SHIPPED_CONFIGS)
    for d in (16, 32, 64, 80, 128, 256):
        for dtype in (torch.float16, torch.bfloat16, torch.float32):
            key = (max(32, 1 << (d - 1).bit_length()), str(dtype)[6:])
            assert tkt.config_for("Some GPU", d, dtype, "sm_80") == table[("*", *key)]
            assert tkt.config_for("Some GPU", d, dtype, "sm_90") == table.get(("sm_90", *key), table[("*", *key)])
    # Hopper: the 128-key dk/dv tile (on sm_80 it spills, so the arch-wide default keeps 64)
    assert tkt.config_for("Some GPU", 128, torch.bfloat16, "sm_90").dkdv.block_n == 128
    assert tkt.config_for("Some GPU", 128, torch.bfloat16, "sm_80").dkdv.block_n == 64


@pytest.fixture
def fresh_config_tables(monkeypatch):
    """config_for reads the files again (the environment variable changes per test)."""
    tkt._config_tables.cache_clear()
    yield monkeypatch
    tkt._config_tables.cache_clear()


def test_tuned_file_overrides_its_device_only(tmp_path, fresh_config_tables):
    entry = {
        "device": "Fake GPU 80GB",
        "head_dim": 128,
        "dtype": "bfloat16",
        "fwd": [64, 32, 4, 2],
        "dkdv": [16, 64, 4, 2],
        "dq": [64, 32, 4, 2],
        "candidates": [],
    }
    path = tmp_path / "tuned.json"
    path.write_text(json.dumps({"format": 1, "measured": True, "configs": [entry]}))
    fresh_config_tables.setenv(tkt.TUNED_ENV, str(path))
    tuned = tkt.config_for("Fake GPU 80GB", 96, torch.bfloat16)
    assert tuned == blocks((64, 32), (16, 64), (64, 32), warps=4, stages=2)
    shipped = tkt.load_configs(tkt.SHIPPED_CONFIGS)
    assert tkt.config_for("Other GPU", 128, torch.bfloat16) == shipped[("*", 128, "bfloat16")]
    assert tkt.config_for("Fake GPU 80GB", 128, torch.float16) == shipped[("*", 128, "float16")]


@pytest.mark.parametrize(
    "content,problem",
    [
        ("{not json", "Expecting property name"),
        (
            json.dumps({"configs": [{"device": "*", "head_dim": 64, "dtype": "bfloat16", "fwd": [64, 64, 4, 2]}]}),
            "missing field 'dkdv'",
        ),
        (
            json.dumps(
                {
                    "configs": [
                        {
                            "device": "*",
                            "head_dim": 64,
                            "dtype": "bfloat16",
                            "fwd": [64, 60, 4, 2],
                            "dkdv": [64, 64, 4, 2],
                            "dq": [64, 64, 4, 2],
                        }
                    ]
                }
            ),
            "block_n must be a power of two",
        ),
    ],
    ids=["syntax", "missing", "bad_block"],
)
def test_bad_tuned_file_is_one_clear_error(tmp_path, fresh_config_tables, content, problem):
    path = tmp_path / "tuned.json"
    path.write_text(content)
    fresh_config_tables.setenv(tkt.TUNED_ENV, str(path))
    with pytest.raises(ValueError) as info:
        tkt.config_for("Fake GPU", 64, torch.bfloat16)
    msg = str(info.value)
    assert "\n" not in msg and msg.startswith(f"{path}: ") and problem in msg, msg


def test_tune_check_rejects_a_wrong_kernel(monkeypatch):
    """The tuning script's correctness gate fails a config whose output is off."""
    from benchmarks import tune

    mask, _ = tune._workload(64, torch.device(DEVICE), dry_run=True)
    check = tune._Check(mask, *tune._inputs(64, 2, 1, 32, torch.float16, DEVICE, seed=3), 32**-0.5, "float16")
    assert check.failures(tkt.INTERPRET_CONFIG) == []
    forward = tkt.forward
    monkeypatch.setattr(tkt, "forward", lambda *a: (lambda o, lse: (o * 1.01, lse))(*forward(*a)))
    assert any(f.startswith("out error") for f in check.failures(tkt.INTERPRET_CONFIG))


@pytest.mark.skipif(GPU, reason="the dry run is the CPU stand-in of the GPU tuning")
def test_tune_dry_run_writes_an_untimed_loadable_file(tmp_path):
    from benchmarks import tune

    out = tmp_path / "tuned.json"
    assert tune.main(["--dry-run", "--out", str(out)]) == 0
    data = json.loads(out.read_text())
    assert data["dry_run"] is True and data["measured"] is False and "nothing timed" in data["source"]
    (entry,) = data["configs"]
    assert all("error" not in r and r["ms"] is None for r in entry["candidates"])
    assert {r["kernel"] for r in entry["candidates"]} == {"fwd", "dkdv", "dq"}
    table = tkt.load_configs(str(out))
    assert table[(entry["device"], 64, "bfloat16")].to_list() == entry["fwd"] + entry["dkdv"] + entry["dq"]


# ----------------------------------------------------------------------------------------------
# GPU only: large shapes, every supported head dim and dtype
# ----------------------------------------------------------------------------------------------
@pytest.mark.gpu
@pytest.mark.skipif(not GPU, reason="needs CUDA")
@pytest.mark.parametrize("d", [64, 128, 256])
@pytest.mark.parametrize("dtype", [torch.float16, torch.bfloat16])
def test_gpu_transfusion_mix(d, dtype, seed):
    """4k tokens: two 2k documents with images of 256 and 1024 patches at odd offsets."""
    cu = [0, 2048, 4096]
    spans = [(5, 261), (300, 1324), (2048 + 77, 2048 + 333), (2048 + 900, 2048 + 1924)]
    check(spans_mask(cu, spans), hq=16, hkv=4, d=d, dtype=dtype)


@pytest.mark.gpu
@pytest.mark.skipif(not GPU, reason="needs CUDA")
def test_gpu_sampling_batch(seed):
    mask = tk.HybridMask.cached([1000, 4097, 17, 2500], [256, 1, 300, 1024], bidirectional=True, device=DEVICE)
    check(mask, hq=16, hkv=4, d=128, dtype=torch.bfloat16)
