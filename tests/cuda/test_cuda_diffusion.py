"""The CUDA fused affine diffusion step's own argument checks and its 64-bit element indices.
Needs a CUDA device and the built extension; skipped otherwise. Its results against the float64
oracle are the cuda parameter of tests/diffusion/test_kernels.py."""

from __future__ import annotations

import pytest
import torch

from transfusion_kernels import philox
from transfusion_kernels.backends import load_extension
from transfusion_kernels.diffusion import cuda as diffusion_cuda

pytestmark = [
    pytest.mark.gpu,
    pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA device"),
    pytest.mark.skipif(load_extension()[0] is None, reason="transfusion_kernels._C is not built"),
]


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
