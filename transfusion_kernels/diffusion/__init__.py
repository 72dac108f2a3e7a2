"""Diffusion ops: forward noising, DDPM and DDIM updates, and the per-image diffusion loss.

Public API::

    sched = DiffusionSchedule(1000, "linear")             # or DiffusionSchedule.from_diffusers(s)
    x_t, noise = add_noise(x0, timesteps, sched, noise=None, seed=None, backend=None)
    x_prev = ddpm_step(model_output, timestep, sample, sched, *, prev_timestep=None, ...)
    x_prev = ddim_step(model_output, timestep, sample, sched, *, prev_timestep, eta=0.0, ...)
    loss = diffusion_loss(pred, target, image_index, backend=None)

Rows: ``sample`` has shape ``[R, ...]``; a timestep is a python int (every row) or an integer
tensor of shape ``[R]`` (one per row: per image, or per patch of a packed batch; a 0-d tensor
counts for every row). Given ``noise``, the results match diffusers' ``DDPMScheduler`` /
``DDIMScheduler`` ``.step`` / ``.add_noise`` for the same configuration. Without it, noise is a
function of ``(seed, element index)`` (``transfusion_kernels.philox``), drawn inside the kernel:
the same seed gives the same output on every backend, up to float rounding. ``seed=None`` draws
a fresh seed from torch's default generator, so results follow ``torch.manual_seed``. (Under
``torch.compile`` with ``seed=None`` the noise comes from ``torch.randn_like`` instead, which
traces; pass a seed for Philox noise there.) Tensor timesteps are range-checked with one host
sync per call (not under torch.compile). Coefficients that depend on t alone come from a
per-schedule table built once per device, and python-int steps are memoised, so a sampling loop
pays a lookup, not a dozen small tensor ops, per step.

Kernel contract (every backend module ``reference``, ``triton``, ``cuda`` implements it).
All three ops are ONE fused elementwise pass with per-row coefficients ``coef`` (float32
``[R, 6]``, computed here in float64 from the schedule with plain torch ops, so they trace)::

    x0  = c[r,0] * sample + c[r,1] * model_output      # predicted clean sample
    x0  = clamp(x0, -clip_range, clip_range)            # only if clip_range is not None
    out = c[r,2] * x0 + c[r,3] * sample + c[r,4] * model_output + c[r,5] * noise

``affine_step(sample, model_output, coef, noise, seed, clip_range, return_noise)
-> (out, drawn_noise_or_None)``; row r covers the flat elements ``[r*L, (r+1)*L)``. Every
backend also takes the keyword ``has_noise=False``: every ``c[:, 5]`` is zero, draw nothing.

Loss backends: ``diffusion_loss(pred, target, image_index, compute_grad) -> (loss, dloss/dpred)``
(reference and triton; the backward is that saved gradient times the upstream scalar).

Both are registered as ``torch.library.custom_op`` (``transfusion_kernels::diffusion_affine_step``,
``transfusion_kernels::diffusion_loss``) with fake implementations and autograd, so
``torch.compile(fullgraph=True)`` traces the public functions without graph breaks.
"""
import numbers
import warnings
from typing import Optional

import torch

from transfusion_kernels.backends import Op, _info, requested_backend
from transfusion_kernels.diffusion.schedule import (
    PREDICTION_TYPES,
    VARIANCE_TYPES,
    DiffusionSchedule,
    add_noise_coefs,
    ddim_coefs,
    ddpm_coefs,
    gather_alphas,
)

__all__ = ["DiffusionSchedule", "add_noise", "ddpm_step", "ddim_step", "diffusion_loss"]

_STEP_IMPLS = {
    "reference": "transfusion_kernels.diffusion.reference",
    "triton": "transfusion_kernels.diffusion.triton",
    "cuda": "transfusion_kernels.diffusion.cuda",
}
ADD_NOISE = Op("add_noise", _STEP_IMPLS)
DDPM_STEP = Op("ddpm_step", _STEP_IMPLS)
DDIM_STEP = Op("ddim_step", _STEP_IMPLS)
LOSS = Op(
    "diffusion_loss",
    {"reference": "transfusion_kernels.diffusion.reference", "triton": "transfusion_kernels.diffusion.triton"},
)

