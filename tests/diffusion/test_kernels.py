"""The diffusion kernel backends (triton, cuda) called directly: the fused affine step with given
and drawn noise, the velocity output, the loss kernel. Oracle: the contract in float64
(tests/oracles.py); baseline of the 2x rule: the reference backend (same fp32 math in PyTorch).

On a CPU triton runs under the interpreter with tiles shrunk so that tiny inputs run as many
programs along both grid axes, every row with its own coefficients (its own timestep), and row
lengths that are not a multiple of the tile; on a GPU both backends run their own tiles on
larger shapes. A backend that cannot run here is skipped with the dispatcher's reason.
"""

import pytest
import torch

from tests.backend_params import KERNEL_BACKENDS, kernels, require
from tests.diffusion.common import DEVICE, DTYPES, GPU, assert_rule
from tests.oracles import affine_step64, diffusion_loss64
from transfusion_kernels import philox
from transfusion_kernels.backends import triton_interpret
from transfusion_kernels.diffusion import reference


@pytest.fixture(params=KERNEL_BACKENDS)
def backend(request, monkeypatch):
    """The backend's module, with small tiles under the interpreter, and NaN-filled outputs with
    NaN slack behind them: a store past a row's end lands in the next row (caught by the
    comparison) or in the slack (caught below), never outside the buffer."""
    require(request.param)
    mod = kernels("diffusion", request.param)
    if request.param == "triton" and not GPU:
        monkeypatch.setattr(mod, "INTERPRET_TILE", 16)
        monkeypatch.setattr(mod, "INTERPRET_MAX_BLOCK_C", 4)
    slack = 64

    def nan_empty(shape, dtype, device):
        n = int(torch.Size(shape).numel())
        buf = torch.full((n + slack,), float("nan"), dtype=dtype, device=device)
        buffers.append(buf[n:])
        return buf[:n].view(shape)

    buffers = []
    monkeypatch.setattr(mod, "_empty", nan_empty)
    yield mod
    assert all(torch.isnan(tail).all() for tail in buffers), "a kernel wrote past the end of its output"


def per_row_coef(R, gen):
    """float32 [R, 6], no two rows alike and no zero coefficient (each row its own timestep)."""
    c = torch.rand(R, 6, generator=gen) * 1.5 + 0.25
    return (c * torch.where(torch.rand(R, 6, generator=gen) < 0.5, -1.0, 1.0)).to(DEVICE)


def tensor(shape, dtype, gen, misaligned=False):
    """Random values; ``misaligned``: contiguous, 1 element past a 16-byte boundary (the cuda
    kernels' scalar path)."""
    values = torch.randn(shape, generator=gen).to(DEVICE, dtype)
    if not misaligned:
        return values
    base = torch.empty(values.numel() + 1, dtype=dtype, device=DEVICE)
    t = base[1:].view(shape)
    return t.copy_(values)


def shape_id(shape):
    return "x".join(map(str, shape))


# Row counts and row shapes: on the CPU rows longer than the 16-element tile (many column
# programs), short rows (several rows per program, many row programs), odd lengths that end inside
# a tile; on a GPU the kernels' own tiles, up to rows of 2**20 elements.
SHAPES = (
    [(5, 37), (13, 3), (9, 2, 5), (1, 50), (33, 1)]
    if not GPU
    else [(1,), (3, 7), (5, 1, 3), (100, 3), (4, 1000), (17, 4097), (2, 4, 32, 32), (1, 1 << 20)]
)
MODES = ["model+noise", "clip"] if not GPU else ["model+noise", "no_model", "clip", "misaligned"]


