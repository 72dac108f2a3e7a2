"""The CUDA fused affine diffusion step against the reference backend and a float64 oracle.
Needs a CUDA device and the built extension; skipped otherwise."""

from __future__ import annotations

import pytest
import torch

from transfusion_kernels import philox
from transfusion_kernels.backends import load_extension
from transfusion_kernels.diffusion import cuda as diffusion_cuda
from transfusion_kernels.diffusion import reference
from tests.diffusion.common import assert_rule
from tests.oracles import affine_step64

pytestmark = [
    pytest.mark.gpu,
    pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA device"),
    pytest.mark.skipif(load_extension()[0] is None, reason="transfusion_kernels._C is not built"),
]

DTYPES = [torch.float32, torch.float16, torch.bfloat16]
SHAPES = [(1,), (3, 7), (5, 1, 3), (100, 3), (4, 1000), (17, 4097), (2, 4, 32, 32), (1, 1 << 20)]


@pytest.fixture
def poison(monkeypatch):
    """Every output of the cuda backend starts as NaN, so an unwritten element fails."""
    monkeypatch.setattr(
        diffusion_cuda,
        "_empty",
        lambda shape, dtype, device: torch.full(shape, float("nan"), dtype=dtype, device=device),
    )


def _tensor(shape, dtype, gen, misaligned=False):
    n = 1
    for s in shape:
        n *= s
    if misaligned:  # contiguous, but 1 element past a 16-byte boundary: the scalar path
        base = torch.empty(n + 1, dtype=dtype, device="cuda")
        t = base[1:].view(shape)
    else:
        t = torch.empty(shape, dtype=dtype, device="cuda")
    t.copy_(torch.randn(shape, generator=gen, dtype=torch.float32).to(dtype))
    return t


def _coef(rows, gen):
    # Random per-row coefficients of the sizes the schedules produce (|c| up to ~3; c5 >= 0).
    c = torch.rand(rows, 6, generator=gen) * 2.0 - 0.5
    c[:, 5] = torch.rand(rows, generator=gen)
    return c.cuda()


@pytest.mark.parametrize("dtype", DTYPES, ids=str)
@pytest.mark.parametrize("shape", SHAPES, ids=str)
@pytest.mark.parametrize("mode", ["model+noise", "no_model", "clip", "misaligned"])
def test_affine_step_given_noise(poison, seed, dtype, shape, mode):
    gen = torch.Generator().manual_seed(seed)
    misaligned = mode == "misaligned"
    sample = _tensor(shape, dtype, gen, misaligned)
    model_output = None if mode == "no_model" else _tensor(shape, dtype, gen, misaligned)
    noise = _tensor(shape, dtype, gen, misaligned)
    coef = _coef(shape[0], gen)
    clip = 0.75 if mode == "clip" else None

    out, drawn = diffusion_cuda.affine_step(sample, model_output, coef, noise, seed, clip, True)
    ref, _ = reference.affine_step(sample, model_output, coef, noise, seed, clip, True)
    assert drawn is None  # nothing is drawn when noise is given
    assert out.shape == sample.shape and out.dtype == dtype and out.is_contiguous()
    assert_rule(out, affine_step64(sample, model_output, coef, noise, clip), ref, f"{dtype} {shape} {mode}")