_DTYPES = (torch.float16, torch.bfloat16, torch.float32)


# --------------------------------------------------------------------------------------------
# custom ops
# --------------------------------------------------------------------------------------------


@torch.library.custom_op("transfusion_kernels::diffusion_affine_step", mutates_args=())
def _affine_step_op(
    sample: torch.Tensor,
    model_output: Optional[torch.Tensor],
    coef: torch.Tensor,
    noise: Optional[torch.Tensor],
    seed: int,
    clip_range: Optional[float],
    return_noise: bool,
    has_noise: bool,
    backend: str,
) -> tuple[torch.Tensor, torch.Tensor]:
    seed = seed % 2**64  # carried as a signed int64 through the op schema
    out, drawn = DDPM_STEP.module(backend).affine_step(
        sample, model_output, coef, noise, seed, clip_range, return_noise, has_noise=has_noise
    )
    return out, (drawn if drawn is not None else sample.new_empty(0))


@_affine_step_op.register_fake
def _(sample, model_output, coef, noise, seed, clip_range, return_noise, has_noise, backend):
    drawn = return_noise and noise is None and has_noise
    return torch.empty_like(sample), (torch.empty_like(sample) if drawn else sample.new_empty(0))


def _affine_setup_context(ctx, inputs, output):
    sample, model_output, coef, noise, _seed, clip_range = inputs[:6]
    ctx.save_for_backward(sample, model_output, coef)
    ctx.clip_range = clip_range
    ctx.noise_given = noise is not None


def _affine_backward(ctx, grad_out, _grad_drawn):
    # The step is linear in (sample, model_output, noise) except for the clamp of x0.
    sample, model_output, coef = ctx.saved_tensors
    R = sample.shape[0]
    g = grad_out.reshape(R, -1).float()
    c = coef.reshape(R, 6, 1)
    grad_x0 = c[:, 2] * g
    if ctx.clip_range is not None:
        x0 = c[:, 0] * sample.reshape(R, -1).float()
        if model_output is not None:
            x0 = x0 + c[:, 1] * model_output.reshape(R, -1).float()
        grad_x0 = grad_x0 * (x0.abs() <= ctx.clip_range)
    grad_sample = (c[:, 0] * grad_x0 + c[:, 3] * g).to(sample.dtype).reshape(sample.shape)
    grad_mo = None
    if model_output is not None:
        grad_mo = (c[:, 1] * grad_x0 + c[:, 4] * g).to(sample.dtype).reshape(sample.shape)
    grad_noise = (c[:, 5] * g).to(sample.dtype).reshape(sample.shape) if ctx.noise_given else None
    return grad_sample, grad_mo, None, grad_noise, None, None, None, None, None


_affine_step_op.register_autograd(_affine_backward, setup_context=_affine_setup_context)


@torch.library.custom_op("transfusion_kernels::diffusion_loss", mutates_args=())
def _loss_op(
    pred: torch.Tensor, target: torch.Tensor, image_index: torch.Tensor, compute_grad: bool, backend: str
) -> tuple[torch.Tensor, torch.Tensor]:
    loss, grad = LOSS.module(backend).diffusion_loss(pred, target, image_index, compute_grad)
    return loss, (grad if grad is not None else pred.new_empty(0))


@_loss_op.register_fake
def _(pred, target, image_index, compute_grad, backend):
    grad = torch.empty_like(pred) if compute_grad else pred.new_empty(0)
    return pred.new_empty((), dtype=torch.float32), grad


def _loss_setup_context(ctx, inputs, output):
    ctx.save_for_backward(output[1])
    ctx.has_grad = inputs[3]  # compute_grad: the public function asks for it whenever autograd needs it


def _loss_backward(ctx, grad_loss, _grad_grad):
    if not ctx.has_grad:
        return None, None, None, None, None
    (unit,) = ctx.saved_tensors  # d loss / d pred, written by the forward pass
    grad_pred = (unit.float() * grad_loss).to(unit.dtype)
    return grad_pred, -grad_pred, None, None, None