@pytest.mark.parametrize("dtype", DTYPES, ids=str)
@pytest.mark.parametrize("shape", SHAPES, ids=shape_id)
@pytest.mark.parametrize("mode", MODES)
def test_affine_step_given_noise(backend, seed, dtype, shape, mode):
    gen = torch.Generator().manual_seed(seed)
    misaligned = mode == "misaligned"
    sample = tensor(shape, dtype, gen, misaligned)
    mo = None if mode == "no_model" else tensor(shape, dtype, gen, misaligned)
    noise = tensor(shape, dtype, gen, misaligned)
    coef = per_row_coef(shape[0], gen)
    clip = 0.7 if mode == "clip" else None
    out, drawn = backend.affine_step(sample, mo, coef, noise, 0, clip, False)
    assert drawn is None  # nothing is drawn when noise is given
    assert out.shape == sample.shape and out.dtype == dtype and out.is_contiguous()
    same = reference.affine_step(sample, mo, coef, noise, 0, clip, False)[0]
    assert_rule(out, affine_step64(sample, mo, coef, noise, clip), same, f"affine {dtype} {shape} {mode}")


DRAWN_SHAPES = SHAPES[:3] if not GPU else [(3, 7), (100, 3), (17, 4097), (2, 4, 32, 32)]


@pytest.mark.parametrize("dtype", DTYPES, ids=str)
@pytest.mark.parametrize("shape", DRAWN_SHAPES, ids=shape_id)
def test_affine_step_drawn_noise(backend, seed, dtype, shape):
    """Noise drawn in the kernel: the Philox definition per element index, returned rounded to
    the dtype; the output follows from exactly that noise (fed back, it gives the same bits); on a
    GPU the same seed draws the same noise, another seed other noise."""
    gen = torch.Generator().manual_seed(seed)
    sample, mo = tensor(shape, dtype, gen), tensor(shape, dtype, gen)
    coef = per_row_coef(shape[0], gen)
    key = seed * 0x9E3779B97F4A7C15 % 2**64  # > 2**32: both key words matter
    out, drawn = backend.affine_step(sample, mo, coef, None, key, None, True)
    expected = philox.randn(key, sample.numel(), device=DEVICE).reshape(shape)
    if backend.__name__.endswith("triton"):
        # one ulp: the interpreter's fp32 -> bf16 cast truncates where a GPU rounds
        torch.testing.assert_close(drawn.float(), expected.to(dtype).float(), rtol=torch.finfo(dtype).eps, atol=1e-5)
    else:
        # float32 noise may differ in the last bits (log/cos/sqrt rounding); a low-precision
        # value may then round the other way
        tol = 4 * torch.finfo(torch.float32).eps if dtype == torch.float32 else torch.finfo(dtype).eps
        assert torch.allclose(drawn.float(), expected, rtol=tol, atol=tol), (drawn.float() - expected).abs().max()
    again, _ = backend.affine_step(sample, mo, coef, drawn, 0, None, False)
    assert torch.equal(again, out)
    same = reference.affine_step(sample, mo, coef, drawn, 0, None, False)[0]
    assert_rule(out, affine_step64(sample, mo, coef, drawn, None), same, f"affine drawn {dtype} {shape}")
    if GPU:  # programs run concurrently (the interpreter runs them one at a time)
        out2, drawn2 = backend.affine_step(sample, mo, coef, None, key, None, True)
        assert torch.equal(out2, out) and torch.equal(drawn2, drawn)
        _, other = backend.affine_step(sample, mo, coef, None, key ^ 1, None, True)
        assert not torch.equal(other, drawn)


VELOCITY_SHAPES = [(9, 2, 5)] if not GPU else [(3, 7), (17, 4097), (2, 4, 32, 32)]


