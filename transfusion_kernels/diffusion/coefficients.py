"""Per-row step coefficients: checked timesteps -> float32 [R, 6] on ``device``, and whether any
row adds noise (the contract in the package docstring). Computed in float64 from the schedule with
plain torch ops, so they trace. Coefficients that depend on t alone come from a per-schedule
[T, 6] table built once per device; python-int (t, prev) pairs are memoised. The public functions
and the benchmarks use them.
"""

import numbers

import torch

from transfusion_kernels.diffusion.schedule import (
    PREDICTION_TYPES,
    VARIANCE_TYPES,
    add_noise_coefs,
    ddim_coefs,
    ddpm_coefs,
    gather_alphas,
)
from transfusion_kernels.diffusion.validation import as_rows, check_prev_before, check_timesteps


def _coef_rows(coef: torch.Tensor, R: int, device) -> torch.Tensor:
    return coef.to(device=device, dtype=torch.float32).expand(R, 6).contiguous()


def _alphas(schedule, t, prev):
    """Per-row (t, alphas_cumprod[t], alphas_cumprod[prev]) on the timesteps' device (the CPU for
    python ints): [1] for scalars, [R] for per-row timesteps."""
    device = next((x.device for x in (t, prev) if isinstance(x, torch.Tensor)), torch.device("cpu"))
    table = schedule.alphas_cumprod_on(device)
    t_rows, prev_rows = torch.broadcast_tensors(as_rows(t, device), as_rows(prev, device))
    return t_rows, gather_alphas(table, t_rows), gather_alphas(table, prev_rows)


def _table_rows(schedule, key, coefs_of_all_t, t, R, device):
    """Coefficients of timesteps ``t`` from a per-schedule [T, 6] table (built once per device)."""
    table = schedule.cached((key, device), lambda: coefs_of_all_t().to(device, torch.float32))
    if isinstance(t, int):
        return table[t : t + 1].expand(R, 6).contiguous()
    return table.index_select(0, t.to(device).reshape(-1)).expand(R, 6).contiguous()


def add_noise_coef(timesteps, R, schedule, device):
    t = check_timesteps(timesteps, "timesteps", R, schedule)
    return _table_rows(schedule, "add_noise", lambda: add_noise_coefs(schedule.alphas_cumprod), t, R, device), True


def ddpm_coef(
    timestep, R, schedule, device, prev_timestep=None, prediction_type="epsilon", variance_type="fixed_small"
):
    if prediction_type not in PREDICTION_TYPES:
        raise ValueError(f"prediction_type must be one of {PREDICTION_TYPES}, got {prediction_type!r}")
    if variance_type not in VARIANCE_TYPES:
        raise ValueError(f"variance_type must be one of {VARIANCE_TYPES}, got {variance_type!r}")
    t = check_timesteps(timestep, "timestep", R, schedule)
    has_noise = not (isinstance(t, int) and t == 0)
    if prev_timestep is None:  # prev = t - 1: a function of t alone

        def all_t():
            ts = torch.arange(schedule.num_train_timesteps)
            _, abar_t, abar_prev = _alphas(schedule, ts, ts - 1)
            return ddpm_coefs(abar_t, abar_prev, ts, prediction_type, variance_type)

        return _table_rows(schedule, ("ddpm", prediction_type, variance_type), all_t, t, R, device), has_noise
    prev = check_timesteps(prev_timestep, "prev_timestep", R, schedule, allow_negative=True)
    check_prev_before(prev, t, "prev_timestep")

    def build():
        t_rows, abar_t, abar_prev = _alphas(schedule, t, prev)
        return _coef_rows(ddpm_coefs(abar_t, abar_prev, t_rows, prediction_type, variance_type), R, device)

    if isinstance(t, int) and isinstance(prev, int):
        return schedule.cached(("ddpm", t, prev, prediction_type, variance_type, R, device), build), has_noise
    return build(), has_noise


def ddim_coef(
    timestep, R, schedule, device, prev_timestep, eta=0.0, prediction_type="epsilon", use_clipped_model_output=False
):
    if prediction_type not in PREDICTION_TYPES:
        raise ValueError(f"prediction_type must be one of {PREDICTION_TYPES}, got {prediction_type!r}")
    if not isinstance(eta, numbers.Real) or isinstance(eta, bool) or not 0.0 <= eta <= 1.0:
        raise ValueError(f"eta must be a float in [0, 1], got {eta!r}")
    t = check_timesteps(timestep, "timestep", R, schedule)
    prev = check_timesteps(prev_timestep, "prev_timestep", R, schedule, allow_negative=True)
    check_prev_before(prev, t, "prev_timestep")
    eta = float(eta)

    def build():
        _, abar_t, abar_prev = _alphas(schedule, t, prev)
        return _coef_rows(ddim_coefs(abar_t, abar_prev, prediction_type, eta, use_clipped_model_output), R, device)

    if isinstance(t, int) and isinstance(prev, int):
        key = ("ddim", t, prev, eta, prediction_type, use_clipped_model_output, R, device)
        return schedule.cached(key, build), eta > 0
    return build(), eta > 0
