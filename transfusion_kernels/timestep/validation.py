"""Argument checks of the timestep ops, done once by the public functions before the custom ops
run: a backend trusts what reaches it (the contract in the package docstring)."""

from __future__ import annotations

import math
import numbers

import torch

X_DTYPES = (torch.float16, torch.bfloat16, torch.float32)
T_DTYPES = (
    torch.uint8,
    torch.int8,
    torch.int16,
    torch.int32,
    torch.int64,
    torch.float16,
    torch.bfloat16,
    torch.float32,
    torch.float64,
)


def describe(t) -> str:
    if isinstance(t, torch.Tensor):
        return f"a {t.dtype} tensor of shape {tuple(t.shape)} on {t.device}"
    return type(t).__name__


def err(msg: str) -> ValueError:
    return ValueError(f"patch_timestep_embedding: {msg}")


def check_config(dim, downscale_freq_shift, scale, max_period, op: str):
    """The sinusoid's float parameters: finite, max_period > 0, and a frequency table without a
    division by zero (diffusers returns NaN there; we refuse it)."""
    values = []
    for name, v in (("downscale_freq_shift", downscale_freq_shift), ("scale", scale), ("max_period", max_period)):
        if isinstance(v, bool) or not isinstance(v, numbers.Real) or not math.isfinite(v):
            raise ValueError(f"{op}: {name} must be a finite real number, got {v!r}")
        values.append(float(v))
    shift, scale, max_period = values
    if max_period <= 0:
        raise ValueError(f"{op}: max_period must be positive, got {max_period}")
    half = dim // 2
    if half > 0 and half - shift == 0:
        raise ValueError(
            f"{op}: downscale_freq_shift must differ from dim // 2 = {half} (the frequency exponent "
            f"divides by dim // 2 - downscale_freq_shift), got {shift}"
        )
    return shift, scale, max_period


def check_inputs(x, timesteps, image_index, w1, b1, w2, b2, freq_dim) -> int:
    if not isinstance(x, torch.Tensor) or x.dim() != 2 or x.dtype not in X_DTYPES:
        raise err(f"x must be a 2-D float16/bfloat16/float32 tensor [P, D], got {describe(x)}")
    P, D = x.shape
    if not isinstance(timesteps, torch.Tensor) or timesteps.dim() != 1 or timesteps.dtype not in T_DTYPES:
        raise err(f"timesteps must be a 1-D integer or floating tensor [M], got {describe(timesteps)}")
    if not isinstance(image_index, torch.Tensor) or image_index.dtype != torch.int32:
        raise err(f"image_index must be an int32 tensor [P], got {describe(image_index)}")
    if image_index.shape != (P,):
        raise err(f"image_index must have shape [P] = [{P}] (one entry per row of x), got {tuple(image_index.shape)}")
    if isinstance(freq_dim, bool) or not isinstance(freq_dim, int) or freq_dim < 1:
        raise err(f"freq_dim must be a positive int, got {freq_dim!r}")
    for name, t in (("timesteps", timesteps), ("image_index", image_index)):
        if t.device != x.device:
            raise err(f"{name} is on {t.device} but x is on {x.device}")
    if w1 is None:
        if any(w is not None for w in (b1, w2, b2)):
            raise err("mlp tuple has w1=None but other weights set")
        if freq_dim != D:
            raise err(
                f"freq_dim must equal D = x.shape[1] = {D} when mlp is None (sinusoid only), got freq_dim={freq_dim}"
            )
        return freq_dim
    for name, w, dims in (("w1", w1, 2), ("b1", b1, 1), ("w2", w2, 2), ("b2", b2, 1)):
        if w is None and name in ("w1", "w2"):
            raise err(f"mlp {name} is None")
        if w is None:
            continue
        if not isinstance(w, torch.Tensor) or w.dim() != dims or w.dtype not in X_DTYPES:
            raise err(f"mlp {name} must be a {dims}-D float16/bfloat16/float32 tensor, got {describe(w)}")
        if w.device != x.device:
            raise err(f"mlp {name} is on {w.device} but x is on {x.device}")
    H = w1.shape[0]
    if w1.shape[1] != freq_dim:
        raise err(
            f"freq_dim={freq_dim} does not match mlp w1 of shape {tuple(w1.shape)} "
            f"(expected [H, freq_dim]); pass freq_dim={w1.shape[1]}"
        )
    if b1 is not None and b1.shape != (H,):
        raise err(f"mlp b1 must have shape [H] = [{H}], got {tuple(b1.shape)}")
    if w2.shape != (D, H):
        raise err(f"mlp w2 must have shape [D, H] = [{D}, {H}] (D = x.shape[1]), got {tuple(w2.shape)}")
    if b2 is not None and b2.shape != (D,):
        raise err(f"mlp b2 must have shape [D] = [{D}], got {tuple(b2.shape)}")
    return freq_dim


def check_index_range(image_index: torch.Tensor, num_images: int) -> None:
    # Data-dependent, so it runs inside the op (eagerly, also under torch.compile), not in the tracer.
    if image_index.numel() == 0:
        return
    lo, hi = (int(v) for v in torch.aminmax(image_index))
    if lo < -1 or hi >= num_images:
        raise err(
            f"image_index values must lie in [-1, M) = [-1, {num_images}) (M = len(timesteps)), "
            f"got values in [{lo}, {hi}]"
        )
