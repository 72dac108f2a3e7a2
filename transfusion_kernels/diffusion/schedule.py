"""Noise schedules and the per-row coefficients of the fused diffusion step.

Every diffusion op is one elementwise pass over ``[R, L]`` rows with six coefficients per row
(see ``transfusion_kernels/diffusion/__init__.py``). This module builds the schedule exactly as
diffusers does (betas in float32, ``alphas_cumprod`` as a float32 cumulative product, so the
numbers are the ones diffusers uses) and turns timesteps into those coefficients in float64
with plain torch ops, so the math traces under ``torch.compile``.
"""

from __future__ import annotations

import math
import numbers

import torch

BETA_SCHEDULES = ("linear", "scaled_linear", "squaredcos_cap_v2")
PREDICTION_TYPES = ("epsilon", "sample", "v_prediction")
VARIANCE_TYPES = ("fixed_small", "fixed_small_log", "fixed_large", "fixed_large_log")


def _cosine_betas(num_train_timesteps: int, max_beta: float = 0.999) -> torch.Tensor:
    # GLIDE's cosine schedule, discretised as diffusers' betas_for_alpha_bar does.
    def alpha_bar(t: float) -> float:
        return math.cos((t + 0.008) / 1.008 * math.pi / 2) ** 2

    n = num_train_timesteps
    betas = [min(1 - alpha_bar((i + 1) / n) / alpha_bar(i / n), max_beta) for i in range(n)]
    return torch.tensor(betas, dtype=torch.float32)


def _rescale_zero_terminal_snr(betas: torch.Tensor) -> torch.Tensor:
    # Lin et al. 2023, Algorithm 1 (as in diffusers): shift sqrt(alpha_bar) so the last step has SNR 0.
    abar_sqrt = torch.cumprod(1.0 - betas, dim=0).sqrt()
    first, last = abar_sqrt[0].clone(), abar_sqrt[-1].clone()
    abar_sqrt = (abar_sqrt - last) * (first / (first - last))
    abar = abar_sqrt**2
    alphas = torch.cat([abar[0:1], abar[1:] / abar[:-1]])
    return 1 - alphas


