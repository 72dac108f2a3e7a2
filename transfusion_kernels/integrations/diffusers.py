"""diffusers drop-ins: DDPM/DDIM schedulers whose ``step`` and ``add_noise`` run the fused kernels,
and a flow-matching Euler scheduler whose ``step`` and ``scale_noise`` do.

    from transfusion_kernels.integrations.diffusers import FusedDDPMScheduler
    pipe.scheduler = FusedDDPMScheduler.from_config(pipe.scheduler.config)   # diffusers' own idiom
    pipe.scheduler = DDPMScheduler.from_config(pipe.scheduler.config)        # and back

Importing this module changes nothing in diffusers: the fused schedulers act only where they are
set, like any scheduler.

``FusedFlowMatchEulerDiscreteScheduler`` (SD3, Flux, ...) follows the same rules; see its
docstring and docs/flow.md.

They are subclasses of diffusers' ``DDPMScheduler`` / ``DDIMScheduler`` with the same config plus
``backend``, so ``from_config``, ``from_pretrained``, ``set_timesteps`` and ``save_pretrained`` work
unchanged, and so do pipelines, exactly as with the stock schedulers: ``DDPMPipeline(unet,
FusedDDPMScheduler())`` keeps the fused scheduler, while ``DDIMPipeline(unet, <any scheduler>)``
makes a stock ``DDIMScheduler`` from its config, as diffusers does (set
``pipe.scheduler = FusedDDIMScheduler.from_config(pipe.scheduler.config)`` after it); a pipeline
saved with a fused scheduler loads again with ``from_pretrained`` (``model_index.json`` names
this module). The schedule is read from the scheduler's ``alphas_cumprod`` at each step, so
reassigning it (as diffusers' own step reads it) takes effect.
``step`` returns diffusers' output types and honours the config (``prediction_type``,
``variance_type``, ``clip_sample``, ``clip_sample_range``, ``set_alpha_to_one``, timestep spacing).

Differences from the stock schedulers:

- Noise comes from the fused kernel's counter-based Philox stream: with ``generator=`` a 64-bit
  seed is drawn from the generator (same generator state, same result; but not the same numbers
  as ``torch.randn``); without one, the seed is drawn from torch's default generator. To reproduce
  a stock run exactly pass the noise itself: ``variance_noise=`` (DDIM has it already; the fused
  DDPM ``step`` accepts it too). A list of generators draws the noise as diffusers does.
- ``pred_original_sample`` costs an extra pass over memory, so it is ``None`` unless
  ``scheduler.compute_pred_original_sample = True``.
- What the kernels do not cover falls back to diffusers' own ``step`` with a one-time warning:
  ``thresholding=True``, ``variance_type`` ``learned`` / ``learned_range``, dtypes other than
  float16/bfloat16/float32, DDIM ``eta`` outside [0, 1], schedules whose betas leave (0, 1]
  (``beta_end`` above 1). ``fixed_large_log`` uses sigma = sqrt(beta_t), where diffusers 0.42's
  ``DDPMScheduler.step`` returns NaN. A ``variance_type`` diffusers does not know acts as
  ``fixed_small``, as in diffusers.
- Zero terminal SNR (``rescale_betas_zero_snr=True``, alphas_cumprod = 0 at the last timestep)
  with epsilon prediction: x0 = (sample - eps) / 0 is infinite. With clipping every backend
  returns the clip bound with the sign of sample - eps, as diffusers does; without clipping
  diffusers returns inf where the fused step returns finite values of order 2**100 (both unusable).
- ``scheduler.backend`` picks the kernel backend (None: ``tk.use_backend`` / the environment); it
  is part of the config, so it is saved and loaded with it.
"""

from __future__ import annotations

import inspect
import warnings

import torch

try:
    from diffusers import DDIMScheduler, DDPMScheduler, FlowMatchEulerDiscreteScheduler
except ImportError as e:
    raise ImportError(
        f"transfusion_kernels.integrations.diffusers needs diffusers ({e}): "
        "pip install 'transfusion-kernels[diffusers]'"
    ) from None
from diffusers import SchedulerMixin  # noqa: F401  diffusers' loader looks the loading class up in this module
from diffusers.schedulers.scheduling_ddim import DDIMSchedulerOutput
from diffusers.schedulers.scheduling_ddpm import DDPMSchedulerOutput
from diffusers.schedulers.scheduling_flow_match_euler_discrete import FlowMatchEulerDiscreteSchedulerOutput
from diffusers.utils.torch_utils import randn_tensor