_loss_op.register_autograd(_loss_backward, setup_context=_loss_setup_context)


# --------------------------------------------------------------------------------------------
# argument checks
# --------------------------------------------------------------------------------------------


def _check_tensor(x, name: str) -> None:
    if not isinstance(x, torch.Tensor):
        raise TypeError(f"{name} must be a torch.Tensor, got {type(x).__name__}")
    if x.dtype not in _DTYPES:
        raise TypeError(f"{name} must be float16, bfloat16 or float32, got {x.dtype}")
    if x.dim() < 1:
        raise ValueError(f"{name} must have a leading row dimension, got a 0-d tensor")


def _check_like(x, name: str, ref, ref_name: str) -> None:
    if not isinstance(x, torch.Tensor):
        raise TypeError(f"{name} must be a torch.Tensor, got {type(x).__name__}")
    if x.shape != ref.shape:
        raise ValueError(f"{name} must have the shape of {ref_name} {tuple(ref.shape)}, got {tuple(x.shape)}")
    if x.dtype != ref.dtype:
        raise TypeError(f"{name} must have the dtype of {ref_name} ({ref.dtype}), got {x.dtype}")
    if x.device != ref.device:
        raise ValueError(f"{name} must be on the device of {ref_name} ({ref.device}), got {x.device}")


def _check_schedule(schedule) -> None:
    if not isinstance(schedule, DiffusionSchedule):
        raise TypeError(
            f"schedule must be a DiffusionSchedule (DiffusionSchedule.from_diffusers converts a diffusers "
            f"scheduler), got {type(schedule).__name__}"
        )


def _timesteps(value, name: str, R: int, schedule: DiffusionSchedule, allow_negative: bool = False):
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


def _as_rows(t, device) -> torch.Tensor:
    if isinstance(t, torch.Tensor):
        return t.to(device).reshape(-1)
    return torch.tensor([t], dtype=torch.int64, device=device)


def _check_prev_before(prev, t, name: str) -> None:
    if isinstance(prev, int) and isinstance(t, int):
        ok = prev <= t
    elif torch.compiler.is_compiling():
        return
    else:
        device = t.device if isinstance(t, torch.Tensor) else prev.device
        ok = bool((_as_rows(prev, device) <= _as_rows(t, device)).all())
    if not ok:
        raise ValueError(f"{name} must not be larger than timestep (negative means the final, noise-free step)")


def _check_seed(seed):
    if seed is None:
        return None
    if isinstance(seed, bool) or not isinstance(seed, int):
        raise TypeError(f"seed must be a python int in [0, 2**64) or None, got {type(seed).__name__}")
    if not 0 <= seed < 2**64:
        raise ValueError(f"seed must be in [0, 2**64), got {seed}")
    return seed


def _fresh_seed() -> int:
    lo, hi = torch.randint(0, 2**32, (2,), dtype=torch.int64).tolist()
    return (hi << 32) | lo


def _clip(clip_sample: bool, clip_sample_range: float):
    if not clip_sample:
        return None
    if isinstance(clip_sample_range, bool) or not isinstance(clip_sample_range, numbers.Real):
        raise ValueError(f"clip_sample_range must be a positive real number, got {clip_sample_range!r}")
    if not clip_sample_range > 0:
        raise ValueError(f"clip_sample_range must be positive, got {clip_sample_range}")
    return float(clip_sample_range)


# --------------------------------------------------------------------------------------------
# dispatch
# --------------------------------------------------------------------------------------------

_WARNED: set = set()


def _warn_fallback(op: str, requested: str, reason: str, used: str) -> None:
    """One warning per (op, backend, reason) and process, worded as the attention dispatcher's;
    none while torch.compile traces."""
    key = (op, requested, reason)
    if key in _WARNED or torch.compiler.is_compiling():
        return
    _WARNED.add(key)
    warnings.warn(f"transfusion_kernels fallback: {op} on backend {requested!r} does not support {reason}; "
                  f"running on {used!r} instead", stacklevel=4)


