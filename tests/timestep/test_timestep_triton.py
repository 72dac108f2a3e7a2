"""The Triton timestep kernels against a float64 oracle, with the fp32 reference backend as the
PyTorch baseline of the 2x rule (see common.py).

On a CPU the kernels run under the Triton interpreter (small shapes); with CUDA the same tests
run on the GPU, plus the large GPU-only cases at the end. Every buffer the kernels write starts
NaN-filled, so an element they forget to write fails.
"""

import math
import os

import torch

if not torch.cuda.is_available():
    # must precede the kernels' import: triton.jit picks the interpreter at decoration time
    os.environ.setdefault("TRITON_INTERPRET", "1")

import pytest

pytest.importorskip("triton")

import transfusion_kernels as tk  # noqa: E402
from transfusion_kernels.timestep import triton as tkt  # noqa: E402
from tests.timestep.common import (  # noqa: E402
    CONFIGS,
    DEVICE,
    FLOOR,
    assert_rule,
    grad_floor,
    make_layout,
    make_mlp,
    patch_oracle,
    run,
    sinusoid64,
)
from tests.oracles import segment_sum64  # noqa: E402

DTYPES = [torch.float32, torch.float16, torch.bfloat16]
LAYOUTS = ["text", "image", "several", "empty", "random"]


@pytest.fixture(autouse=True)
def poison(monkeypatch):
    def nan_empty(shape, dtype, device):
        return torch.full(shape, float("nan"), dtype=dtype, device=device)

    monkeypatch.setattr(tkt, "_empty", nan_empty)


@pytest.fixture
def small_blocks(monkeypatch):
    """Blocks small enough that tiny inputs span many programs, pieces and loop iterations."""
    for name, value in dict(
        ADD_BLOCK=128,
        ADD_MAX_BLOCK_D=32,
        PIECE_ROWS=8,
        SUM_BLOCK_R=4,
        SUM_BLOCK_D=16,
        IMAGE_SUM_BLOCK_T=2,
        HIDDEN_BLOCK_H=16,
        HIDDEN_BLOCK_K=16,
        SINUSOID_BLOCK_M=4,
        SINUSOID_MAX_BLOCK_D=16,
    ).items():
        monkeypatch.setattr(tkt, name, value)


def timesteps(cfg, M, gen, integer=False):
    if cfg[2] > 1:
        return torch.rand(M, generator=gen).to(DEVICE)
    if integer:
        return torch.randint(0, 1000, (M,), generator=gen).to(DEVICE)
    return (torch.rand(M, generator=gen) * 1000).to(DEVICE)


def check(
    seed,
    layout,
    P,
    D,
    M,
    dtype,
    *,
    with_mlp=True,
    F=32,
    H=48,
    cfg=CONFIGS[0],
    bias=True,
    wdtype=torch.float32,
    integer_t=False,
):
    gen = torch.Generator().manual_seed(seed)
    freq_dim = F if with_mlp else D
    t = timesteps(cfg, M, gen, integer_t)
    idx = make_layout(layout, P, M, gen).to(DEVICE)
    x = torch.randn(P, D, generator=gen).to(DEVICE, dtype)
    dy = torch.randn(P, D, generator=gen).to(DEVICE, dtype)
    weights = make_mlp(F, H, D, wdtype, bias) if with_mlp else None

    y, grads = run("triton", x, t, idx, weights, freq_dim, cfg, dy)
    y_ref, grads_ref = run("reference", x, t, idx, weights, freq_dim, cfg, dy)
    w64 = None if weights is None else [None if w is None else w.double().requires_grad_() for w in weights]
    y64 = patch_oracle(x.double(), t, idx, w64, freq_dim, cfg)

    assert y.dtype == dtype and y.shape == (P, D)
    assert_rule("y", y, y64, y_ref, FLOOR[dtype])
    assert torch.equal(grads[0], dy), "dx must be dy"
    if with_mlp:
        live = [w for w in w64 if w is not None]
        oracle = torch.autograd.grad(y64, live, dy.double())
        names = [n for n, w in zip(["w1", "b1", "w2", "b2"], w64) if w is not None]
        for name, g, r, o, w in zip(names, grads[1:], grads_ref[1:], oracle, live):
            assert g.dtype == wdtype and g.shape == w.shape, name
            floor = grad_floor(o) if wdtype == torch.float32 else FLOOR[wdtype] * max(1.0, o.abs().max().item())
            assert_rule(name, g, o, r, floor)
    return y, grads