from transfusion_kernels import diffusion as tkd
from transfusion_kernels import flow as tkf
from transfusion_kernels.diffusion.schedule import VARIANCE_TYPES, x0_coefs

__all__ = ["FusedDDPMScheduler", "FusedDDIMScheduler", "FusedFlowMatchEulerDiscreteScheduler"]

_DTYPES = (torch.float16, torch.bfloat16, torch.float32)
_warned: set[tuple[str, str]] = set()


def _same(key: tuple, other: tuple) -> bool:
    """Cache keys of (tensor, its _version, ...) pairs: the same tensor objects at the same versions."""
    return all(a is b if isinstance(a, torch.Tensor) else a == b for a, b in zip(key, other))


def _seed_from(generator: torch.Generator) -> int:
    draw = torch.randint(-(2**63), 2**63 - 1, (), dtype=torch.int64, generator=generator, device=generator.device)
    return int(draw) % 2**64


class _FusedBase:
    """What every drop-in shares: the ``backend`` config entry, noise/seed, the fallback."""

    @property
    def backend(self) -> str | None:
        return self.config.get("backend")

    @backend.setter
    def backend(self, value: str | None) -> None:
        self.register_to_config(backend=value)

    def _fallback(self, reason: str) -> None:
        key = (type(self).__name__, reason)
        if key not in _warned:
            _warned.add(key)
            warnings.warn(
                f"{type(self).__name__}: the fused kernels do not support {reason}; using diffusers' step",
                stacklevel=3,
            )

    def _noise_and_seed(self, generator, variance_noise, sample):
        if variance_noise is not None:
            if generator is not None:
                raise ValueError("Cannot pass both generator and variance_noise; leave one of them None.")
            return variance_noise, None
        if generator is None:
            return None, None  # a fresh seed from torch's default generator
        if isinstance(generator, (list, tuple)):  # per-sample generators: draw as diffusers does
            return randn_tensor(sample.shape, generator=list(generator), device=sample.device, dtype=sample.dtype), None
        return None, _seed_from(generator)


class _Fused(_FusedBase):
    """What the DDPM and DDIM drop-ins share: the schedule, x0, add_noise."""

    compute_pred_original_sample: bool = False

    @property
    def fused_schedule(self) -> tkd.DiffusionSchedule | None:
        """The schedule of the current ``alphas_cumprod`` (None where the kernels cannot take it)."""
        abar = self.alphas_cumprod
        # the tensors themselves (held, so matched by identity) and their versions: a reassigned or
        # in-place modified schedule is seen
        key = (abar, abar._version, self.betas, self.betas._version)
        cached = self.__dict__.get("_fused_schedule")
        if cached is None or not _same(cached[0], key):
            try:
                sched = tkd.DiffusionSchedule(trained_betas=self.betas)
                sched.alphas_cumprod = abar.detach().to("cpu", torch.float64)  # the values diffusers' step reads
            except ValueError:
                sched = None
            cached = self.__dict__["_fused_schedule"] = (key, sched)
        return cached[1]

    def _common_unsupported(self, model_output, sample) -> str | None:
        if self.fused_schedule is None:
            return "betas outside (0, 1]"
        if self.config.thresholding:
            return "thresholding=True"
        if sample.dtype not in _DTYPES:
            return f"dtype {sample.dtype}"
        if model_output.shape != sample.shape or model_output.dtype != sample.dtype:
            return "a model_output whose shape or dtype differs from sample's"
        return None

    def _pred_original_sample(self, model_output, t: int, sample):
        if not self.compute_pred_original_sample:
            return None
        abar = self.fused_schedule.alphas_cumprod[t : t + 1]
        c0, c1 = (float(c) for c in x0_coefs(abar, self.config.prediction_type))
        x0 = c0 * sample.float() + c1 * model_output.float()
        if self.config.clip_sample:
            x0 = x0.clamp(-self.config.clip_sample_range, self.config.clip_sample_range)
        return x0.to(sample.dtype)

    def add_noise(self, original_samples, noise, timesteps):
        x0 = original_samples
        if isinstance(timesteps, int):
            timesteps = torch.tensor(timesteps)
        fused = (
            isinstance(timesteps, torch.Tensor)
            and not timesteps.dtype.is_floating_point
            and x0.dtype in _DTYPES
            and x0.dim() >= 1
            and noise.shape == x0.shape
            and noise.dtype == x0.dtype
            and timesteps.numel() in (1, x0.shape[0])
            and self.fused_schedule is not None
        )
        if not fused:
            return super().add_noise(original_samples, noise, timesteps)
        t = timesteps.reshape(()) if timesteps.numel() == 1 else timesteps.reshape(-1)
        return tkd.add_noise(x0, t, self.fused_schedule, noise=noise, backend=self.backend)[0]