def _loss_backend(backend, device) -> str:
    """diffusion_loss has no CUDA C++ kernel: asked for the cuda backend (where it can run: the
    same check, and error, as the other ops), the loss runs on triton, else the reference."""
    if requested_backend(backend) != "cuda":
        return LOSS.resolve(backend, device)
    ADD_NOISE.resolve("cuda", device)  # raises BackendUnavailableError where cuda cannot run
    used = "triton" if LOSS.has("triton") and _info("triton", device).available else "reference"
    _warn_fallback(LOSS.name, "cuda", "any input (it has no CUDA C++ kernel)", used)
    return used



def _coef_rows(coef: torch.Tensor, R: int, device) -> torch.Tensor:
    return coef.to(device=device, dtype=torch.float32).expand(R, 6).contiguous()


def _alphas(schedule, t, prev):
    """Per-row (t, alphas_cumprod[t], alphas_cumprod[prev]) on the timesteps' device (the CPU for
    python ints): [1] for scalars, [R] for per-row timesteps."""
    device = next((x.device for x in (t, prev) if isinstance(x, torch.Tensor)), torch.device("cpu"))
    table = schedule.alphas_cumprod_on(device)
    t_rows, prev_rows = torch.broadcast_tensors(_as_rows(t, device), _as_rows(prev, device))
    return t_rows, gather_alphas(table, t_rows), gather_alphas(table, prev_rows)


def _table_rows(schedule, key, coefs_of_all_t, t, R, device):
    """Coefficients of timesteps ``t`` from a per-schedule [T, 6] table (built once per device)."""
    table = schedule.cached((key, device), lambda: coefs_of_all_t().to(device, torch.float32))
    if isinstance(t, int):
        return table[t : t + 1].expand(R, 6).contiguous()
    return table.index_select(0, t.to(device).reshape(-1)).expand(R, 6).contiguous()


# The coefficient builders: checked timesteps -> float32 [R, 6] on ``device``, and whether any
# row adds noise. The public functions below and the benchmarks use them. Coefficients that
# depend on t alone come from a per-schedule table; python-int (t, prev) pairs are memoised.


def add_noise_coef(timesteps, R, schedule, device):
    t = _timesteps(timesteps, "timesteps", R, schedule)
    return _table_rows(schedule, "add_noise", lambda: add_noise_coefs(schedule.alphas_cumprod), t, R, device), True


def ddpm_coef(timestep, R, schedule, device, prev_timestep=None, prediction_type="epsilon", variance_type="fixed_small"):
    if prediction_type not in PREDICTION_TYPES:
        raise ValueError(f"prediction_type must be one of {PREDICTION_TYPES}, got {prediction_type!r}")
    if variance_type not in VARIANCE_TYPES:
        raise ValueError(f"variance_type must be one of {VARIANCE_TYPES}, got {variance_type!r}")
    t = _timesteps(timestep, "timestep", R, schedule)
    has_noise = not (isinstance(t, int) and t == 0)
    if prev_timestep is None:  # prev = t - 1: a function of t alone

        def all_t():
            ts = torch.arange(schedule.num_train_timesteps)
            _, abar_t, abar_prev = _alphas(schedule, ts, ts - 1)
            return ddpm_coefs(abar_t, abar_prev, ts, prediction_type, variance_type)

        return _table_rows(schedule, ("ddpm", prediction_type, variance_type), all_t, t, R, device), has_noise
    prev = _timesteps(prev_timestep, "prev_timestep", R, schedule, allow_negative=True)
    _check_prev_before(prev, t, "prev_timestep")

    def build():
        t_rows, abar_t, abar_prev = _alphas(schedule, t, prev)
        return _coef_rows(ddpm_coefs(abar_t, abar_prev, t_rows, prediction_type, variance_type), R, device)

    if isinstance(t, int) and isinstance(prev, int):
        return schedule.cached(("ddpm", t, prev, prediction_type, variance_type, R, device), build), has_noise
    return build(), has_noise


