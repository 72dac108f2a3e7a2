"""The CUDA attention kernels on interval unions (K > 1 intervals per query) and with a softcap,
run on the CPU: the kernel sources of csrc/attention/ compiled against the host emulation
(tests/cuda/attention_host/), as in tests/cuda/test_cuda_attention.py. Every kernel's out, lse,
dq, dk and dv are held to the 2x rule against the float64 oracle (tests/oracles.py), on fresh
random inputs, over grids of several query and key tiles, with masks from
HybridMask.from_splits (BAGEL-style noise splits: K = 2), sink-plus-window pairs and random
unions (K = 2, 3 padded to 4, and 4). Outputs start NaN between guard words; K/V rows no query
sees hold NaN.
"""

from __future__ import annotations

import os
import shutil
import subprocess

import pytest
import torch

import transfusion_kernels as tk
from tests.cuda.conftest import NVCC
from tests.cuda.test_cuda_attention import EmulationError, _storage, emulation_build
from tests.oracles import assert_2x, dense_attention
from transfusion_kernels.attention import cuda as tkc
from transfusion_kernels.attention.plan import heaviest_first, key_tiles, query_runs
from transfusion_kernels.backends import load_extension

FLOOR = {torch.float16: 1e-4, torch.bfloat16: 1e-3}
BLOCK_M = {"fwd_mma": 128, "fwd_sm90": 128, "bwd": 64, "bwd_sm90": 64}  # query tile of each mode's tables
MODES = ("fwd_mma", "fwd_sm90", "bwd", "bwd_sm90")


@pytest.fixture(scope="module")
def emulator(tmp_path_factory):
    if shutil.which("g++") is None or NVCC is None:
        pytest.skip("needs g++ and the CUDA headers (nvcc)")
    return emulation_build(tmp_path_factory.mktemp("attention_emu_union"))


# ---- masks ------------------------------------------------------------------------------------
def bagel_mask():
    """Two BAGEL-style samples: text, a noised image copy, its clean copy, text; later queries see
    their sample minus the noise split before them (K = 2)."""
    return tk.HybridMask.from_splits(
        [[37, 70, 70, 21], [45, 64, 9]], [["causal", "noise", "full", "causal"], ["causal", "noise", "causal"]]
    )


def sink_window_mask(n=300, sink=5, window=70):
    """Attention sinks plus a causal sliding window: [0, sink) and [i - window + 1, i + 1),
    merged into one interval where they touch (the second slot then empty)."""
    i = torch.arange(n)
    w0 = torch.clamp(i - window + 1, min=0)
    merged = w0 <= sink
    s = torch.stack([torch.zeros_like(i), torch.where(merged, i + 1, w0)], 1)
    e = torch.stack([torch.where(merged, i + 1, torch.full_like(i, sink)), i + 1], 1)
    s[:, 1] = torch.where(merged, e[:, 0], s[:, 1])  # empty second slot
    e[:, 1] = torch.where(merged, e[:, 0], e[:, 1])
    return tk.HybridMask.from_intervals(s.int(), e.int(), num_keys=n)


def random_union_mask(nq, nk, k, lo, hi, gen):
    """K sorted, disjoint intervals per query inside [lo, hi) (keys outside: seen by no query),
    some empty, some long enough to cover whole key tiles; a few rows see nothing."""
    pts = torch.sort(torch.randint(lo, hi + 1, (nq, 2 * k), generator=gen), 1).values
    wide = torch.rand(nq, generator=gen) < 0.5  # half the rows: one interval stretched over the others
    pts[wide, 1 : 2 * k - 1] = pts[wide, 2 * k - 2 : 2 * k - 1]
    s, e = pts[:, 0::2].contiguous(), pts[:, 1::2].contiguous()
    empty = torch.rand(nq, generator=gen) < 0.05
    e[empty] = s[empty]
    return tk.HybridMask.from_intervals(s.int(), e.int(), num_keys=nk)