def _with_backend(cls):
    """``backend`` as a config entry: diffusers reads the config keys from the signature of
    ``__init__``, so it is the stock signature plus ``backend``."""
    stock = inspect.signature(cls.__bases__[1].__init__)

    def __init__(self, *args, backend: str | None = None, **kwargs):
        super(cls, self).__init__(*args, **kwargs)
        self.register_to_config(backend=backend)

    param = inspect.Parameter("backend", inspect.Parameter.KEYWORD_ONLY, default=None)
    __init__.__signature__ = stock.replace(parameters=[*stock.parameters.values(), param])
    cls.__init__ = __init__
    return cls


@_with_backend
class FusedDDPMScheduler(_Fused, DDPMScheduler):
    """``DDPMScheduler`` whose ``step`` and ``add_noise`` are one fused kernel each (module docstring)."""

    def step(self, model_output, timestep, sample, generator=None, return_dict: bool = True, variance_noise=None):
        reason = self._common_unsupported(model_output, sample)
        if reason is None and self.variance_type in ("learned", "learned_range"):
            reason = f"variance_type={self.variance_type!r}"
        if reason is not None:
            if variance_noise is not None:
                raise ValueError(f"variance_noise needs the fused step, which does not support {reason}")
            self._fallback(reason)
            return super().step(model_output, timestep, sample, generator=generator, return_dict=return_dict)
        t = int(timestep)
        prev_t = int(self.previous_timestep(t))
        noise, seed = self._noise_and_seed(generator, variance_noise, sample) if t > 0 else (None, None)
        # diffusers' _get_variance treats a variance_type it does not know as fixed_small
        variance_type = self.variance_type if self.variance_type in VARIANCE_TYPES else "fixed_small"
        prev_sample = tkd.ddpm_step(
            model_output,
            t,
            sample,
            self.fused_schedule,
            prev_timestep=prev_t,
            prediction_type=self.config.prediction_type,
            variance_type=variance_type,
            clip_sample=self.config.clip_sample,
            clip_sample_range=self.config.clip_sample_range,
            noise=noise,
            seed=seed,
            backend=self.backend,
        )
        x0 = self._pred_original_sample(model_output, t, sample)
        if not return_dict:
            return (prev_sample, x0)
        return DDPMSchedulerOutput(prev_sample=prev_sample, pred_original_sample=x0)


@_with_backend
class FusedDDIMScheduler(_Fused, DDIMScheduler):
    """``DDIMScheduler`` whose ``step`` and ``add_noise`` are one fused kernel each (module docstring)."""

    def step(
        self,
        model_output,
        timestep,
        sample,
        eta: float = 0.0,
        use_clipped_model_output: bool = False,
        generator=None,
        variance_noise=None,
        return_dict: bool = True,
    ):
        if self.num_inference_steps is None:
            raise ValueError(
                "Number of inference steps is 'None', you need to run 'set_timesteps' after creating the scheduler"
            )
        reason = self._common_unsupported(model_output, sample)
        if reason is None and not 0.0 <= eta <= 1.0:
            reason = f"eta={eta}"
        if reason is not None:
            self._fallback(reason)
            return super().step(
                model_output,
                timestep,
                sample,
                eta=eta,
                use_clipped_model_output=use_clipped_model_output,
                generator=generator,
                variance_noise=variance_noise,
                return_dict=return_dict,
            )
        t = int(timestep)
        prev_t = t - self.config.num_train_timesteps // self.num_inference_steps
        if prev_t < 0 and not self.config.set_alpha_to_one:
            prev_t = 0  # final_alpha_cumprod is alphas_cumprod[0]
        noise, seed = self._noise_and_seed(generator, variance_noise, sample) if eta > 0 else (None, None)
        prev_sample = tkd.ddim_step(
            model_output,
            t,
            sample,
            self.fused_schedule,
            prev_timestep=prev_t,
            eta=float(eta),
            prediction_type=self.config.prediction_type,
            clip_sample=self.config.clip_sample,
            clip_sample_range=self.config.clip_sample_range,
            use_clipped_model_output=use_clipped_model_output,
            noise=noise,
            seed=seed,
            backend=self.backend,
        )
        x0 = self._pred_original_sample(model_output, t, sample)
        if not return_dict:
            return (prev_sample, x0)
        return DDIMSchedulerOutput(prev_sample=prev_sample, pred_original_sample=x0)