class DiffusionSchedule:
    """A DDPM noise schedule: ``betas`` and ``alphas_cumprod`` for ``num_train_timesteps`` steps.

    ``beta_schedule`` is ``"linear"``, ``"scaled_linear"`` (latent diffusion) or
    ``"squaredcos_cap_v2"`` (GLIDE cosine); ``trained_betas`` overrides it with explicit betas.
    The tables hold float64 copies of diffusers' float32 values, so coefficients computed from
    them agree with diffusers' schedulers.
    """

    def __init__(
        self,
        num_train_timesteps: int = 1000,
        beta_schedule: str = "linear",
        beta_start: float = 1e-4,
        beta_end: float = 0.02,
        *,
        trained_betas=None,
        rescale_betas_zero_snr: bool = False,
    ):
        if trained_betas is not None:
            try:
                betas = torch.as_tensor(trained_betas).detach()
            except (TypeError, ValueError, RuntimeError) as e:
                raise ValueError(f"trained_betas must be a sequence or tensor of real numbers: {e}") from None
            if betas.dtype == torch.bool or betas.is_complex():
                raise ValueError(f"trained_betas must hold real numbers, got dtype {betas.dtype}")
            betas = betas.to("cpu", torch.float32).flatten()
            if betas.numel() == 0:
                raise ValueError("trained_betas must not be empty")
            num_train_timesteps = betas.numel()
            beta_schedule = "trained"
        else:
            if (
                isinstance(num_train_timesteps, bool)
                or not isinstance(num_train_timesteps, int)
                or num_train_timesteps < 1
            ):
                raise ValueError(f"num_train_timesteps must be a positive int, got {num_train_timesteps!r}")
            if beta_schedule in ("linear", "scaled_linear"):
                for name, b in (("beta_start", beta_start), ("beta_end", beta_end)):
                    if isinstance(b, bool) or not isinstance(b, numbers.Real):
                        raise ValueError(f"{name} must be a real number in (0, 1], got {b!r}")
                    if not 0 < b <= 1:
                        raise ValueError(f"betas must lie in (0, 1]: {name} = {b!r}")
            if beta_schedule == "linear":
                betas = torch.linspace(beta_start, beta_end, num_train_timesteps, dtype=torch.float32)
            elif beta_schedule == "scaled_linear":
                betas = torch.linspace(beta_start**0.5, beta_end**0.5, num_train_timesteps, dtype=torch.float32) ** 2
            elif beta_schedule == "squaredcos_cap_v2":
                betas = _cosine_betas(num_train_timesteps)
            else:
                raise ValueError(f"beta_schedule must be one of {BETA_SCHEDULES}, got {beta_schedule!r}")
        if rescale_betas_zero_snr:
            if betas.numel() < 2:
                raise ValueError("rescale_betas_zero_snr needs num_train_timesteps >= 2")
            betas = _rescale_zero_terminal_snr(betas)
        if not bool(((betas > 0) & (betas <= 1)).all()):
            raise ValueError("betas must lie in (0, 1]")
        self.num_train_timesteps = int(num_train_timesteps)
        self.beta_schedule = beta_schedule
        self.beta_start = float(beta_start)
        self.beta_end = float(beta_end)
        self.rescale_betas_zero_snr = bool(rescale_betas_zero_snr)
        self.betas = betas.to(torch.float64)
        self.alphas_cumprod = torch.cumprod(1.0 - betas, dim=0).to(torch.float64)
        self._cache: dict = {}

    @classmethod
    def from_diffusers(cls, scheduler_or_config) -> "DiffusionSchedule":
        """The schedule of a diffusers scheduler (DDPMScheduler, DDIMScheduler, ...) or its config.

        From a scheduler object the betas are taken as they are (any ``beta_schedule`` diffusers
        supports); from a config, ``trained_betas`` or one of the schedules above."""
        betas = getattr(scheduler_or_config, "betas", None)
        if isinstance(betas, torch.Tensor):
            return cls(trained_betas=betas)
        config = getattr(scheduler_or_config, "config", scheduler_or_config)
        if not hasattr(config, "get"):
            raise TypeError(
                f"from_diffusers expects a diffusers scheduler or its config, got {type(scheduler_or_config).__name__}"
            )
        return cls(
            num_train_timesteps=config.get("num_train_timesteps", 1000),
            beta_schedule=config.get("beta_schedule", "linear"),
            beta_start=config.get("beta_start", 1e-4),
            beta_end=config.get("beta_end", 0.02),
            trained_betas=config.get("trained_betas", None),
            rescale_betas_zero_snr=config.get("rescale_betas_zero_snr", False),
        )

    def cached(self, key, build):
        """``build()``, memoised on this schedule under ``key`` (not while torch.compile traces:
        there the tensors are part of the graph). Holds coefficient tables, so repeated calls
        with the same timesteps cost a lookup instead of a dozen small tensor ops."""
        if torch.compiler.is_compiling():
            return build()
        value = self._cache.get(key)
        if value is None:
            if len(self._cache) >= 4096:  # a long run of distinct per-call keys: start over
                self._cache.clear()
            value = self._cache[key] = build()
        return value

    def alphas_cumprod_on(self, device: torch.device) -> torch.Tensor:
        """``alphas_cumprod`` (float64) on ``device``, copied there once."""
        device = torch.device(device)
        if device.type == "cpu":
            return self.alphas_cumprod
        return self.cached(("alphas_cumprod", device), lambda: self.alphas_cumprod.to(device))

    def __repr__(self) -> str:
        return (
            f"DiffusionSchedule(num_train_timesteps={self.num_train_timesteps}, "
            f"beta_schedule={self.beta_schedule!r}, beta_start={self.beta_start}, beta_end={self.beta_end}"
            + (", rescale_betas_zero_snr=True" if self.rescale_betas_zero_snr else "")
            + ")"
        )


# ---------------------------------------------------------------------------------------------
# Coefficients. Inputs are float64 tensors of shape [R]: abar_t = alphas_cumprod[t], abar_prev =
# alphas_cumprod[prev] (1 where prev < 0). Each function returns float64 [R, 6] for
#   x0  = c0 * sample + c1 * model_output ; x0 = clamp(x0) if clipping
#   out = c2 * x0 + c3 * sample + c4 * model_output + c5 * noise
# ---------------------------------------------------------------------------------------------


def gather_alphas(alphas_cumprod: torch.Tensor, t: torch.Tensor) -> torch.Tensor:
    """alphas_cumprod[t] with 1 for negative t (the "previous" of the last step)."""
    vals = alphas_cumprod[t.clamp(min=0)]
    return torch.where(t >= 0, vals, torch.ones_like(vals))