@pytest.mark.parametrize("dtype", DTYPES, ids=str)
@pytest.mark.parametrize("shape", [(3, 7), (100, 3), (17, 4097), (2, 4, 32, 32)], ids=str)
def test_affine_step_draws_reference_noise(poison, seed, dtype, shape):
    gen = torch.Generator().manual_seed(seed)
    sample, model_output = _tensor(shape, dtype, gen), _tensor(shape, dtype, gen)
    coef = _coef(shape[0], gen)
    key = seed * 0x9E3779B97F4A7C15 % 2**64  # exercise both 32-bit halves of the key

    out, drawn = diffusion_cuda.affine_step(sample, model_output, coef, None, key, None, True)
    ref_out, ref_drawn = reference.affine_step(sample, model_output, coef, None, key, None, True)

    # Same seed, same noise: the reference Philox, rounded to the dtype. float32 noise may differ
    # in the last bits (log/cos/sqrt rounding); a low-precision value may then round the other way.
    expected = philox.randn(key, sample.numel(), device="cuda").reshape(shape)
    tol = 4 * torch.finfo(torch.float32).eps if dtype == torch.float32 else torch.finfo(dtype).eps
    assert torch.allclose(drawn.float(), expected, rtol=tol, atol=tol), (drawn.float() - expected).abs().max()
    assert torch.allclose(drawn.float(), ref_drawn.float(), rtol=tol, atol=tol)

    # The output uses exactly the noise it returns: feeding it back reproduces it bit for bit.
    again, _ = diffusion_cuda.affine_step(sample, model_output, coef, drawn, 0, None, False)
    assert torch.equal(again, out)
    assert_rule(out, affine_step64(sample, model_output, coef, drawn, None), ref_out, f"{dtype} {shape} drawn")

    # Deterministic; a different seed gives different noise.
    out2, drawn2 = diffusion_cuda.affine_step(sample, model_output, coef, None, key, None, True)
    assert torch.equal(out2, out) and torch.equal(drawn2, drawn)
    _, other = diffusion_cuda.affine_step(sample, model_output, coef, None, key ^ 1, None, True)
    assert not torch.equal(other, drawn)


@pytest.mark.parametrize("dtype", DTYPES, ids=str)
@pytest.mark.parametrize("shape", [(3, 7), (17, 4097), (2, 4, 32, 32)], ids=str)
@pytest.mark.parametrize("misaligned", [False, True], ids=["aligned", "misaligned"])
def test_velocity_output(poison, seed, dtype, shape, misaligned):
    """velocity=True: the second output is noise - sample (fp32, rounded once) for given and
    drawn noise; the step's output is unchanged."""
    gen = torch.Generator().manual_seed(seed)
    sample, model_output, noise = (_tensor(shape, dtype, gen, misaligned) for _ in range(3))
    coef = _coef(shape[0], gen)
    out, target = diffusion_cuda.affine_step(sample, model_output, coef, noise, 0, None, False, velocity=True)
    ref_out, ref_target = reference.affine_step(sample, model_output, coef, noise, 0, None, False, velocity=True)
    assert torch.equal(target, ref_target)  # one fp32 subtraction, one rounding: exact
    assert_rule(out, affine_step64(sample, model_output, coef, noise, None), ref_out, f"{dtype} {shape} velocity")

    key = seed * 0x9E3779B97F4A7C15 % 2**64
    out, target = diffusion_cuda.affine_step(sample, None, coef, None, key, None, False, velocity=True)
    drawn = diffusion_cuda.affine_step(sample, None, coef, None, key, None, True)[1]
    assert torch.equal(target, (drawn.float() - sample.float()).to(dtype))
    again, _ = diffusion_cuda.affine_step(sample, None, coef, drawn, 0, None, False)
    assert torch.equal(again, out)
    _, none = diffusion_cuda.affine_step(sample, None, coef, None, key, None, False, has_noise=False, velocity=True)
    assert torch.equal(none, -sample)


