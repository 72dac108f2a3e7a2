"""The flow-matching inference schedule: timesteps and sigmas of diffusers'
``FlowMatchEulerDiscreteScheduler.set_timesteps``, in float64.

A schedule is built in four stages from ``n`` base sigmas (evenly spaced timesteps between the
training schedule's ends, or the sigmas / timesteps given):

1. shift: a constant ``shift`` maps s to ``shift s / (1 + (shift - 1) s)``; with dynamic shifting
   the resolution-dependent ``mu`` maps s to ``e^mu / (e^mu + 1/s - 1)`` (exponential) or
   ``mu / (mu + 1/s - 1)`` (linear);
2. ``shift_terminal``: rescale ``1 - s`` so that the last sigma equals ``shift_terminal``;
3. optionally respace between the first and last sigma: Karras (rho = 7), exponential
   (log-uniform) or beta (quantiles of Beta(0.6, 0.6), needs scipy);
4. append the terminal sigma, 0 (1 when ``invert_sigmas``, which also maps s to 1 - s first).

Timesteps are ``sigma * num_train_timesteps`` (the given timesteps, if any, unless inverted).
The ends of the training schedule are the ones diffusers uses: sigma 1 and the sigma of
timestep 1 (``1 / num_train_timesteps``, shifted by ``shift`` unless shifting is dynamic).
"""

from __future__ import annotations

import math
import numbers

import torch

TIME_SHIFT_TYPES = ("exponential", "linear")
_CONFIG_KEYS = (
    "num_train_timesteps",
    "shift",
    "use_dynamic_shifting",
    "base_shift",
    "max_shift",
    "base_image_seq_len",
    "max_image_seq_len",
    "invert_sigmas",
    "shift_terminal",
    "use_karras_sigmas",
    "use_exponential_sigmas",
    "use_beta_sigmas",
    "time_shift_type",
)


def _real(value, name: str, positive: bool = False) -> float:
    if isinstance(value, bool) or not isinstance(value, numbers.Real) or not math.isfinite(value):
        raise ValueError(f"{name} must be a finite real number, got {value!r}")
    if positive and not value > 0:
        raise ValueError(f"{name} must be positive, got {value}")
    return float(value)