# ----------------------------------------------------------------------------- forward + backward


WIDTHS = [64, 96, 128, 256]


@pytest.mark.parametrize("layout", LAYOUTS)
@pytest.mark.parametrize("D", WIDTHS)
def test_layouts_and_widths(layout, D, seed):
    # each width in one dtype, every dtype over the widths (test_dtypes runs each dtype fully)
    check(seed, layout, 77, D, 4, DTYPES[WIDTHS.index(D) % len(DTYPES)])


@pytest.mark.parametrize("dtype", DTYPES)
@pytest.mark.parametrize("layout", ["several", "random"])
def test_dtypes(dtype, layout, seed):
    check(seed, layout, 130, 96, 5, dtype)


@pytest.mark.parametrize("dtype", DTYPES)
@pytest.mark.parametrize("layout", ["text", "image", "several"])
def test_sinusoid_only(dtype, layout, seed):
    cfg = CONFIGS[(DTYPES.index(dtype) + ["text", "image", "several"].index(layout)) % len(CONFIGS)]
    check(seed, layout, 61, 64, 3, dtype, with_mlp=False, cfg=cfg)


@pytest.mark.parametrize("cfg", CONFIGS)
def test_configs_odd_freq_dim_integer_timesteps(cfg, seed):
    check(seed, "several", 50, 64, 3, torch.float32, F=33, H=40, cfg=cfg, integer_t=True)


@pytest.mark.parametrize("layout", ["image", "several", "random"])
@pytest.mark.parametrize("cfg", [CONFIGS[0], CONFIGS[1]], ids=["flip", "noflip"])
def test_small_blocks_many_programs(layout, cfg, small_blocks, seed):
    # 20 images, each its own timestep: two row tiles of the hidden kernel; pieces of 8 patches;
    # D spans 3 column blocks
    check(seed, layout, 203, 40, 20, torch.bfloat16, F=24, H=40, cfg=cfg)


@pytest.mark.parametrize("cfg", CONFIGS, ids=["flip", "noflip_shift", "flip_scaled", "noflip_period"])
@pytest.mark.parametrize("dim", [7, 40])
def test_sinusoid_kernel_many_programs(cfg, dim, small_blocks, seed):
    """Row and column tiles of 4 x 16: every program a different set of timesteps."""
    gen = torch.Generator().manual_seed(seed)
    t = timesteps(cfg, 11, gen)
    kw = dict(flip_sin_to_cos=cfg[0], downscale_freq_shift=cfg[1], scale=cfg[2], max_period=cfg[3])
    got = tkt.sinusoid(t, dim, **kw)
    assert_rule("sinusoid", got, sinusoid64(t, dim, *cfg), tk.timestep_embedding(t, dim, *cfg), 1e-6)


def test_flip_sin_to_cos_order():
    """t = pi/2 with frequency 1 (column 0): sin = 1, cos = 0, so the first column says which
    function comes first; flip_sin_to_cos=True puts cos first (DiT, Transfusion)."""
    t = torch.tensor([math.pi / 2], device=DEVICE)
    kw = dict(downscale_freq_shift=0.0, scale=1.0, max_period=10000.0)
    flip = tkt.sinusoid(t, 8, flip_sin_to_cos=True, **kw)[0]
    plain = tkt.sinusoid(t, 8, flip_sin_to_cos=False, **kw)[0]
    assert abs(flip[0].item()) < 1e-6 and abs(flip[4].item() - 1) < 1e-6, flip  # cos(pi/2), sin(pi/2)
    assert abs(plain[0].item() - 1) < 1e-6 and abs(plain[4].item()) < 1e-6, plain


def test_no_bias_and_bf16_weights(seed):
    check(seed, "several", 90, 64, 3, torch.bfloat16, bias=False, wdtype=torch.bfloat16)


def test_no_images(seed):
    x = torch.randn(33, 64, device=DEVICE, dtype=torch.float16)
    idx = torch.full((33,), -1, dtype=torch.int32, device=DEVICE)
    t = torch.zeros(0, device=DEVICE)
    y = tk.patch_timestep_embedding(x, t, idx, None, freq_dim=64, backend="triton")
    assert torch.equal(y, x)
    w = tuple(w.requires_grad_() for w in make_mlp(16, 24, 64))
    y = tk.patch_timestep_embedding(x, t, idx, w, freq_dim=16, backend="triton")
    assert torch.equal(y, x)
    grads = torch.autograd.grad(y, w, torch.randn_like(x))
    assert all(torch.equal(g, torch.zeros_like(g)) for g in grads)