CASES = {  # name -> (mask builder(gen), hq, hkv, d, dtype, softcap, unseen keys hold NaN)
    "bagel-splits-k2-gqa-d64-bf16": (lambda g: bagel_mask(), 4, 2, 64, torch.bfloat16, 0.0, False),
    "bagel-splits-k2-softcap-d128-f16": (lambda g: bagel_mask(), 2, 1, 128, torch.float16, 2.0, False),
    "sink-window-k2-softcap-d64-f16": (lambda g: sink_window_mask(), 2, 1, 64, torch.float16, 1.5, False),
    "random-k4-nan-outside-d64-f16": (
        lambda g: random_union_mask(200, 260, 4, 20, 240, g),
        2,
        1,
        64,
        torch.float16,
        0.0,
        True,
    ),
    "random-k3-softcap-nan-outside-d128-bf16": (
        lambda g: random_union_mask(150, 190, 3, 9, 180, g),
        2,
        2,
        128,
        torch.bfloat16,
        3.0,
        True,
    ),
    "random-k2-gqa-d128-bf16": (
        lambda g: random_union_mask(270, 270, 2, 0, 270, g),
        4,
        1,
        128,
        torch.bfloat16,
        0.0,
        False,
    ),
    "spans-k1-softcap-d64-bf16": (
        lambda g: tk.HybridMask.from_spans(torch.tensor([0, 150, 290]), torch.tensor([[20, 90], [170, 250]])),
        2,
        1,
        64,
        torch.bfloat16,
        1.0,
        False,
    ),
}
ORDERED = {"bagel-splits-k2-gqa-d64-bf16", "random-k4-nan-outside-d64-f16"}  # blocks take tiles heaviest first


# ---- the driver (attention_host/driver.cpp) -----------------------------------------------------
def emulate(exe, work, mode, mask, q, k, v, scale, softcap, out=None, lse=None, dout=None, ordered=False, schedule=1):
    """forward -> (out, lse), bwd -> (dq, dk, dv), with the intervals and tables as cuda.py passes
    them (K padded to the kernels' 1, 2 or 4)."""
    nq, hq, d = q.shape
    nk, hkv = k.shape[:2]
    views = []
    for name, t in (("q", q), ("k", k), ("v", v), ("out", out), ("dout", dout)):
        data, offset, (rs, hs) = _storage(q if t is None else t)
        (work / f"{name}.bin").write_bytes(data)
        views.append(f"{offset} {rs} {hs}")
    (kv_start, kv_end), runs = tkc._intervals(mask.starts, mask.ends)
    (work / "kv_start.bin").write_bytes(kv_start.numpy().tobytes())
    (work / "kv_end.bin").write_bytes(kv_end.numpy().tobytes())
    q_tiles = tkc._pad_runs(query_runs(mask, BLOCK_M[mode]), runs).contiguous()
    k_tiles = key_tiles(mask, 64)
    (work / "q_tiles.bin").write_bytes(q_tiles.numpy().tobytes())
    (work / "k_tiles.bin").write_bytes(k_tiles.numpy().tobytes())
    for name, table in (("q_order", q_tiles), ("k_order", k_tiles)):
        if ordered:
            (work / f"{name}.bin").write_bytes(heaviest_first(table).numpy().tobytes())
        else:
            (work / f"{name}.bin").unlink(missing_ok=True)
    if lse is not None:
        (work / "lse.bin").write_bytes(lse.contiguous().numpy().tobytes())
    dt = 1 if q.dtype == torch.float16 else 2
    meta = f"{nq} {nk} {hq} {hkv} {d} {dt} {scale!r}\n" + "\n".join(views) + f"\n{runs} {softcap!r}\n"
    (work / "meta").write_text(meta)
    env = {**os.environ, "EMU_SEED": str(schedule)}
    try:
        proc = subprocess.run([str(exe), mode, str(work)], capture_output=True, text=True, timeout=600, env=env)
    except subprocess.TimeoutExpired:
        raise EmulationError(f"{mode}: no result within 600 s") from None
    if proc.returncode != 0:
        raise EmulationError(f"{mode}: exit {proc.returncode}: {proc.stderr[-2000:]}")

    def read(name, shape, dtype):
        return torch.frombuffer(bytearray((work / f"{name}_out.bin").read_bytes()), dtype=dtype).view(shape)

    if mode.startswith("bwd"):
        return read("dq", q.shape, q.dtype), read("dk", k.shape, k.dtype), read("dv", v.shape, v.dtype)
    return read("out", q.shape, q.dtype), read("lse", (hq, nq), torch.float32)