class FlowMatchSchedule:
    """The configuration of diffusers' ``FlowMatchEulerDiscreteScheduler`` (same names and
    defaults) and its ``set_timesteps``. SD3 ships with ``shift=3.0``; Flux with
    ``use_dynamic_shifting=True`` (base_shift 0.5, max_shift 1.15, image sequence lengths
    256 .. 4096), ``mu`` from :meth:`mu_for`."""

    def __init__(
        self,
        num_train_timesteps: int = 1000,
        shift: float = 1.0,
        use_dynamic_shifting: bool = False,
        base_shift: float = 0.5,
        max_shift: float = 1.15,
        base_image_seq_len: int = 256,
        max_image_seq_len: int = 4096,
        invert_sigmas: bool = False,
        shift_terminal: float | None = None,
        use_karras_sigmas: bool = False,
        use_exponential_sigmas: bool = False,
        use_beta_sigmas: bool = False,
        time_shift_type: str = "exponential",
    ):
        if isinstance(num_train_timesteps, bool) or not isinstance(num_train_timesteps, int) or num_train_timesteps < 1:
            raise ValueError(f"num_train_timesteps must be a positive int, got {num_train_timesteps!r}")
        if sum(map(bool, (use_karras_sigmas, use_exponential_sigmas, use_beta_sigmas))) > 1:
            raise ValueError("use at most one of use_karras_sigmas, use_exponential_sigmas and use_beta_sigmas")
        if time_shift_type not in TIME_SHIFT_TYPES:
            raise ValueError(f"time_shift_type must be one of {TIME_SHIFT_TYPES}, got {time_shift_type!r}")
        if shift_terminal is not None and shift_terminal != 0:  # falsy means off, as in diffusers
            shift_terminal = _real(shift_terminal, "shift_terminal")
            if not 0.0 <= shift_terminal < 1.0:
                raise ValueError(f"shift_terminal must be in [0, 1), got {shift_terminal}")
        else:
            shift_terminal = None
        self.num_train_timesteps = num_train_timesteps
        self.shift = _real(shift, "shift", positive=True)
        self.use_dynamic_shifting = bool(use_dynamic_shifting)
        self.base_shift = _real(base_shift, "base_shift")
        self.max_shift = _real(max_shift, "max_shift")
        self.base_image_seq_len = int(base_image_seq_len)
        self.max_image_seq_len = int(max_image_seq_len)
        self.invert_sigmas = bool(invert_sigmas)
        self.shift_terminal = shift_terminal
        self.use_karras_sigmas = bool(use_karras_sigmas)
        self.use_exponential_sigmas = bool(use_exponential_sigmas)
        self.use_beta_sigmas = bool(use_beta_sigmas)
        self.time_shift_type = time_shift_type

    @classmethod
    def from_diffusers(cls, scheduler_or_config) -> "FlowMatchSchedule":
        """From a ``FlowMatchEulerDiscreteScheduler`` (its config and current ``shift``) or its config."""
        config = getattr(scheduler_or_config, "config", scheduler_or_config)
        if not hasattr(config, "get"):
            raise TypeError(
                f"expected a diffusers FlowMatchEulerDiscreteScheduler or its config, got {type(scheduler_or_config).__name__}"
            )
        kwargs = {k: config[k] for k in _CONFIG_KEYS if config.get(k) is not None}
        if hasattr(scheduler_or_config, "config") and hasattr(scheduler_or_config, "shift"):
            kwargs["shift"] = scheduler_or_config.shift  # set_shift changes it after construction
        return cls(**kwargs)

    def __repr__(self) -> str:
        args = ", ".join(f"{k}={getattr(self, k)!r}" for k in _CONFIG_KEYS)
        return f"FlowMatchSchedule({args})"

    def mu_for(self, image_seq_len: int) -> float:
        """The dynamic shift ``mu`` for an image of ``image_seq_len`` tokens: linear in the length,
        ``base_shift`` at ``base_image_seq_len`` and ``max_shift`` at ``max_image_seq_len``."""
        slope = (self.max_shift - self.base_shift) / (self.max_image_seq_len - self.base_image_seq_len)
        return self.base_shift + slope * (image_seq_len - self.base_image_seq_len)

    def _shifted(self, s: torch.Tensor, mu) -> torch.Tensor:
        if self.use_dynamic_shifting:
            odds = 1.0 / s - 1.0  # inf at s = 0: the shifted sigma is 0
            scale = math.exp(mu) if self.time_shift_type == "exponential" else mu
            return scale / (scale + odds)
        return self.shift * s / (1.0 + (self.shift - 1.0) * s)

    def _respaced(self, s: torch.Tensor, n: int) -> torch.Tensor:
        hi, lo = float(s[0]), float(s[-1])
        ramp = torch.linspace(0.0, 1.0, n, dtype=torch.float64)
        if self.use_karras_sigmas:
            rho = 7.0
            return (hi ** (1 / rho) + ramp * (lo ** (1 / rho) - hi ** (1 / rho))) ** rho
        if self.use_exponential_sigmas:
            return torch.linspace(math.log(hi), math.log(lo), n, dtype=torch.float64).exp()
        if self.use_beta_sigmas:
            try:
                from scipy.stats import beta
            except ImportError:
                raise ImportError("use_beta_sigmas needs scipy: pip install scipy") from None
            q = torch.from_numpy(beta.ppf((1.0 - ramp).numpy(), 0.6, 0.6))
            return lo + q * (hi - lo)
        return s

    def set_timesteps(
        self, num_inference_steps: int | None = None, *, mu: float | None = None, sigmas=None, timesteps=None
    ):
        """``(timesteps [n], sigmas [n + 1])``, float64 on the CPU, as diffusers'
        ``set_timesteps(num_inference_steps, sigmas=, mu=, timesteps=)``."""
        if self.use_dynamic_shifting and mu is None:
            raise ValueError("use_dynamic_shifting needs mu (FlowMatchSchedule.mu_for(image_seq_len) computes it)")
        if mu is not None:
            mu = _real(mu, "mu")
        given = [
            torch.as_tensor(x, dtype=torch.float64).reshape(-1) if x is not None else None for x in (sigmas, timesteps)
        ]
        sig, ts = given
        if sig is not None and ts is not None and len(sig) != len(ts):
            raise ValueError(f"sigmas and timesteps must have the same length, got {len(sig)} and {len(ts)}")
        lengths = {len(x) for x in given if x is not None}
        if num_inference_steps is None:
            if not lengths:
                raise ValueError("pass num_inference_steps, sigmas or timesteps")
            n = lengths.pop()
        else:
            if (
                isinstance(num_inference_steps, bool)
                or not isinstance(num_inference_steps, int)
                or num_inference_steps < 1
            ):
                raise ValueError(f"num_inference_steps must be a positive int, got {num_inference_steps!r}")
            n = num_inference_steps
            if lengths and lengths != {n}:
                raise ValueError(f"sigmas and timesteps must have num_inference_steps={n} entries")
        if n < 1:
            raise ValueError("sigmas / timesteps must not be empty")
        T = self.num_train_timesteps
        if sig is None:
            if ts is None:
                lo = (
                    1.0 / T
                    if self.use_dynamic_shifting
                    else float(self._shifted(torch.tensor(1.0 / T, dtype=torch.float64), mu))
                )
                ts_base = torch.linspace(T * 1.0, lo * T, n, dtype=torch.float64)
            else:
                ts_base = ts
            s = ts_base / T
        else:
            s = sig
        s = self._shifted(s, mu)
        if self.shift_terminal is not None:
            if not s[-1] < 1.0:  # diffusers returns NaN sigmas here
                raise ValueError(
                    "shift_terminal cannot stretch a schedule that ends at sigma 1 (e.g. one step from "
                    "sigma 1): take more steps or leave shift_terminal unset"
                )
            stretch = (1.0 - s[-1]) / (1.0 - self.shift_terminal)
            s = 1.0 - (1.0 - s) / stretch
        s = self._respaced(s, n)
        out_ts = ts if ts is not None else s * T
        if self.invert_sigmas:
            s = 1.0 - s
            out_ts = s * T
            end = 1.0
        else:
            end = 0.0
        return out_ts.clone(), torch.cat([s, torch.full((1,), end, dtype=torch.float64)])