def ddim_coef(timestep, R, schedule, device, prev_timestep, eta=0.0, prediction_type="epsilon",
              use_clipped_model_output=False):
    if prediction_type not in PREDICTION_TYPES:
        raise ValueError(f"prediction_type must be one of {PREDICTION_TYPES}, got {prediction_type!r}")
    if not isinstance(eta, numbers.Real) or isinstance(eta, bool) or not 0.0 <= eta <= 1.0:
        raise ValueError(f"eta must be a float in [0, 1], got {eta!r}")
    t = _timesteps(timestep, "timestep", R, schedule)
    prev = _timesteps(prev_timestep, "prev_timestep", R, schedule, allow_negative=True)
    _check_prev_before(prev, t, "prev_timestep")
    eta = float(eta)

    def build():
        _, abar_t, abar_prev = _alphas(schedule, t, prev)
        return _coef_rows(ddim_coefs(abar_t, abar_prev, prediction_type, eta, use_clipped_model_output), R, device)

    if isinstance(t, int) and isinstance(prev, int):
        key = ("ddim", t, prev, eta, prediction_type, use_clipped_model_output, R, device)
        return schedule.cached(key, build), eta > 0
    return build(), eta > 0


def _run(op, sample, model_output, coef, noise, seed, clip_range, has_noise, return_noise, backend):
    name = op.resolve(backend, sample.device)
    if noise is not None:
        _check_like(noise, "noise", sample, "sample")
        noise = noise.contiguous()
    seed = _check_seed(seed)
    if not has_noise:
        noise, seed = None, 0
    elif noise is None and seed is None:
        if torch.compiler.is_compiling():
            noise = torch.randn_like(sample)  # a traced draw; Philox needs a concrete seed
        else:
            seed = _fresh_seed()
    if seed is None:
        seed = 0
    out, drawn = _affine_step_op(
        sample.contiguous(),
        model_output.contiguous() if model_output is not None else None,
        coef,
        noise,
        seed - 2**64 if seed >= 2**63 else seed,
        clip_range,
        return_noise,
        has_noise,
        name,
    )
    return out, (noise if noise is not None else (drawn if return_noise and has_noise else None))


# --------------------------------------------------------------------------------------------
# public API
# --------------------------------------------------------------------------------------------


def add_noise(x0, timesteps, schedule, noise=None, seed=None, backend=None):
    """Forward diffusion: ``x_t = sqrt(abar_t) x0 + sqrt(1 - abar_t) noise``.

    Returns ``(x_t, noise)``: the noise given, or the noise drawn from ``seed`` (in x0's dtype;
    passing it back as ``noise`` reproduces x_t exactly). Matches diffusers' ``add_noise``."""
    _check_tensor(x0, "x0")
    _check_schedule(schedule)
    coef, _ = add_noise_coef(timesteps, x0.shape[0], schedule, x0.device)
    return _run(ADD_NOISE, x0, None, coef, noise, seed, None, True, True, backend)


def ddpm_step(
    model_output,
    timestep,
    sample,
    schedule,
    *,
    prev_timestep=None,
    prediction_type="epsilon",
    variance_type="fixed_small",
    clip_sample=False,
    clip_sample_range=1.0,
    noise=None,
    seed=None,
    backend=None,
):
    """One ancestral DDPM step x_t -> x_prev (Ho et al. 2020), as diffusers' ``DDPMScheduler.step``.

    ``prev_timestep`` defaults to ``timestep - 1``: diffusers' default spacing
    ``t - num_train_timesteps // num_inference_steps`` with one-step spacing. For skipped steps
    pass the next timestep of the inference schedule (the posterior then uses its
    ``alphas_cumprod``, as diffusers does with ``num_inference_steps < num_train_timesteps``);
    a negative value means ``alpha_prod_prev = 1``. No noise is added on rows with ``t = 0``.

    ``variance_type``: ``fixed_small`` / ``fixed_small_log`` (posterior variance, clamped at 1e-20
    as diffusers), ``fixed_large`` / ``fixed_large_log`` (beta_t). ``fixed_large_log`` uses the
    intended sigma = sqrt(beta_t) (GLIDE's max log-variance); diffusers 0.42's own
    ``DDPMScheduler.step`` returns NaN for it because it takes the square root of log(beta_t).
    """
    _check_tensor(sample, "sample")
    _check_like(model_output, "model_output", sample, "sample")
    _check_schedule(schedule)
    clip_range = _clip(clip_sample, clip_sample_range)
    coef, has_noise = ddpm_coef(
        timestep, sample.shape[0], schedule, sample.device, prev_timestep, prediction_type, variance_type
    )
    return _run(DDPM_STEP, sample, model_output, coef, noise, seed, clip_range, has_noise, False, backend)[0]


