"""Argument checks of the public diffusion functions: one clear error per mistake."""

import numbers

import torch

from transfusion_kernels.diffusion.schedule import DiffusionSchedule

DTYPES = (torch.float16, torch.bfloat16, torch.float32)


def check_tensor(x, name: str) -> None:
    if not isinstance(x, torch.Tensor):
        raise TypeError(f"{name} must be a torch.Tensor, got {type(x).__name__}")
    if x.dtype not in DTYPES:
        raise TypeError(f"{name} must be float16, bfloat16 or float32, got {x.dtype}")
    if x.dim() < 1:
        raise ValueError(f"{name} must have a leading row dimension, got a 0-d tensor")


def check_like(x, name: str, ref, ref_name: str) -> None:
    if not isinstance(x, torch.Tensor):
        raise TypeError(f"{name} must be a torch.Tensor, got {type(x).__name__}")
    if x.shape != ref.shape:
        raise ValueError(f"{name} must have the shape of {ref_name} {tuple(ref.shape)}, got {tuple(x.shape)}")
    if x.dtype != ref.dtype:
        raise TypeError(f"{name} must have the dtype of {ref_name} ({ref.dtype}), got {x.dtype}")
    if x.device != ref.device:
        raise ValueError(f"{name} must be on the device of {ref_name} ({ref.device}), got {x.device}")


def check_schedule(schedule) -> None:
    if not isinstance(schedule, DiffusionSchedule):
        raise TypeError(
            f"schedule must be a DiffusionSchedule (DiffusionSchedule.from_diffusers converts a diffusers "
            f"scheduler), got {type(schedule).__name__}"
        )


def check_timesteps(value, name: str, R: int, schedule: DiffusionSchedule, allow_negative: bool = False):
    """A python int, or an integer tensor of shape [] or [R] -> (int or int64 tensor)."""
    T = schedule.num_train_timesteps
    lo = "" if allow_negative else "0 <= "
    if isinstance(value, torch.Tensor):
        if value.dtype.is_floating_point or value.dtype.is_complex or value.dtype == torch.bool:
            raise TypeError(f"{name} must be an integer tensor, got {value.dtype}")
        if value.dim() > 1 or (value.dim() == 1 and value.shape[0] != R):
            raise ValueError(
                f"{name} must be a python int or an integer tensor of shape [{R}] (one per row of sample), "
                f"got shape {tuple(value.shape)}"
            )
        value = value.long()
        if not torch.compiler.is_compiling():
            bad = value >= T if allow_negative else (value < 0) | (value >= T)
            if bool(bad.any()):
                raise ValueError(f"{name} must satisfy {lo}{name} < num_train_timesteps={T}")
        return value
    if isinstance(value, bool) or not isinstance(value, int):
        try:
            value = int(value.__index__())
        except AttributeError:
            raise TypeError(f"{name} must be an int or an integer tensor, got {type(value).__name__}") from None
    if not (value < T and (allow_negative or value >= 0)):
        raise ValueError(f"{name} must satisfy {lo}{name} < num_train_timesteps={T}, got {value}")
    return value


def as_rows(t, device) -> torch.Tensor:
    if isinstance(t, torch.Tensor):
        return t.to(device).reshape(-1)
    return torch.tensor([t], dtype=torch.int64, device=device)


def check_prev_before(prev, t, name: str) -> None:
    if isinstance(prev, int) and isinstance(t, int):
        ok = prev <= t
    elif torch.compiler.is_compiling():
        return
    else:
        device = t.device if isinstance(t, torch.Tensor) else prev.device
        ok = bool((as_rows(prev, device) <= as_rows(t, device)).all())
    if not ok:
        raise ValueError(f"{name} must not be larger than timestep (negative means the final, noise-free step)")


def check_seed(seed):
    if seed is None:
        return None
    if isinstance(seed, bool) or not isinstance(seed, int):
        raise TypeError(f"seed must be a python int in [0, 2**64) or None, got {type(seed).__name__}")
    if not 0 <= seed < 2**64:
        raise ValueError(f"seed must be in [0, 2**64), got {seed}")
    return seed


def fresh_seed() -> int:
    lo, hi = torch.randint(0, 2**32, (2,), dtype=torch.int64).tolist()
    return (hi << 32) | lo


def clip_range_of(clip_sample: bool, clip_sample_range: float):
    if not clip_sample:
        return None
    if isinstance(clip_sample_range, bool) or not isinstance(clip_sample_range, numbers.Real):
        raise ValueError(f"clip_sample_range must be a positive real number, got {clip_sample_range!r}")
    if not clip_sample_range > 0:
        raise ValueError(f"clip_sample_range must be positive, got {clip_sample_range}")
    return float(clip_sample_range)


def check_loss_inputs(pred, image_index, **like_pred) -> None:
    """pred [P, C] (C > 0), the tensors in ``like_pred`` (name=tensor) like it, image_index int [P] >= -1."""
    check_tensor(pred, "pred")
    if pred.dim() != 2:
        raise ValueError(f"pred must have shape [P, C], got {tuple(pred.shape)}")
    if pred.shape[1] == 0:
        raise ValueError("pred must have at least one channel (C > 0)")
    for name, x in like_pred.items():
        check_like(x, name, pred, "pred")
    if not isinstance(image_index, torch.Tensor):
        raise TypeError(f"image_index must be an int32/int64 tensor, got {type(image_index).__name__}")
    if image_index.dtype not in (torch.int32, torch.int64):
        raise TypeError(f"image_index must be int32 or int64, got {image_index.dtype}")
    if image_index.shape != (pred.shape[0],):
        raise ValueError(
            f"image_index must have shape [{pred.shape[0]}] (one per row of pred), got {tuple(image_index.shape)}"
        )
    if image_index.device != pred.device:
        raise ValueError(f"image_index must be on the device of pred ({pred.device}), got {image_index.device}")
    if not torch.compiler.is_compiling() and bool((image_index < -1).any()):
        raise ValueError("image_index must be >= -1 (-1 marks rows that are not image patches)")