def x0_coefs(abar_t: torch.Tensor, prediction_type: str):
    # x0 from (sample, model_output): eq. (15) of Ho et al. for epsilon; v = sqrt(a) eps - sqrt(1-a) x0.
    if prediction_type == "epsilon":
        # At zero terminal SNR (abar_t = 0) x0 = (sample - eps) / 0: +-2**100 instead of inf keeps
        # inf * sample - inf * eps from turning into NaN, so clipping gives diffusers' +-bound.
        return (1.0 / abar_t.sqrt()).clamp(max=2.0**100), (-(1.0 - abar_t).sqrt() / abar_t.sqrt()).clamp(
            min=-(2.0**100)
        )
    if prediction_type == "sample":
        return torch.zeros_like(abar_t), torch.ones_like(abar_t)
    if prediction_type == "v_prediction":
        return abar_t.sqrt(), -(1.0 - abar_t).sqrt()
    raise ValueError(f"prediction_type must be one of {PREDICTION_TYPES}, got {prediction_type!r}")


def add_noise_coefs(abar_t: torch.Tensor) -> torch.Tensor:
    zero, one = torch.zeros_like(abar_t), torch.ones_like(abar_t)
    return torch.stack([one, zero, abar_t.sqrt(), zero, zero, (1.0 - abar_t).sqrt()], dim=1)


def ddpm_coefs(
    abar_t: torch.Tensor, abar_prev: torch.Tensor, t: torch.Tensor, prediction_type: str, variance_type: str
) -> torch.Tensor:
    """Posterior q(x_prev | x_t, x0) of Ho et al. eq. (6)-(7), with diffusers' variance options."""
    c0, c1 = x0_coefs(abar_t, prediction_type)
    beta_prod_t, beta_prod_prev = 1.0 - abar_t, 1.0 - abar_prev
    alpha = abar_t / abar_prev
    beta = 1.0 - alpha
    c2 = abar_prev.sqrt() * beta / beta_prod_t
    c3 = alpha.sqrt() * beta_prod_prev / beta_prod_t
    if variance_type in ("fixed_small", "fixed_small_log"):
        # diffusers clamps the posterior variance at 1e-20 before taking its root (or log).
        sigma = (beta_prod_prev / beta_prod_t * beta).clamp(min=1e-20).sqrt()
    elif variance_type in ("fixed_large", "fixed_large_log"):
        sigma = beta.sqrt()
    else:
        raise ValueError(f"variance_type must be one of {VARIANCE_TYPES}, got {variance_type!r}")
    c5 = torch.where(t > 0, sigma, torch.zeros_like(sigma))  # no noise on the last step
    return torch.stack([c0, c1, c2, c3, torch.zeros_like(c0), c5], dim=1)


def ddim_coefs(
    abar_t: torch.Tensor,
    abar_prev: torch.Tensor,
    prediction_type: str,
    eta: float,
    use_clipped_model_output: bool = False,
) -> torch.Tensor:
    """DDIM (Song et al. eq. 12): x_prev = sqrt(a_prev) x0 + sqrt(1 - a_prev - s^2) eps + s noise,
    with s = eta * sqrt(variance) as diffusers' DDIMScheduler._get_variance."""
    c0, c1 = x0_coefs(abar_t, prediction_type)
    beta_prod_t, beta_prod_prev = 1.0 - abar_t, 1.0 - abar_prev
    std = eta * ((beta_prod_prev / beta_prod_t) * (1.0 - abar_t / abar_prev)).sqrt()
    # >= 0 for eta <= 1 in exact arithmetic; the clamp only removes rounding below zero.
    direction = (1.0 - abar_prev - std**2).clamp(min=0.0).sqrt()
    if use_clipped_model_output:
        # eps re-derived from the (clipped) x0: (sample - sqrt(a_t) x0) / sqrt(1 - a_t).
        c2 = abar_prev.sqrt() - direction * abar_t.sqrt() / beta_prod_t.sqrt()
        c3 = direction / beta_prod_t.sqrt()
        c4 = torch.zeros_like(c3)
    else:
        # eps as a linear function of (sample, model_output), before clipping (as diffusers).
        if prediction_type == "epsilon":
            e_s, e_m = torch.zeros_like(abar_t), torch.ones_like(abar_t)
        elif prediction_type == "sample":
            e_s, e_m = 1.0 / beta_prod_t.sqrt(), -abar_t.sqrt() / beta_prod_t.sqrt()
        else:  # v_prediction
            e_s, e_m = beta_prod_t.sqrt(), abar_t.sqrt()
        c2 = abar_prev.sqrt()
        c3, c4 = direction * e_s, direction * e_m
    return torch.stack([c0, c1, c2, c3, c4, std], dim=1)