@pytest.mark.parametrize("dtype", DTYPES, ids=str)
@pytest.mark.parametrize("shape", VELOCITY_SHAPES, ids=shape_id)
@pytest.mark.parametrize(
    "misaligned", [False, True] if GPU else [False], ids=lambda m: "misaligned" if m else "aligned"
)
def test_velocity_output(backend, seed, dtype, shape, misaligned):
    """velocity=True: the second output is noise - sample (fp32, rounded once) for given and
    drawn noise; the step's output is unchanged."""
    if triton_interpret() and dtype == torch.bfloat16 and backend.__name__.endswith("triton"):
        pytest.skip("the interpreter's fp32 -> bf16 cast truncates where a GPU rounds: exact bf16 needs a GPU")
    gen = torch.Generator().manual_seed(seed)
    sample, mo, noise = (tensor(shape, dtype, gen, misaligned) for _ in range(3))
    coef = per_row_coef(shape[0], gen)
    out, target = backend.affine_step(sample, mo, coef, noise, 0, None, False, velocity=True)
    ref_out, ref_target = reference.affine_step(sample, mo, coef, noise, 0, None, False, velocity=True)
    assert torch.equal(target, ref_target)  # one fp32 subtraction, one rounding: exact
    assert_rule(out, affine_step64(sample, mo, coef, noise, None), ref_out, f"{dtype} {shape} velocity")

    key = seed * 0x9E3779B97F4A7C15 % 2**64
    out, target = backend.affine_step(sample, None, coef, None, key, None, False, velocity=True)
    drawn = backend.affine_step(sample, None, coef, None, key, None, True)[1]
    assert torch.equal(target, (drawn.float() - sample.float()).to(dtype))
    again, _ = backend.affine_step(sample, None, coef, drawn, 0, None, False)
    assert torch.equal(again, out)
    _, none = backend.affine_step(sample, None, coef, None, key, None, False, has_noise=False, velocity=True)
    assert torch.equal(none, -sample)


def test_has_noise_false_draws_nothing(backend, seed):
    gen = torch.Generator().manual_seed(seed)
    sample = tensor((6, 50), torch.float16, gen)
    coef = per_row_coef(6, gen)
    coef[:, 5] = 0
    out, drawn = backend.affine_step(sample, None, coef, None, seed, None, True, has_noise=False)
    assert drawn is None
    ref, _ = reference.affine_step(sample, None, coef, None, seed, None, True, has_noise=False)
    assert_rule(out, affine_step64(sample, None, coef, None, None), ref)


@pytest.mark.gpu
@pytest.mark.skipif(not GPU, reason="needs CUDA")
def test_runs_on_the_current_stream(backend, seed):
    gen = torch.Generator().manual_seed(seed)
    sample = tensor((8, 1 << 16), torch.bfloat16, gen)
    coef = per_row_coef(8, gen)
    side = torch.cuda.Stream()
    side.wait_stream(torch.cuda.current_stream())
    with torch.cuda.stream(side):
        out, drawn = backend.affine_step(sample, None, coef, None, seed, None, True)
    side.synchronize()
    ref, _ = reference.affine_step(sample, None, coef, drawn, seed, None, False)
    assert_rule(out, affine_step64(sample, None, coef, drawn, None), ref)


@pytest.mark.parametrize("P,C", [(21, 3), (7, 9), (40, 1)])
@pytest.mark.parametrize("dtype", DTYPES, ids=str)
def test_loss_kernel_many_programs(backend, seed, P, C, dtype):
    """Images of different sizes (so every row has its own weight), text rows between them."""
    if not hasattr(backend, "diffusion_loss"):
        pytest.skip(f"{backend.__name__} has no loss kernel (diffusion_loss runs on triton or the reference)")
    gen = torch.Generator().manual_seed(seed)
    idx = torch.randint(-1, 4, (P,), generator=gen).to(torch.int32)
    idx[:4] = torch.tensor([0, 1, 2, 3], dtype=torch.int32)  # every image has a patch
    pred, target = (torch.randn(P, C, generator=gen).to(DEVICE, dtype) for _ in range(2))
    loss, grad = backend.diffusion_loss(pred, target, idx.to(DEVICE), True)
    loss64, grad64 = diffusion_loss64(pred, target, idx)
    same_loss, same_grad = reference.diffusion_loss(pred, target, idx.to(DEVICE), True)
    assert_rule(loss, loss64, same_loss, "loss")
    assert_rule(grad, grad64, same_grad, "grad")