def test_backward_is_deterministic(seed):
    gen = torch.Generator().manual_seed(seed)
    P, D, M = 300, 64, 6
    idx = make_layout("random", P, M, gen).to(DEVICE)
    t = timesteps(CONFIGS[0], M, gen)
    x = torch.randn(P, D, generator=gen).to(DEVICE)
    dy = torch.randn(P, D, generator=gen).to(DEVICE, torch.bfloat16)
    weights = make_mlp(32, 48, D)
    first = run("triton", x.bfloat16(), t, idx, weights, 32, CONFIGS[0], dy)[1]
    second = run("triton", x.bfloat16(), t, idx, weights, 32, CONFIGS[0], dy)[1]
    assert all(torch.equal(a, b) for a, b in zip(first, second))


# ----------------------------------------------------------------------------- building blocks


@pytest.mark.parametrize("cfg", CONFIGS)
@pytest.mark.parametrize("dim", [7, 64, 100])
def test_sinusoid_kernel(cfg, dim, seed):
    gen = torch.Generator().manual_seed(seed)
    t = timesteps(cfg, 19, gen)
    kw = dict(flip_sin_to_cos=cfg[0], downscale_freq_shift=cfg[1], scale=cfg[2], max_period=cfg[3])
    got = tkt.sinusoid(t, dim, **kw)
    assert_rule("sinusoid", got, sinusoid64(t, dim, *cfg), tk.timestep_embedding(t, dim, *cfg), 1e-6)
    if dim % 2:
        assert (got[:, -1] == 0).all()


@pytest.mark.parametrize("layout", ["trailing_text", *LAYOUTS])
def test_segment_sum_kernel(layout, small_blocks, seed):
    gen = torch.Generator().manual_seed(seed)
    P, D, M = 150, 40, 7
    if layout == "trailing_text":
        # text rows sort after every image, so a piece or image range read one row or one
        # partial past its end reads real data (a wrong sum), never past the buffer
        idx = make_layout("image", P - 9, M, gen)
        idx = torch.cat([idx, torch.full((9,), -1, dtype=torch.int32)])[torch.randperm(P, generator=gen)].to(DEVICE)
    else:
        idx = make_layout(layout, P, M, gen).to(DEVICE)
    dy = torch.randn(P, D, generator=gen).to(DEVICE, torch.float16)
    got = tkt.segment_sum(dy, idx, M)
    oracle = segment_sum64(dy, idx, M)
    baseline = torch.zeros(M, D, dtype=torch.float16, device=DEVICE).index_add_(
        0, idx.clamp(min=0).long()[idx >= 0], dy[idx >= 0]
    )
    assert_rule("demb", got, oracle, baseline, 1e-5)


@pytest.mark.parametrize("dtype", DTYPES)
def test_add_kernel_rounds_once_to_nearest_even(dtype, seed):
    """y = round(x + emb[idx]) exactly, ties included (1 + half an ulp of 1 must round to even)."""
    gen = torch.Generator().manual_seed(seed)
    P, D, M = 37, 64, 3
    eps = torch.finfo(dtype).eps
    x = torch.randn(P, D, generator=gen).to(DEVICE, dtype)
    x[:4] = torch.tensor([1.0, 1.0 + eps, -1.0, -(1.0 + eps)], dtype=dtype).repeat_interleave(D).view(4, D).to(DEVICE)
    emb = torch.randn(M, D, generator=gen).to(DEVICE)
    emb[0, : D // 2] = eps / 2  # exact ties against rows 0-3
    emb[0, D // 2 :] = -eps / 2
    idx = make_layout("random", P, M, gen).to(DEVICE)
    idx[:4] = 0
    got = tkt.add_rows(x, emb, idx)
    want = (x.float() + torch.where((idx >= 0)[:, None], emb[idx.long().clamp(min=0)], 0)).to(dtype)
    assert torch.equal(got, want)


# ----------------------------------------------------------------------------- GPU only


@pytest.mark.gpu
@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs CUDA")
@pytest.mark.parametrize(
    "P,D,M,dtype",
    [(65536, 1024, 64, torch.bfloat16), (20000, 4096, 256, torch.float16), (4097, 2048, 1, torch.float32)],
)
def test_gpu_transfusion_sizes(P, D, M, dtype, seed):
    check(seed, "several" if M > 1 else "image", P, D, M, dtype, F=256, H=D)