def union_check(exe, work, case, modes, seed, schedule=1, scale=None):
    gen = torch.Generator().manual_seed(seed)
    build, hq, hkv, d, dtype, softcap, nan_outside = CASES[case]
    mask = build(gen)
    nq, nk = mask.num_queries, mask.num_keys
    scale = d**-0.5 if scale is None else scale
    q, k, v = (torch.randn(n, h, d, generator=gen).to(dtype) for n, h in ((nq, hq), (nk, hkv), (nk, hkv)))
    dout = torch.randn(nq, hq, d, generator=gen).to(dtype)
    allowed = mask.to_dense()
    seen = allowed.any(0)
    if nan_outside:  # keys no query sees: NaN for the kernels, the clean values for the oracle
        assert not seen.all()
        k_in, v_in = k.clone(), v.clone()
        k_in[~seen] = float("nan")
        v_in[~seen] = float("nan")
    else:
        k_in, v_in = k, v
    cap = softcap or None
    ref_in = [t.detach().double().requires_grad_() for t in (q, k, v)]
    low_in = [t.detach().clone().requires_grad_() for t in (q, k, v)]
    ref_out, ref_lse = dense_attention(*ref_in, allowed, scale, cap)
    low_out, low_lse = dense_attention(*low_in, allowed, scale, cap, lse_dtype=torch.float32)
    floor = FLOOR[dtype]
    out, lse = ref_out.detach().to(dtype), ref_lse.detach().float()
    run = dict(ordered=case in ORDERED, schedule=schedule)
    for mode in modes:
        if not mode.startswith("bwd"):
            got_out, got_lse = emulate(exe, work, mode, mask, q, k_in, v_in, scale, softcap, **run)
            assert_2x(f"{mode} out", got_out, ref_out, low_out, floor)
            assert_2x(f"{mode} lse", got_lse, ref_lse, low_lse, floor, neg_inf_exact=True)
            continue
        grads = emulate(exe, work, mode, mask, q, k_in, v_in, scale, softcap, out=out, lse=lse, dout=dout, **run)
        ref_g = torch.autograd.grad(ref_out, ref_in, dout.double(), retain_graph=True)
        low_g = torch.autograd.grad(low_out, low_in, dout, retain_graph=True)
        for name, g, rg, lg in zip(("dq", "dk", "dv"), grads, ref_g, low_g):
            if name != "dq":  # a NaN key row reaches only its own dk, dv
                g, rg, lg = g[seen], rg[seen], lg[seen]
            assert_2x(f"{mode} {name}", g, rg, lg, floor)
        assert torch.all(grads[0][~allowed.any(1)] == 0), f"{mode}: dq of a row that sees nothing"


def test_cases_are_unions_over_several_tiles():
    """The cases cover what they claim: K of each, several query and key tiles per grid."""
    gen = torch.Generator().manual_seed(0)
    ks = {name: case[0](gen).num_intervals for name, case in CASES.items()}
    assert ks["bagel-splits-k2-gqa-d64-bf16"] == 2 and ks["random-k3-softcap-nan-outside-d128-bf16"] == 3
    assert sorted(set(ks.values())) == [1, 2, 3, 4]
    for name, case in CASES.items():
        mask = case[0](gen)
        assert mask.num_queries > 128 and mask.num_keys > 128, name
        if mask.num_intervals > 1:  # both slots used somewhere
            assert (mask.ends[:, 1] > mask.starts[:, 1]).any(), name


@pytest.mark.parametrize("case", list(CASES))
def test_unions_and_softcap_under_emulation(emulator, tmp_path, case, seed):
    """Forward and backward kernels on K > 1 masks and softcap: out, lse, dq, dk, dv against the
    float64 oracle under the 2x rule."""
    union_check(emulator, tmp_path, case, MODES, seed)


@pytest.mark.parametrize(
    "case,scale", [("sink-window-k2-softcap-d64-f16", -0.2), ("bagel-splits-k2-gqa-d64-bf16", 0.0)]
)
def test_negative_and_zero_scale(emulator, tmp_path, case, scale, seed):
    """A negative scale (the forwards negate Q; the softcap's tanh is odd) and a zero one."""
    union_check(emulator, tmp_path, case, MODES, seed, schedule=2, scale=scale)


def test_padding_and_refusals():
    """K = 3 gets an empty fourth slot in the intervals and the runs; K > 4 is named by supports
    and refused by the plan; softcap is covered."""
    mask = random_union_mask(70, 80, 3, 0, 80, torch.Generator().manual_seed(1))
    (s, e), runs = tkc._intervals(mask.starts, mask.ends)
    assert runs == 4 and s.shape == (70, 4) and torch.equal(s[:, :3], mask.starts) and torch.equal(s[:, 3], e[:, 3])
    table = tkc._pad_runs(query_runs(mask, 64), runs)
    assert table.shape == (2, 4, 4) and not table[:, 3].any()
    q = torch.zeros(70, 2, 64, dtype=torch.float16)
    assert tkc.supports(q, 0.1, 5.0, 4) is None
    assert "5 intervals" in tkc.supports(q, 0.1, 0.0, 5)
    with pytest.raises(ValueError, match="1 to 4 intervals"):
        tkc._intervals(torch.zeros(3, 5, dtype=torch.int32), torch.zeros(3, 5, dtype=torch.int32))


