"""The CUDA timestep kernels (csrc/timestep/) against a float64 oracle, with the fp32 reference
backend as the PyTorch baseline of the 2x rule (tests/timestep/common.py). Needs a CUDA device
and the built extension; every buffer the kernels write starts NaN-filled."""

from __future__ import annotations

import pytest
import torch

import transfusion_kernels as tk
from transfusion_kernels.backends import load_extension
from transfusion_kernels.timestep import reference
from tests.timestep.common import (
    CONFIGS,
    FLOOR,
    assert_rule,
    grad_floor,
    make_layout,
    make_mlp,
    patch_oracle,
    run,
    sinusoid64,
)

pytestmark = [
    pytest.mark.gpu,
    pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA device"),
    pytest.mark.skipif(load_extension()[0] is None, reason="transfusion_kernels._C is not built"),
]

DTYPES = [torch.float32, torch.float16, torch.bfloat16]
LAYOUTS = ["text", "image", "several", "empty", "random"]


@pytest.fixture(autouse=True)
def poison(monkeypatch):
    from transfusion_kernels.timestep import cuda as tkc

    monkeypatch.setattr(
        tkc, "_empty", lambda shape, dtype, device: torch.full(shape, float("nan"), dtype=dtype, device=device)
    )


def _check(seed, layout, P, D, M, dtype, *, with_mlp=True, F=32, H=48, cfg=CONFIGS[0], bias=True):
    gen = torch.Generator().manual_seed(seed)
    freq_dim = F if with_mlp else D
    t = (torch.rand(M, generator=gen) * (1.0 if cfg[2] > 1 else 1000.0)).cuda()
    idx = make_layout(layout, P, M, gen).cuda()
    x = torch.randn(P, D, generator=gen).to("cuda", dtype)
    dy = torch.randn(P, D, generator=gen).to("cuda", dtype)
    weights = make_mlp(F, H, D, torch.float32, bias, device="cuda") if with_mlp else None

    y, grads = run("cuda", x, t, idx, weights, freq_dim, cfg, dy)
    y_ref, grads_ref = run("reference", x, t, idx, weights, freq_dim, cfg, dy)
    w64 = None if weights is None else [None if w is None else w.double().requires_grad_() for w in weights]
    y64 = patch_oracle(x.double(), t, idx, w64, freq_dim, cfg)
    assert y.dtype == dtype and y.shape == (P, D)
    assert_rule("y", y, y64, y_ref, FLOOR[dtype])
    assert torch.equal(grads[0], dy), "dx must be dy"
    if with_mlp:
        live = [w for w in w64 if w is not None]
        oracle = torch.autograd.grad(y64, live, dy.double())
        for g, r, o in zip(grads[1:], grads_ref[1:], oracle):
            assert_rule("weight grad", g, o, r, grad_floor(o))


@pytest.mark.parametrize("layout", LAYOUTS)
@pytest.mark.parametrize("D", [64, 96, 100, 1024])  # 100: not a multiple of the vector width
def test_layouts_and_widths(layout, D, seed):
    _check(seed, layout, 333, D, 4, DTYPES[seed % 3])


@pytest.mark.parametrize("dtype", DTYPES, ids=str)
@pytest.mark.parametrize("cfg", CONFIGS)
def test_sinusoid_only(dtype, cfg, seed):
    _check(seed, "several", 200, 64, 3, dtype, with_mlp=False, cfg=cfg)


@pytest.mark.parametrize("dtype", DTYPES, ids=str)
def test_large_and_no_bias(dtype, seed):
    _check(seed, "several", 20000, 256, 9, dtype, F=256, H=512, bias=False)


def test_misaligned_rows_take_the_scalar_path(seed):
    gen = torch.Generator().manual_seed(seed)
    base = torch.randn(1 + 50 * 64, generator=gen).to("cuda", torch.float16)
    x = base[1:].view(50, 64)  # contiguous, 2 bytes past a 16-byte boundary
    t = torch.tensor([10.0, 500.0], device="cuda")
    idx = make_layout("several", 50, 2, gen).cuda()
    y = tk.patch_timestep_embedding(x, t, idx, None, freq_dim=64, backend="cuda")
    y_ref = tk.patch_timestep_embedding(x, t, idx, None, freq_dim=64, backend="reference")
    y64 = patch_oracle(x.double(), t, idx, None, 64, CONFIGS[0])
    assert_rule("y", y, y64, y_ref, FLOOR[torch.float16])


@pytest.mark.parametrize("cfg", CONFIGS)
def test_sinusoid_kernel(cfg, seed):
    from transfusion_kernels.timestep import cuda as tkc

    gen = torch.Generator().manual_seed(seed)
    t = torch.cat([torch.tensor([0.0, 1.0, 999.0]), torch.rand(29, generator=gen) * 1000]).cuda()
    for dim in (1, 7, 64, 320):
        kw = dict(flip_sin_to_cos=cfg[0], downscale_freq_shift=cfg[1], scale=cfg[2], max_period=cfg[3])
        got = tkc.sinusoid(t, freq_dim=dim, **kw)
        ref = reference.sinusoid(t, dim, *cfg)
        assert_rule(f"sinusoid dim={dim}", got, sinusoid64(t, dim, *cfg), ref, 1e-6)


@pytest.mark.parametrize("layout", ["image", "random", "empty"])
def test_segment_sum_is_deterministic(layout, seed):
    from transfusion_kernels.timestep import cuda as tkc

    gen = torch.Generator().manual_seed(seed)
    P, D, M = 5000, 96, 7  # images of hundreds of rows: several pieces each
    idx = make_layout(layout, P, M, gen).cuda()
    dy = torch.randn(P, D, generator=gen).to("cuda", torch.bfloat16)
    a = tkc.segment_sum(dy, idx, M)
    b = tkc.segment_sum(dy, idx, M)
    assert torch.equal(a, b)
    oracle = torch.zeros(M + 1, D, dtype=torch.float64, device="cuda").index_add_(
        0, torch.where(idx >= 0, idx, M).long(), dy.double()
    )[:M]
    assert_rule("segment_sum", a, oracle, reference.segment_sum(dy, idx, M), grad_floor(oracle))