def ddim_step(
    model_output,
    timestep,
    sample,
    schedule,
    *,
    prev_timestep,
    eta=0.0,
    prediction_type="epsilon",
    clip_sample=False,
    clip_sample_range=1.0,
    use_clipped_model_output=False,
    noise=None,
    seed=None,
    backend=None,
):
    """One DDIM step x_t -> x_prev (Song et al. 2021, eq. 12), as diffusers' ``DDIMScheduler.step``.

    ``prev_timestep``: diffusers uses ``t - num_train_timesteps // num_inference_steps``; negative
    means ``alpha_prod_prev = 1`` (``final_alpha_cumprod`` with ``set_alpha_to_one=True``; pass 0
    to get ``set_alpha_to_one=False``). ``eta`` in [0, 1] scales the noise (sigma from
    diffusers' ``_get_variance``); ``eta = 0`` is deterministic and ignores ``noise``/``seed``.
    ``use_clipped_model_output`` re-derives the noise estimate from the clipped x0 (GLIDE)."""
    _check_tensor(sample, "sample")
    _check_like(model_output, "model_output", sample, "sample")
    _check_schedule(schedule)
    clip_range = _clip(clip_sample, clip_sample_range)
    coef, has_noise = ddim_coef(
        timestep, sample.shape[0], schedule, sample.device, prev_timestep, eta, prediction_type,
        use_clipped_model_output,
    )
    return _run(DDIM_STEP, sample, model_output, coef, noise, seed, clip_range, has_noise, False, backend)[0]


def diffusion_loss(pred, target, image_index, backend=None):
    """Per-image diffusion loss of a packed batch.

    ``pred``, ``target``: ``[P, C]`` patch rows; ``image_index``: int ``[P]``, the image of each
    row, -1 for rows that are not image patches (ignored). The loss is the mean squared error of
    each image (over its patches and channels), averaged over the images with at least one patch;
    float32; 0 (with zero gradient) when there is no image. Differentiable in pred and target."""
    _check_tensor(pred, "pred")
    if pred.dim() != 2:
        raise ValueError(f"pred must have shape [P, C], got {tuple(pred.shape)}")
    if pred.shape[1] == 0:
        raise ValueError("pred must have at least one channel (C > 0)")
    _check_like(target, "target", pred, "pred")
    if not isinstance(image_index, torch.Tensor):
        raise TypeError(f"image_index must be an int32/int64 tensor, got {type(image_index).__name__}")
    if image_index.dtype not in (torch.int32, torch.int64):
        raise TypeError(f"image_index must be int32 or int64, got {image_index.dtype}")
    if image_index.shape != (pred.shape[0],):
        raise ValueError(f"image_index must have shape [{pred.shape[0]}] (one per row of pred), got {tuple(image_index.shape)}")
    if image_index.device != pred.device:
        raise ValueError(f"image_index must be on the device of pred ({pred.device}), got {image_index.device}")
    if not torch.compiler.is_compiling() and bool((image_index < -1).any()):
        raise ValueError("image_index must be >= -1 (-1 marks rows that are not image patches)")
    name = _loss_backend(backend, pred.device)
    compute_grad = torch.is_grad_enabled() and (pred.requires_grad or target.requires_grad)
    loss, _ = _loss_op(pred.contiguous(), target.contiguous(), image_index.contiguous(), compute_grad, name)
    return loss