# ---- GPU: the compiled kernels through hybrid_attention ------------------------------------------
GPU = torch.cuda.is_available() and load_extension()[0] is not None


@pytest.mark.gpu
@pytest.mark.skipif(not GPU, reason="needs a CUDA device and the built transfusion_kernels._C")
@pytest.mark.parametrize("fwd", ["mma", "wgmma"])
@pytest.mark.parametrize("case", list(CASES))
def test_gpu_unions_and_softcap(case, fwd, monkeypatch, seed):
    """hybrid_attention(backend="cuda") on the same masks, outputs poisoned with NaN: out, dq, dk,
    dv against the float64 oracle under the 2x rule, with each forward the device has."""
    if fwd == "wgmma" and not tkc.sm90_supported("cuda"):
        pytest.skip("the wgmma forward needs compute capability 9.0 and an sm_90a build")
    monkeypatch.setenv(tkc.FWD_ENV, fwd)
    monkeypatch.setattr(
        tkc, "_empty", lambda shape, dtype, device: torch.full(shape, float("nan"), dtype=dtype, device=device)
    )
    gen = torch.Generator().manual_seed(seed)
    build, hq, hkv, d, dtype, softcap, _ = CASES[case]
    mask = build(gen)
    nq, nk = mask.num_queries, mask.num_keys
    q, k, v = (torch.randn(n, h, d, generator=gen).to(dtype) for n, h in ((nq, hq), (nk, hkv), (nk, hkv)))
    dout = torch.randn(nq, hq, d, generator=gen).to(dtype)
    allowed, scale, cap = mask.to_dense(), d**-0.5, softcap or None
    ref_in = [t.double().requires_grad_() for t in (q, k, v)]
    low_in = [t.clone().requires_grad_() for t in (q, k, v)]
    ref_out, _ = dense_attention(*ref_in, allowed, scale, cap)
    low_out, _ = dense_attention(*low_in, allowed, scale, cap, lse_dtype=torch.float32)
    got_in = [t.cuda().requires_grad_() for t in (q, k, v)]
    out = tk.hybrid_attention(*got_in, mask.to("cuda"), softmax_scale=scale, backend="cuda", softcap=cap)
    grads = torch.autograd.grad(out, got_in, dout.cuda())
    floor = FLOOR[dtype]
    assert_2x("out", out, ref_out, low_out, floor)
    ref_g = torch.autograd.grad(ref_out, ref_in, dout.double())
    low_g = torch.autograd.grad(low_out, low_in, dout)
    for name, g, rg, lg in zip(("dq", "dk", "dv"), grads, ref_g, low_g):
        assert_2x(name, g, rg, lg, floor)


@pytest.mark.parametrize(
    "change,match",
    [
        (dict(num_intervals=3), "num_intervals"),
        (dict(num_intervals=0), "num_intervals"),
        (dict(softcap=-1.0), "softcap"),
        (dict(softcap=float("nan")), "softcap"),
    ],
)
def test_bindings_reject_bad_masks(extension, change, match):
    """num_intervals outside 1, 2, 4 and a negative or non-finite softcap are refused before any
    device work (the pointers are never touched)."""
    common = dict(q=96, k=112, v=128, kv_start=176, kv_end=192, q_tiles=208, nq=10, nk=12, hq=4, hkv=2, head_dim=64)
    strides = dict(q_strides=(256, 64), k_strides=(128, 64), v_strides=(128, 64))
    rest = dict(scale=0.125, dtype="bfloat16", stream=0, **change)
    for launch in (extension.attention_fwd, extension.attention_fwd_sm90):
        with pytest.raises(ValueError, match=match):
            launch(out=16, lse=32, **common, **strides, **rest)
    with pytest.raises(ValueError, match=match):
        extension.attention_bwd(
            dq=16,
            dk=32,
            dv=48,
            scratch=64,
            dout=80,
            out=144,
            lse=160,
            k_tiles=224,
            **common,
            **strides,
            o_strides=(256, 64),
            do_strides=(256, 64),
            **rest,
        )
