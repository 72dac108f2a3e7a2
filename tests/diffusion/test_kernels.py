"""The Triton diffusion kernels called directly, with tiles shrunk so that tiny inputs run as many
programs along both grid axes, every row with its own coefficients (its own timestep), and row
lengths that are not a multiple of the tile. Oracle: the contract in float64 (tests/oracles.py);
baseline of the 2x rule: the reference backend (same fp32 math in PyTorch)."""

import pytest
import torch

from tests.diffusion.common import DEVICE, assert_rule
from tests.oracles import affine_step64, diffusion_loss64

pytest.importorskip("triton")
if not (torch.cuda.is_available() or __import__("os").environ.get("TRITON_INTERPRET") == "1"):
    pytest.skip("triton cannot run here", allow_module_level=True)

from transfusion_kernels.diffusion import reference  # noqa: E402
from transfusion_kernels.diffusion import triton as tkt  # noqa: E402

DTYPES = (torch.float32, torch.float16, torch.bfloat16)


@pytest.fixture(autouse=True)
def _poison(monkeypatch):
    """NaN-filled outputs with NaN slack behind them: a store past a row's end lands in the next
    row (caught by the comparison) or in the slack (caught below), never outside the buffer."""
    slack = 64

    def nan_empty(shape, dtype, device):
        n = int(torch.Size(shape).numel())
        buf = torch.full((n + slack,), float("nan"), dtype=dtype, device=device)
        buffers.append(buf[n:])
        return buf[:n].view(shape)

    buffers = []
    monkeypatch.setattr(tkt, "_empty", nan_empty)
    yield
    assert all(torch.isnan(tail).all() for tail in buffers), "a kernel wrote past the end of its output"


@pytest.fixture
def small_tiles(monkeypatch):
    monkeypatch.setattr(tkt, "INTERPRET_TILE", 16)
    monkeypatch.setattr(tkt, "INTERPRET_MAX_BLOCK_C", 4)


def per_row_coef(R, gen):
    """float32 [R, 6], no two rows alike and no zero coefficient (each row its own timestep)."""
    c = torch.rand(R, 6, generator=gen) * 1.5 + 0.25
    return (c * torch.where(torch.rand(R, 6, generator=gen) < 0.5, -1.0, 1.0)).to(DEVICE)


# (rows, row shape): rows longer than the 16-element tile (many column programs), short rows
# (several rows per program, many row programs), odd lengths that end inside a tile
SHAPES = [(5, (37,)), (13, (3,)), (9, (2, 5)), (1, (50,)), (33, (1,))]


@pytest.mark.parametrize("dtype", DTYPES, ids=str)
@pytest.mark.parametrize("R,shape", SHAPES, ids=[f"{r}x{'x'.join(map(str, s))}" for r, s in SHAPES])
@pytest.mark.parametrize("clip", [None, 0.7], ids=["noclip", "clip"])
def test_affine_kernel_many_programs_given_noise(small_tiles, seed, dtype, R, shape, clip):
    gen = torch.Generator().manual_seed(seed)
    sample, mo, noise = (torch.randn(R, *shape, generator=gen).to(DEVICE, dtype) for _ in range(3))
    coef = per_row_coef(R, gen)
    out, drawn = tkt.affine_step(sample, mo, coef, noise, 0, clip, False)
    assert drawn is None
    same = reference.affine_step(sample, mo, coef, noise, 0, clip, False)[0]
    assert_rule(out, affine_step64(sample, mo, coef, noise, clip), same, f"affine {dtype} R={R} {shape}")


@pytest.mark.parametrize("dtype", DTYPES, ids=str)
@pytest.mark.parametrize("R,shape", SHAPES[:3], ids=[f"{r}x{'x'.join(map(str, s))}" for r, s in SHAPES[:3]])
def test_affine_kernel_many_programs_drawn_noise(small_tiles, seed, dtype, R, shape):
    """Noise drawn in the kernel: the Philox definition per element index, returned rounded to
    the dtype; the output follows from that noise as from given noise."""
    gen = torch.Generator().manual_seed(seed)
    sample = torch.randn(R, *shape, generator=gen).to(DEVICE, dtype)
    coef = per_row_coef(R, gen)
    philox_seed = (seed << 20) | 0x5EED  # > 2**32: both key words matter
    out, drawn = tkt.affine_step(sample, None, coef, None, philox_seed, None, True)
    want_noise = reference.affine_step(sample, None, coef, None, philox_seed, None, True)[1]
    # one ulp: the interpreter's fp32 -> bf16 cast truncates where a GPU rounds
    torch.testing.assert_close(drawn, want_noise, rtol=torch.finfo(dtype).eps, atol=1e-5)
    same = reference.affine_step(sample, None, coef, drawn, 0, None, False)[0]
    assert_rule(out, affine_step64(sample, None, coef, drawn, None), same, f"affine drawn {dtype}")


@pytest.mark.parametrize("P,C", [(21, 3), (7, 9), (40, 1)])
@pytest.mark.parametrize("dtype", DTYPES, ids=str)
def test_loss_kernel_many_programs(small_tiles, seed, P, C, dtype):
    """Images of different sizes (so every row has its own weight), text rows between them."""
    gen = torch.Generator().manual_seed(seed)
    idx = torch.randint(-1, 4, (P,), generator=gen).to(torch.int32)
    idx[:4] = torch.tensor([0, 1, 2, 3], dtype=torch.int32)  # every image has a patch
    pred, target = (torch.randn(P, C, generator=gen).to(DEVICE, dtype) for _ in range(2))
    loss, grad = tkt.diffusion_loss(pred, target, idx.to(DEVICE), True)
    loss64, grad64 = diffusion_loss64(pred, target, idx)
    same_loss, same_grad = reference.diffusion_loss(pred, target, idx.to(DEVICE), True)
    assert_rule(loss, loss64, same_loss, "loss")
    assert_rule(grad, grad64, same_grad, "grad")
