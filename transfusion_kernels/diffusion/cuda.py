"""CUDA C++ backend of the diffusion ops: the fused affine step of csrc/diffusion/.

Same contract as ``reference.affine_step`` (see the package docstring). This wrapper checks the
tensors, allocates the outputs with torch and launches the kernel of the torch-independent
extension ``transfusion_kernels._C`` on torch's current stream. One pass over memory: reads
sample (and model_output, noise when given), writes out (and the drawn noise when asked for);
16-byte vector accesses when every pointer is 16-byte aligned.
"""

from __future__ import annotations

import torch

from transfusion_kernels.backends import require_extension

_DTYPE_NAMES = {torch.float32: "float32", torch.float16: "float16", torch.bfloat16: "bfloat16"}


def supports(sample) -> str | None:
    """The affine-step kernel covers every input the ops accept."""
    return None


def supports_loss(pred) -> str | None:
    """diffusion_loss has no CUDA C++ kernel: it runs on the next backend (triton)."""
    return "any input (it has no CUDA C++ kernel)"


def _empty(shape, dtype, device) -> torch.Tensor:
    """Output allocation (tests replace it to poison outputs with NaN)."""
    return torch.empty(shape, dtype=dtype, device=device)


def _check_like(name: str, t: torch.Tensor, sample: torch.Tensor) -> None:
    if not isinstance(t, torch.Tensor):
        raise TypeError(f"{name} must be a torch.Tensor or None, got {type(t).__name__}")
    if t.shape != sample.shape:
        raise ValueError(f"{name} must have sample's shape {tuple(sample.shape)}, got {tuple(t.shape)}")
    if t.dtype != sample.dtype:
        raise TypeError(f"{name} must have sample's dtype {sample.dtype}, got {t.dtype}")
    if t.device != sample.device:
        raise ValueError(f"{name} must be on sample's device {sample.device}, got {t.device}")
    if not t.is_contiguous():
        raise ValueError(f"{name} must be contiguous")


def affine_step(sample, model_output, coef, noise, seed, clip_range, return_noise, *, has_noise=True, velocity=False):
    """Fused ``out = c2 * clamp(c0 * s + c1 * m) + c3 * s + c4 * m + c5 * noise`` per row.

    ``noise=None`` draws ``philox.randn(seed, numel)`` in the kernel (rounded to sample.dtype,
    as the reference does); ``has_noise=False`` with ``noise=None`` draws nothing (every
    ``c[:, 5]`` is zero). Returns ``(out, drawn_noise_or_None)``; with ``velocity=True``
    ``(out, noise - sample)``."""
    ext = require_extension()
    if not isinstance(sample, torch.Tensor):
        raise TypeError(f"sample must be a torch.Tensor, got {type(sample).__name__}")
    if sample.dtype not in _DTYPE_NAMES:
        raise TypeError(f"sample must be float16, bfloat16 or float32, got {sample.dtype}")
    if sample.device.type != "cuda":
        raise ValueError(f"the cuda backend needs CUDA tensors, got sample on {sample.device}")
    if sample.dim() < 1:
        raise ValueError("sample must have at least one dimension (rows)")
    if not sample.is_contiguous():
        raise ValueError("sample must be contiguous")
    if model_output is not None:
        _check_like("model_output", model_output, sample)
    if noise is not None:
        _check_like("noise", noise, sample)
    rows = sample.shape[0]
    if not isinstance(coef, torch.Tensor):
        raise TypeError(f"coef must be a torch.Tensor, got {type(coef).__name__}")
    if coef.dtype != torch.float32:
        raise TypeError(f"coef must be float32, got {coef.dtype}")
    if tuple(coef.shape) != (rows, 6):
        raise ValueError(f"coef must have shape ({rows}, 6) (rows of sample, 6), got {tuple(coef.shape)}")
    if coef.device != sample.device:
        raise ValueError(f"coef must be on sample's device {sample.device}, got {coef.device}")
    if not coef.is_contiguous():
        raise ValueError("coef must be contiguous")
    if clip_range is not None:
        clip_range = float(clip_range)
        if not clip_range >= 0.0:
            raise ValueError(f"clip_range must be a float >= 0 or None, got {clip_range}")

    draw = noise is None and has_noise
    if draw:
        if isinstance(seed, bool) or not isinstance(seed, int):
            raise TypeError(f"seed must be a python int when noise is drawn, got {type(seed).__name__}")
        if not 0 <= seed < 2**64:
            raise ValueError(f"seed must be in [0, 2**64), got {seed}")

    out = _empty(sample.shape, sample.dtype, sample.device)
    second = velocity or (draw and return_noise)
    drawn = _empty(sample.shape, sample.dtype, sample.device) if second else None
    if sample.numel() > 0:
        with torch.cuda.device(sample.device):
            ext.diffusion_affine_step(
                out.data_ptr(),
                sample.data_ptr(),
                model_output.data_ptr() if model_output is not None else 0,
                coef.data_ptr(),
                noise.data_ptr() if noise is not None else 0,
                drawn.data_ptr() if drawn is not None else 0,
                sample.numel(),
                rows,
                _DTYPE_NAMES[sample.dtype],
                seed if draw else 0,
                draw,
                clip_range,
                torch.cuda.current_stream(sample.device).cuda_stream,
                velocity,
            )
    return out, drawn