def test_drawn_noise_statistics(seed):
    n = 1 << 22
    sample = torch.zeros(4, n // 4, device="cuda")
    coef = torch.tensor([[0.0, 0.0, 0.0, 0.0, 0.0, 1.0]] * 4, device="cuda")  # out = noise
    out, drawn = diffusion_cuda.affine_step(sample, None, coef, None, seed, None, True)
    assert torch.equal(out, drawn)
    z = out.flatten().double()
    se = n**-0.5
    assert abs(z.mean().item()) < 5 * se
    assert abs(z.var().item() - 1.0) < 5 * 2**0.5 * se
    assert abs((z.abs() > 2).double().mean().item() - 0.0455) < 0.002  # Gaussian tails
    assert abs(torch.corrcoef(torch.stack([z[:-1], z[1:]]))[0, 1].item()) < 5 * se  # neighbours independent


def test_has_noise_false_draws_nothing(seed):
    gen = torch.Generator().manual_seed(seed)
    sample = _tensor((6, 50), torch.float16, gen)
    coef = _coef(6, gen)
    coef[:, 5] = 0
    out, drawn = diffusion_cuda.affine_step(sample, None, coef, None, seed, None, True, has_noise=False)
    assert drawn is None
    ref, _ = reference.affine_step(sample, None, coef, None, seed, None, True, has_noise=False)
    assert_rule(out, affine_step64(sample, None, coef, None, None), ref)


def test_runs_on_the_current_stream(seed):
    gen = torch.Generator().manual_seed(seed)
    sample = _tensor((8, 1 << 16), torch.bfloat16, gen)
    coef = _coef(8, gen)
    side = torch.cuda.Stream()
    side.wait_stream(torch.cuda.current_stream())
    with torch.cuda.stream(side):
        out, drawn = diffusion_cuda.affine_step(sample, None, coef, None, seed, None, True)
    side.synchronize()
    ref, _ = reference.affine_step(sample, None, coef, drawn, seed, None, False)
    assert_rule(out, affine_step64(sample, None, coef, drawn, None), ref)


def test_empty_and_errors(seed):
    x = torch.randn(0, 5, device="cuda", dtype=torch.float16)
    out, drawn = diffusion_cuda.affine_step(x, None, torch.zeros(0, 6, device="cuda"), None, seed, None, True)
    assert out.shape == (0, 5) and drawn.shape == (0, 5)
    s = torch.randn(4, 8, device="cuda")
    c = torch.zeros(4, 6, device="cuda")
    with pytest.raises(ValueError, match="coef"):
        diffusion_cuda.affine_step(s, None, c[:3], None, seed, None, False)
    with pytest.raises(TypeError, match="coef"):
        diffusion_cuda.affine_step(s, None, c.double(), None, seed, None, False)
    with pytest.raises(TypeError, match="model_output"):
        diffusion_cuda.affine_step(s, s.half(), c, None, seed, None, False)
    with pytest.raises(ValueError, match="noise"):
        diffusion_cuda.affine_step(s, None, c, s[:, :4], seed, None, False)
    with pytest.raises(ValueError, match="contiguous"):
        diffusion_cuda.affine_step(s.t().contiguous().t(), None, c, None, seed, None, False)
    with pytest.raises(ValueError, match="CUDA"):
        diffusion_cuda.affine_step(s.cpu(), None, c.cpu(), None, seed, None, False)
    with pytest.raises(ValueError, match="seed"):
        diffusion_cuda.affine_step(s, None, c, None, 2**64, None, False)
    with pytest.raises(TypeError, match="float16"):
        diffusion_cuda.affine_step(s.double(), None, c, None, seed, None, False)


@pytest.mark.slow
def test_more_than_2_to_the_31_elements(seed):
    """64-bit element indices: the Philox counter's high word and the row arithmetic."""
    rows = 3
    numel = (2**31 // rows + 5) * rows
    try:
        sample = torch.zeros(rows, numel // rows, dtype=torch.float16, device="cuda")
        coef = torch.tensor([[0.0, 0.0, 0.0, 0.0, 0.0, 1.0]] * rows, device="cuda")
        out, drawn = diffusion_cuda.affine_step(sample, None, coef, None, seed, None, True)
    except torch.cuda.OutOfMemoryError:
        pytest.skip("not enough GPU memory for 3 x 4 GiB")
    flat = out.flatten()
    for start in (0, 2**31 - 2048, numel - 4096):
        ref = philox.randn(seed, 4096, device="cuda", offset=start).half()
        got = flat[start : start + 4096]
        assert torch.allclose(got.float(), ref.float(), rtol=1e-3, atol=1e-3), start