@_with_backend
class FusedFlowMatchEulerDiscreteScheduler(_FusedBase, FlowMatchEulerDiscreteScheduler):
    """``FlowMatchEulerDiscreteScheduler`` whose ``step`` and ``scale_noise`` are one fused kernel
    each (``transfusion_kernels.flow``). ``set_timesteps`` and the config are diffusers' own.

    ``step`` also takes ``variance_noise=`` (the stochastic step's noise, instead of a
    ``generator``) to reproduce a stock run exactly. ``per_token_timesteps``, dtypes other than
    float16/bfloat16/float32, a ``model_output`` whose shape or dtype differs from ``sample``'s and
    sigmas outside [0, 1] fall back to diffusers' step with a one-time warning."""

    def _cpu(self, name: str) -> torch.Tensor:
        """float64 CPU copy of ``self.sigmas`` / ``self.timesteps`` (kept until they change): a
        step reads python floats from it, with no device sync when the schedule is on a GPU."""
        value = getattr(self, name)
        key = (value, value._version)
        cached = self.__dict__.get(f"_fused_{name}")
        if cached is None or not _same(cached[0], key):
            cached = self.__dict__[f"_fused_{name}"] = (key, value.detach().to("cpu", torch.float64))
        return cached[1]

    def _sigmas_unsupported(self) -> str | None:
        sigmas = self._cpu("sigmas")
        return "sigmas outside [0, 1]" if bool((sigmas < 0).any() or (sigmas > 1).any()) else None

    def step(
        self,
        model_output,
        timestep,
        sample,
        s_churn: float = 0.0,
        s_tmin: float = 0.0,
        s_tmax: float = float("inf"),
        s_noise: float = 1.0,
        generator=None,
        per_token_timesteps=None,
        return_dict: bool = True,
        variance_noise=None,
    ):
        stock = dict(
            s_churn=s_churn,
            s_tmin=s_tmin,
            s_tmax=s_tmax,
            s_noise=s_noise,
            generator=generator,
            per_token_timesteps=per_token_timesteps,
            return_dict=return_dict,
        )
        if isinstance(timestep, int) or (isinstance(timestep, torch.Tensor) and not timestep.is_floating_point()):
            return super().step(model_output, timestep, sample, **stock)  # diffusers' error for step indices
        if per_token_timesteps is not None:
            reason = "per_token_timesteps"
        elif sample.dtype not in _DTYPES:
            reason = f"dtype {sample.dtype}"
        elif model_output.shape != sample.shape or model_output.dtype != sample.dtype:
            reason = "a model_output whose shape or dtype differs from sample's"
        else:
            reason = self._sigmas_unsupported()
        if reason is not None:
            if variance_noise is not None:
                raise ValueError(f"variance_noise needs the fused step, which does not support {reason}")
            self._fallback(reason)
            return super().step(model_output, timestep, sample, **stock)
        if self.step_index is None:
            self._init_step_index(timestep)
        sigmas = self._cpu("sigmas")
        sigma, sigma_next = float(sigmas[self.step_index]), float(sigmas[self.step_index + 1])
        stochastic = bool(self.config.stochastic_sampling)
        noise, seed = self._noise_and_seed(generator, variance_noise, sample) if stochastic else (None, None)
        prev_sample = tkf.flow_euler_step(
            model_output,
            sigma,
            sigma_next,
            sample,
            stochastic_sampling=stochastic,
            noise=noise,
            seed=seed,
            backend=self.backend,
        )
        self._step_index += 1
        if not return_dict:
            return (prev_sample,)
        return FlowMatchEulerDiscreteSchedulerOutput(prev_sample=prev_sample)

    def scale_noise(self, sample, timestep, noise=None):
        fused = (
            isinstance(noise, torch.Tensor)
            and isinstance(timestep, torch.Tensor)
            and timestep.dim() == 1
            and timestep.shape[0] in (1, sample.shape[0] if sample.dim() else -1)
            and sample.dtype in _DTYPES
            and noise.shape == sample.shape
            and noise.dtype == sample.dtype
            and self._sigmas_unsupported() is None
        )
        if not fused:
            return super().scale_noise(sample, timestep, noise)
        # the sigma of each timestep, found as diffusers does (by value, or the begin / current step)
        if self.begin_index is None:
            schedule = self._cpu("timesteps").float()
            index = [self.index_for_timestep(t, schedule) for t in timestep.detach().cpu().float()]
        else:
            index = [self.step_index if self.step_index is not None else self.begin_index] * timestep.shape[0]
        sigma = self._cpu("sigmas")[index]
        sigma = float(sigma) if len(index) == 1 else sigma
        return tkf.flow_add_noise(sample, sigma, noise=noise, backend=self.backend)[0]
